//! Retention, backup and the settings and secrets checks around them: old resolved incidents are pruned
//! with everything under them and nothing else, `backup` writes a copy that opens, and a partial
//! Exotel configuration keeps its API key out of stored requests.

use std::process::Command;
use std::time::Duration;

use exotel_sos::domain::now_ms;
use exotel_sos::store::Store;

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    pruning_removes_old_resolved_incidents_and_everything_under_them,
    the_retention_task_prunes_only_when_keep_days_is_set,
    pruning_spares_a_send_in_flight_by_the_databases_clock,
    pruning_takes_the_alarms_of_pruned_incidents_and_cleared_account_alarms,
    a_partial_exotel_configuration_keeps_the_api_key_out_of_stored_requests,
);

const DAY_MS: i64 = 86_400_000;

/// Raises an incident by Passthru and waits until its (dry-run) deliveries are finished.
async fn raise(app: &TestApp, call_sid: &str) -> String {
    let res = app
        .passthru(&format!("CallSid={call_sid}&EmergencyType=Heart"))
        .await;
    assert_eq!(res.status(), 200, "{call_sid}");
    app.settled(call_sid).await;
    app.store
        .incident_by_call_sid(call_sid)
        .await
        .unwrap()
        .expect("incident stored")
        .id
}

async fn resolve_at(app: &TestApp, incident_id: &str, resolved_at: i64) {
    exotel_sos::app::incidents::resolve(&app.state, incident_id, "test")
        .await
        .unwrap()
        .expect("incident exists");
    sqlx::query("UPDATE incidents SET resolved_at = $1 WHERE id = $2")
        .bind(resolved_at)
        .bind(incident_id)
        .execute(app.store.pool())
        .await
        .unwrap();
}

/// (incidents, deliveries, events) stored for one incident.
async fn rows_of(store: &Store, incident_id: &str) -> (i64, i64, i64) {
    let count = |sql: &'static str| {
        let store = store.clone();
        let id = incident_id.to_owned();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(id)
                .fetch_one(store.pool())
                .await
                .unwrap()
        }
    };
    (
        count("SELECT COUNT(*) FROM incidents WHERE id = $1").await,
        count("SELECT COUNT(*) FROM deliveries WHERE incident_id = $1").await,
        count(
            "SELECT COUNT(*) FROM delivery_events e JOIN deliveries d ON d.id = e.delivery_id \
             WHERE d.incident_id = $1",
        )
        .await,
    )
}

async fn pruning_removes_old_resolved_incidents_and_everything_under_them(db: Db) {
    let app = spawn_app_with(
        db,
        // Auto-resolve would otherwise close the old open incident below.
        &[("SOS_INCIDENTS__AUTO_RESOLVE_AFTER", "3650d".into())],
    )
    .await;
    let now = now_ms();
    let old_a = raise(&app, "retention0000000000000000000001a").await;
    let old_b = raise(&app, "retention0000000000000000000001b").await;
    let recent = raise(&app, "retention0000000000000000000002").await;
    let open = raise(&app, "retention0000000000000000000003").await;
    resolve_at(&app, &old_a, now - 10 * DAY_MS).await;
    resolve_at(&app, &old_b, now - 9 * DAY_MS).await;
    resolve_at(&app, &recent, now - DAY_MS).await;
    // Open for ten days: old, but never pruned while open.
    sqlx::query("UPDATE incidents SET received_at = $1 WHERE id = $2")
        .bind(now - 10 * DAY_MS)
        .bind(&open)
        .execute(app.store.pool())
        .await
        .unwrap();
    let before: Vec<_> = [&old_a, &old_b, &recent, &open]
        .iter()
        .map(|id| id.to_string())
        .collect();
    for id in &before {
        let (i, d, e) = rows_of(&app.store, id).await;
        assert!(
            i == 1 && d == HEART_DELIVERIES as i64 && e > 0,
            "{id}: {i} {d} {e}"
        );
    }
    let kept_recent = rows_of(&app.store, &recent).await;
    let kept_open = rows_of(&app.store, &open).await;
    let events_of_old = rows_of(&app.store, &old_a).await.2 + rows_of(&app.store, &old_b).await.2;

    // A batch of one: two batches delete, the third finds nothing.
    let pruned = app
        .store
        .prune_resolved_before(now - 7 * DAY_MS, 1)
        .await
        .unwrap();
    assert_eq!(pruned.incidents, 2);
    assert_eq!(pruned.deliveries, 2 * HEART_DELIVERIES as u64);
    assert_eq!(pruned.events, events_of_old as u64);
    assert_eq!(rows_of(&app.store, &old_a).await, (0, 0, 0));
    assert_eq!(rows_of(&app.store, &old_b).await, (0, 0, 0));
    assert_eq!(rows_of(&app.store, &recent).await, kept_recent);
    assert_eq!(rows_of(&app.store, &open).await, kept_open);

    // Nothing left to do: a second pass deletes nothing.
    let again = app
        .store
        .prune_resolved_before(now - 7 * DAY_MS, 500)
        .await
        .unwrap();
    assert_eq!(again.incidents, 0);
    app.stop().await;
}

/// A lease runs on the database's clock, not the service's: a service clock ahead of it (a test's,
/// or a replica's skewed one) must not let pruning delete a delivery whose send is still in flight.
async fn pruning_spares_a_send_in_flight_by_the_databases_clock(db: Db) {
    let app = spawn_app_with(db, &[("SOS_INCIDENTS__AUTO_RESOLVE_AFTER", "3650d".into())]).await;
    let id = raise(&app, "retention0000000000000000000007").await;
    resolve_at(&app, &id, now_ms() - 10 * DAY_MS).await;
    // The lease alone: pruning judges a send in flight by its lease (the status machine would refuse
    // a finished delivery's move back to `sending`).
    let lease = |until: i64| {
        sqlx::query(
            "UPDATE deliveries SET lease_owner = 'elsewhere', lease_until = $1 \
             WHERE id = (SELECT MIN(id) FROM deliveries WHERE incident_id = $2)",
        )
        .bind(until)
        .bind(id.clone())
        .execute(app.store.pool())
    };
    // Leased for another minute by the database's clock; the service's clock two hours ahead.
    lease(now_ms() + 60_000).await.unwrap();
    app.store.clock().advance(Duration::from_secs(2 * 3600));
    let kept = rows_of(&app.store, &id).await;
    let pruned = app
        .store
        .prune_resolved_before(app.store.now_ms() - 7 * DAY_MS, 500)
        .await
        .unwrap();
    assert_eq!(pruned.incidents, 0, "the send in flight keeps its incident");
    assert_eq!(rows_of(&app.store, &id).await, kept);
    // Once the lease has lapsed by the database's clock, the incident goes.
    lease(now_ms() - 1_000).await.unwrap();
    let pruned = app
        .store
        .prune_resolved_before(app.store.now_ms() - 7 * DAY_MS, 500)
        .await
        .unwrap();
    assert_eq!(pruned.incidents, 1);
    assert_eq!(rows_of(&app.store, &id).await, (0, 0, 0));
    app.stop().await;
}

/// The alarms table is pruned with the incidents: an unreached alarm goes with its incident, an
/// account alarm once it was cleared before the cutoff; an open account alarm stays however old.
async fn pruning_takes_the_alarms_of_pruned_incidents_and_cleared_account_alarms(db: Db) {
    let app = spawn_app_with(db, &[("SOS_INCIDENTS__AUTO_RESOLVE_AFTER", "3650d".into())]).await;
    let old = raise(&app, "retention0000000000000000000008").await;
    let young = raise(&app, "retention0000000000000000000009").await;
    resolve_at(&app, &old, now_ms() - 10 * DAY_MS).await;
    resolve_at(&app, &young, now_ms() - DAY_MS).await;
    let long_ago = now_ms() - 20 * DAY_MS;
    for (key, incident, cleared) in [
        ("unreached:old", Some(old.as_str()), None),
        ("unreached:young", Some(young.as_str()), None),
        (
            "account:exotel:401:cleared:1",
            None,
            Some(now_ms() - 9 * DAY_MS),
        ),
        (
            "account:exotel:402:cleared:2",
            None,
            Some(now_ms() - DAY_MS),
        ),
        ("account:gupshup:auth", None, None),
    ] {
        sqlx::query(
            "INSERT INTO alarms (id, kind, dedup_key, incident_id, summary, body, status, due_at, \
             raised_at, cleared_at) VALUES ($1, $2, $3, $4, 's', '{}', 'sent', $5, $5, $6)",
        )
        .bind(key)
        .bind(if incident.is_some() {
            "unreached"
        } else {
            "account"
        })
        .bind(key)
        .bind(incident)
        .bind(long_ago)
        .bind(cleared)
        .execute(app.store.pool())
        .await
        .unwrap();
    }
    let pruned = app
        .store
        .prune_resolved_before(now_ms() - 7 * DAY_MS, 500)
        .await
        .unwrap();
    assert_eq!((pruned.incidents, pruned.alarms), (1, 2), "{pruned:?}");
    let mut left: Vec<String> = sqlx::query_scalar("SELECT id FROM alarms")
        .fetch_all(app.store.pool())
        .await
        .unwrap();
    left.sort();
    assert_eq!(
        left,
        [
            "account:exotel:402:cleared:2",
            "account:gupshup:auth",
            "unreached:young"
        ]
    );
    app.stop().await;
}

async fn the_retention_task_prunes_only_when_keep_days_is_set(db: Db) {
    // keep_days = 0 (the default): nothing is ever deleted, however old.
    let app = spawn_app_with(db, &[("SOS_RETENTION__EVERY_MS", "50".into())]).await;
    let id = raise(&app, "retention0000000000000000000004").await;
    resolve_at(&app, &id, now_ms() - 3650 * DAY_MS).await;
    let kept = rows_of(&app.store, &id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rows_of(&app.store, &id).await,
        kept,
        "keep_days = 0 keeps everything"
    );
    app.stop().await;

    let app = spawn_app_with(
        db,
        &[
            ("SOS_RETENTION__KEEP_DAYS", "7".into()),
            ("SOS_RETENTION__EVERY_MS", "50".into()),
        ],
    )
    .await;
    let old = raise(&app, "retention0000000000000000000005").await;
    let young = raise(&app, "retention0000000000000000000006").await;
    let young_rows = rows_of(&app.store, &young).await;
    resolve_at(&app, &old, now_ms() - 8 * DAY_MS).await;
    resolve_at(&app, &young, now_ms() - 6 * DAY_MS).await;
    let store = app.store.clone();
    let old_id = old.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let store = store.clone();
            let id = old_id.clone();
            async move { rows_of(&store, &id).await == (0, 0, 0) }
        })
        .await,
        "the incident resolved eight days ago is pruned"
    );
    assert_eq!(rows_of(&app.store, &young).await, young_rows);
    app.stop().await;
}

async fn a_partial_exotel_configuration_keeps_the_api_key_out_of_stored_requests(db: Db) {
    // Key and account set, token missing: calls and SMS run dry-run and store their requests.
    let key = "9f8e7d6c5b4a39281706f5e4";
    let app = spawn_app_with(
        db,
        &[
            ("SOS_EXOTEL__ACCOUNT_SID", "acme".into()),
            ("SOS_EXOTEL__API_KEY", key.into()),
            ("SOS_EXOTEL__CALLER_ID", "08069891522".into()),
            ("SOS_EXOTEL__SMS_FROM", "HOSPTL".into()),
        ],
    )
    .await;
    let sid = "retention0000000000000000000007";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(sid).await;
    let exotel: Vec<_> = ds
        .iter()
        .filter(|d| d.channel == "call" || d.channel == "sms")
        .collect();
    assert!(!exotel.is_empty());
    for d in exotel {
        let stored = d
            .last_request
            .as_deref()
            .expect("dry-run stores the request");
        assert!(!stored.contains(key), "{stored}");
        assert!(!stored.contains(&key[4..]), "{stored}");
    }
    app.stop().await;
}

fn run_cli(args: &[&str], database_url: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_exotel-sos"))
        .args(args)
        .env("SOS_DATABASE__URL", database_url)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_writes_a_copy_that_opens_and_holds_the_incidents() {
    let app = spawn_app(Db::Sqlite).await;
    let id = raise(&app, "retention0000000000000000000008").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("copy.db");
    let url = app.db.url.clone();
    // While the server runs: VACUUM INTO reads one consistent snapshot.
    let (ok, text) = tokio::task::spawn_blocking({
        let file = file.clone();
        move || run_cli(&["backup", file.to_str().unwrap()], &url)
    })
    .await
    .unwrap();
    assert!(ok, "{text}");
    // mode=rw: the file must exist (the store switches it to WAL, so not read-only).
    let copy = Store::connect(&format!("sqlite://{}?mode=rw", file.display()), 1)
        .await
        .unwrap();
    assert!(copy.is_migrated().await.unwrap());
    let stored = copy.incident(&id).await.unwrap().expect("incident in copy");
    assert_eq!(
        stored.call_sid.as_deref(),
        Some("retention0000000000000000000008")
    );
    assert_eq!(copy.deliveries(&id).await.unwrap().len(), HEART_DELIVERIES);
    copy.close().await;

    // Never over an existing file.
    let url = app.db.url.clone();
    let (ok, text) = tokio::task::spawn_blocking({
        let file = file.clone();
        move || run_cli(&["backup", file.to_str().unwrap()], &url)
    })
    .await
    .unwrap();
    assert!(!ok && text.contains("already exists"), "{text}");
    app.stop().await;
}

#[test]
fn backup_refuses_postgresql_and_points_to_pg_dump() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("copy.db");
    let (ok, text) = run_cli(&["backup", file.to_str().unwrap()], &pg_admin_url());
    assert!(!ok, "{text}");
    assert!(text.contains("pg_dump"), "{text}");
    assert!(!file.exists());
}

#[test]
fn check_config_refuses_a_huge_retry_wait_without_panicking() {
    let out = Command::new(env!("CARGO_BIN_EXE_exotel-sos"))
        .arg("check-config")
        .env("SOS_DISPATCH__RETRY_SCHEDULE_SECS", "1e300")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("dispatch.retry_schedule_secs"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
