//! Exotel: the voice call (`call`) and the SMS (`sms`) clients, the caller's recording
//! (`recording`, `call_details`), and what they share here: account, credentials, and the
//! `RestException` error body.

pub mod call;
pub mod call_details;
pub mod recording;
pub mod sms;

use secrecy::SecretString;

/// Reads `RestException.Message` from a JSON or XML error body (frappe/crm reads it the same way), so
/// the operator sees Exotel's own words, e.g. a TRAI NDNC block.
pub fn rest_exception(body: &str) -> Option<String> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        let e = &v["RestException"];
        let message = e["Message"].as_str()?;
        return Some(
            match e["Code"]
                .as_i64()
                .or_else(|| e["Code"].as_str()?.parse().ok())
            {
                Some(code) => format!("{message} (code {code})"),
                None => message.to_owned(),
            },
        );
    }
    // <TwilioResponse><RestException><Status>403</Status><Message>…</Message></RestException>
    let start = body.find("<Message>")? + "<Message>".len();
    let end = body[start..].find("</Message>")? + start;
    Some(body[start..end].trim().to_owned())
}

/// DLT codes (API-FACTS §5) that block every message of a sender or a template, not one recipient.
const DLT_SENDER_CODES: &[i64] = &[23080, 23081, 23281];
const DLT_TEMPLATE_CODES: &[i64] = &[23082, 23181, 23182, 23183, 23184, 23185];

/// Exotel answers that mean every later request on this account fails too: 401 (the API key or
/// token is refused), 402 (the plan or usage limit is reached; developer.exotel.com/api/http-status-codes),
/// and a DLT block of the sender or template (SMS; its code in `DetailedStatusCode` or
/// `RestException.Code`).
pub fn account_problem(status: u16, body: &str) -> Option<super::AccountProblem> {
    let said = || error_reason(status, body);
    match status {
        401 => {
            return Some(super::AccountProblem {
                reason: "auth",
                detail: said(),
            })
        }
        402 => {
            return Some(super::AccountProblem {
                reason: "payment",
                detail: said(),
            })
        }
        _ => {}
    }
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let code_of = |v: &serde_json::Value| {
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
    };
    let message = &v["SMSMessage"];
    let code = code_of(&message["DetailedStatusCode"])
        .or_else(|| code_of(&message[0]["DetailedStatusCode"]))
        .or_else(|| code_of(&v["RestException"]["Code"]))?;
    let mut problem = dlt_problem(code)?;
    problem.detail = format!("HTTP {status}: {}", problem.detail);
    Some(problem)
}

/// A DLT code that blocks every SMS of the sender or the template (in an answer, or in the SMS
/// status callback's `DetailedStatusCode`), as an account problem.
pub fn dlt_problem(code: i64) -> Option<super::AccountProblem> {
    let reason = if DLT_SENDER_CODES.contains(&code) {
        "dlt_sender"
    } else if DLT_TEMPLATE_CODES.contains(&code) {
        "dlt_template"
    } else {
        return None;
    };
    Some(super::AccountProblem {
        reason,
        detail: format!(
            "DLT code {code}: operators refuse every SMS of this {}",
            &reason[4..]
        ),
    })
}

/// Longest provider message kept in a reason: enough for Exotel's own words, never a whole page.
const MAX_MESSAGE_CHARS: usize = 500;

/// The reason to store for a non-2xx answer.
pub fn error_reason(status: u16, body: &str) -> String {
    match rest_exception(body) {
        Some(msg) => format!(
            "HTTP {status}: {}",
            msg.chars().take(MAX_MESSAGE_CHARS).collect::<String>()
        ),
        None => {
            let snippet: String = body.chars().take(200).collect();
            format!("HTTP {status}: {}", snippet.trim())
        }
    }
}

/// The text of the first `<tag>` inside the first `<parent>` element of an XML body: Exotel's XML
/// success shape (`<TwilioResponse><Call><Sid>…</Sid>…`), which a request without the `.json` suffix,
/// or a proxy that rewrites it, gets instead of JSON. A plain scan: the bodies are small and flat.
pub fn xml_field(body: &str, parent: &str, tag: &str) -> Option<String> {
    let open = format!("<{parent}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..]
        .find(&format!("</{parent}>"))
        .map_or(body.len(), |i| start + i);
    let inner = &body[start..end];
    let open_tag = format!("<{tag}>");
    let from = inner.find(&open_tag)? + open_tag.len();
    let to = inner[from..].find(&format!("</{tag}>"))? + from;
    let value = inner[from..to].trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// A 2xx that names no request: it may be Exotel, or a captive portal, a proxy page or a wrong
/// `exotel.base_url` answering. Nobody knows whether anything was sent, and no report or look-up can
/// ever name it: send again (at-least-once) rather than wait for nothing.
pub fn unnamed_success(status: u16, body: &str, what: &str) -> super::Outcome {
    let snippet: String = body.chars().take(120).collect();
    super::Outcome::Transient {
        reason: format!(
            "HTTP {status} without {what} (outcome unknown; check exotel.base_url): {}",
            snippet.trim()
        ),
        retry_after: None,
    }
}

/// One URL path segment, percent-encoded: a provider id comes from a callback (anyone holding the
/// webhook token can send one), so `../` or `?` in it must not steer the look-up to another path.
pub fn path_segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Account and credentials, shared by the call and SMS clients.
#[derive(Clone)]
pub struct Account {
    pub base_url: String,
    pub account_sid: String,
    pub api_key: String,
    pub api_token: SecretString,
}

impl Account {
    /// The Basic credentials every request to the account's API carries.
    pub fn basic_auth(&self) -> Option<(String, SecretString)> {
        Some((self.api_key.clone(), self.api_token.clone()))
    }

    /// `{base}/v1/Accounts/{sid}/{path}`.
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}/v1/Accounts/{}/{path}",
            self.base_url.trim_end_matches('/'),
            self.account_sid
        )
    }

    pub fn has_credentials(&self) -> bool {
        use secrecy::ExposeSecret;
        !self.account_sid.trim().is_empty()
            && !self.api_key.trim().is_empty()
            && !self.api_token.expose_secret().trim().is_empty()
    }
}

/// `Status=completed EventType=terminal …`: the fields of a callback worth keeping in the audit trail.
pub fn summary(get: &impl Fn(&str) -> Option<String>, keys: &[&str]) -> String {
    keys.iter()
        .filter_map(|k| get(k).map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_problems_are_told_from_a_refused_request() {
        let reason = |status, body: &str| account_problem(status, body).map(|p| p.reason);
        assert_eq!(reason(401, "<html>Unauthorized</html>"), Some("auth"));
        assert_eq!(
            reason(
                402,
                r#"{"RestException":{"Status":402,"Message":"Plan limit reached"}}"#
            ),
            Some("payment")
        );
        assert_eq!(
            reason(
                200,
                r#"{"SMSMessage":{"Sid":"x","Status":"failed","DetailedStatusCode":23082}}"#
            ),
            Some("dlt_template")
        );
        assert_eq!(
            reason(
                400,
                r#"{"RestException":{"Status":400,"Message":"Sender blocked","Code":"23080"}}"#
            ),
            Some("dlt_sender")
        );
        // One recipient's trouble, an overload, a DND block: not the account's.
        assert_eq!(
            reason(
                403,
                r#"{"RestException":{"Status":403,"Message":"TRAI NDNC"}}"#
            ),
            None
        );
        assert_eq!(reason(503, ""), None);
        assert_eq!(
            reason(
                200,
                r#"{"SMSMessage":{"Sid":"x","DetailedStatusCode":21010}}"#
            ),
            None
        );
        assert_eq!(dlt_problem(24105), None);
    }

    #[test]
    fn reads_json_and_xml_rest_exceptions() {
        assert_eq!(
            rest_exception(
                r#"{"RestException":{"Status":400,"Message":"Invalid From","Code":10001}}"#
            )
            .as_deref(),
            Some("Invalid From (code 10001)")
        );
        let xml = "<TwilioResponse><RestException><Status>403</Status><Message>Call to [01234] cannot be made because of TRAI NDNC regulations</Message></RestException></TwilioResponse>";
        assert_eq!(
            rest_exception(xml).as_deref(),
            Some("Call to [01234] cannot be made because of TRAI NDNC regulations")
        );
        assert_eq!(rest_exception("<html>oops</html>"), None);
        let huge = format!(
            r#"{{"RestException":{{"Status":400,"Message":"{}"}}}}"#,
            "x".repeat(100_000)
        );
        assert!(error_reason(400, &huge).len() < 600);
        assert_eq!(
            xml_field(
                "<TwilioResponse><Call><Sid>abc123</Sid><Status>in-progress</Status></Call></TwilioResponse>",
                "Call",
                "Sid"
            )
            .as_deref(),
            Some("abc123")
        );
        assert_eq!(xml_field("<Call><Sid> </Sid></Call>", "Call", "Sid"), None);
        assert_eq!(xml_field("<html>Sid</html>", "Call", "Sid"), None);
        assert_eq!(
            error_reason(502, "<html>Bad gateway</html>"),
            "HTTP 502: <html>Bad gateway</html>"
        );
    }
}
