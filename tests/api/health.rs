//! `/healthz` and `/readyz`: database, migrations, dispatcher heartbeat and channel modes.

use std::sync::atomic::Ordering;

use serde_json::Value;

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    readyz_follows_the_dispatcher_heartbeat,
    readyz_is_503_when_the_database_is_down,
);

async fn readyz(app: &TestApp) -> (u16, Value) {
    let res = app
        .client
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

fn beat(app: &TestApp, seconds_ago: i64) {
    app.state.dispatcher_heartbeat.store(
        exotel_sos::domain::now_ms() - seconds_ago * 1000,
        Ordering::Relaxed,
    );
}

async fn readyz_follows_the_dispatcher_heartbeat(db: Db) {
    // Calls are configured, SMS (no sender) and WhatsApp are not.
    let app = spawn_app_with(
        db,
        &[
            // The loop goes round once at start, then not for a minute: the test sets the heartbeat.
            ("SOS_DISPATCH__POLL_INTERVAL_MS", "60000".into()),
            ("SOS_EXOTEL__ACCOUNT_SID", "acme".into()),
            ("SOS_EXOTEL__API_KEY", "key".into()),
            ("SOS_EXOTEL__API_TOKEN", "secret".into()),
            ("SOS_EXOTEL__CALLER_ID", "08069891522".into()),
            (
                "SOS_EXOTEL__FLOW_URL",
                "http://my.exotel.com/acme/exoml/start_voice/1".into(),
            ),
            ("SOS_READYZ__HEARTBEAT_STALE_SECS", "30".into()),
        ],
    )
    .await;
    let res = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let started = eventually(std::time::Duration::from_secs(10), || async {
        app.state.dispatcher_heartbeat.load(Ordering::Relaxed) > 0
    })
    .await;
    assert!(started, "the dispatcher went round once");

    // As if the dispatcher had not started: not ready, and the body says why.
    app.state.dispatcher_heartbeat.store(0, Ordering::Relaxed);
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_eq!(body["database"], "ok");
    assert_eq!(body["migrations"], "ok");
    assert_eq!(body["dispatcher"]["alive"], false);
    assert!(body["dispatcher"]["last_heartbeat_age_secs"].is_null());
    assert_eq!(body["channels"]["call"], "live");
    assert_eq!(body["channels"]["sms"], "dry-run");
    assert_eq!(body["channels"]["whatsapp"], "dry-run");

    beat(&app, 0);
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(body["dispatcher"]["alive"], true);

    // A loop that stopped going round 31 s ago is stale.
    beat(&app, 31);
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["dispatcher"]["alive"], false);
    assert!(
        body["dispatcher"]["last_heartbeat_age_secs"]
            .as_f64()
            .unwrap()
            >= 31.0
    );
    app.stop().await;
}

async fn readyz_is_503_when_the_database_is_down(db: Db) {
    let app = spawn_app(db).await;
    beat(&app, 0);
    let (status, _) = readyz(&app).await;
    assert_eq!(status, 200);
    let admin = match db {
        Db::Postgres => Some(app.db.take_down().await),
        // Closing the pool is what a failed disk looks like to the handler: no connection can be had.
        Db::Sqlite => {
            app.store.close().await;
            None
        }
    };
    beat(&app, 0);
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_ne!(body["database"], "ok");
    assert_eq!(
        body["dispatcher"]["alive"], true,
        "only the database is down"
    );

    if let Some(outage) = admin {
        outage.end().await;
        // Back up: ready again without a restart.
        let (status, body) = readyz(&app).await;
        assert_eq!(status, 200, "{body}");
    }
    app.stop().await;
}

/// With the real dispatcher running, readiness follows its loop without any help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_ready_with_the_dispatcher_running() {
    let app = spawn_app(Db::Sqlite).await;
    let ok = eventually(std::time::Duration::from_secs(10), || async {
        readyz(&app).await.0 == 200
    })
    .await;
    assert!(ok, "ready once the dispatcher has gone round");
    let (_, body) = readyz(&app).await;
    assert_eq!(body["dispatcher"]["alive"], true);
    assert_eq!(body["channels"]["call"], "dry-run");
    app.stop().await;
}

/// A webhook-only replica (no dispatcher in it) is ready without a heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_only_replica_is_ready_without_a_dispatcher() {
    let app = spawn_app_with(Db::Sqlite, &[without_dispatcher()]).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dispatcher"]["enabled"], false);
    app.stop().await;
}
