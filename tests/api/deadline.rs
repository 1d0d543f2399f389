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

crate::both_engines!(a_passthru_answered_302_logs_what_became_of_its_write);

/// The real binary with JSON logs, its lines collected as they come.
struct Logged {
    _child: tokio::process::Child,
    base: String,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Logged {
    async fn start(db: &TestDb, stakeholders: &std::path::Path) -> Self {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_exotel-sos"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOS_") || k == "RUST_LOG") {
            cmd.env_remove(k);
        }
        let mut child = cmd
            .envs([
                ("SOS_DATABASE__URL", db.url.clone()),
                ("SOS_SERVER__LISTEN", "127.0.0.1:0".to_owned()),
                ("SOS_SERVER__ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
                ("SOS_SERVER__WEBHOOK_TOKEN", WEBHOOK_TOKEN.to_owned()),
                ("SOS_STAKEHOLDERS__FILE", stakeholders.display().to_string()),
                ("SOS_DISPATCH__ENABLED", "false".to_owned()),
                ("SOS_LOG__FORMAT", "json".to_owned()),
                ("SOS_LOG__LEVEL", "info".to_owned()),
            ])
            .arg("serve")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the server starts");
        let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let base = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = out.next_line().await.expect("server output") {
                if let Some(addr) = line.strip_prefix("exotel-sos listening on ") {
                    return addr.trim().to_owned();
                }
            }
            panic!("the server exited before listening");
        })
        .await
        .expect("the server listens");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Logged {
            _child: child,
            base,
            lines,
        }
    }

    async fn passthru(&self, sid: &str) -> u16 {
        reqwest::Client::new()
            .get(format!(
                "{}/exotel/passthru?token={WEBHOOK_TOKEN}&CallSid={sid}&EmergencyType=Heart\
                 &CallFrom=09901320691",
                self.base
            ))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("passthru answered")
            .status()
            .as_u16()
    }

    /// Waits for the JSON log event of the Passthru `sid` (its span's CallSid) that says whether its
    /// emergency was stored (`stored`), and returns it.
    async fn outcome(&self, sid: &str) -> serde_json::Value {
        let find = || {
            self.lines.lock().unwrap().iter().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["span"]["call_sid"] == sid && v["fields"]["stored"].is_boolean()).then_some(v)
            })
        };
        let seen = eventually(Duration::from_secs(60), || async { find().is_some() }).await;
        assert!(
            seen,
            "nothing logged of what became of {sid}:\n{}",
            self.lines.lock().unwrap().join("\n")
        );
        find().expect("seen")
    }
}

/// Holds SQLite's write lock, or `LOCK TABLE incidents` on PostgreSQL, from a connection of the test's
/// own, until the returned sender is used or dropped.
async fn hold_incident_writes(db: &TestDb) -> tokio::sync::oneshot::Sender<()> {
    let url = db.url.clone();
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let store = exotel_sos::store::Store::connect(&url, 1).await.unwrap();
        let mut tx = store.pool().begin().await.unwrap();
        let sql = match store.engine() {
            exotel_sos::store::Engine::Postgres => "LOCK TABLE incidents IN ACCESS EXCLUSIVE MODE",
            // Any schema change takes SQLite's one write lock; it is rolled back.
            exotel_sos::store::Engine::Sqlite => "CREATE TABLE held_by_the_test (x INTEGER)",
        };
        sqlx::query(sql).execute(&mut *tx).await.unwrap();
        let _ = locked_tx.send(());
        let _ = release_rx.await;
        let _ = tx.rollback().await;
        store.close().await;
    });
    locked_rx.await.expect("writes held");
    release_tx
}

/// A Passthru whose write outlasts its budget is answered 302, and the write goes on: what becomes of
/// it is logged with its CallSid (the caller's number masked), so that ops can see an emergency that
/// was stored after all, or one that was not (before, a write that failed after the 302 left no
/// trace). On PostgreSQL the write waits on the lock for as long as it is held: the connection it
/// waits on is ended after the 302, and a second Passthru is stored once the lock goes, both after
/// their 302. On SQLite the write gives up on its own (its wait for the one writer or for the lock
/// runs out), at about the time the Passthru's budget does: either way its outcome is logged.
async fn a_passthru_answered_302_logs_what_became_of_its_write(db: Db) {
    let db = TestDb::new(db).await;
    let stakeholders = db.dir().join("stakeholders.toml");
    std::fs::write(&stakeholders, STAKEHOLDERS).unwrap();
    let server = Logged::start(&db, &stakeholders).await;
    let release = hold_incident_writes(&db).await;

    let lost = "late0000000000000000000000000001";
    assert_eq!(server.passthru(lost).await, 302);
    let postgres = db.url.starts_with("postgres");
    if postgres {
        let admin = exotel_sos::store::Store::connect(&pg_admin_url(), 1)
            .await
            .unwrap();
        let name = db.url.rsplit('/').next().unwrap().to_owned();
        let ended = eventually(Duration::from_secs(30), || async {
            let ended: Vec<bool> = sqlx::query_scalar(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{name}' AND query LIKE 'INSERT INTO incidents%'"
            ))
            .fetch_all(admin.pool())
            .await
            .unwrap();
            !ended.is_empty()
        })
        .await;
        assert!(ended, "the waiting write was found and ended");
        admin.close().await;
    }
    let failed = server.outcome(lost).await;
    assert_eq!(failed["fields"]["stored"], false, "{failed}");
    assert_eq!(failed["level"], "ERROR", "{failed}");
    assert_eq!(failed["fields"]["caller"], "+91******0691", "{failed}");
    if postgres {
        // Ended only after the 302 came: the outcome can only be the late one.
        let message = failed["fields"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("the write that went on after the Passthru was answered 302"),
            "{failed}"
        );
        let late = "late0000000000000000000000000002";
        assert_eq!(server.passthru(late).await, 302);
        let _ = release.send(());
        let stored = server.outcome(late).await;
        assert_eq!(stored["fields"]["stored"], true, "{stored}");
        let message = stored["fields"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("emergency stored after the Passthru was answered 302"),
            "{stored}"
        );
        assert!(stored["fields"]["incident_id"].is_string(), "{stored}");
        let store = exotel_sos::store::Store::connect(&db.url, 1).await.unwrap();
        assert!(store.incident_by_call_sid(late).await.unwrap().is_some());
        assert!(store.incident_by_call_sid(lost).await.unwrap().is_none());
        store.close().await;
    } else {
        drop(release);
    }
    let lines = server.lines.lock().unwrap().clone();
    assert!(
        lines.iter().all(|l| !l.contains("9901320691")),
        "a full number was logged:\n{}",
        lines.join("\n")
    );
    drop(server);
}
