//! Malformed storms: thousands of random, truncated, oversized, wrongly encoded and NUL-bearing requests
//! at every route, with valid Passthrus in between. Never a 500, never a dropped connection on a
//! well-formed request (a panicking handler drops it), 503 only where the contract lists it, and every
//! valid Passthru answered 200 and stored.
//!
//! `SOS_STORM_SEED` replays a run (the seed is printed); `SOS_HEAVY_TESTS=1` sends ten times more.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

use crate::both_engines;
use crate::helpers::*;
use crate::raw;

both_engines!(malformed_storm_never_fails_and_passthrus_keep_working);

/// Every route with the methods it serves; a random method is sent one time in five.
const ROUTES: &[(&str, &[&str])] = &[
    ("/exotel/passthru", &["GET", "POST", "HEAD"]),
    ("/exotel/passthru", &["GET", "POST"]),
    ("/exotel/greeting", &["GET", "HEAD"]),
    ("/exotel/call-status", &["POST"]),
    ("/exotel/sms-status", &["POST"]),
    ("/r/{}", &["GET"]),
    ("/api/v1/incidents", &["POST"]),
    ("/api/v1/incidents", &["GET"]),
    ("/api/v1/incidents/{}", &["GET"]),
    ("/api/v1/incidents/{}/resolve", &["POST"]),
    ("/api/v1/alertmanager", &["POST"]),
    ("/api/v1/openapi.json", &["GET"]),
    ("/healthz", &["GET"]),
    ("/readyz", &["GET"]),
    ("/metrics", &["GET"]),
    ("/nowhere", &["GET"]),
    ("/exotel/passthru/extra", &["GET"]),
    ("//exotel//passthru", &["GET"]),
];

const METHODS: &[&str] = &["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"];

const KEYS: &[&str] = &[
    "CallSid",
    "CallFrom",
    "From",
    "To",
    "EmergencyType",
    "emergency_type",
    "digits",
    "RecordingUrl",
    "StartTime",
    "Created",
    "CustomField",
    "Status",
    "SmsSid",
    "EventType",
    "DetailedStatusCode",
    "Legs[0][Status]",
    "limit",
    "before",
    "page",
    "status",
    "token",
];

/// Routes whose contract lists 503 (busy database share, report not yet recorded, store unavailable,
/// readiness). Any other 503 is a failure.
fn may_answer_503(method: &str, path: &str) -> bool {
    path == "/readyz"
        || path == "/exotel/call-status"
        || path == "/exotel/sms-status"
        || path.starts_with("/r/")
        || (method == "POST" && (path == "/api/v1/incidents" || path == "/api/v1/alertmanager"))
}

struct Spec {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Bytes sent as they are over TCP instead of through an HTTP client.
    raw: Option<Vec<u8>>,
    /// A body over `server.max_body_bytes`: the server may answer before reading it and close.
    oversized: bool,
}

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.gen_range(0..items.len())]
}

/// A percent-encoded value: plain, control bytes, invalid UTF-8, bad escapes, quotes, long, empty.
fn value(rng: &mut StdRng) -> String {
    match rng.gen_range(0..10) {
        0 => String::new(),
        1 => "%00".repeat(rng.gen_range(1..5)),
        2 => (0..rng.gen_range(1..40))
            .map(|_| format!("%{:02X}", rng.gen::<u8>()))
            .collect(),
        3 => "%ZZ%".to_owned(),
        4 => "%22Heart%00%22".to_owned(),
        5 => "x".repeat(rng.gen_range(100..6000)),
        6 => "%F0%9F%9A%91%FF%FE".to_owned(),
        7 => "null".to_owned(),
        8 => format!("e12eb6e6fcd9{:020}", rng.gen::<u64>()),
        _ => (0..rng.gen_range(1..20))
            .map(|_| rng.gen_range(b'a'..=b'z') as char)
            .collect(),
    }
}

fn query(rng: &mut StdRng) -> String {
    let mut parts = Vec::new();
    match rng.gen_range(0..10) {
        0..=5 => parts.push(format!("token={WEBHOOK_TOKEN}")),
        6..=7 => parts.push("token=wrong".to_owned()),
        _ => {}
    }
    for _ in 0..rng.gen_range(0..8) {
        let key = if rng.gen_bool(0.8) {
            pick(rng, KEYS).to_owned()
        } else {
            value(rng)
        };
        parts.push(format!("{key}={}", value(rng)));
    }
    if rng.gen_bool(0.05) {
        parts.push("&&==&%".to_owned());
    }
    parts.join("&")
}

/// A JSON document that is sometimes valid, sometimes not: wrong types, NUL escapes, raw control bytes,
/// deep nesting, truncation.
fn json_body(rng: &mut StdRng, path: &str) -> Vec<u8> {
    let s = |rng: &mut StdRng| -> serde_json::Value {
        // Half of the values are good ones, so that requests get past validation too.
        match rng.gen_range(0..12) {
            0 => serde_json::Value::Null,
            1 => serde_json::json!(rng.gen::<i64>()),
            2 => serde_json::json!(["a\u{0}", 1, null]),
            3 => serde_json::json!({"nested": "x\u{0}y"}),
            4 => serde_json::json!("Heart\u{0}\u{1b}"),
            5 => serde_json::json!("y".repeat(rng.gen_range(0..2000))),
            6..=8 => serde_json::json!("Heart"),
            _ => serde_json::json!("db1 is down"),
        }
    };
    let doc = if path.contains("alertmanager") {
        serde_json::json!({
            "version": if rng.gen_bool(0.8) { serde_json::json!("4") } else { s(rng) },
            "groupKey": s(rng), "status": "firing", "receiver": s(rng),
            "alerts": [{
                "status": if rng.gen_bool(0.5) { "firing" } else { "resolved" },
                "labels": {"alertname": s(rng), "emergency_type": s(rng)},
                "annotations": {"summary": s(rng)},
                "startsAt": s(rng), "fingerprint": s(rng)
            }]
        })
    } else {
        let mut m = serde_json::Map::new();
        let keys: &[&str] = if path.starts_with("/api/") {
            &["emergency_type", "message", "audio_url", "dedup_key"]
        } else {
            &[
                "CallSid",
                "Status",
                "SmsSid",
                "EmergencyType",
                "CustomField",
            ]
        };
        for &key in keys {
            if rng.gen_bool(if key == "audio_url" { 0.2 } else { 0.8 }) {
                m.insert(key.to_owned(), s(rng));
            }
        }
        if rng.gen_bool(0.1) {
            m.insert("unknown\u{0}".to_owned(), s(rng));
        }
        serde_json::Value::Object(m)
    };
    let mut bytes = doc.to_string().into_bytes();
    match rng.gen_range(0..8) {
        0 => bytes.truncate(rng.gen_range(0..bytes.len().max(1))),
        1 => {
            let at = rng.gen_range(0..bytes.len().max(1));
            bytes.insert(at, rng.gen_range(0..0x20));
        }
        2 => bytes = format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
        3 => bytes.extend_from_slice(&[0xff, 0xfe, 0x00]),
        _ => {}
    }
    bytes
}

fn form_body(rng: &mut StdRng) -> Vec<u8> {
    let mut b = query(rng).into_bytes();
    if rng.gen_bool(0.3) {
        b.extend_from_slice(&[b'&', b'x', b'=', 0xff, 0x00, 0xc3]);
    }
    b
}

fn multipart_body(rng: &mut StdRng, boundary: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for _ in 0..rng.gen_range(0..5) {
        let name = pick(rng, KEYS);
        b.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                .as_bytes(),
        );
        b.extend_from_slice(value(rng).as_bytes());
        if rng.gen_bool(0.2) {
            b.extend_from_slice(&[0, 0xff, 0xfe]);
        }
        b.extend_from_slice(b"\r\n");
    }
    if rng.gen_bool(0.7) {
        b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    }
    b
}

fn spec(rng: &mut StdRng) -> Spec {
    let (route, methods) = ROUTES[rng.gen_range(0..ROUTES.len())];
    let path = route.replace("{}", &value(rng).replace('/', "%2F"));
    let method = if rng.gen_bool(0.2) {
        pick(rng, METHODS)
    } else {
        pick(rng, methods)
    }
    .to_owned();
    if rng.gen_bool(0.08) {
        return raw_spec(rng, &path);
    }
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    match rng.gen_range(0..10) {
        0..=5 => headers.push((
            "authorization".into(),
            format!("Bearer {ADMIN_TOKEN}").into_bytes(),
        )),
        6 => headers.push(("authorization".into(), b"Bearer wrong".to_vec())),
        7 => headers.push(("authorization".into(), b"Basic \x01\xff".to_vec())),
        _ => {}
    }
    if rng.gen_bool(0.1) {
        headers.push(("x-sos-source".into(), b"cli".to_vec()));
    }
    let mut body = Vec::new();
    let mut oversized = false;
    if method != "GET" && method != "HEAD" || rng.gen_bool(0.05) {
        let boundary: String = (0..rng.gen_range(1..30))
            .map(|_| {
                let c = rng.gen_range(0..62u8);
                match c {
                    0..=9 => (b'0' + c) as char,
                    10..=35 => (b'a' + c - 10) as char,
                    _ => (b'A' + c - 36) as char,
                }
            })
            .collect();
        let (ctype, b): (String, Vec<u8>) = match rng.gen_range(0..9) {
            0 | 1 => ("application/json".into(), json_body(rng, &path)),
            2 => (
                "Application/JSON; charset=utf-16".into(),
                json_body(rng, &path),
            ),
            3 | 4 => ("application/x-www-form-urlencoded".into(), form_body(rng)),
            5 => (
                format!("Multipart/Form-Data; boundary={boundary}"),
                multipart_body(rng, &boundary),
            ),
            6 => (
                "multipart/form-data; boundary=\"\"".into(),
                multipart_body(rng, "x"),
            ),
            7 => (
                "text/plain".into(),
                (0..rng.gen_range(0..500)).map(|_| rng.gen()).collect(),
            ),
            _ => (String::new(), json_body(rng, &path)),
        };
        if !ctype.is_empty() {
            headers.push(("content-type".into(), ctype.into_bytes()));
        }
        body = b;
        if rng.gen_bool(0.02) {
            body = vec![b'a'; 70_000];
            oversized = true;
        }
    }
    Spec {
        method,
        path,
        query: query(rng),
        headers,
        body,
        raw: None,
        oversized,
    }
}

/// Bytes no HTTP client would send: garbage, a header cut off half-way, control bytes in a header, a
/// body shorter than its length.
fn raw_spec(rng: &mut StdRng, path: &str) -> Spec {
    let bytes: Vec<u8> = match rng.gen_range(0..10) {
        0..=3 => (0..rng.gen_range(1..300)).map(|_| rng.gen()).collect(),
        4..=6 => format!("GET {path}?token={WEBHOOK_TOKEN}&CallSid=ab HTTP/1.1\r\nHost: x\r\nX-A")
            .into_bytes(),
        7 | 8 => {
            let mut b = format!("POST {path}?token={WEBHOOK_TOKEN} HTTP/1.1\r\nHost: x\r\nX-Bad: ")
                .into_bytes();
            b.extend_from_slice(&[0, 1, 0xff, b'\r', b'\n', b'\r', b'\n']);
            b
        }
        _ => format!(
            "POST {path}?token={WEBHOOK_TOKEN} HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nCallSid=ab"
        )
        .into_bytes(),
    };
    Spec {
        method: "RAW".into(),
        path: path.to_owned(),
        query: String::new(),
        headers: Vec::new(),
        body: Vec::new(),
        raw: Some(bytes),
        oversized: false,
    }
}

/// What went wrong, one line per failure.
type Failures = Arc<Mutex<Vec<String>>>;

/// Answers by status code, for the run's summary.
type Tally = Arc<Mutex<std::collections::BTreeMap<u16, usize>>>;

async fn send(
    app: &TestApp,
    client: &reqwest::Client,
    s: &Spec,
    failures: &Failures,
    tally: &Tally,
) {
    if let Some(bytes) = &s.raw {
        let mut stream = raw::connect(app).await;
        use tokio::io::AsyncWriteExt;
        let _ = stream.write_all(bytes).await;
        match raw::read_to_close(&mut stream, Duration::from_secs(30)).await {
            None => failures
                .lock()
                .await
                .push(format!("raw request to {} was never closed", s.path)),
            Some(answer) => {
                if raw::status_of(&answer).is_some_and(|c| c >= 500) {
                    failures.lock().await.push(format!(
                        "raw request to {}: {}",
                        s.path,
                        String::from_utf8_lossy(&answer[..answer.len().min(80)])
                    ));
                }
            }
        }
        return;
    }
    let Ok(method) = reqwest::Method::from_bytes(s.method.as_bytes()) else {
        return;
    };
    let url = format!("{}{}?{}", app.base, s.path, s.query);
    let mut req = client.request(method, &url).body(s.body.clone());
    for (k, v) in &s.headers {
        if let Ok(v) = reqwest::header::HeaderValue::from_bytes(v) {
            req = req.header(k.as_str(), v);
        }
    }
    let label = format!(
        "{} {}",
        s.method,
        s.path.chars().take(60).collect::<String>()
    );
    match req.send().await {
        Ok(res) => {
            let code = res.status().as_u16();
            *tally.lock().await.entry(code).or_default() += 1;
            let path = res.url().path().to_owned();
            let body = res.text().await.unwrap_or_default();
            let bad = code == 500
                || (code >= 500 && !(code == 503 && may_answer_503(&s.method, &path)))
                || (path == "/exotel/passthru" && code == 302);
            if bad {
                failures.lock().await.push(format!(
                    "{label} -> {code} {}",
                    body.chars().take(120).collect::<String>()
                ));
            }
        }
        Err(e) if !s.oversized => {
            failures
                .lock()
                .await
                .push(format!("{label}: no answer: {e}"));
        }
        Err(_) => {}
    }
}

async fn malformed_storm_never_fails_and_passthrus_keep_working(db: Db) {
    let heavy = std::env::var("SOS_HEAVY_TESTS").is_ok_and(|v| v == "1");
    let total: usize = if heavy { 20_000 } else { 2_000 };
    let seed: u64 = std::env::var("SOS_STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0007);
    println!("storm: {total} requests, seed {seed} (SOS_STORM_SEED replays it)");
    let app = Arc::new(
        spawn_app_with(
            db,
            &[
                ("SOS_SERVER__HEADER_READ_TIMEOUT_SECS", "1".into()),
                ("SOS_SERVER__REQUEST_TIMEOUT_SECS", "6".into()),
            ],
        )
        .await,
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let specs: Vec<Spec> = (0..total).map(|_| spec(&mut rng)).collect();
    // A new connection per request: the server cuts idle ones after a second, and a reused connection
    // closed under the client would read as a dropped request.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let failures: Failures = Arc::new(Mutex::new(Vec::new()));
    let tally: Tally = Arc::default();
    let valid: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let specs = Arc::new(specs);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = 12;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (app, client, failures, tally, valid, specs, next) = (
            app.clone(),
            client.clone(),
            failures.clone(),
            tally.clone(),
            valid.clone(),
            specs.clone(),
            next.clone(),
        );
        tasks.spawn(async move {
            let mut n = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(s) = specs.get(i) else { break };
                send(&app, &client, s, &failures, &tally).await;
                n += 1;
                // A valid Passthru every 25 requests of each worker, in the thick of it.
                if n.is_multiple_of(25) {
                    let sid = format!("{:032}", w * 1_000_000 + n);
                    let res = client
                        .get(format!(
                            "{}/exotel/passthru?token={WEBHOOK_TOKEN}&CallSid={sid}&EmergencyType=Heart&CallFrom=09901320691",
                            app.base
                        ))
                        .send()
                        .await;
                    match res.map(|r| r.status().as_u16()) {
                        Ok(200) => valid.lock().await.push(sid),
                        other => failures
                            .lock()
                            .await
                            .push(format!("valid Passthru {sid}: {other:?}")),
                    }
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a storm worker panicked");
    }
    println!("storm answers by status: {:?}", tally.lock().await);
    let failures = failures.lock().await.clone();
    assert!(
        failures.is_empty(),
        "{} failure(s) with seed {seed}:\n{}",
        failures.len(),
        failures
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let valid = valid.lock().await.clone();
    assert!(valid.len() >= total / 30, "{} valid Passthrus", valid.len());
    for sid in &valid {
        let inc = app
            .store
            .incident_by_call_sid(sid)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("valid Passthru {sid} answered 200 but not stored"));
        assert_eq!(inc.emergency_type, "Heart");
    }
    // Still serving after the storm.
    assert_eq!(
        app.passthru("CallSid=after0storm&EmergencyType=Heart")
            .await
            .status(),
        200
    );
    if let Ok(app) = Arc::try_unwrap(app) {
        app.stop().await;
    }
}
