//! The request time limit and the commit: a stored incident is never answered as a failure, the store
//! work is never cut off half-way, and requests cut by the time limit are counted.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::op::*;
use crate::raw;

const SID: &str = "e12eb6e6fcd920019d7174b60099187v";

/// The shortest request time limit settings accept: tests wait for it.
fn short_timeout() -> (&'static str, String) {
    ("SOS_SERVER__REQUEST_TIMEOUT_SECS", "6".into())
}

/// Holds `LOCK TABLE <table>` in its own transaction on the app's database until the returned sender is
/// used or dropped.
async fn lock_table(app: &TestApp, table: &str) -> tokio::sync::oneshot::Sender<()> {
    let url = app.db.url.clone();
    let sql = format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let store = exotel_sos::store::Store::connect(&url, 1).await.unwrap();
        let mut tx = store.pool().begin().await.unwrap();
        sqlx::query(&sql).execute(&mut *tx).await.unwrap();
        let _ = locked_tx.send(());
        let _ = release_rx.await;
        let _ = tx.rollback().await;
        store.close().await;
    });
    locked_rx.await.expect("table locked");
    release_tx
}

/// The incident commits, then reading it back for the answer hangs past the request time limit: the
/// answer is still 201 (before, 408, and a retry without a dedup key alerted everyone twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_trigger_is_201_once_committed_even_when_reading_it_back_hangs() {
    let app = spawn_app_with(Db::Postgres, &[without_dispatcher(), short_timeout()]).await;
    // create_incident writes incidents and deliveries only; the answer's detail reads delivery_events.
    let release = lock_table(&app, "delivery_events").await;
    let (status, body) = post_incident(&app, &heart("db1 is down")).await;
    let _ = release.send(());
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["message"], "db1 is down");
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    let id = id_of(&body);
    assert!(app.store.incident(&id).await.unwrap().is_some());
    app.stop().await;
}

/// The commit waits on a lock past the Passthru's budget: Exotel gets 302 (the flow's fallback branch)
/// in time, and the emergency is still stored when the lock goes (before, the write was cancelled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthru_whose_commit_outlasts_the_budget_is_still_stored() {
    let app = spawn_app_with(Db::Postgres, &[without_dispatcher()]).await;
    let release = lock_table(&app, "incidents").await;
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(7)).await;
        let _ = release.send(());
    });
    let res = app
        .passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert_eq!(res.status(), 302);
    releaser.await.unwrap();
    let store = app.store.clone();
    let stored = eventually(Duration::from_secs(60), || {
        let store = store.clone();
        async move { matches!(store.incident_by_call_sid(SID).await, Ok(Some(_))) }
    })
    .await;
    assert!(stored, "the emergency was stored once the lock went");
    assert_eq!(app.deliveries_of(SID).await.len(), HEART_DELIVERIES);
    app.stop().await;
}

/// Every connection of the shared pool busy (a burst of sends recording their outcomes, streams, slow
/// reads): a Passthru is still stored and answered 200 in time, on connections nothing else may take.
/// PostgreSQL only: SQLite has one writer, which the intake already goes first for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthru_is_stored_while_every_shared_connection_is_busy() {
    let app = spawn_app_with(Db::Postgres, &[without_dispatcher()]).await;
    let mut held = Vec::new();
    while let Ok(Ok(conn)) =
        tokio::time::timeout(Duration::from_millis(500), app.store.pool().acquire()).await
    {
        held.push(conn);
    }
    assert!(!held.is_empty(), "the shared pool was taken");
    let res = app
        .passthru(&format!("CallSid={SID}-busy&EmergencyType=Heart"))
        .await;
    assert_eq!(
        res.status(),
        200,
        "{}",
        res.text().await.unwrap_or_default()
    );
    drop(held);
    assert_eq!(
        app.deliveries_of(&format!("{SID}-busy")).await.len(),
        HEART_DELIVERIES
    );
    app.stop().await;
}

/// A request cut by the time limit (here a body that never finishes) is answered 408 and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_by_the_time_limit_are_counted() {
    let app = spawn_app_with(Db::Sqlite, &[without_dispatcher(), short_timeout()]).await;
    let mut stream = raw::connect(&app).await;
    raw::send(
        &mut stream,
        format!(
            "POST /exotel/passthru?token={WEBHOOK_TOKEN} HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nCallSid=abc"
        )
        .as_bytes(),
    )
    .await;
    let answer = raw::read_response(&mut stream, Duration::from_secs(30)).await;
    assert_eq!(answer.map(|(s, _)| s), Some(408));
    let text = app.state.metrics.encode_classic().unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("sos_webhook_requests_total")
                && l.contains("endpoint=\"/exotel/passthru\"")
                && l.contains("status=\"408\"")
        })
        .unwrap_or_else(|| panic!("no 408 sample in\n{text}"));
    assert!(line.ends_with(" 1"), "{line}");
    app.stop().await;
}

/// Nothing of a slow Alertmanager or API trigger is answered 500: an unreachable database is 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_trigger_with_the_database_down_is_503_not_500() {
    let app = spawn_app_with(Db::Sqlite, &[without_dispatcher()]).await;
    app.store.close().await;
    let (status, body) =
        post_incident(&app, &json!({"emergency_type": "Heart", "message": "x"})).await;
    assert_eq!(status, 503, "{body}");
    app.stop().await;
}
