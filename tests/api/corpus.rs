//! Replays the committed fuzz corpus (fuzz/corpus/<target>/*) through the same checks the cargo-fuzz
//! targets run (fuzz/harness.rs), so every input the fuzzer ever kept, and every crash it found, is an
//! ordinary test on the stable toolchain.

use std::path::PathBuf;
use std::time::Duration;

use exotel_sos::providers::{Answer, Client};

#[path = "../../fuzz/harness.rs"]
pub mod harness;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            (path, data)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    for (path, data) in corpus(target) {
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{} fails its checks", path.display());
        }
    }
}

#[test]
fn passthru_params_corpus() {
    replay("passthru_params", harness::passthru_params);
}

#[test]
fn callbacks_corpus() {
    replay("callbacks", harness::callbacks);
}

#[test]
fn classifiers_corpus() {
    replay("classifiers", harness::classifiers);
}

#[test]
fn stakeholders_corpus() {
    replay("stakeholders", harness::stakeholders);
}

/// Bodies a wrong base_url, a proxy or a captive portal answer with, at every status that matters.
#[test]
fn classifiers_survive_html_empty_huge_and_nul_bodies() {
    let huge_json = format!(
        "{{\"Call\":{{\"Sid\":\"{}\"}},\"RestException\":{{\"Message\":\"{}\"}}}}",
        "s".repeat(1 << 20),
        "m".repeat(1 << 20)
    );
    let bodies = [
        String::new(),
        "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>".to_owned(),
        "<TwilioResponse><RestException><Message>".to_owned(),
        "\0".repeat(64),
        "{\"Call\":{\"Sid\":\"\0\"},\"SMSMessage\":{\"Sid\":\"\0\"}}".to_owned(),
        "x".repeat(4 << 20),
        huge_json,
        "{\"response\":{\"status\":\"success\",\"id\":null}}".to_owned(),
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".repeat(64),
    ];
    let clients: [&dyn Client; 3] = [
        &harness::exotel_call(),
        &harness::exotel_sms(),
        &harness::gupshup(),
    ];
    for status in [
        0, 100, 200, 201, 202, 204, 301, 400, 401, 403, 404, 408, 429, 500, 503, 504, 999,
    ] {
        for body in &bodies {
            for retry_after in [None, Some(Duration::from_secs(u64::MAX))] {
                let answer = Answer {
                    status,
                    retry_after,
                    body: body.clone(),
                };
                for client in clients {
                    let outcome = client.classify(&answer);
                    harness::check_outcome(&answer, &outcome);
                    let _ = client.read_report("id", &answer);
                }
            }
        }
    }
}
