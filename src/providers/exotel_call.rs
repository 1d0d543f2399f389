//! Exotel voice: connect the stakeholder to the outbound call flow whose Greeting plays the alert.
//!
//! <https://developer.exotel.com/api/outgoing-call-to-connect-number-to-a-call-flow>

use std::time::Duration;

use super::exotel::{error_reason, Account};
use super::{classify_http, Answer, Client, Job, Outcome, Prepared};
use crate::domain::Channel;

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
            basic_auth: Some((self.account.api_key.clone(), self.account.api_token.clone())),
            secret_fields: &[],
            timeout: self.request_timeout,
        }
    }

    fn classify(&self, answer: &Answer) -> Outcome {
        if (200..300).contains(&answer.status) {
            let sid = serde_json::from_str::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|v| v["Call"]["Sid"].as_str().map(str::to_owned));
            let status = serde_json::from_str::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|v| v["Call"]["Status"].as_str().map(str::to_owned))
                .unwrap_or_default();
            return match sid {
                Some(sid) => Outcome::Accepted {
                    provider_id: Some(sid),
                    detail: format!("HTTP {}: call originated ({status})", answer.status),
                },
                // Placed, by Exotel's word, but unnamed: the terminal callback still finds it by CustomField.
                None => Outcome::Accepted {
                    provider_id: None,
                    detail: format!("HTTP {} without Call.Sid", answer.status),
                },
            };
        }
        // A 5xx from Calls/connect may or may not have dialled (API-FACTS §3); at-least-once says again.
        classify_http(
            answer.status,
            answer.retry_after,
            error_reason(answer.status, &answer.body),
        )
    }
}
