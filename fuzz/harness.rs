//! What each fuzz target does with its input, shared by the cargo-fuzz targets (fuzz/fuzz_targets/) and
//! by the ordinary tests that replay the committed corpus (tests/api/corpus.rs) and run the proptest
//! properties (tests/api/properties.rs). Every function takes arbitrary bytes, must never panic, and
//! asserts the invariants the rest of the service relies on.

#![allow(dead_code)]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue};
use exotel_sos::domain::{call_sid::CallSid, phone, phone::Phone};
use exotel_sos::http::params::{clean, exotel_time, http_url, Params, MAX_VALUE_CHARS};
use exotel_sos::providers::exotel::call::ExotelCall;
use exotel_sos::providers::exotel::sms::ExotelSms;
use exotel_sos::providers::exotel::Account;
use exotel_sos::providers::gupshup::Gupshup;
use exotel_sos::providers::{parse_retry_after, Answer, Client, Outcome};
use exotel_sos::stakeholders::Routing;
use secrecy::SecretString;

/// Content types a webhook body is read as; the first input byte picks one. Boundaries in mixed case
/// and odd spellings on purpose: they have been wrong before.
pub const CONTENT_TYPES: &[&str] = &[
    "",
    "application/x-www-form-urlencoded",
    "application/json",
    "application/json; charset=utf-8",
    "multipart/form-data; boundary=XyZ",
    "multipart/form-data; boundary=xyz",
    "multipart/form-data; boundary=\"XyZ\"",
    "Multipart/Form-Data; Boundary=XyZ",
    "multipart/form-data",
    "text/plain",
    "application/xml",
    "APPLICATION/JSON",
];

/// The fields the Passthru and the callbacks read (http/exotel/passthru.rs, http/exotel/callbacks.rs).
pub const FIELDS: &[&str] = &[
    "token",
    "CallSid",
    "EmergencyType",
    "emergency_type",
    "digits",
    "RecordingUrl",
    "CallFrom",
    "From",
    "StartTime",
    "Created",
    "CurrentTime",
    "CustomField",
    "Status",
    "EventType",
    "ConversationDuration",
    "DateUpdated",
    "Legs[0][Status]",
    "Legs[0][OnCallDuration]",
    "SmsSid",
    "DetailedStatusCode",
    "DetailedStatus",
    "DateSent",
    "SmsUnits",
];

/// Drives a future that never waits on I/O (the body is already in memory) to completion.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    // The multipart reader over one in-memory chunk is ready at every poll; a bound instead of a loop
    // forever turns a future that would hang the server into a finding.
    for _ in 0..10_000 {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("a body parser kept waiting on an in-memory body");
}

/// Input layout: `[content type index] query bytes 0xFF body bytes` (no 0xFF: all query, no body).
pub fn split_request(data: &[u8]) -> (&'static str, String, Bytes) {
    let (first, rest) = data.split_first().unwrap_or((&0, &[]));
    let content_type = CONTENT_TYPES[usize::from(*first) % CONTENT_TYPES.len()];
    let (query, body) = match rest.iter().position(|b| *b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    // A URI's query is text by the time axum hands it over.
    let query = String::from_utf8_lossy(query).into_owned();
    (content_type, query, Bytes::copy_from_slice(body))
}

/// Parses a webhook request as the handlers do: query first, then the body.
pub fn read_params(content_type: &str, query: &str, body: Bytes) -> Result<Params, String> {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        if !content_type.is_empty() {
            headers.insert(header::CONTENT_TYPE, v);
        }
    }
    let mut params = Params::from_query(Some(query));
    block_on(params.extend_body(&headers, body))?;
    Ok(params)
}

/// Invariants of one cleaned value.
pub fn check_value(v: &str) {
    assert!(!v.is_empty(), "an empty value is absent, never Some(\"\")");
    assert!(
        v.chars().count() <= MAX_VALUE_CHARS,
        "values are cut to MAX_VALUE_CHARS"
    );
}

/// `clean` on one raw value: the invariants, and that cleaning what it returned changes nothing more
/// than one more layer of quotes would.
pub fn check_clean(raw: &str) {
    if let Some(v) = clean(raw) {
        check_value(&v);
        if let Some(again) = clean(&v) {
            check_value(&again);
        }
    }
}

/// The Passthru: every field it reads, and the parsers those fields go through.
pub fn passthru_params(data: &[u8]) {
    let (content_type, query, body) = split_request(data);
    let Ok(params) = read_params(content_type, &query, body) else {
        return;
    };
    for key in FIELDS {
        if let Some(v) = params.get(key) {
            check_value(&v);
            check_clean(&v);
        }
    }
    let _ = params.get_any(&["EmergencyType", "emergency_type"]);
    if let Some(sid) = params.get("CallSid") {
        if let Ok(parsed) = CallSid::parse(&sid) {
            assert!(!parsed.as_str().is_empty());
        }
    }
    if let Some(url) = params.get("RecordingUrl") {
        if let Some(ok) = http_url(&url) {
            let parsed = reqwest::Url::parse(&ok).expect("http_url returns a URL");
            assert!(matches!(parsed.scheme(), "http" | "https"));
        }
    }
    if let Some(region) = phone::region("IN") {
        if let Some(caller) = params.get_any(&["CallFrom", "From"]) {
            if let Ok(p) = Phone::parse(&caller, region) {
                assert!(p.e164().starts_with('+'), "{}", p.e164());
                let _ = p.masked();
            }
        }
    }
    for key in ["StartTime", "Created", "CurrentTime"] {
        if let Some(t) = params.get(key) {
            // Offsets as settings allow them (validated to UTC-14h..UTC+14h).
            for offset in [-840, 0, 330, 840] {
                let _ = exotel_time(&t, offset);
            }
        }
    }
    let audit = params.audit_json(&["token"]);
    let parsed: Vec<(String, String)> =
        serde_json::from_str(&audit).expect("the audit record is a JSON list of pairs");
    // Read as pairs, not searched as text: a key may hold `"token"` inside it (the fuzzer's first find).
    assert!(
        parsed.iter().all(|(k, _)| !k.eq_ignore_ascii_case("token")),
        "the token never reaches the audit record: {audit}"
    );
}

fn exotel_account() -> Account {
    Account {
        base_url: "https://api.in.exotel.com".into(),
        account_sid: "acme".into(),
        api_key: "a1b2c3d4e5f6a7b8c9d0".into(),
        api_token: SecretString::from("token".to_owned()),
    }
}

pub fn exotel_call() -> ExotelCall {
    ExotelCall {
        account: exotel_account(),
        caller_id: "08069891522".into(),
        flow_url: "http://my.exotel.com/acme/exoml/start_voice/1".into(),
        status_callback: "https://h/exotel/call-status?token=x".into(),
        ring_timeout_secs: 30,
        request_timeout: Duration::from_secs(45),
    }
}

pub fn exotel_sms() -> ExotelSms {
    ExotelSms {
        account: exotel_account(),
        from: "HOSPTL".into(),
        dlt_entity_id: String::new(),
        sms_type: "transactional".into(),
        priority: "high".into(),
        status_callback: "https://h/exotel/sms-status?token=x".into(),
        request_timeout: Duration::from_secs(15),
    }
}

pub fn gupshup() -> Gupshup {
    Gupshup {
        base_url: "https://media.smsgupshup.com/GatewayAPI/rest".into(),
        userid: "2000123456".into(),
        password: SecretString::from("pw".to_owned()),
        msg_type: "HSM".into(),
        is_template: true,
        request_timeout: Duration::from_secs(15),
    }
}

/// A look-up for a reported id stays on the provider's details path.
fn check_lookup(client: &dyn Client, id: &str, prefix: &[&str]) {
    let Some(lookup) = client.status_lookup(id) else {
        return;
    };
    let url = reqwest::Url::parse(&lookup.url).expect("the look-up URL parses");
    let segments: Vec<&str> = url
        .path_segments()
        .map(Iterator::collect)
        .unwrap_or_default();
    assert_eq!(&segments[..prefix.len()], prefix, "{id:?} -> {url}");
    assert_eq!(segments.len(), prefix.len() + 1, "{id:?} -> {url}");
    assert!(
        url.query().is_none() && url.fragment().is_none(),
        "{id:?} -> {url}"
    );
    let stored = lookup.redacted_json();
    assert!(
        !stored.contains("a1b2c3d4e5f6a7b8c9d0"),
        "API key stored: {stored}"
    );
}

/// The status callbacks: what http/exotel/callbacks.rs reads, and the look-up URL a reported id leads to.
pub fn callbacks(data: &[u8]) {
    let (content_type, query, body) = split_request(data);
    let Ok(params) = read_params(content_type, &query, body) else {
        return;
    };
    let call_status = params
        .get("Status")
        .or_else(|| params.get("Legs[0][Status]"));
    if let Some(status) = &call_status {
        check_value(status);
        let _ = status.trim().to_ascii_lowercase();
    }
    for key in FIELDS {
        if let Some(v) = params.get(key) {
            check_value(&v);
        }
    }
    if let Some(sid) = params.get("CallSid") {
        check_lookup(&exotel_call(), &sid, &["v1", "Accounts", "acme", "Calls"]);
    }
    if let Some(sid) = params.get("SmsSid") {
        check_lookup(
            &exotel_sms(),
            &sid,
            &["v1", "Accounts", "acme", "SMS", "Messages"],
        );
    }
    // Ids as they arrive, before cleaning, too: the look-up must hold for any string.
    let raw = String::from_utf8_lossy(data);
    check_lookup(&exotel_call(), &raw, &["v1", "Accounts", "acme", "Calls"]);
}

/// Input layout: two bytes of HTTP status (mod 1000), one byte choosing a Retry-After, then the body.
pub fn split_answer(data: &[u8]) -> Answer {
    let status = match data {
        [a, b, ..] => u16::from_be_bytes([*a, *b]) % 1000,
        _ => 200,
    };
    let retry_after = match data.get(2) {
        Some(0) | None => None,
        Some(n) => Some(Duration::from_secs(u64::from(*n))),
    };
    let body = String::from_utf8_lossy(data.get(3..).unwrap_or_default()).into_owned();
    Answer {
        status,
        retry_after,
        body,
    }
}

/// One classified answer: a variant the dispatcher acts on, and never an accepted request with an
/// empty provider id (its callbacks could never be matched).
pub fn check_outcome(answer: &Answer, outcome: &Outcome) {
    match outcome {
        Outcome::Accepted { provider_id, .. } => {
            assert!(
                (200..300).contains(&answer.status),
                "only a 2xx is accepted, not {}",
                answer.status
            );
            if let Some(id) = provider_id {
                assert!(
                    !id.trim().is_empty(),
                    "accepted with an empty provider id: {:?}",
                    answer.body
                );
            }
        }
        Outcome::Transient { reason, .. } | Outcome::Permanent { reason } => {
            assert!(!reason.is_empty());
        }
    }
    if matches!(answer.status, 429 | 503) && !matches!(outcome, Outcome::Accepted { .. }) {
        // Overload pauses the provider: such an answer is never final.
        assert!(
            matches!(outcome, Outcome::Transient { .. }),
            "{} must be transient: {outcome:?}",
            answer.status
        );
    }
}

/// The provider answer classifiers and status look-up readers, and `Retry-After`.
pub fn classifiers(data: &[u8]) {
    let answer = split_answer(data);
    let clients: [&dyn Client; 3] = [&exotel_call(), &exotel_sms(), &gupshup()];
    for client in clients {
        let outcome = client.classify(&answer);
        check_outcome(&answer, &outcome);
        if let Some(report) = client.read_report("fuzz-id", &answer) {
            assert!((200..300).contains(&answer.status));
            assert_eq!(report.provider_id, "fuzz-id");
            assert_eq!(report.channel, client.channel());
        }
    }
    let _ = parse_retry_after(&answer.body);
}

/// The stakeholder file: parsed, validated, and if valid, asked for plans and digits.
pub fn stakeholders(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Some(region) = phone::region("IN") else {
        return;
    };
    match Routing::parse(&text, "fuzz.toml", region) {
        Ok(routing) => {
            for ty in [None, Some(""), Some("Heart"), Some("default"), Some(" x ")] {
                let plan = routing.plan(ty);
                for t in &plan.targets {
                    assert!(t.phone.e164().starts_with('+'));
                }
            }
            for digits in ["1", "2", "*", "#", ""] {
                let _ = routing.type_for_digits(digits);
            }
            let _ = routing.describe();
            let _ = routing.describe_escalation(900);
            let _ = routing.check_escalation(&exotel_sos::stakeholders::EscalationBounds {
                ring_timeout_secs: 30,
                ack_deadline_secs: 900,
            });
            let _ = routing.contact_count();
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a refused file says why");
            for e in &errors {
                assert!(e.starts_with("fuzz.toml"), "errors name the file: {e}");
            }
        }
    }
}
