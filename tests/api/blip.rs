//! A database blip while sends are at the provider: the outcomes are known, so they are kept and
//! recorded once the database is back, and nothing is sent twice.
//!
//! PostgreSQL is taken away from the test's own database (new connections refused, open ones ended)
//! for four seconds while every send of the fan-out waits two seconds for the provider's answer. SQLite
//! has no such blip to give: a locked file makes its writer wait in its busy handler (ten seconds),
//! which the full-disk test (`full_disk.rs`) and the fault suite cover.

use std::time::Duration;

use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

/// Answers as [`FreshIds`] after `delay`.
struct Slow(FreshIds, Duration);

impl wiremock::Respond for Slow {
    fn respond(&self, req: &wiremock::Request) -> ResponseTemplate {
        self.0.respond(req).set_delay(self.1)
    }
}

const SID: &str = "b11bdb0000000000000000000000000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_blip_shorter_than_the_lease_sends_nothing_twice() {
    let p = Providers::start().await;
    let answer_after = Duration::from_secs(2);
    for (server, p_path, kind) in [
        (&p.exotel, CALLS_PATH, "call"),
        (&p.exotel, SMS_PATH, "sms"),
        (&p.gupshup, GUPSHUP_PATH, "whatsapp"),
    ] {
        Mock::given(method("POST"))
            .and(path(p_path))
            .respond_with(Slow(FreshIds::new(kind), answer_after))
            .mount(server)
            .await;
    }
    let mut env = p.env();
    // Provider limits well inside a lease far longer than the blip.
    env.push(("SOS_EXOTEL__CALL_TIMEOUT_SECS", "5".into()));
    env.push(("SOS_EXOTEL__SMS_TIMEOUT_SECS", "5".into()));
    env.push(("SOS_GUPSHUP__TIMEOUT_SECS", "5".into()));
    env.push(("SOS_DISPATCH__LEASE_SECS", "30".into()));
    let app = spawn_app_with(Db::Postgres, &env).await;
    let res = app
        .passthru(&format!("CallSid={SID}1&EmergencyType=Heart"))
        .await;
    assert_eq!(res.status(), 200);

    // Every send of the fan-out is at the provider, waiting for its answer.
    let at_provider = eventually(Duration::from_secs(20), || async {
        p.requests(CALLS_PATH).await.len()
            + p.requests(SMS_PATH).await.len()
            + p.requests(GUPSHUP_PATH).await.len()
            >= HEART_DELIVERIES
    })
    .await;
    assert!(at_provider, "the fan-out did not reach the provider");
    let outage = app.db.take_down().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    outage.end().await;

    let ds = app.settled(&format!("{SID}1")).await;
    assert_eq!(ds.len(), HEART_DELIVERIES);
    let sent = p.requests(CALLS_PATH).await.len()
        + p.requests(SMS_PATH).await.len()
        + p.requests(GUPSHUP_PATH).await.len();
    assert_eq!(
        sent, HEART_DELIVERIES,
        "a blip shorter than the lease made the provider see a delivery twice"
    );
    for d in &ds {
        assert_eq!(d.attempts, 1, "{d:?}");
        assert!(
            matches!(d.status.as_str(), "accepted" | "delivered" | "sent"),
            "{d:?}"
        );
    }
    let expired: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM delivery_events WHERE kind IN ('lease_expired', 'released')",
    )
    .fetch_one(app.store.pool())
    .await
    .expect("events");
    assert_eq!(expired, 0, "a live dispatcher's lease ran out");
    app.stop().await;
}

/// A claim of `n` takes `n`, however many are due: on PostgreSQL the picking subquery runs once for the
/// statement, never once per row looked at (which let one claim lease every due delivery of its lane).
async fn a_claim_takes_no_more_than_its_limit(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    for n in 0..4 {
        let res = app
            .passthru(&format!("CallSid={SID}c{n}&EmergencyType=Heart"))
            .await;
        assert_eq!(res.status(), 200);
    }
    // Heart has three SMS per incident: twelve due on the lane.
    for limit in [1_i64, 5] {
        let claimed = app
            .store
            .claim("exotel:sms", "test", Duration::from_secs(60), limit)
            .await
            .expect("claim");
        assert_eq!(claimed.len() as i64, limit, "a claim of {limit}");
    }
    let queued: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM deliveries WHERE provider = 'exotel:sms' AND status = 'queued'",
    )
    .fetch_one(app.store.pool())
    .await
    .expect("count");
    assert_eq!(queued, 12 - 6);
    app.stop().await;
}

crate::both_engines!(a_claim_takes_no_more_than_its_limit);

/// Runs `op` (given the store and the incident of a new Heart Passthru) against a transaction that locks
/// the incident's deliveries, then the incident: the opposite order of a resolve or an acknowledgement.
/// The test's transaction waits longer before its deadlock check, so PostgreSQL ends `op`'s transaction,
/// not the test's. What `op` came to.
async fn against_a_deadlock<F, Fut, T>(app: &TestApp, call_sid: &str, op: F) -> anyhow::Result<T>
where
    F: FnOnce(exotel_sos::store::Store, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let res = app
        .passthru(&format!("CallSid={call_sid}&EmergencyType=Heart"))
        .await;
    assert_eq!(res.status(), 200);
    let incident = app
        .store
        .incident_by_call_sid(call_sid)
        .await
        .expect("read")
        .expect("stored");
    let other = exotel_sos::store::Store::connect(&app.db.url, 1)
        .await
        .expect("second handle");
    let mut tx = other.pool().begin().await.expect("begin");
    sqlx::query("SET LOCAL deadlock_timeout = '10s'")
        .execute(&mut *tx)
        .await
        .expect("deadlock timeout");
    sqlx::query("SELECT id FROM deliveries WHERE incident_id = $1 FOR UPDATE")
        .bind(&incident.id)
        .execute(&mut *tx)
        .await
        .expect("lock the deliveries");
    let running = tokio::spawn(op(app.store.clone(), incident.id.clone()));
    // `op` holds the incident and waits for the deliveries; now wait for the incident.
    let waiting = eventually(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE 'UPDATE deliveries%'",
        )
        .fetch_one(app.store.pool())
        .await
        .unwrap_or(0)
            > 0
    })
    .await;
    assert!(waiting, "it never waited for the deliveries");
    sqlx::query("UPDATE incidents SET recording_url = recording_url WHERE id = $1")
        .bind(&incident.id)
        .execute(&mut *tx)
        .await
        .expect("the test's transaction is not the one ended");
    tx.rollback().await.expect("rollback");
    let outcome = running.await.expect("task");
    other.close().await;
    outcome
}

/// A resolve that deadlocks with another transaction on PostgreSQL (which ends one of the two) is run
/// again instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_that_deadlocks_is_run_again() {
    let app = spawn_app_with(Db::Postgres, &[without_dispatcher()]).await;
    let resolved = against_a_deadlock(&app, &format!("{SID}d1"), |store, id| async move {
        store.resolve_incident(&id, "deadlock test").await
    })
    .await
    .expect("the resolve went through on its second try")
    .expect("found");
    assert!(resolved.changed);
    assert_eq!(resolved.cancelled.len(), HEART_DELIVERIES);
    app.stop().await;
}

/// The same for an operator's acknowledgement, which also locks the incident, then its deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_that_deadlocks_is_run_again() {
    let app = spawn_app_with(Db::Postgres, &[without_dispatcher()]).await;
    let acked = against_a_deadlock(&app, &format!("{SID}d2"), |store, id| async move {
        store
            .acknowledge(&exotel_sos::store::AckRequest {
                incident_id: id,
                delivery_id: None,
                by: "operator".into(),
                via: "api".into(),
                notice_lanes: Vec::new(),
            })
            .await
    })
    .await
    .expect("the acknowledgement went through on its second try")
    .expect("found");
    assert!(acked.first);
    app.stop().await;
}
