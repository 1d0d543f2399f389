//! Provider clients: each channel's request is *prepared* as data (so dry-run can store exactly what
//! would go out) and each answer is *classified* into an [`Outcome`] the dispatcher acts on.

pub mod exotel;
pub mod gupshup;
pub mod registry;

pub use crate::domain::AccountProblem;
pub use registry::{Registered, Registry};

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::domain::{Channel, Report};

/// What one delivery asks a provider to do.
#[derive(Debug, Clone)]
pub struct Job {
    pub delivery_id: String,
    pub channel: Channel,
    /// E.164.
    pub phone: String,
    pub greeting_ref: String,
    /// The SMS or WhatsApp text (empty for calls).
    pub text: String,
    /// The DLT template id the SMS text is registered under (its message kind's); empty for none.
    pub dlt_template_id: String,
}

/// A request ready to send: method, URL, form fields and credentials, kept apart so the stored copy
/// can leave the secrets out.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub url: String,
    pub form: Vec<(String, String)>,
    pub basic_auth: Option<(String, SecretString)>,
    /// Form fields whose values are secrets (GupShup's password).
    pub secret_fields: &'static [&'static str],
    pub timeout: Duration,
}

/// The stored, secret-free copy of a request.
#[derive(Debug, Clone, Serialize)]
pub struct RedactedRequest {
    pub method: &'static str,
    pub url: String,
    pub basic_auth_user: Option<String>,
    pub form: Vec<(String, String)>,
}

impl Prepared {
    /// The request as an operator may see it: passwords, the API token and the webhook token inside
    /// callback URLs replaced.
    pub fn redacted(&self) -> RedactedRequest {
        RedactedRequest {
            method: "POST",
            url: redact_url_token(&self.url),
            // Exotel's basic-auth user is the API key: half a credential, so only a hint of it is kept
            // (enough to tell which key was configured).
            basic_auth_user: self.basic_auth.as_ref().map(|(user, _)| mask_key(user)),
            form: self
                .form
                .iter()
                .map(|(k, v)| {
                    if self.secret_fields.contains(&k.as_str()) {
                        (k.clone(), "[REDACTED]".to_owned())
                    } else {
                        (k.clone(), redact_url_token(v))
                    }
                })
                .collect(),
        }
    }

    pub fn redacted_json(&self) -> String {
        serde_json::to_string(&self.redacted()).unwrap_or_default()
    }
}

/// `a1b2c3d4e5f6…` → `a1b2****`; keys too short to spare four characters show nothing.
fn mask_key(key: &str) -> String {
    if key.chars().count() < 12 {
        return "****".to_owned();
    }
    let head: String = key.chars().take(4).collect();
    format!("{head}****")
}

/// `…?token=abc&x=1` → `…?token=[REDACTED]&x=1`.
fn redact_url_token(s: &str) -> String {
    let Some(start) = s.find("token=") else {
        return s.to_owned();
    };
    let value_start = start + "token=".len();
    let value_end = s[value_start..]
        .find('&')
        .map(|i| value_start + i)
        .unwrap_or(s.len());
    format!("{}[REDACTED]{}", &s[..value_start], &s[value_end..])
}

/// A provider id as answered, trimmed; blank is none. Callbacks name a request by this id (cleaned the
/// same way at the edge), so a blank one could never be matched and must not be stored as if it could.
pub fn non_blank(id: Option<&str>) -> Option<String> {
    id.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// What became of one provider request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The provider took it; `provider_id` is what its callbacks will name.
    Accepted {
        provider_id: Option<String>,
        detail: String,
    },
    /// Worth trying again: timeout, connection error, 429, 5xx, Exotel's 503 overload, or any answer
    /// that leaves it unknown whether the request took effect (sent again: a duplicate call is better
    /// than a missed one).
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Will fail the same way again: bad number, DND block, auth, plan limits.
    Permanent { reason: String },
}

/// The answer of a provider, as read off the wire.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: String,
}

/// A channel's client: builds its request and reads its answers.
pub trait Client: Send + Sync {
    fn channel(&self) -> Channel;
    /// Whether credentials are set; without them the channel runs dry-run.
    fn is_live(&self) -> bool;
    /// Whether an accepted request gets a final report (callback or look-up) to wait for. Without one
    /// acceptance is as far as we can see.
    fn reports_outcome(&self) -> bool {
        false
    }
    fn prepare(&self, job: &Job) -> Prepared;
    fn classify(&self, answer: &Answer) -> Outcome;
    /// Whether this answer means every later request of this lane will fail the same way
    /// (credentials refused, no credit, a blocked sender or template): it then raises an account
    /// alarm. Read beside [`Client::classify`], which still decides what becomes of the delivery.
    fn account_problem(&self, _answer: &Answer) -> Option<AccountProblem> {
        None
    }
    /// Where to look up a request's outcome when its status callback never came, if the API has such
    /// a look-up.
    fn status_lookup(&self, _provider_id: &str) -> Option<Prepared> {
        None
    }
    /// The report a look-up's answer gives on request `provider_id`, in our own words.
    fn read_report(&self, _provider_id: &str, _answer: &Answer) -> Option<Report> {
        None
    }
}

/// Sends a prepared look-up as a GET (no body).
pub async fn fetch(http: &reqwest::Client, prepared: &Prepared) -> Result<Answer, Outcome> {
    send(http.get(&prepared.url), prepared).await
}

/// Sends a prepared request as a form POST. Transport failures come back as transient outcomes.
pub async fn execute(http: &reqwest::Client, prepared: &Prepared) -> Result<Answer, Outcome> {
    send(http.post(&prepared.url).form(&prepared.form), prepared).await
}

async fn send(req: reqwest::RequestBuilder, prepared: &Prepared) -> Result<Answer, Outcome> {
    let mut req = req
        .timeout(prepared.timeout)
        .header(reqwest::header::ACCEPT, "application/json");
    if let Some((user, pass)) = &prepared.basic_auth {
        req = req.basic_auth(user, Some(pass.expose_secret()));
    }
    let started = Instant::now();
    let res = req
        .send()
        .await
        .map_err(|e| transport_failure(&e, started))?;
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = res
        .text()
        .await
        .map_err(|e| transport_failure(&e, started))?;
    Ok(Answer {
        status,
        retry_after,
        body,
    })
}

fn transport_failure(e: &reqwest::Error, started: Instant) -> Outcome {
    let what = if e.is_timeout() {
        format!(
            "no answer within {:.1}s (outcome unknown)",
            started.elapsed().as_secs_f64()
        )
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed mid-way (outcome unknown)".to_owned()
    };
    // The error's own text may hold the URL; the URL may hold nothing secret (auth is a header) but
    // keep the reason short and stable.
    Outcome::Transient {
        reason: what,
        retry_after: None,
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// How long a provider is paused after a 429 or 503 that named no Retry-After.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(5);

/// Status-code classification shared by Exotel's APIs (developer.exotel.com/api/http-status-codes).
pub fn classify_http(status: u16, retry_after: Option<Duration>, reason: String) -> Outcome {
    match status {
        // Overload (429; Exotel's SMS answers 503): slow the whole provider down, not only this request.
        429 | 503 => Outcome::Transient {
            reason,
            retry_after: retry_after.or(Some(DEFAULT_BACKOFF)),
        },
        408 | 425 | 500..=599 => Outcome::Transient {
            reason,
            retry_after,
        },
        _ => Outcome::Permanent { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_tokens_and_passwords() {
        let p = Prepared {
            url: "http://x/y?token=abc".into(),
            form: vec![
                (
                    "StatusCallback".into(),
                    "https://h/exotel/call-status?token=s3cret&a=1".into(),
                ),
                ("password".into(), "pw".into()),
                ("msg".into(), "hello".into()),
            ],
            basic_auth: Some(("key".into(), SecretString::from("tok".to_owned()))),
            secret_fields: &["password"],
            timeout: Duration::from_secs(1),
        };
        let json = p.redacted_json();
        assert!(
            !json.contains("s3cret") && !json.contains("\"pw\"") && !json.contains("tok\""),
            "{json}"
        );
        assert!(json.contains("token=[REDACTED]&a=1"), "{json}");
        assert!(json.contains("hello"));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn the_api_key_is_masked_in_the_stored_request() {
        // A partial Exotel configuration (key set, token missing) runs dry-run and stores its request.
        let p = Prepared {
            url: "https://api.exotel.com/v1/Accounts/acme/Calls/connect.json".into(),
            form: vec![("From".into(), "+919800000001".into())],
            basic_auth: Some((
                "a1b2c3d4e5f6a7b8c9d0".into(),
                SecretString::from(String::new()),
            )),
            secret_fields: &[],
            timeout: Duration::from_secs(1),
        };
        let json = p.redacted_json();
        assert!(!json.contains("a1b2c3d4e5f6a7b8c9d0"), "{json}");
        assert!(!json.contains("e5f6a7b8"), "{json}");
        let user = p.redacted().basic_auth_user.unwrap();
        assert!(user.starts_with("a1b2") && user.contains('*'), "{user}");
        // Short keys show nothing of themselves.
        let short = Prepared {
            basic_auth: Some(("k".into(), SecretString::from(String::new()))),
            ..p
        };
        assert_eq!(short.redacted().basic_auth_user.as_deref(), Some("****"));
    }
}
