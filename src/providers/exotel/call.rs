//! Exotel voice: connect the stakeholder to the outbound call flow whose Greeting plays the alert.
//!
//! <https://developer.exotel.com/api/outgoing-call-to-connect-number-to-a-call-flow>

use std::time::Duration;

use super::{error_reason, path_segment, summary, unnamed_success, xml_field, Account};
use crate::domain::{Channel, Report, ReportOutcome};
use crate::providers::{classify_http, Answer, Client, Job, Outcome, Prepared};

pub struct ExotelCall {
    pub account: Account,
    pub caller_id: String,
    pub flow_url: String,
    /// `{public_url}/exotel/call-status?token=…`
    pub status_callback: String,
    /// Ring time for the stakeholder's leg (Exotel's `TimeOut`, at most 60 under TRAI rules).
    pub ring_timeout_secs: u64,
    /// Exotel originates synchronously and retries internally before answering: tens of seconds.
    pub request_timeout: Duration,
}

impl Client for ExotelCall {
    fn channel(&self) -> Channel {
        Channel::Call
    }

    fn reports_outcome(&self) -> bool {
        true
    }

    fn is_live(&self) -> bool {
        self.account.has_credentials()
            && !self.caller_id.trim().is_empty()
            && !self.flow_url.trim().is_empty()
    }

    fn prepare(&self, job: &Job) -> Prepared {
        Prepared {
            url: self.account.url("Calls/connect.json"),
            form: vec![
                ("From".into(), job.phone.clone()),
                ("CallerId".into(), self.caller_id.clone()),
                ("Url".into(), self.flow_url.clone()),
                // An opaque reference, never the recording itself: the greeting can only play what we stored.
                ("CustomField".into(), job.greeting_ref.clone()),
                ("CallType".into(), "trans".into()),
                ("TimeOut".into(), self.ring_timeout_secs.to_string()),
                ("StatusCallback".into(), self.status_callback.clone()),
                ("StatusCallbackEvents[0]".into(), "terminal".into()),
                (
                    "StatusCallbackContentType".into(),
                    "application/json".into(),
                ),
            ],
            basic_auth: self.account.basic_auth(),
            secret_fields: &[],
            timeout: self.request_timeout,
        }
    }

    fn account_problem(&self, answer: &Answer) -> Option<crate::providers::AccountProblem> {
        super::account_problem(answer.status, &answer.body)
    }

    fn classify(&self, answer: &Answer) -> Outcome {
        if (200..300).contains(&answer.status) {
            let json = serde_json::from_str::<serde_json::Value>(&answer.body).ok();
            let field = |name: &str| {
                json.as_ref()
                    .and_then(|v| v["Call"][name].as_str().map(str::to_owned))
                    .or_else(|| xml_field(&answer.body, "Call", name))
                    .filter(|s| !s.trim().is_empty())
            };
            return match field("Sid") {
                Some(sid) => Outcome::Accepted {
                    provider_id: Some(sid),
                    detail: format!(
                        "HTTP {}: call originated ({})",
                        answer.status,
                        field("Status").unwrap_or_default()
                    ),
                },
                None => unnamed_success(answer.status, &answer.body, "a Call Sid"),
            };
        }
        // A 5xx from Calls/connect may or may not have dialled (API-FACTS §3); at-least-once says again.
        classify_http(
            answer.status,
            answer.retry_after,
            error_reason(answer.status, &answer.body),
        )
    }

    /// <https://developer.exotel.com/api/call-details>: `GET …/Calls/{CallSid}.json`.
    fn status_lookup(&self, provider_id: &str) -> Option<Prepared> {
        Some(Prepared {
            url: self
                .account
                .url(&format!("Calls/{}.json", path_segment(provider_id))),
            form: Vec::new(),
            basic_auth: self.account.basic_auth(),
            secret_fields: &[],
            timeout: Duration::from_secs(15),
        })
    }

    fn read_report(&self, provider_id: &str, answer: &Answer) -> Option<Report> {
        if !(200..300).contains(&answer.status) {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&answer.body).ok()?;
        let status = v["Call"]["Status"].as_str()?.to_owned();
        let detail = format!(
            "Call Details API: Status={status} Duration={}",
            v["Call"]["Duration"]
                .as_i64()
                .map(|d| d.to_string())
                .unwrap_or_default()
        );
        Some(call_report(provider_id, None, &status, detail))
    }
}

/// Exotel's call StatusCallback (JSON, form or multipart fields, read through `get`) as a report; an
/// error names the missing field. RecordingUrl and most other fields are absent on unanswered calls
/// (nammayatri #917): only CallSid and a status are required.
pub fn callback_report(get: impl Fn(&str) -> Option<String>) -> Result<Report, String> {
    let call_sid = get("CallSid").ok_or("CallSid is required")?;
    let status = get("Status")
        .or_else(|| get("Legs[0][Status]"))
        .ok_or("Status is required")?;
    let detail = summary(
        &get,
        &[
            "Status",
            "EventType",
            "ConversationDuration",
            "DateUpdated",
            "Legs[0][Status]",
            "Legs[0][OnCallDuration]",
        ],
    );
    Ok(call_report(&call_sid, get("CustomField"), &status, detail))
}

/// Exotel's word for a call's state, as a report: `completed` is answered; `busy`, `no-answer`,
/// `failed` and `canceled` are not reached; anything else (`queued`, `ringing`, `in-progress`) is
/// progress. Used for the StatusCallback and the Call Details API alike.
pub fn call_report(
    call_sid: &str,
    custom_field: Option<String>,
    status: &str,
    detail: String,
) -> Report {
    let word = status.trim().to_ascii_lowercase();
    let outcome = match word.as_str() {
        "completed" => ReportOutcome::Answered,
        "busy" | "no-answer" | "failed" | "canceled" => ReportOutcome::Unanswered {
            reason: word.clone(),
        },
        _ => ReportOutcome::Progress,
    };
    Report {
        channel: Channel::Call,
        provider_id: call_sid.to_owned(),
        reference: custom_field,
        outcome,
        provider_status: word,
        detail,
        account_problem: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Answer;
    use secrecy::SecretString;

    fn client() -> ExotelCall {
        ExotelCall {
            account: Account {
                base_url: "https://api.in.exotel.com".into(),
                account_sid: "acme".into(),
                api_key: "k".into(),
                api_token: SecretString::from("t".to_owned()),
            },
            caller_id: "08069891522".into(),
            flow_url: "http://my.exotel.com/acme/exoml/start_voice/1".into(),
            status_callback: "https://h/exotel/call-status?token=x".into(),
            ring_timeout_secs: 30,
            request_timeout: Duration::from_secs(45),
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
    fn reads_the_documented_success_body() {
        let body = r#"{"Call":{"Sid":"40ccc7656e1a3eb66c6cb2be57d1142k","ParentCallSid":null,"DateCreated":"2020-02-20 18:42:19","To":null,"From":"+917800000000","Status":"in-progress","Direction":"outbound-api","RecordingUrl":null}}"#;
        assert_eq!(
            client().classify(&answer(200, body)),
            Outcome::Accepted {
                provider_id: Some("40ccc7656e1a3eb66c6cb2be57d1142k".into()),
                detail: "HTTP 200: call originated (in-progress)".into()
            }
        );
        // Exotel's XML success shape names the call too.
        let xml = "<?xml version=\"1.0\"?>\n<TwilioResponse><Call><Sid>40ccc7656e1a3eb66c6cb2be57d1142k</Sid><Status>in-progress</Status></Call></TwilioResponse>";
        assert_eq!(
            client().classify(&answer(200, xml)),
            Outcome::Accepted {
                provider_id: Some("40ccc7656e1a3eb66c6cb2be57d1142k".into()),
                detail: "HTTP 200: call originated (in-progress)".into()
            }
        );
        // A 2xx that names no call is not a call: outcome unknown, sent again.
        for body in [
            "<TwilioResponse/>",
            "<html>Hotel Wi-Fi login</html>",
            "",
            "{\"Call\":{\"Sid\":\"\"}}",
        ] {
            assert!(
                matches!(
                    client().classify(&answer(200, body)),
                    Outcome::Transient { .. }
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn classifies_errors_as_documented() {
        let c = client();
        let dnd = "<TwilioResponse><RestException><Status>403</Status><Message>Call to [01234] cannot be made because of TRAI NDNC regulations</Message></RestException></TwilioResponse>";
        assert!(
            matches!(c.classify(&answer(403, dnd)), Outcome::Permanent { ref reason } if reason.contains("TRAI NDNC"))
        );
        for s in [400, 401, 402, 404, 409] {
            assert!(
                matches!(c.classify(&answer(s, "{}")), Outcome::Permanent { .. }),
                "{s}"
            );
        }
        // No route at all is 500 or 504 (KB 3000083306): it may or may not have dialled; dial again.
        for s in [429, 500, 502, 503, 504] {
            assert!(
                matches!(c.classify(&answer(s, "")), Outcome::Transient { .. }),
                "{s}"
            );
        }
    }

    #[test]
    fn a_reported_call_sid_cannot_leave_the_call_details_path() {
        for id in [
            "../../Accounts/other/Calls/x",
            "abc?x=1#frag",
            "a/b",
            "..",
            "a b%2F",
        ] {
            let lookup = client().status_lookup(id).unwrap();
            let url = reqwest::Url::parse(&lookup.url).unwrap();
            let segments: Vec<&str> = url.path_segments().unwrap().collect();
            assert_eq!(
                segments[..4],
                ["v1", "Accounts", "acme", "Calls"],
                "{id}: {url}"
            );
            assert_eq!(segments.len(), 5, "{id}: {url}");
            assert!(
                url.query().is_none() && url.fragment().is_none(),
                "{id}: {url}"
            );
        }
        assert_eq!(
            client().status_lookup("40ccc7656e1a3eb66c6cb2be57d1142k").unwrap().url,
            "https://api.in.exotel.com/v1/Accounts/acme/Calls/40ccc7656e1a3eb66c6cb2be57d1142k.json"
        );
    }

    #[test]
    fn a_blank_sid_is_no_provider_id() {
        for body in [r#"{"Call":{"Sid":""}}"#, r#"{"Call":{"Sid":"  "}}"#] {
            assert!(
                !matches!(
                    client().classify(&answer(200, body)),
                    Outcome::Accepted {
                        provider_id: Some(_),
                        ..
                    }
                ),
                "{body}"
            );
        }
    }
}
