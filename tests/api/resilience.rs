//! At-least-once under failure: a second dispatcher on the same PostgreSQL, a process killed mid-send,
//! and a graceful shutdown with work in flight.

use std::collections::HashMap;
use std::time::Duration;

use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

/// Two replicas share one PostgreSQL: every delivery is sent exactly once in normal operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_on_one_postgres_never_send_the_same_delivery_twice() {
    let p = Providers::start().await;
    mount_happy(&p).await;
    // The account's shared limit of 180 calls a minute would pace these 60 calls over 20 seconds; the
    // subject here is who sends each one, not how fast.
    let mut env = p.env();
    env.push(("SOS_DISPATCH__CALL_PER_MINUTE", "6000".into()));
    let a = spawn_app_with(Db::Postgres, &env).await;
    // The second replica: same database, same stakeholders, its own dispatcher and HTTP port.
    let settings = test_settings(&a.db, &a.stakeholders, &env);
    let second_db = TestDb::shared(&a.db.url);
    let b = start(second_db, a.stakeholders.clone(), settings).await;
    let n = 30;
    for i in 0..n {
        let app = if i % 2 == 0 { &a } else { &b };
        let sid = format!("{i:032}");
        assert_eq!(
            app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
                .await
                .status(),
            200
        );
    }
    for i in 0..n {
        a.settled(&format!("{i:032}")).await;
    }
    let mut per_reference: HashMap<String, usize> = HashMap::new();
    for path in [CALLS_PATH, SMS_PATH, GUPSHUP_PATH] {
        for (form, _) in p.requests(path).await {
            let key = field(&form, "CustomField")
                .or(field(&form, "extra"))
                .unwrap()
                .to_owned();
            *per_reference.entry(key).or_default() += 1;
        }
    }
    assert_eq!(per_reference.len(), n * HEART_DELIVERIES);
    assert!(
        per_reference.values().all(|&c| c == 1),
        "a delivery was sent twice"
    );
    // Both replicas did some of the work.
    let owners: std::collections::HashSet<String> = {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT detail FROM delivery_events WHERE kind = 'attempt'")
                .fetch_all(a.store.pool())
                .await
                .unwrap();
        rows.into_iter()
            .map(|(d,)| d.rsplit(' ').next().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(owners.len(), 2, "both dispatchers claimed work: {owners:?}");
    b.stop().await;
    a.stop().await;
}

const ONE_CALL: &str = r#"
[[contact]]
name = "Desk"
phone = "+919800000004"
channels = ["call"]
teams = ["desk"]

[routes]
default = ["desk"]
"#;

async fn killed_mid_send_is_resumed_after_restart(db: Db) {
    let p = Providers::start().await;
    // The first request hangs: the process is killed while it waits for Exotel.
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(60)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let db = TestDb::new(db).await;
    let stakeholders = db.dir().join("stakeholders.toml");
    std::fs::write(&stakeholders, ONE_CALL).unwrap();

    let port = free_port();
    let mut first = spawn_server(&db.url, &stakeholders, &p, port, &[]);
    first.wait_healthy().await;
    let client = reqwest::Client::new();
    let res = client
        .get(format!(
            "http://127.0.0.1:{port}/exotel/passthru?token={WEBHOOK_TOKEN}&CallSid=ffff0000000000000000000000000001"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        eventually(Duration::from_secs(10), || async {
            !p.requests(CALLS_PATH).await.is_empty()
        })
        .await,
        "the first process sent the call"
    );
    first.kill(); // SIGKILL: no shutdown, no release

    let port = free_port();
    let mut second = spawn_server(&db.url, &stakeholders, &p, port, &[]);
    second.wait_healthy().await;
    let store = exotel_sos::store::Store::connect(&db.url, 2).await.unwrap();
    let inc = store
        .incident_by_call_sid("ffff0000000000000000000000000001")
        .await
        .unwrap()
        .unwrap();
    let ok = eventually(Duration::from_secs(20), || {
        let store = store.clone();
        let id = inc.id.clone();
        async move {
            let ds = store.deliveries(&id).await.unwrap();
            ds.len() == 1 && ds[0].status == "accepted"
        }
    })
    .await;
    second.kill();
    assert!(
        ok,
        "the delivery was resumed and sent after the lease expired"
    );
    let d = &store.deliveries(&inc.id).await.unwrap()[0];
    assert_eq!(d.attempts, 2);
    assert_eq!(
        p.requests(CALLS_PATH).await.len(),
        2,
        "sent again: at-least-once"
    );
    let attempts = store
        .events(&d.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "attempt")
        .count();
    assert_eq!(attempts, 2, "both attempts are on record");
    let events = store.events(&d.id).await.unwrap();
    assert!(
        events.iter().any(|e| e.kind == "lease_expired"),
        "the lost lease is on record"
    );
    store.close().await;
}

crate::both_engines!(
    killed_mid_send_is_resumed_after_restart,
    shutdown_releases_work_still_in_flight
);

async fn shutdown_releases_work_still_in_flight(db: Db) {
    let p = Providers::start().await;
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let mut env = p.env();
    env.push(("SOS_DISPATCH__SHUTDOWN_GRACE_SECS", "0.3".into()));
    let app = spawn_app_with(db, &env).await;
    app.passthru("CallSid=ffff0000000000000000000000000002&EmergencyType=Heart")
        .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            !p.requests(CALLS_PATH).await.is_empty()
        })
        .await
    );
    let started = std::time::Instant::now();
    let db = app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown did not wait for the hung request"
    );
    // The app closed its pool on the way out; look with a connection of our own.
    let store = exotel_sos::store::Store::connect(&db.url, 1).await.unwrap();
    let inc = store
        .incident_by_call_sid("ffff0000000000000000000000000002")
        .await
        .unwrap()
        .unwrap();
    let calls: Vec<_> = store
        .deliveries(&inc.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.channel == "call")
        .collect();
    assert!(!calls.is_empty());
    for d in calls {
        assert_eq!(d.status, "queued", "released for the next process: {d:?}");
        assert_eq!(d.lease_owner, None);
    }
    store.close().await;
}

/// A Passthru stored by one replica wakes another replica's dispatcher at once through NOTIFY, long
/// before its poll would find the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_a_dispatcher_in_another_replica() {
    let p = Providers::start().await;
    mount_happy(&p).await;
    // Replica A takes webhooks only; replica B dispatches and polls only once a minute.
    let mut env_a = p.env();
    env_a.push(("SOS_DISPATCH__ENABLED", "false".into()));
    let a = spawn_app_with(Db::Postgres, &env_a).await;
    let mut env_b = p.env();
    env_b.push(("SOS_DISPATCH__POLL_INTERVAL_MS", "60000".into()));
    let settings = test_settings(&a.db, &a.stakeholders, &env_b);
    let b = start(TestDb::shared(&a.db.url), a.stakeholders.clone(), settings).await;
    // B's first round runs at start; give it that, and its LISTEN, before the Passthru.
    assert!(
        eventually(Duration::from_secs(10), || async {
            b.state
                .dispatcher_heartbeat
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    a.passthru("CallSid=ffff0000000000000000000000000009&EmergencyType=Heart")
        .await;
    let ds = a.settled("ffff0000000000000000000000000009").await;
    assert!(ds.iter().all(|d| d.status == "accepted"));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "woken by NOTIFY, not by the 60 s poll"
    );
    b.stop().await;
    a.stop().await;
}
