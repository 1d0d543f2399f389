//! Properties of the parsers of untrusted input: the Passthru and callback parameters, the provider
//! answer classifiers and the stakeholder file. 64 cases each by default so CI stays fast; set
//! `PROPTEST_CASES=100000` for a long run.

use axum::body::Bytes;
use exotel_sos::http::params::{clean, strip_all_controls, Params};
use exotel_sos::providers::{parse_retry_after, Answer, Client, Outcome};
use proptest::prelude::*;

use super::corpus::harness;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        // Found failures are shrunk and reported; add them to fuzz/corpus to keep them.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A value no cleaning should change: printable, no quotes or spaces at its ends, not "null".
fn plain_value() -> impl Strategy<Value = String> {
    "[A-Za-z0-9+:/._@-]([A-Za-z0-9 +:/._@,=&?#%-]{0,40}[A-Za-z0-9+:/._@-])?"
        .prop_filter("null means absent", |v| !v.eq_ignore_ascii_case("null"))
}

fn key() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9_]{0,15}"
}

/// The value `key` has after a request carrying only `key=value`: `value` without control characters,
/// cleaned, whatever the encoding: the edge's clean-up holds for every body type alike.
fn single(content_type: &str, query: &str, body: Vec<u8>, key: &str) -> Option<String> {
    harness::read_params(content_type, query, Bytes::from(body))
        .expect("a well-formed body is read")
        .get(key)
}

const BOUNDARY: &str = "exotelsosboundary7ma4ywxkt";

fn multipart(key: &str, value: &str) -> Vec<u8> {
    format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n--{BOUNDARY}--\r\n"
    )
    .into_bytes()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn params_never_panic_on_any_bytes_and_content_type(
        data in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        harness::passthru_params(&data);
        harness::callbacks(&data);
    }

    #[test]
    fn params_never_panic_with_an_arbitrary_content_type(
        content_type in ".{0,80}",
        query in ".{0,200}",
        body in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        if let Ok(params) = harness::read_params(&content_type, &query, Bytes::from(body)) {
            for key in harness::FIELDS {
                if let Some(v) = params.get(key) {
                    harness::check_value(&v);
                }
            }
        }
    }

    #[test]
    fn clean_never_returns_empty_and_is_stable_on_its_own_output(raw in "\\PC{0,64}|.{0,64}") {
        harness::check_clean(&raw);
    }

    #[test]
    fn clean_keeps_plain_values_and_strips_one_layer_of_quotes(v in plain_value()) {
        prop_assert_eq!(clean(&v), Some(v.clone()));
        prop_assert_eq!(clean(&format!("\"{v}\"")), Some(v.clone()));
        prop_assert_eq!(clean(&format!("  '{v}' \t")), Some(v.clone()));
        // Idempotent on what it returns.
        prop_assert_eq!(clean(&v).and_then(|c| clean(&c)), Some(v));
    }

    #[test]
    fn a_value_reads_back_the_same_from_query_form_json_and_multipart(
        key in key(),
        // Any text, NUL and other control characters included.
        value in "(.|\\x00|[\\x01-\\x1f]|\\x7f|\\x{85}){0,60}",
    ) {
        // Every field enters without control characters, then reads back cleaned.
        let expected = clean(&strip_all_controls(value.clone()));
        let form = serde_urlencoded::to_string([(&key, &value)]).expect("encodes");
        prop_assert_eq!(Params::from_query(Some(&form)).get(&key), expected.clone());
        prop_assert_eq!(
            single("application/x-www-form-urlencoded", "", form.into_bytes(), &key),
            expected.clone()
        );
        let json = serde_json::to_vec(&serde_json::json!({ key.clone(): value.clone() }))
            .expect("encodes");
        prop_assert_eq!(single("application/json", "", json, &key), expected.clone());
        // Multipart cannot carry a bare CR or LF in a line of its own without changing the value, and
        // its reader (multer, through encoding_rs) drops a leading byte-order mark, as a decoder should.
        if !value.contains(['\r', '\n']) && !value.starts_with('\u{feff}') {
            prop_assert_eq!(
                single(
                    &format!("multipart/form-data; boundary={BOUNDARY}"),
                    "",
                    multipart(&key, &value),
                    &key
                ),
                expected
            );
        }
    }

    #[test]
    fn classifiers_never_panic_and_never_accept_an_empty_id(
        status in 0u16..1000,
        body in "(.|\\x00){0,300}",
        retry in proptest::option::of(0u64..100_000),
    ) {
        let answer = Answer {
            status,
            retry_after: retry.map(std::time::Duration::from_secs),
            body,
        };
        let clients: [&dyn Client; 3] = [&harness::exotel_call(), &harness::exotel_sms(), &harness::gupshup()];
        for client in clients {
            let outcome = client.classify(&answer);
            harness::check_outcome(&answer, &outcome);
            let _ = client.read_report("id", &answer);
        }
    }

    #[test]
    fn a_2xx_with_a_blank_id_is_never_accepted_under_that_id(
        status in 200u16..300,
        id in "[ \\t]{0,3}",
    ) {
        let bodies = [
            serde_json::json!({"Call": {"Sid": id, "Status": "in-progress"}}),
            serde_json::json!({"SMSMessage": {"Sid": id, "Status": "queued"}}),
            serde_json::json!({"SMSMessage": [{"Sid": id}]}),
            serde_json::json!({"response": {"status": "success", "id": id}}),
        ];
        let clients: [&dyn Client; 3] = [&harness::exotel_call(), &harness::exotel_sms(), &harness::gupshup()];
        for body in bodies {
            let answer = Answer { status, retry_after: None, body: body.to_string() };
            for client in clients {
                let outcome = client.classify(&answer);
                let blank = matches!(
                    &outcome,
                    Outcome::Accepted { provider_id: Some(p), .. } if p.trim().is_empty()
                );
                prop_assert!(!blank, "{} accepted {} under a blank id", client.channel(), answer.body);
            }
        }
    }

    #[test]
    fn retry_after_reads_any_number_of_seconds_and_never_panics(secs in any::<u64>(), raw in ".{0,40}") {
        prop_assert_eq!(
            parse_retry_after(&secs.to_string()),
            Some(std::time::Duration::from_secs(secs))
        );
        let _ = parse_retry_after(&raw);
    }

    #[test]
    fn the_stakeholder_parser_never_panics_and_reports_errors(text in "(.|\\n|\\x00){0,400}") {
        harness::stakeholders(text.as_bytes());
    }

    #[test]
    fn stakeholder_files_of_the_right_shape_never_panic(
        contacts in proptest::collection::vec(
            (".{0,12}", "[+0-9 ()-]{0,16}", proptest::collection::vec("[a-z]{0,6}", 0..3),
             proptest::option::of(proptest::collection::vec("call|sms|whatsapp|pager|CALL", 0..4))),
            0..6,
        ),
        routes in proptest::collection::vec(("[A-Za-z ]{0,8}", proptest::collection::vec("[a-z]{0,6}", 0..3)), 0..4),
        ivr in proptest::collection::vec(("[0-9*#a ]{0,3}", "[A-Za-z]{0,8}"), 0..4),
    ) {
        let mut file = String::new();
        for (name, phone, teams, channels) in &contacts {
            file.push_str(&format!("[[contact]]\nname = {name:?}\nphone = {phone:?}\nteams = {teams:?}\n"));
            if let Some(channels) = channels {
                file.push_str(&format!("channels = {channels:?}\n"));
            }
        }
        file.push_str("[routes]\n");
        for (ty, teams) in &routes {
            file.push_str(&format!("{ty:?} = {teams:?}\n"));
        }
        file.push_str("[ivr]\n");
        for (digits, ty) in &ivr {
            file.push_str(&format!("{digits:?} = {ty:?}\n"));
        }
        harness::stakeholders(file.as_bytes());
    }
}
