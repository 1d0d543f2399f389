//! GupShup enterprise WhatsApp gateway (`SendMessage`), where errors come back as
//! `{"response":{"status":"error","id":"<code>",…}}`, even with HTTP 200.
//!
//! <https://docs.gupshup.io/docs/api-reference>

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::{classify_http, Answer, Client, Job, Outcome, Prepared};
use crate::domain::Channel;

pub struct Gupshup {
    pub base_url: String,
    pub userid: String,
    pub password: SecretString,
    /// `HSM` for a registered template (business-initiated messages need one), `TEXT` in a session.
    pub msg_type: String,
    pub is_template: bool,
    pub request_timeout: Duration,
}

/// Error codes that will not heal by retrying (askeva.io copy of the enterprise doc): auth, user, number,
/// method, credits, pack, permissions, media type. 100 ("unknown exception") is worth another try.
const PERMANENT_CODES: &[&str] = &[
    "101", "102", "103", "104", "105", "106", "112", "123", "124", "171", "175", "328",
];

impl Client for Gupshup {
    fn channel(&self) -> Channel {
        Channel::Whatsapp
    }

    fn is_live(&self) -> bool {
        !self.userid.trim().is_empty() && !self.password.expose_secret().trim().is_empty()
    }

    fn prepare(&self, job: &Job) -> Prepared {
        let mut form = vec![
            ("method".to_owned(), "SendMessage".to_owned()),
            ("userid".into(), self.userid.clone()),
            ("password".into(), self.password.expose_secret().to_owned()),
            ("auth_scheme".into(), "plain".into()),
            ("v".into(), "1.1".into()),
            ("format".into(), "json".into()),
            (
                "send_to".into(),
                job.phone.trim_start_matches('+').to_owned(),
            ),
            ("msg".into(), job.text.clone()),
            ("msg_type".into(), self.msg_type.clone()),
            ("data_encoding".into(), "text".into()),
        ];
        if self.is_template {
            form.push(("isTemplate".into(), "true".into()));
        }
        form.push(("extra".into(), job.greeting_ref.clone()));
        Prepared {
            url: self.base_url.clone(),
            form,
            basic_auth: None,
            secret_fields: &["password"],
            timeout: self.request_timeout,
        }
    }

    fn classify(&self, answer: &Answer) -> Outcome {
        let parsed: Option<serde_json::Value> = serde_json::from_str(&answer.body).ok();
        let response = parsed.as_ref().map(|v| &v["response"]);
        let field = |name: &str| {
            response
                .and_then(|r| match &r[name] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        let status = field("status");
        if (200..300).contains(&answer.status) && status.eq_ignore_ascii_case("success") {
            let id = field("id");
            return Outcome::Accepted {
                provider_id: (!id.is_empty()).then_some(id),
                detail: format!("HTTP {}: success", answer.status),
            };
        }
        if status.eq_ignore_ascii_case("error") {
            let code = field("id");
            let reason = format!("GupShup error {code}: {}", field("details"));
            // A 5xx or 429 with an error body is still the server's trouble, not ours.
            if PERMANENT_CODES.contains(&code.as_str())
                && answer.status < 500
                && answer.status != 429
            {
                return Outcome::Permanent { reason };
            }
            return Outcome::Transient {
                reason,
                retry_after: answer.retry_after,
            };
        }
        if (200..300).contains(&answer.status) {
            // 2xx without the JSON we asked for: unknown whether it went out; send again.
            return Outcome::Transient {
                reason: format!(
                    "HTTP {} with an unreadable body: {}",
                    answer.status,
                    answer.body.chars().take(200).collect::<String>()
                ),
                retry_after: None,
            };
        }
        classify_http(
            answer.status,
            answer.retry_after,
            format!(
                "HTTP {}: {}",
                answer.status,
                answer.body.chars().take(200).collect::<String>()
            ),
        )
    }
}
