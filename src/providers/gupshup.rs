//! GupShup enterprise WhatsApp gateway (`SendMessage`, `OPT_IN`), where errors come back as
//! `{"response":{"status":"error","id":"<code>",…}}`, even with HTTP 200, and its delivery reports
//! (`SENT`, `DELIVERED`, `READ`, anything else a failure), read into provider-neutral reports.
//!
//! <https://docs.gupshup.io/docs/api-reference>

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::{classify_http, non_blank, Answer, Client, Job, Outcome, Prepared};
use crate::domain::{mask, Channel, Report, ReportOutcome};

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

    /// GupShup posts delivery reports to `/gupshup/dlr`; without one by the deadline a message is
    /// unconfirmed (the enterprise gateway has no look-up).
    fn reports_outcome(&self) -> bool {
        true
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

    /// Error codes of the enterprise gateway (API-FACTS §6a) that refuse the account: 102 auth
    /// failed, 103 no such userid, 104 user disabled, 123 insufficient credits, 124 WhatsApp pack
    /// expired; and a 401.
    fn account_problem(&self, answer: &Answer) -> Option<super::AccountProblem> {
        let parsed: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
        let r = &parsed["response"];
        let code = match &r["id"] {
            serde_json::Value::String(s) => s.trim().to_owned(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        let is_error = r["status"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("error"));
        let reason = match (is_error, code.as_str()) {
            (true, "102" | "103" | "104") => "auth",
            (true, "123") => "credit",
            (true, "124") => "pack_expired",
            _ if answer.status == 401 => "auth",
            _ => return None,
        };
        let details: String = r["details"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        Some(super::AccountProblem {
            reason,
            detail: format!("HTTP {}: GupShup error {code}: {details}", answer.status),
        })
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

impl Gupshup {
    /// The `OPT_IN` request for one number (E.164), with the same credentials and format as a send.
    pub fn opt_in(&self, phone: &str) -> Prepared {
        Prepared {
            url: self.base_url.clone(),
            form: vec![
                ("method".to_owned(), "OPT_IN".to_owned()),
                ("userid".into(), self.userid.clone()),
                ("password".into(), self.password.expose_secret().to_owned()),
                ("auth_scheme".into(), "plain".into()),
                ("v".into(), "1.1".into()),
                ("format".into(), "json".into()),
                (
                    "phone_number".into(),
                    phone.trim_start_matches('+').to_owned(),
                ),
                ("channel".into(), "WHATSAPP".into()),
            ],
            basic_auth: None,
            secret_fields: &["password"],
            timeout: self.request_timeout,
        }
    }

    /// Whether an `OPT_IN` answer says the number is opted in; otherwise why not.
    pub fn read_opt_in(&self, answer: &Answer) -> Result<(), String> {
        match self.classify(answer) {
            Outcome::Accepted { .. } => Ok(()),
            Outcome::Transient { reason, .. } | Outcome::Permanent { reason } => {
                Err(crate::domain::mask_numbers(&reason))
            }
        }
    }
}

/// Reads one delivery report's field, a string or a number, by its name in GupShup's JSON.
fn dlr_field(item: &serde_json::Value, name: &str) -> Option<String> {
    let map = item.as_object()?;
    let value = map
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)?;
    match value {
        serde_json::Value::String(s) => non_blank(Some(s)),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The reports in a delivery-report body: a JSON array of objects, as GupShup posts them, or a single
/// object. Items without an `externalId` name nothing and are left out.
pub fn dlr_reports(body: &serde_json::Value) -> Vec<Report> {
    let one = |item: &serde_json::Value| dlr_report(|name| dlr_field(item, name));
    match body {
        serde_json::Value::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// One delivery report from its fields (`field("externalId")`, …), however they were posted.
/// <https://github.com/samagra-comms/adapter> `GSWhatsappReport.java`: `eventType` `SENT`,
/// `DELIVERED`, `READ`; anything else is a failure, whose `errorCode` and `cause` are kept as given.
pub fn dlr_report(field: impl Fn(&str) -> Option<String>) -> Option<Report> {
    let provider_id = non_blank(field("externalId").as_deref())?;
    let event = field("eventType").unwrap_or_default();
    let code = field("errorCode");
    let cause = field("cause").unwrap_or_default();
    let outcome = match event.to_ascii_uppercase().as_str() {
        "SENT" => ReportOutcome::Progress,
        "DELIVERED" => ReportOutcome::Delivered,
        "READ" => ReportOutcome::Read,
        _ => ReportOutcome::Failed {
            reason: format!(
                "GupShup {}: errorCode {}, cause {}",
                if event.is_empty() {
                    "(no eventType)"
                } else {
                    &event
                },
                code.as_deref().unwrap_or("(none)"),
                if cause.is_empty() { "(none)" } else { &cause },
            ),
            code: code.clone(),
        },
    };
    let mut detail = vec![format!("eventType={event}")];
    if let Some(code) = &code {
        detail.push(format!("errorCode={code}"));
    }
    if !cause.is_empty() {
        detail.push(format!("cause={cause}"));
    }
    if let Some(dest) = field("destAddr") {
        detail.push(format!("destAddr={}", mask(&dest)));
    }
    if let Some(ts) = field("eventTs") {
        detail.push(format!("eventTs={ts}"));
    }
    Some(Report {
        channel: Channel::Whatsapp,
        provider_id,
        // The reference we sent as `extra`, echoed in the report.
        reference: non_blank(field("extra").as_deref()),
        outcome,
        provider_status: event,
        detail: detail.join(" "),
        account_problem: None,
    })
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
    fn auth_credit_and_pack_errors_are_account_problems_a_bad_number_is_not() {
        let reason = |status, body: &str| {
            client()
                .account_problem(&answer(status, body))
                .map(|p| p.reason)
        };
        let error = |code: &str| {
            format!(r#"{{"response":{{"id":"{code}","phone":"","details":"x","status":"error"}}}}"#)
        };
        assert_eq!(reason(200, &error("102")), Some("auth"));
        assert_eq!(reason(200, &error("104")), Some("auth"));
        assert_eq!(reason(200, &error("123")), Some("credit"));
        assert_eq!(reason(200, &error("124")), Some("pack_expired"));
        assert_eq!(reason(200, &error("105")), None, "one recipient's number");
        assert_eq!(reason(200, &error("100")), None);
        assert_eq!(
            reason(
                401,
                r#"{"message":"Authentication Failed","status":"error"}"#
            ),
            Some("auth")
        );
        assert_eq!(
            reason(
                200,
                r#"{"response":{"id":"1","phone":"91","details":"","status":"success"}}"#
            ),
            None
        );
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

    /// The real report from samagra-comms/adapter `GupShupWhatsappAdapterTest.java`.
    #[test]
    fn reads_the_delivery_report_array() {
        let body = serde_json::json!([
            {"srcAddr":"TESTSM","channel":"WHATSAPP","externalId":"4340925846643462155-31668054994359383",
             "cause":"SENT","errorCode":"025","destAddr":"919311415686","eventType":"SENT","eventTs":1625655218000_i64},
            {"externalId":"4340925846643462155-31668054994359383","eventType":"DELIVERED","cause":"SUCCESS",
             "errorCode":"000","destAddr":"919311415686","eventTs":1625655219000_i64,"extra":"ref1"},
            {"externalId":"4340925846643462155-31668054994359383","eventType":"READ","cause":"READ","errorCode":"026"},
            {"externalId":"x-1","eventType":"FAILED","cause":"UNKNOWN_SUBSCRIBER","errorCode":1002},
            {"eventType":"READ"}
        ]);
        let reports = dlr_reports(&body);
        assert_eq!(reports.len(), 4);
        assert_eq!(reports[0].outcome, ReportOutcome::Progress);
        assert_eq!(
            reports[0].provider_id,
            "4340925846643462155-31668054994359383"
        );
        assert!(
            !reports[0].detail.contains("919311415686"),
            "{}",
            reports[0].detail
        );
        assert_eq!(reports[1].outcome, ReportOutcome::Delivered);
        assert_eq!(reports[1].reference.as_deref(), Some("ref1"));
        assert_eq!(reports[2].outcome, ReportOutcome::Read);
        match &reports[3].outcome {
            ReportOutcome::Failed { code, reason } => {
                assert_eq!(code.as_deref(), Some("1002"));
                assert!(
                    reason.contains("1002") && reason.contains("UNKNOWN_SUBSCRIBER"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A single object is one report.
        assert_eq!(dlr_reports(&body[1]).len(), 1);
    }

    #[test]
    fn opt_in_uses_the_send_credentials_and_digits_only() {
        let p = client().opt_in("+919800000001");
        for (k, v) in [
            ("method", "OPT_IN"),
            ("phone_number", "919800000001"),
            ("channel", "WHATSAPP"),
            ("userid", "2000123456"),
            ("auth_scheme", "plain"),
            ("v", "1.1"),
            ("format", "json"),
        ] {
            assert!(p.form.contains(&(k.into(), v.into())), "{k}");
        }
        let bad = r#"{"response":{"id":"105","phone":"","details":"The phone number \"919800000001\" is not valid","status":"error"}}"#;
        let err = client().read_opt_in(&answer(200, bad)).unwrap_err();
        assert!(!err.contains("919800000001"), "{err}");
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
