//! Dispatch benchmarks, against a local stand-in provider that answers at once.
//!
//! 1. Latency: Passthru request → first provider request arriving at the stand-in, per incident,
//!    one incident at a time (median, p99).
//! 2. Drain: how fast one process sends 10,000 queued deliveries, against a bare reqwest loop posting
//!    the same requests to the same stand-in with the same concurrency, measured in the same run.
//!
//! Run with `scripts/bench.sh` (both engines) or `BENCH_DB=sqlite cargo bench --bench dispatch`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use exotel_sos::domain::{phone, Channel, Phone, Source};
use exotel_sos::settings::Settings;
use exotel_sos::store::{NewDelivery, NewIncident, Store};
use exotel_sos::App;
use futures_util::StreamExt;
use tokio::sync::Notify;

const TOKEN: &str = "bench-token-0123456789abcdef";

/// Counts requests and wakes whoever waits for a number of them.
#[derive(Default)]
struct StandIn {
    hits: AtomicUsize,
    notify: Notify,
}

async fn start_stand_in() -> (SocketAddr, Arc<StandIn>) {
    let stand_in = Arc::new(StandIn::default());
    let s1 = stand_in.clone();
    let s2 = stand_in.clone();
    let s3 = stand_in.clone();
    let hit = |s: Arc<StandIn>| {
        let n = s.hits.fetch_add(1, Ordering::SeqCst);
        s.notify.notify_waiters();
        n
    };
    let app = Router::new()
        .route(
            "/v1/Accounts/bench/Calls/connect.json",
            post(move || async move {
                let n = hit(s1);
                axum::Json(serde_json::json!({"Call": {"Sid": format!("c{n}"), "Status": "in-progress"}}))
            }),
        )
        .route(
            "/v1/Accounts/bench/Sms/send.json",
            post(move || async move {
                let n = hit(s2);
                axum::Json(serde_json::json!({"SMSMessage": {"Sid": format!("s{n}"), "Status": "queued"}}))
            }),
        )
        .route(
            "/gupshup",
            post(move || async move {
                let n = hit(s3);
                axum::Json(serde_json::json!({"response": {"id": format!("w{n}"), "status": "success", "details": "", "phone": ""}}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, stand_in)
}

impl StandIn {
    async fn wait_for(&self, n: usize) {
        loop {
            let notified = self.notify.notified();
            if self.hits.load(Ordering::SeqCst) >= n {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }
}

struct Db {
    url: String,
    pg_name: Option<String>,
    _dir: tempfile::TempDir,
}

async fn database(kind: &str) -> Db {
    let dir = tempfile::tempdir().unwrap();
    if kind == "sqlite" {
        return Db {
            url: format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("bench.db").display()
            ),
            pg_name: None,
            _dir: dir,
        };
    }
    let admin = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let name = format!("sos_bench_{}", uuid::Uuid::new_v4().simple());
    let store = Store::connect(&admin, 1).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(store.pool())
        .await
        .unwrap();
    store.close().await;
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .unwrap_or(admin);
    Db {
        url: format!("{base}/{name}"),
        pg_name: Some(name),
        _dir: dir,
    }
}

async fn drop_database(db: &Db) {
    if let Some(name) = &db.pg_name {
        let admin = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let store = Store::connect(&admin, 1).await.unwrap();
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(store.pool())
            .await;
        store.close().await;
    }
}

const STAKEHOLDERS: &str = r#"
[[contact]]
name = "A"
phone = "+919800000001"
teams = ["t"]

[[contact]]
name = "B"
phone = "+919800000002"
teams = ["t"]

[[contact]]
name = "C"
phone = "+919800000003"
teams = ["t"]

[routes]
default = ["t"]
"#;

fn settings(db: &Db, stand_in: SocketAddr, dispatch: bool, concurrency: u32) -> Settings {
    let file = db._dir.path().join("stakeholders.toml");
    std::fs::write(&file, STAKEHOLDERS).unwrap();
    let base = format!("http://{stand_in}");
    let c = concurrency.to_string();
    let env: Vec<(String, String)> = [
        ("SOS_DATABASE__URL", db.url.clone()),
        ("SOS_DATABASE__MAX_CONNECTIONS", "16".into()),
        ("SOS_SERVER__WEBHOOK_TOKEN", TOKEN.into()),
        ("SOS_SERVER__ADMIN_TOKEN", TOKEN.into()),
        ("SOS_STAKEHOLDERS__FILE", file.display().to_string()),
        ("SOS_EXOTEL__BASE_URL", base.clone()),
        ("SOS_EXOTEL__ACCOUNT_SID", "bench".into()),
        ("SOS_EXOTEL__API_KEY", "k".into()),
        ("SOS_EXOTEL__API_TOKEN", "t".into()),
        ("SOS_EXOTEL__CALLER_ID", "08069891522".into()),
        (
            "SOS_EXOTEL__FLOW_URL",
            "http://my.exotel.com/bench/exoml/start_voice/1".into(),
        ),
        ("SOS_EXOTEL__SMS_FROM", "BENCH".into()),
        ("SOS_GUPSHUP__BASE_URL", format!("{base}/gupshup")),
        ("SOS_GUPSHUP__USERID", "1".into()),
        ("SOS_GUPSHUP__PASSWORD", "p".into()),
        ("SOS_DISPATCH__ENABLED", dispatch.to_string()),
        ("SOS_DISPATCH__CALL_CONCURRENCY", c.clone()),
        ("SOS_DISPATCH__SMS_CONCURRENCY", c.clone()),
        ("SOS_DISPATCH__WHATSAPP_CONCURRENCY", c),
        ("SOS_DISPATCH__CALL_PER_MINUTE", "100000000".into()),
        ("SOS_DISPATCH__SMS_PER_MINUTE", "100000000".into()),
        ("SOS_DISPATCH__WHATSAPP_PER_MINUTE", "100000000".into()),
        ("SOS_LOG__LEVEL", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Settings::load_with_env(None, env).unwrap()
}

async fn serve(
    app: App,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let _ = app
            .run(listener, async move {
                let _ = rx.await;
            })
            .await;
    });
    (addr, tx, handle)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Passthru → first provider request, one incident at a time.
async fn latency(kind: &str, incidents: usize) {
    let (stand_addr, stand_in) = start_stand_in().await;
    let db = database(kind).await;
    let app = App::build(settings(&db, stand_addr, true, 16))
        .await
        .unwrap();
    let (addr, stop, handle) = serve(app).await;
    let client = reqwest::Client::new();
    let per_incident = 9; // 3 contacts × 3 channels
    let mut samples = Vec::with_capacity(incidents);
    let mut passthru_ms = Vec::with_capacity(incidents);
    for i in 0..incidents {
        let before = stand_in.hits.load(Ordering::SeqCst);
        let url = format!(
            "http://{addr}/exotel/passthru?token={TOKEN}&CallSid={i:032}&CallFrom=09901320691&EmergencyType=Heart"
        );
        let t0 = Instant::now();
        let res = client.get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200);
        passthru_ms.push(t0.elapsed());
        stand_in.wait_for(before + 1).await;
        samples.push(t0.elapsed());
        // Let the incident's fan-out finish so each sample starts from an idle queue.
        stand_in.wait_for(before + per_incident).await;
    }
    samples.sort();
    passthru_ms.sort();
    println!(
        "latency {kind}: incidents={incidents} passthru_200 median={:.2}ms p99={:.2}ms | first_provider_request median={:.2}ms p99={:.2}ms max={:.2}ms",
        ms(percentile(&passthru_ms, 0.5)),
        ms(percentile(&passthru_ms, 0.99)),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap()),
    );
    let _ = stop.send(());
    let _ = handle.await;
    drop_database(&db).await;
}

/// Drains `n` queued deliveries, then posts the same number of requests with a bare reqwest loop.
async fn drain(kind: &str, n: usize, concurrency: u32) {
    let (stand_addr, stand_in) = start_stand_in().await;
    let db = database(kind).await;
    // Queue the work with the dispatcher off.
    let app = App::build(settings(&db, stand_addr, false, concurrency))
        .await
        .unwrap();
    let region = phone::region("IN").unwrap();
    let contacts = n.div_ceil(3);
    let providers = app.state.providers.clone();
    let targets: Vec<NewDelivery> = (0..contacts)
        .flat_map(|i| {
            let phone = Phone::parse(&format!("+9198{:08}", 10_000_000 + i), region).unwrap();
            let providers = providers.clone();
            Channel::ALL.into_iter().map(move |channel| NewDelivery {
                contact_name: format!("c{i}"),
                phone: phone.e164().to_owned(),
                channel,
                provider: providers.for_channel(channel).unwrap().name.clone(),
                tier: 0,
                run: 0,
                delay_ms: 0,
            })
        })
        .take(n)
        .collect();
    app.state
        .store
        .create_incident(
            &NewIncident {
                source: Source::Api,
                call_sid: None,
                dedup_key: Some("bench".into()),
                emergency_type: "Bench".into(),
                route: "default".into(),
                caller: None,
                recording_url: Some(
                    "https://recordings.exotel.com/exotelrecordings/bench/a.mp3".into(),
                ),
                message: Some("drain benchmark".into()),
                raw_params: "[]".into(),
                occurred_at: None,
                recording_fetch: None,
                escalation: None,
                unreached_after_ms: None,
            },
            &targets,
        )
        .await
        .unwrap();
    let store = app.state.store.clone();
    drop(app);

    let app = App::build(settings(&db, stand_addr, true, concurrency))
        .await
        .unwrap();
    let t0 = Instant::now();
    let (_addr, stop, handle) = serve(app).await;
    stand_in.wait_for(n).await;
    let sent = t0.elapsed();
    // Done means recorded, not only sent.
    loop {
        let counts = store.delivery_status_counts().await.unwrap();
        let open: i64 = counts
            .iter()
            .filter(|(s, _)| s == "queued" || s == "sending")
            .map(|(_, c)| *c)
            .sum();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = t0.elapsed();
    let _ = stop.send(());
    let _ = handle.await;

    // Baseline: the same requests, the same stand-in, the same total concurrency, nothing stored.
    let client = reqwest::Client::new();
    let urls = [
        format!("http://{stand_addr}/v1/Accounts/bench/Calls/connect.json"),
        format!("http://{stand_addr}/v1/Accounts/bench/Sms/send.json"),
        format!("http://{stand_addr}/gupshup"),
    ];
    let b0 = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let url = urls[i % 3].clone();
            async move {
                let form = [
                    ("From", "+919800000001"),
                    ("CallerId", "08069891522"),
                    ("CustomField", "0123456789abcdef0123456789abcdef"),
                ];
                let res = client
                    .post(&url)
                    .basic_auth("k", Some("t"))
                    .form(&form)
                    .send()
                    .await
                    .unwrap();
                let _ = res.text().await.unwrap();
            }
        })
        .buffer_unordered(concurrency as usize * 3)
        .collect::<Vec<_>>()
        .await;
    let baseline = b0.elapsed();
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "drain {kind}: deliveries={n} concurrency={}x3 | dispatcher sent in {:.2}s, recorded in {:.2}s = {:.0}/s | bare reqwest {:.2}s = {:.0}/s | ratio dispatcher/baseline = {:.3}",
        concurrency,
        sent.as_secs_f64(),
        drained.as_secs_f64(),
        rate(drained),
        baseline.as_secs_f64(),
        rate(baseline),
        rate(drained) / rate(baseline),
    );
    store.close().await;
    drop_database(&db).await;
}

#[tokio::main]
async fn main() {
    let kinds: Vec<String> = match std::env::var("BENCH_DB") {
        Ok(k) => vec![k],
        Err(_) => vec!["sqlite".into(), "postgres".into()],
    };
    let incidents: usize = std::env::var("BENCH_INCIDENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let deliveries: usize = std::env::var("BENCH_DELIVERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let concurrency: u32 = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    for kind in &kinds {
        latency(kind, incidents).await;
        drain(kind, deliveries, concurrency).await;
    }
}
