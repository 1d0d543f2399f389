//! Fault suite: the server binary of this build (or the in-process server) on real databases under SIGKILLs, a
//! database that refuses connections or goes silent, a provider outage and three replicas, against
//! stand-ins for Exotel and GupShup. Every test prints its figures; see them with
//! `cargo test --test api faults:: -- --nocapture`. The database tests use only a database they create
//! (taken down by refusing its connections, or reached through a relay that the test silences), never
//! the shared cluster's settings.
//!
//! The contract checked everywhere: every Passthru answered 200 has its incident and every one of its
//! deliveries reached the provider's stand-in (requests lost: 0); a delivery is sent more than once only
//! when a process was stopped while it was in flight there (its trail shows `lease_expired` or
//! `released`). Where no process is stopped (the database tests), nothing may be sent twice at all: their
//! leases outlast the outage, and a live dispatcher keeps the outcomes it knows until it can record them.
//!
//! CI runs the light variants (the refused and the silent database stay away 10 s). `SOS_HEAVY_TESTS=1` runs
//! heavier ones: the kill storm kills 60 times instead of 20 with Passthrus arriving twice as fast,
//! the refused and the silent database stay away for 30 s instead of 10 s, the provider outage lasts three times as
//! long (against a retry budget three times as long), and the three replicas take three times the load. `SOS_FAULT_SEED=N` replays
//! the kill moments of a run (the kill tests print their seed); `SOS_TEST_SERVER_LOGS=DIR` keeps the
//! servers' logs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exotel_sos::store::{DeliveryRow, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wiremock::matchers::{method, path};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

use crate::helpers::*;

fn heavy() -> bool {
    std::env::var("SOS_HEAVY_TESTS").is_ok_and(|v| v == "1")
}

fn seed() -> u64 {
    std::env::var("SOS_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_127)
}

/// How long Exotel waits for a Passthru answer (the server's own request limit).
const PASSTHRU_BUDGET: Duration = Duration::from_secs(10);

/// How long the queue may stay as long as it is before a test calls it stalled.
const STALL: Duration = Duration::from_secs(60);

/// Per-channel concurrency given to every server here: at most this many requests per channel are in
/// flight in one process when it is killed.
const CONCURRENCY: usize = 10;

/// Limits so high that throughput, not the limiter, sets the pace.
fn unlimited() -> Vec<(&'static str, String)> {
    [
        "SOS_DISPATCH__CALL_CONCURRENCY",
        "SOS_DISPATCH__SMS_CONCURRENCY",
        "SOS_DISPATCH__WHATSAPP_CONCURRENCY",
    ]
    .into_iter()
    .map(|key| (key, CONCURRENCY.to_string()))
    .chain(
        [
            "SOS_DISPATCH__CALL_PER_MINUTE",
            "SOS_DISPATCH__SMS_PER_MINUTE",
            "SOS_DISPATCH__WHATSAPP_PER_MINUTE",
        ]
        .into_iter()
        .map(|key| (key, "600000".to_owned())),
    )
    .collect()
}

/// One-second provider time limits and a three-second lease: a killed process's work is requeued quickly.
fn quick_recovery() -> Vec<(&'static str, String)> {
    vec![
        ("SOS_EXOTEL__CALL_TIMEOUT_SECS", "1".into()),
        ("SOS_EXOTEL__SMS_TIMEOUT_SECS", "1".into()),
        ("SOS_GUPSHUP__TIMEOUT_SECS", "1".into()),
        ("SOS_DISPATCH__LEASE_SECS", "3".into()),
    ]
}

/// One-second provider time limits and a lease that outlasts `outage`: where no process stops, an
/// outage shorter than the lease may not make anything be sent twice.
fn lease_outlasting(outage: Duration) -> Vec<(&'static str, String)> {
    let mut env = quick_recovery();
    env.retain(|(k, _)| *k != "SOS_DISPATCH__LEASE_SECS");
    env.push((
        "SOS_DISPATCH__LEASE_SECS",
        (outage.as_secs() + 15).to_string(),
    ));
    env
}

/// Emergency types sent in turn, with the deliveries each fans out to under [`STAKEHOLDERS`].
const TYPES: [(&str, usize); 3] = [
    ("Heart", HEART_DELIVERIES),
    ("Brain", BRAIN_DELIVERIES),
    ("Fire", DEFAULT_DELIVERIES),
];

/// One Passthru sent and how it was answered (`None`: no answer at all, e.g. the process was down).
#[derive(Debug, Clone)]
struct Sent {
    call_sid: String,
    deliveries: usize,
    status: Option<u16>,
    started: Instant,
    took: Duration,
}

/// A stream of Passthrus with unique CallSids to the servers in turn, one every period whether or not
/// the earlier ones were answered yet (calls reach Exotel on their own schedule).
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Sent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Sends a Passthru to `bases` in turn every `every`, until stopped or `limit` are sent.
    fn start(bases: Vec<String>, every: Duration, prefix: &'static str, limit: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(PASSTHRU_BUDGET + Duration::from_secs(5))
            .build()
            .unwrap();
        let task = tokio::spawn({
            let stop = stop.clone();
            let sent = sent.clone();
            async move {
                let mut in_flight = tokio::task::JoinSet::new();
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) && i < limit {
                    let (emergency_type, deliveries) = TYPES[i % TYPES.len()];
                    let call_sid = format!("{prefix}{i:028}");
                    let url = format!(
                        "{}/exotel/passthru?token={WEBHOOK_TOKEN}&CallSid={call_sid}&EmergencyType={emergency_type}&CallFrom=09812345678",
                        bases[i % bases.len()]
                    );
                    let client = client.clone();
                    let sent = sent.clone();
                    in_flight.spawn(async move {
                        let started = Instant::now();
                        let status = client
                            .get(&url)
                            .send()
                            .await
                            .ok()
                            .map(|r| r.status().as_u16());
                        sent.lock().unwrap().push(Sent {
                            call_sid,
                            deliveries,
                            status,
                            started,
                            took: started.elapsed(),
                        });
                    });
                    while in_flight.try_join_next().is_some() {}
                    i += 1;
                    tokio::time::sleep(every).await;
                }
                while in_flight.join_next().await.is_some() {}
            }
        });
        Load { stop, sent, task }
    }

    fn snapshot(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    /// Waits until the stream has sent all it was asked to and every answer is in.
    async fn done(self) -> Vec<Sent> {
        let sent = self.sent.clone();
        let _ = self.task.await;
        let all = sent.lock().unwrap().clone();
        all
    }

    /// Stops the stream and waits for the answers still to come.
    async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self.sent.clone();
        let _ = self.task.await;
        let all = sent.lock().unwrap().clone();
        all
    }
}

/// Requests the stand-ins received, per (channel, delivery reference): the number each went to.
async fn sends(p: &Providers) -> HashMap<(String, String), Vec<String>> {
    let mut out: HashMap<(String, String), Vec<String>> = HashMap::new();
    for (path, channel, reference, phone) in [
        (CALLS_PATH, "call", "CustomField", "From"),
        (SMS_PATH, "sms", "CustomField", "To"),
        (GUPSHUP_PATH, "whatsapp", "extra", "send_to"),
    ] {
        for (form, _) in p.requests(path).await {
            let key = (
                channel.to_owned(),
                field(&form, reference).unwrap_or_default().to_owned(),
            );
            out.entry(key)
                .or_default()
                .push(field(&form, phone).unwrap_or_default().to_owned());
        }
    }
    out
}

async fn all_deliveries(store: &Store) -> Vec<DeliveryRow> {
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM deliveries ORDER BY id")
        .fetch_all(store.pool())
        .await
        .unwrap();
    let mut rows = Vec::with_capacity(ids.len());
    for id in ids {
        rows.push(store.delivery(&id).await.unwrap().unwrap());
    }
    rows
}

/// Waits until no delivery is queued or being sent. A slow machine only makes this take longer: it gives
/// up (false) only when the number still open has not gone down for `stall`.
async fn settle(store: &Store, stall: Duration) -> bool {
    let mut best = i64::MAX;
    let mut last_progress = Instant::now();
    loop {
        let open: Result<i64, _> = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deliveries WHERE status IN ('queued', 'sending')",
        )
        .fetch_one(store.pool())
        .await;
        match open {
            Ok(0) => return true,
            Ok(n) if n < best => {
                best = n;
                last_progress = Instant::now();
            }
            _ => {}
        }
        if last_progress.elapsed() >= stall {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deliveries (queued, sending) right now.
async fn queued(store: &Store) -> (i64, i64) {
    let count = |status: &'static str| async move {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM deliveries WHERE status = $1")
            .bind(status)
            .fetch_one(store.pool())
            .await
            .unwrap_or(-1)
    };
    (count("queued").await, count("sending").await)
}

/// What the stand-ins and the database say after a run.
#[derive(Debug, Default)]
struct Tally {
    /// Passthrus answered 200.
    ok: usize,
    /// CallSids answered 200 with no incident stored.
    missing_incidents: Vec<String>,
    /// CallSids answered 200 whose incident has fewer deliveries than contacts × channels.
    short_incidents: Vec<String>,
    /// Deliveries of a Passthru answered 200 that never reached the stand-in at the right number.
    lost: Vec<String>,
    /// Deliveries (of any stored incident) the stand-ins never saw.
    unsent: usize,
    deliveries: usize,
    /// Requests beyond the first, over all deliveries.
    duplicates: usize,
    /// Deliveries whose trail shows them in flight in a process that stopped.
    in_flight: usize,
    /// Those events (`lease_expired`, `released`): a delivery may be in flight at several stops.
    in_flight_events: usize,
    /// Deliveries sent more often than once plus their `lease_expired`/`released` events.
    beyond_bound: Vec<String>,
    statuses: HashMap<String, usize>,
}

impl Tally {
    fn lost_requests(&self) -> usize {
        self.missing_incidents.len() + self.short_incidents.len() + self.lost.len()
    }
}

/// `processes_stopped`: whether the run killed or stopped a server, the only thing that may excuse a
/// second send (of a delivery whose trail shows it in flight at a stop).
async fn tally(store: &Store, p: &Providers, sent: &[Sent], processes_stopped: bool) -> Tally {
    let incidents: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id, call_sid FROM incidents")
            .fetch_all(store.pool())
            .await
            .unwrap();
    let by_sid: HashMap<String, String> = incidents
        .into_iter()
        .filter_map(|(id, sid)| sid.map(|s| (s, id)))
        .collect();
    let mut by_incident: HashMap<String, Vec<DeliveryRow>> = HashMap::new();
    let deliveries = all_deliveries(store).await;
    for d in &deliveries {
        by_incident
            .entry(d.incident_id.clone())
            .or_default()
            .push(d.clone());
    }
    let marks: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT delivery_id, COUNT(*) FROM delivery_events \
         WHERE kind IN ('lease_expired', 'released') GROUP BY delivery_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap()
    .into_iter()
    .collect();
    let seen = sends(p).await;
    let count_of = |d: &DeliveryRow| {
        seen.get(&(d.channel.to_string(), d.greeting_ref.clone()))
            .map(|phones| {
                phones
                    .iter()
                    .filter(|n| n.trim_start_matches('+') == d.phone.trim_start_matches('+'))
                    .count()
            })
            .unwrap_or(0)
    };
    let mut t = Tally {
        deliveries: deliveries.len(),
        in_flight: marks.len(),
        in_flight_events: marks.values().sum::<i64>() as usize,
        ..Tally::default()
    };
    for s in sent.iter().filter(|s| s.status == Some(200)) {
        t.ok += 1;
        let Some(incident) = by_sid.get(&s.call_sid) else {
            t.missing_incidents.push(s.call_sid.clone());
            continue;
        };
        let ds = by_incident.get(incident).cloned().unwrap_or_default();
        if ds.len() < s.deliveries {
            t.short_incidents.push(s.call_sid.clone());
        }
        for d in ds.iter().filter(|d| count_of(d) == 0) {
            t.lost.push(format!(
                "{} {} {} ({}, {} attempts)",
                s.call_sid, d.channel, d.greeting_ref, d.status, d.attempts
            ));
        }
    }
    for d in &deliveries {
        *t.statuses.entry(d.status.to_string()).or_default() += 1;
        let n = count_of(d);
        if n == 0 {
            t.unsent += 1;
            continue;
        }
        t.duplicates += n - 1;
        let allowed = if processes_stopped {
            marks.get(&d.id).copied().unwrap_or(0) as usize
        } else {
            0
        };
        if n - 1 > allowed {
            t.beyond_bound.push(format!(
                "{} {} sent {n} times, in flight at a stop {allowed} times",
                d.channel, d.greeting_ref
            ));
        }
    }
    t
}

fn answers(sent: &[Sent]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for s in sent {
        let key = s
            .status
            .map(|c| c.to_string())
            .unwrap_or_else(|| "none".to_owned());
        *out.entry(key).or_default() += 1;
    }
    out
}

/// Asserts the delivery contract on a tally, after printing it.
fn assert_nothing_lost(name: &str, t: &Tally) {
    assert!(
        t.missing_incidents.is_empty(),
        "{name}: Passthrus answered 200 without an incident: {:?}",
        t.missing_incidents
    );
    assert!(
        t.short_incidents.is_empty(),
        "{name}: incidents with deliveries missing: {:?}",
        t.short_incidents
    );
    assert!(
        t.lost.is_empty(),
        "{name}: {} deliveries of Passthrus answered 200 never reached the provider: {:?}",
        t.lost.len(),
        &t.lost[..t.lost.len().min(20)]
    );
    assert!(
        t.beyond_bound.is_empty(),
        "{name}: {} deliveries sent twice without being in flight at a stop: {:?}",
        t.beyond_bound.len(),
        &t.beyond_bound[..t.beyond_bound.len().min(20)]
    );
    assert_eq!(
        t.unsent, 0,
        "{name}: stored deliveries that never reached the provider"
    );
}

/// A stand-in that answers like the provider, after `delay`.
struct Slow {
    ids: FreshIds,
    delay: Duration,
}

impl Respond for Slow {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        self.ids.respond(req).set_delay(self.delay)
    }
}

/// Stand-ins for all three channels that take `delay` to answer.
async fn mount_slow(p: &Providers, delay: Duration) {
    for (server, p_path, kind) in [
        (&p.exotel, CALLS_PATH, "call"),
        (&p.exotel, SMS_PATH, "sms"),
        (&p.gupshup, GUPSHUP_PATH, "whatsapp"),
    ] {
        Mock::given(method("POST"))
            .and(path(p_path))
            .respond_with(Slow {
                ids: FreshIds::new(kind),
                delay,
            })
            .mount(server)
            .await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Kill storm

/// Starts the server on `port` (the port a killed process held), trying again if it is not free yet.
async fn restart(db_url: &str, stakeholders: &std::path::Path, p: &Providers, port: u16) -> Server {
    let env: Vec<(&str, String)> = [unlimited(), quick_recovery()].concat();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let mut server = spawn_server(db_url, stakeholders, p, port, &env);
        if server.healthy_within(Duration::from_secs(60)).await {
            return server;
        }
        server.kill();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the server did not come back on port {port} within 2 minutes");
}

/// The server is SIGKILLed at random moments while Passthrus keep arriving, and restarted each time on
/// the same port and database.
async fn kill_storm(db: Db) {
    let started = Instant::now();
    let kills = if heavy() { 60 } else { 20 };
    let every = Duration::from_millis(if heavy() { 25 } else { 50 });
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let p = Providers::start().await;
    // Answers take a moment, as Exotel's do: kills find requests in flight.
    mount_slow(&p, Duration::from_millis(150)).await;
    let test_db = TestDb::new(db).await;
    let stakeholders = test_db.dir().join("stakeholders.toml");
    std::fs::write(&stakeholders, STAKEHOLDERS).unwrap();
    let port = stable_port();
    let mut server = restart(&test_db.url, &stakeholders, &p, port).await;
    let load = Load::start(vec![server.base()], every, "ks", usize::MAX);
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
        server.kill();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
        server = restart(&test_db.url, &stakeholders, &p, port).await;
    }
    // The last process keeps serving for a moment, then the stream stops and the work settles.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = load.finish().await;
    let store = Store::connect(&test_db.url, 2).await.unwrap();
    let settled = settle(&store, STALL).await;
    let t = tally(&store, &p, &sent, true).await;
    let last_alive = !server.exited();
    eprintln!(
        "kill storm ({db:?}, seed {seed}): kills {kills}, last process alive {last_alive}, Passthrus sent {}, answered {:?}, 200 {}, \
         deliveries {}, requests lost {}, deliveries never sent {}, duplicates {}, in flight at a kill {} deliveries \
         {} times (bound {}), statuses {:?}, {:.1} s",
        sent.len(),
        answers(&sent),
        t.ok,
        t.deliveries,
        t.lost_requests(),
        t.unsent,
        t.duplicates,
        t.in_flight,
        t.in_flight_events,
        kills * CONCURRENCY * 3,
        t.statuses,
        started.elapsed().as_secs_f64()
    );
    store.close().await;
    drop(server);
    assert!(t.ok > 0, "some Passthrus were stored");
    assert!(
        settled,
        "deliveries still queued or sending after the storm"
    );
    assert_nothing_lost("kill storm", &t);
    assert!(
        t.duplicates <= kills * CONCURRENCY * 3,
        "more duplicates ({}) than requests in flight at {kills} kills",
        t.duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_storm_sqlite() {
    kill_storm(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_storm_postgres() {
    kill_storm(Db::Postgres).await
}

// ---------------------------------------------------------------------------------------------------
// Database loss

/// With these, the database tests' stream of Passthrus arrives faster than it is sent: a backlog is
/// queued and requests are in flight when the database goes.
const SLOW_ANSWER: Duration = Duration::from_millis(200);
const SLOW_CONCURRENCY: &str = "3";

/// The test's own PostgreSQL database refuses connections for 10 s (30 s heavy) under a steady stream
/// of Passthrus to the in-process server; the dispatcher must pick up its backlog and the requests it
/// had in flight again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_loss_answers_302_loses_nothing_and_resumes_by_itself() {
    let started = Instant::now();
    // 10 s in the normal run, 30 s heavy: the lease outlasts either, so nothing may be sent twice.
    let outage = Duration::from_secs(if heavy() { 30 } else { 10 });
    let p = Providers::start().await;
    mount_slow(&p, SLOW_ANSWER).await;
    let mut env: Vec<(&str, String)> = [p.env(), unlimited(), lease_outlasting(outage)].concat();
    env.extend([
        (
            "SOS_DISPATCH__CALL_CONCURRENCY",
            SLOW_CONCURRENCY.to_owned(),
        ),
        ("SOS_DISPATCH__SMS_CONCURRENCY", SLOW_CONCURRENCY.to_owned()),
        (
            "SOS_DISPATCH__WHATSAPP_CONCURRENCY",
            SLOW_CONCURRENCY.to_owned(),
        ),
    ]);
    let app = spawn_app_with(Db::Postgres, &env).await;
    let load = Load::start(
        vec![app.base.clone()],
        Duration::from_millis(100),
        "dl",
        usize::MAX,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let backlog_at_outage = queued(&app.store).await;
    let down = app.db.take_down().await;
    let down_from = Instant::now();
    tokio::time::sleep(outage).await;
    let up_at = Instant::now();
    down.end().await;
    // No restart: the same process stores Passthrus again once the database is back.
    let resumed = eventually(Duration::from_secs(60), || async {
        load.snapshot()
            .iter()
            .any(|s| s.started >= up_at && s.status == Some(200))
    })
    .await;
    let resumed_after = up_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = load.finish().await;
    let settled = settle(&app.store, STALL).await;
    let t = tally(&app.store, &p, &sent, false).await;
    let during: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.started >= down_from && s.started + s.took <= up_at)
        .collect();
    let slowest = sent.iter().map(|s| s.took).max().unwrap_or_default();
    eprintln!(
        "database loss: outage {} s, backlog when it went {backlog_at_outage:?}, Passthrus sent {}, \
         answered {:?}, during the outage {} ({:?}), slowest answer {:.2} s, 200 {}, deliveries {}, requests lost {}, duplicates {}, in flight {}, \
         first 200 {:.1} s after the database came back, statuses {:?}, {:.1} s",
        outage.as_secs(),
        sent.len(),
        answers(&sent),
        during.len(),
        answers(&during.iter().map(|s| (*s).clone()).collect::<Vec<_>>()),
        slowest.as_secs_f64(),
        t.ok,
        t.deliveries,
        t.lost_requests(),
        t.duplicates,
        t.in_flight,
        resumed_after.as_secs_f64(),
        t.statuses,
        started.elapsed().as_secs_f64()
    );
    app.stop().await;
    let wrong: Vec<&Sent> = sent
        .iter()
        .filter(|s| !matches!(s.status, Some(200 | 302)))
        .collect();
    assert!(
        wrong.is_empty(),
        "Passthrus answered neither 200 nor 302: {wrong:?}"
    );
    assert!(
        slowest <= PASSTHRU_BUDGET,
        "a Passthru took {slowest:?}, past Exotel's {PASSTHRU_BUDGET:?}"
    );
    assert!(
        !during.is_empty(),
        "Passthrus were answered during the outage"
    );
    assert!(
        during.iter().all(|s| s.status == Some(302)),
        "only 302 while the database is away"
    );
    assert!(resumed, "Passthrus are stored again without a restart");
    assert!(settled, "the dispatcher resumed and drained the queue");
    assert_nothing_lost("database loss", &t);
}

/// A TCP relay between the server and its PostgreSQL database that can stand for a network
/// partition: while frozen it passes no byte either way and connects nobody new (every connection just
/// hangs, as across a dead link); when the partition heals, every connection open across it is cut.
struct Partition {
    port: u16,
    frozen: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    async fn start(upstream: String) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn({
            let frozen = frozen.clone();
            let cut = cut.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let frozen = frozen.clone();
                    let cut_rx = cut.subscribe();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        // Connected across a partition: wait for it to heal, then get cut with the rest.
                        while frozen.load(Ordering::SeqCst) {
                            if cut_rx.has_changed().unwrap_or(true) {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let up = relay(cr, sw, frozen.clone(), cut_rx.clone());
                        let down = relay(sr, cw, frozen, cut_rx);
                        tokio::join!(up, down);
                    });
                }
            }
        });
        Partition {
            port,
            frozen,
            cut,
            task,
        }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Cuts every connection open now, then passes traffic again.
    fn heal(&self) {
        self.cut.send_modify(|g| *g += 1);
        self.frozen.store(false, Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.send_modify(|g| *g += 1);
    }
}

/// Copies one direction until either side closes or the connection is cut; holds bytes while frozen.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    mut cut: tokio::sync::watch::Receiver<u64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = cut.changed() => return,
        };
        while frozen.load(Ordering::SeqCst) {
            if cut.has_changed().unwrap_or(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The server reaches its PostgreSQL database through a link that goes silent for 10 s (30 s heavy)
/// under a stream of Passthrus: nothing answers and nothing fails fast, every open query hangs. Each
/// Passthru still answers (302) within Exotel's wait, nothing answered 200 is lost, and once the link
/// is back (its old connections cut) the same process stores and sends again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_partition_answers_302_in_time_and_resumes_by_itself() {
    let started = Instant::now();
    let outage = Duration::from_secs(if heavy() { 30 } else { 10 });
    let p = Providers::start().await;
    mount_slow(&p, SLOW_ANSWER).await;
    let db = TestDb::new(Db::Postgres).await;
    let mut url = reqwest::Url::parse(&db.url).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let link = Partition::start(upstream).await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(link.port)).unwrap();
    let stakeholders = db.dir().join("stakeholders.toml");
    std::fs::write(&stakeholders, STAKEHOLDERS).unwrap();
    let mut env: Vec<(&str, String)> = [p.env(), unlimited(), lease_outlasting(outage)].concat();
    env.extend([
        ("SOS_DATABASE__URL", url.to_string()),
        (
            "SOS_DISPATCH__CALL_CONCURRENCY",
            SLOW_CONCURRENCY.to_owned(),
        ),
        ("SOS_DISPATCH__SMS_CONCURRENCY", SLOW_CONCURRENCY.to_owned()),
        (
            "SOS_DISPATCH__WHATSAPP_CONCURRENCY",
            SLOW_CONCURRENCY.to_owned(),
        ),
    ]);
    let settings = test_settings(&db, &stakeholders, &env);
    let direct = Store::connect(&db.url, 2).await.unwrap();
    let app = start(TestDb::shared(url.as_ref()), stakeholders, settings).await;
    let load = Load::start(
        vec![app.base.clone()],
        Duration::from_millis(100),
        "dp",
        usize::MAX,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let backlog_at_outage = queued(&direct).await;
    link.freeze();
    let down_from = Instant::now();
    tokio::time::sleep(outage).await;
    let up_at = Instant::now();
    link.heal();
    let resumed = eventually(Duration::from_secs(60), || async {
        load.snapshot()
            .iter()
            .any(|s| s.started >= up_at && s.status == Some(200))
    })
    .await;
    let resumed_after = up_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = load.finish().await;
    let settled = settle(&direct, STALL).await;
    let t = tally(&direct, &p, &sent, false).await;
    let during: Vec<Sent> = sent
        .iter()
        .filter(|s| s.started >= down_from && s.started + s.took <= up_at)
        .cloned()
        .collect();
    let slowest = sent.iter().map(|s| s.took).max().unwrap_or_default();
    eprintln!(
        "database partition: outage {} s, backlog when it went {backlog_at_outage:?}, Passthrus sent {}, \
         answered {:?}, during the outage {} ({:?}), slowest answer {:.2} s, 200 {}, deliveries {}, \
         requests lost {}, duplicates {}, in flight {}, first 200 {:.1} s after the link came back, \
         statuses {:?}, {:.1} s",
        outage.as_secs(),
        sent.len(),
        answers(&sent),
        during.len(),
        answers(&during),
        slowest.as_secs_f64(),
        t.ok,
        t.deliveries,
        t.lost_requests(),
        t.duplicates,
        t.in_flight,
        resumed_after.as_secs_f64(),
        t.statuses,
        started.elapsed().as_secs_f64()
    );
    app.stop().await;
    direct.close().await;
    drop(link);
    let wrong: Vec<&Sent> = sent
        .iter()
        .filter(|s| !matches!(s.status, Some(200 | 302)))
        .collect();
    assert!(
        wrong.is_empty(),
        "Passthrus answered neither 200 nor 302: {wrong:?}"
    );
    assert!(
        slowest <= PASSTHRU_BUDGET,
        "a Passthru took {slowest:?}, past Exotel's {PASSTHRU_BUDGET:?}"
    );
    assert!(
        !during.is_empty(),
        "Passthrus were answered during the outage"
    );
    assert!(
        during.iter().all(|s| s.status == Some(302)),
        "only 302 while the database is away"
    );
    assert!(resumed, "Passthrus are stored again without a restart");
    assert!(settled, "the dispatcher resumed and drained the queue");
    assert_nothing_lost("database partition", &t);
}

// ---------------------------------------------------------------------------------------------------
// Provider outage

/// Exotel stand-in whose behaviour follows a shared phase: 0 answers 503, 1 answers only after the
/// client's time limit, 2 answers like Exotel (and notes which references it accepted).
struct Outage {
    phase: Arc<AtomicU8>,
    ids: FreshIds,
    accepted: Arc<Mutex<Vec<String>>>,
}

impl Respond for Outage {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        match self.phase.load(Ordering::SeqCst) {
            0 => ResponseTemplate::new(503).set_body_string("Service Unavailable"),
            1 => ResponseTemplate::new(503).set_delay(Duration::from_secs(5)),
            _ => {
                let form: Vec<(String, String)> =
                    serde_urlencoded::from_bytes(&req.body).unwrap_or_default();
                self.accepted
                    .lock()
                    .unwrap()
                    .push(field(&form, "CustomField").unwrap_or_default().to_owned());
                self.ids.respond(req)
            }
        }
    }
}

/// Exotel answers 503 and then times out for a period far longer than the attempts' schedule (as
/// 10 minutes are against the default `2, 5, 15, 30, 60, 120, 300` s and 8 attempts), but shorter than
/// `dispatch.retry_for`: every delivery still goes out once Exotel is back.
async fn provider_outage(db: Db) {
    let started = Instant::now();
    let scale = if heavy() { 3 } else { 1 };
    let each_phase = Duration::from_secs(3 * scale);
    let p = Providers::start().await;
    let phase = Arc::new(AtomicU8::new(0));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    for (p_path, kind) in [(CALLS_PATH, "call"), (SMS_PATH, "sms")] {
        Mock::given(method("POST"))
            .and(path(p_path))
            .respond_with(Outage {
                phase: phase.clone(),
                ids: FreshIds::new(kind),
                accepted: accepted.clone(),
            })
            .mount(&p.exotel)
            .await;
    }
    mount_happy(&p).await; // WhatsApp (GupShup) stays up
    let mut env: Vec<(&str, String)> = [p.env(), unlimited()].concat();
    env.extend([
        ("SOS_DISPATCH__RETRY_SCHEDULE_SECS", "0.1, 0.2, 0.4".into()),
        ("SOS_DISPATCH__MAX_ATTEMPTS", "3".into()),
        // Well past the outage (6 s, or 18 s heavy), so a slow machine cannot turn it into a failure.
        ("SOS_DISPATCH__RETRY_FOR", format!("{}s", 30 * scale)),
        ("SOS_DISPATCH__RETRY_AFTER_MAX_SECS", "0.5".into()),
        ("SOS_EXOTEL__CALL_TIMEOUT_SECS", "1".into()),
        ("SOS_EXOTEL__SMS_TIMEOUT_SECS", "1".into()),
    ]);
    let app = spawn_app_with(db, &env).await;
    let mut sids = Vec::new();
    for (i, (emergency_type, _)) in TYPES.iter().cycle().take(6).enumerate() {
        let sid = format!("po{i:030}");
        let res = app
            .passthru(&format!("CallSid={sid}&EmergencyType={emergency_type}"))
            .await;
        assert_eq!(res.status(), 200);
        sids.push(sid);
    }
    tokio::time::sleep(each_phase).await;
    phase.store(1, Ordering::SeqCst);
    tokio::time::sleep(each_phase).await;
    phase.store(2, Ordering::SeqCst);
    let recovered = Instant::now();
    let settled = settle(&app.store, STALL).await;
    let deliveries = all_deliveries(&app.store).await;
    let accepted = accepted.lock().unwrap().clone();
    let exotel_requests = p.exotel.received_requests().await.unwrap_or_default().len();
    let not_delivered: Vec<String> = deliveries
        .iter()
        .filter(|d| {
            d.status != "accepted"
                || (d.channel != "whatsapp" && !accepted.contains(&d.greeting_ref))
        })
        .map(|d| {
            format!(
                "{} {} after {} attempts: {}",
                d.channel,
                d.status,
                d.attempts,
                d.last_error.as_deref().unwrap_or("-")
            )
        })
        .collect();
    eprintln!(
        "provider outage ({db:?}): 503 for {} s then time-outs for {} s, Passthrus {}, deliveries {}, \
         not delivered {}, Exotel requests {}, settled {:.1} s after recovery, {:.1} s",
        each_phase.as_secs(),
        each_phase.as_secs(),
        sids.len(),
        deliveries.len(),
        not_delivered.len(),
        exotel_requests,
        recovered.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    app.stop().await;
    assert!(settled, "deliveries still queued or sending");
    assert!(
        not_delivered.is_empty(),
        "{} deliveries not delivered after the outage: {:?}",
        not_delivered.len(),
        &not_delivered[..not_delivered.len().min(10)]
    );
}

crate::both_engines!(provider_outage);

// ---------------------------------------------------------------------------------------------------
// Three replicas

/// The calls stand-in, noting when each request arrived.
struct Stamped {
    ids: FreshIds,
    at: Arc<Mutex<Vec<Instant>>>,
}

impl Respond for Stamped {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        self.at.lock().unwrap().push(Instant::now());
        self.ids.respond(req)
    }
}

/// Most requests within any `window`.
fn max_in_window(mut at: Vec<Instant>, window: Duration) -> usize {
    at.sort();
    let mut first = 0;
    let mut max = 0;
    for last in 0..at.len() {
        while at[last] - at[first] >= window {
            first += 1;
        }
        max = max.max(last - first + 1);
    }
    max
}

/// Three replicas share one PostgreSQL under a stream of Passthrus; one is SIGKILLed mid-run. The
/// account-wide call limit holds across the replicas together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_killed_no_double_sends_and_the_account_limit_holds() {
    const PER_MINUTE: usize = 120;
    const WINDOW: Duration = Duration::from_secs(10);
    let per_second = PER_MINUTE / 60;
    // A token bucket may spend a few seconds' worth at once.
    let burst = per_second * 5;
    let allowed = per_second * WINDOW.as_secs() as usize + burst;
    let started = Instant::now();
    let passthrus = if heavy() { 90 } else { 30 };
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let p = Providers::start().await;
    let stamps = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(Stamped {
            ids: FreshIds::new("call"),
            at: stamps.clone(),
        })
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let db = TestDb::new(Db::Postgres).await;
    let stakeholders = db.dir().join("stakeholders.toml");
    std::fs::write(&stakeholders, STAKEHOLDERS).unwrap();
    let mut env: Vec<(&str, String)> = [unlimited(), quick_recovery()].concat();
    env.extend([
        ("SOS_DISPATCH__CALL_PER_MINUTE", PER_MINUTE.to_string()),
        ("SOS_DISPATCH__CALL_CONCURRENCY", "4".into()),
        // Waiting for the limit must not use up a delivery: only the limit is under test here.
        ("SOS_DISPATCH__MAX_ATTEMPTS", "1000".into()),
        ("SOS_DISPATCH__LEASE_SECS", "6".into()),
    ]);
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(spawn_server(&db.url, &stakeholders, &p, free_port(), &env));
    }
    for s in &mut servers {
        s.wait_healthy().await;
    }
    let load = Load::start(
        servers.iter().map(Server::base).collect(),
        Duration::from_millis(150),
        "r3",
        passthrus,
    );
    let kill_after = Duration::from_millis(rng.gen_range(1500..4000));
    tokio::time::sleep(kill_after).await;
    servers[2].kill();
    let killed_at = started.elapsed();
    let sent = load.done().await;
    let store = Store::connect(&db.url, 2).await.unwrap();
    let settled = settle(&store, STALL).await;
    let t = tally(&store, &p, &sent, true).await;
    let stamps = stamps.lock().unwrap().clone();
    let calls = stamps.len();
    let span = match (stamps.iter().min(), stamps.iter().max()) {
        (Some(a), Some(b)) => (*b - *a).as_secs_f64(),
        _ => 0.0,
    };
    let max_window = max_in_window(stamps, WINDOW);
    eprintln!(
        "three replicas (seed {seed}): Passthrus {}, answered {:?}, 200 {}, replica killed at {:.1} s, deliveries {}, \
         requests lost {}, duplicates {}, in flight at the kill {}, calls {calls} over {span:.1} s, \
         most calls in any {} s: {max_window} (limit {PER_MINUTE}/min allows {allowed}), statuses {:?}, \
         {:.1} s",
        sent.len(),
        answers(&sent),
        t.ok,
        killed_at.as_secs_f64(),
        t.deliveries,
        t.lost_requests(),
        t.duplicates,
        t.in_flight,
        WINDOW.as_secs(),
        t.statuses,
        started.elapsed().as_secs_f64()
    );
    store.close().await;
    drop(servers);
    assert!(settled, "deliveries still queued or sending");
    assert_nothing_lost("three replicas", &t);
    assert!(
        max_window <= allowed,
        "{max_window} calls within {WINDOW:?} across the replicas; the account-wide limit of \
         {PER_MINUTE}/min allows {allowed}"
    );
}
