//! Exotel SMS, with India's DLT ids.
//!
//! <https://developer.exotel.com/api/sms>

use std::time::Duration;

use super::{error_reason, path_segment, summary, unnamed_success, xml_field, Account};
use crate::domain::{Channel, Report, ReportOutcome};
use crate::providers::{classify_http, Answer, Client, Job, Outcome, Prepared};

/// Exotel's limit on one SMS body.
pub const MAX_BODY_CHARS: usize = 2000;

pub struct ExotelSms {
    pub account: Account,
    pub from: String,
    pub dlt_entity_id: String,
    /// `SmsType`: `transactional`, `transactional_opt_in` or `promotional`; empty leaves it out.
    pub sms_type: String,
    /// `Priority`: `high` or `normal`; empty leaves it out.
    pub priority: String,
    /// `{public_url}/exotel/sms-status?token=…`
    pub status_callback: String,
    pub request_timeout: Duration,
}

impl Client for ExotelSms {
    fn channel(&self) -> Channel {
        Channel::Sms
    }

    fn reports_outcome(&self) -> bool {
        true
    }

    fn is_live(&self) -> bool {
        self.account.has_credentials() && !self.from.trim().is_empty()
    }

    fn prepare(&self, job: &Job) -> Prepared {
        let body: String = job.text.chars().take(MAX_BODY_CHARS).collect();
        // Text outside the GSM-7 alphabet (a Hindi name, °, an emoji) arrives garbled or not at all
        // unless Exotel is told to send it as Unicode.
        let unicode = !crate::messages::gsm::is_gsm7(&body);
        let mut form = vec![
            ("From".to_owned(), self.from.clone()),
            ("To".to_owned(), job.phone.clone()),
            ("Body".to_owned(), body),
        ];
        if unicode {
            form.push(("EncodingType".into(), "unicode".into()));
        }
        for (key, value) in [
            ("SmsType", &self.sms_type),
            ("Priority", &self.priority),
            ("DltEntityId", &self.dlt_entity_id),
            ("DltTemplateId", &job.dlt_template_id),
        ] {
            if !value.trim().is_empty() {
                form.push((key.into(), value.trim().to_owned()));
            }
        }
        form.push(("StatusCallback".into(), self.status_callback.clone()));
        form.push(("CustomField".into(), job.greeting_ref.clone()));
        Prepared {
            url: self.account.url("Sms/send.json"),
            form,
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
            // `SMSMessage` is an object, or a list of them (hasgeek/funnel reads both).
            let v: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
            let msg = match &v["SMSMessage"] {
                serde_json::Value::Array(items) => items.first().cloned().unwrap_or_default(),
                other => other.clone(),
            };
            let sid = msg["Sid"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| xml_field(&answer.body, "SMSMessage", "Sid"))
                .filter(|s| !s.trim().is_empty());
            let Some(sid) = sid else {
                return unnamed_success(answer.status, &answer.body, "an SMSMessage Sid");
            };
            let status = msg["Status"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| xml_field(&answer.body, "SMSMessage", "Status"))
                .unwrap_or_else(|| "accepted".to_owned());
            let detail = format!(
                "HTTP {}: {status} {}",
                answer.status,
                msg["DetailedStatus"].as_str().unwrap_or("")
            );
            return Outcome::Accepted {
                provider_id: Some(sid),
                detail: detail.trim().to_owned(),
            };
        }
        // Exotel answers SMS overload with 503: transient, like any 5xx.
        classify_http(
            answer.status,
            answer.retry_after,
            error_reason(answer.status, &answer.body),
        )
    }

    /// <https://developer.exotel.com/api/sms>: `GET …/SMS/Messages/{SmsSid}.json`.
    fn status_lookup(&self, provider_id: &str) -> Option<Prepared> {
        Some(Prepared {
            url: self
                .account
                .url(&format!("SMS/Messages/{}.json", path_segment(provider_id))),
            form: Vec::new(),
            basic_auth: self.account.basic_auth(),
            secret_fields: &[],
            timeout: self.request_timeout,
        })
    }

    fn read_report(&self, provider_id: &str, answer: &Answer) -> Option<Report> {
        if !(200..300).contains(&answer.status) {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&answer.body).ok()?;
        let msg = match &v["SMSMessage"] {
            serde_json::Value::Array(items) => items.first().cloned()?,
            other => other.clone(),
        };
        let status = msg["Status"].as_str()?.to_owned();
        let code = msg["DetailedStatusCode"]
            .as_i64()
            .map(|c| c.to_string())
            .unwrap_or_default();
        let name = msg["DetailedStatus"].as_str().unwrap_or("");
        let detail = format!("{status}: {code} {name}").trim().to_owned();
        Some(sms_report(provider_id, None, &status, &code, name, detail))
    }
}

/// Exotel's SMS StatusCallback (fields read through `get`) as a report; an error names the missing
/// field.
pub fn callback_report(get: impl Fn(&str) -> Option<String>) -> Result<Report, String> {
    let sms_sid = get("SmsSid").ok_or("SmsSid is required")?;
    let status = get("Status").ok_or("Status is required")?;
    let code = get("DetailedStatusCode").unwrap_or_default();
    let name = get("DetailedStatus").unwrap_or_default();
    let detail = summary(
        &get,
        &[
            "Status",
            "DetailedStatusCode",
            "DetailedStatus",
            "DateSent",
            "SmsUnits",
        ],
    );
    Ok(sms_report(
        &sms_sid,
        get("CustomField"),
        &status,
        &code,
        &name,
        detail,
    ))
}

/// Exotel's word for an SMS's state, as a report: `sent` (or `delivered`) is delivered; `failed`,
/// `failed_dnd`, `undelivered` and `rejected` are failed, with Exotel's detailed code and name;
/// anything else (`queued`, `sending`, `submitted`) is progress. Used for the StatusCallback and the
/// SMS details API alike.
pub fn sms_report(
    sms_sid: &str,
    custom_field: Option<String>,
    status: &str,
    code: &str,
    name: &str,
    detail: String,
) -> Report {
    let word = status.trim().to_ascii_lowercase();
    let outcome = match word.as_str() {
        "sent" | "delivered" => ReportOutcome::Delivered,
        s if s.starts_with("failed") || s == "undelivered" || s == "rejected" => {
            ReportOutcome::Failed {
                code: Some(code.trim().to_owned()).filter(|c| !c.is_empty()),
                reason: format!("{}: {code} {name}", status.trim())
                    .trim()
                    .to_owned(),
            }
        }
        _ => ReportOutcome::Progress,
    };
    Report {
        channel: Channel::Sms,
        provider_id: sms_sid.to_owned(),
        reference: custom_field,
        outcome,
        provider_status: word,
        detail,
        // A DLT block may come with any status word, so the code alone decides.
        account_problem: code.trim().parse().ok().and_then(super::dlt_problem),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Answer;
    use secrecy::SecretString;

    fn client() -> ExotelSms {
        ExotelSms {
            account: Account {
                base_url: "https://api.exotel.com/".into(),
                account_sid: "acme".into(),
                api_key: "k".into(),
                api_token: SecretString::from("t".to_owned()),
            },
            from: "HOSPTL".into(),
            dlt_entity_id: String::new(),
            sms_type: "transactional".into(),
            priority: String::new(),
            status_callback: "https://h/exotel/sms-status?token=x".into(),
            request_timeout: Duration::from_secs(1),
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
    fn reads_the_sid_from_an_object_or_a_list() {
        let c = client();
        let object = r#"{"SMSMessage":{"Sid":"0f477d60517e6e6a0f6d9a7e9af8630e","Status":"queued","DetailedStatusCode":21010,"DetailedStatus":"PENDING_TO_OPERATOR"}}"#;
        let list = r#"{"SMSMessage":[{"Sid":"abc","Status":"queued"}]}"#;
        assert!(matches!(c.classify(&answer(200, object)),
            Outcome::Accepted { provider_id: Some(ref s), ref detail } if s == "0f477d60517e6e6a0f6d9a7e9af8630e" && detail.contains("PENDING_TO_OPERATOR")));
        assert!(
            matches!(c.classify(&answer(200, list)), Outcome::Accepted { provider_id: Some(ref s), .. } if s == "abc")
        );
        let xml = "<TwilioResponse><SMSMessage><Sid>x1y2</Sid><Status>queued</Status></SMSMessage></TwilioResponse>";
        assert!(
            matches!(c.classify(&answer(200, xml)), Outcome::Accepted { provider_id: Some(ref s), ref detail } if s == "x1y2" && detail.contains("queued"))
        );
        // A 2xx that names no message leaves it unknown whether one went out: sent again.
        for body in [
            "",
            "<html>proxy</html>",
            r#"{"SMSMessage":[]}"#,
            r#"{"SMSMessage":{"Sid":""}}"#,
        ] {
            assert!(
                matches!(c.classify(&answer(200, body)), Outcome::Transient { .. }),
                "{body}"
            );
        }
    }

    #[test]
    fn overload_is_transient_and_slows_the_provider_bad_sender_is_permanent() {
        let c = client();
        assert!(matches!(
            c.classify(&answer(503, "")),
            Outcome::Transient {
                retry_after: Some(_),
                ..
            }
        ));
        assert!(
            matches!(c.classify(&answer(402, r#"{"RestException":{"Status":402,"Message":"Plan limit reached"}}"#)),
            Outcome::Permanent { ref reason } if reason == "HTTP 402: Plan limit reached")
        );
        let empty_dlt = c.prepare(&Job {
            delivery_id: "d".into(),
            channel: Channel::Sms,
            phone: "+919800000001".into(),
            greeting_ref: "r".into(),
            text: "x".repeat(3000),
            dlt_template_id: String::new(),
        });
        assert!(
            empty_dlt.form.iter().all(|(k, _)| k != "DltEntityId"),
            "unset DLT ids are not sent"
        );
        let body = &empty_dlt.form.iter().find(|(k, _)| k == "Body").unwrap().1;
        assert_eq!(body.chars().count(), MAX_BODY_CHARS);
        assert_eq!(
            empty_dlt.url,
            "https://api.exotel.com/v1/Accounts/acme/Sms/send.json"
        );
    }

    fn job(text: &str, dlt_template_id: &str) -> Job {
        Job {
            delivery_id: "d".into(),
            channel: Channel::Sms,
            phone: "+919800000001".into(),
            greeting_ref: "r".into(),
            text: text.into(),
            dlt_template_id: dlt_template_id.into(),
        }
    }

    #[test]
    fn sends_the_kind_s_template_id_the_sms_type_and_unicode_only_when_needed() {
        let c = client();
        let p = c.prepare(&job("SOS Heart from Dr. Asha Rao", "1107000000000000009"));
        let fields: Vec<(&str, &str)> = p
            .form
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("From", "HOSPTL"),
                ("To", "+919800000001"),
                ("Body", "SOS Heart from Dr. Asha Rao"),
                ("SmsType", "transactional"),
                ("DltTemplateId", "1107000000000000009"),
                ("StatusCallback", "https://h/exotel/sms-status?token=x"),
                ("CustomField", "r"),
            ],
            "an empty priority is left out"
        );
        for text in ["SOS Heart from डॉ. आशा राव", "Temp 39°C", "🚑"] {
            let p = c.prepare(&job(text, ""));
            assert!(
                p.form.contains(&("EncodingType".into(), "unicode".into())),
                "{text}"
            );
        }
    }

    #[test]
    fn a_reported_sms_sid_cannot_leave_the_sms_details_path() {
        for id in ["../../../Calls/x", "abc?x=1#frag", "a/b", ".."] {
            let lookup = client().status_lookup(id).unwrap();
            let url = reqwest::Url::parse(&lookup.url).unwrap();
            let segments: Vec<&str> = url.path_segments().unwrap().collect();
            assert_eq!(
                segments[..5],
                ["v1", "Accounts", "acme", "SMS", "Messages"],
                "{id}: {url}"
            );
            assert_eq!(segments.len(), 6, "{id}: {url}");
            assert!(
                url.query().is_none() && url.fragment().is_none(),
                "{id}: {url}"
            );
        }
    }

    #[test]
    fn a_blank_sid_is_no_provider_id() {
        for body in [
            r#"{"SMSMessage":{"Sid":""}}"#,
            r#"{"SMSMessage":[{"Sid":" "}]}"#,
        ] {
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

    #[test]
    fn a_dlt_block_in_the_status_callback_is_an_account_problem_in_the_report() {
        let report = |status: &str, code: &str| {
            let fields = [
                ("SmsSid", "sm1"),
                ("Status", status),
                ("DetailedStatusCode", code),
            ];
            callback_report(|k| {
                fields
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| (*v).to_owned())
            })
            .map(|r| r.account_problem.map(|p| p.reason))
        };
        assert_eq!(report("failed", " 23080 "), Ok(Some("dlt_sender")));
        assert_eq!(report("failed", "23183"), Ok(Some("dlt_template")));
        // The code decides, whatever the status word says.
        assert_eq!(report("sent", "23082"), Ok(Some("dlt_template")));
        assert_eq!(report("failed_dnd", "24105"), Ok(None));
        assert_eq!(report("sent", ""), Ok(None));
    }
}
