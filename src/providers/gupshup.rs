//! GupShup enterprise WhatsApp gateway (`SendMessage`), where errors come back as
//! `{"response":{"status":"error","id":"<code>",…}}`, even with HTTP 200.
//!
//! <https://docs.gupshup.io/docs/api-reference>

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::{classify_http, non_blank, Answer, Client, Job, Outcome, Prepared};
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
            return Outcome::Accepted {
                provider_id: non_blank(Some(&field("id"))),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Answer;

    fn client() -> Gupshup {
        Gupshup {
            base_url: "https://media.smsgupshup.com/GatewayAPI/rest".into(),
            userid: "2000123456".into(),
            password: SecretString::from("pw".to_owned()),
            msg_type: "HSM".into(),
            is_template: true,
            request_timeout: Duration::from_secs(15),
        }
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            retry_after: None,
            body: body.into(),
        }
    }

    #[test]
    fn reads_success_and_error_bodies_whatever_the_http_status() {
        let c = client();
        let ok = r#"{"response":{"id":"4340925846643462155-31668054994359383","phone":"919800000001","details":"","status":"success"}}"#;
        assert!(matches!(c.classify(&answer(200, ok)),
            Outcome::Accepted { provider_id: Some(ref id), .. } if id == "4340925846643462155-31668054994359383"));
        let bad_number = r#"{"response":{"id":"105","phone":"","details":"The phone number \"666\" is not a valid phone number","status":"error"}}"#;
        assert!(
            matches!(c.classify(&answer(200, bad_number)), Outcome::Permanent { ref reason } if reason.starts_with("GupShup error 105"))
        );
        let auth = r#"{"response":{"id":102,"phone":"","details":"Authentication failed","status":"error"}}"#;
        assert!(matches!(
            c.classify(&answer(200, auth)),
            Outcome::Permanent { .. }
        ));
        let unknown = r#"{"response":{"id":"100","details":"Unknown exception","status":"error"}}"#;
        assert!(matches!(
            c.classify(&answer(200, unknown)),
            Outcome::Transient { .. }
        ));
        assert!(matches!(
            c.classify(&answer(500, bad_number)),
            Outcome::Transient { .. }
        ));
        assert!(matches!(
            c.classify(&answer(200, "success | 919800000001 | 123")),
            Outcome::Transient { .. }
        ));
        assert!(matches!(
            c.classify(&answer(502, "")),
            Outcome::Transient { .. }
        ));
        assert!(matches!(
            c.classify(&answer(401, "")),
            Outcome::Permanent { .. }
        ));
    }

    #[test]
    fn sends_digits_without_plus_and_hides_the_password_when_stored() {
        let p = client().prepare(&Job {
            delivery_id: "d".into(),
            channel: Channel::Whatsapp,
            phone: "+919800000001".into(),
            greeting_ref: "ref".into(),
            dlt_template_id: String::new(),
            text: "hi".into(),
        });
        assert!(p.form.contains(&("send_to".into(), "919800000001".into())));
        let stored = p.redacted_json();
        assert!(!stored.contains("\"pw\""), "{stored}");
    }

    #[test]
    fn a_blank_id_is_no_provider_id() {
        let body = r#"{"response":{"id":"  ","status":"success"}}"#;
        assert!(!matches!(
            client().classify(&answer(200, body)),
            Outcome::Accepted {
                provider_id: Some(_),
                ..
            }
        ));
    }
}
