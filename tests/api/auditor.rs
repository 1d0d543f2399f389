//! The auditor: finds work that is not moving (queued deliveries nobody claims, deliveries stuck in
//! `sending` past their lease, held calls nobody released), re-kicks it or reports it in `/readyz` and
//! `/metrics`, and calls the heartbeat URL after clean passes only.

use std::time::Duration;

use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    queued_work_nobody_claims_is_a_stall_and_stops_the_heartbeat,
    a_delivery_stuck_in_sending_past_its_lease_is_requeued,
    a_held_call_nobody_released_is_released,
    a_report_nobody_looks_up_is_given_up_on_and_the_call_redialled,
    an_open_incident_past_its_unreached_time_is_reported_unless_acknowledged_or_a_drill,
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

async fn metrics(app: &TestApp) -> String {
    app.client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until `/readyz` lists a stall of `kind`; the body.
async fn stall(app: &TestApp, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = readyz(app).await;
        let hit = body["auditor"]["stalls"]
            .as_array()
            .is_some_and(|s| s.iter().any(|f| f["kind"] == kind));
        if hit {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {kind} stall reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn heartbeats(server: &MockServer) -> usize {
    server.received_requests().await.unwrap_or_default().len()
}

async fn queued_work_nobody_claims_is_a_stall_and_stops_the_heartbeat(db: Db) {
    let watcher = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/ping/sos"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&watcher)
        .await;
    let app = spawn_app_with(
        db,
        &[
            without_dispatcher(),
            ("SOS_AUDITOR__EVERY", "1s".into()),
            (
                "SOS_AUDITOR__HEARTBEAT_URL",
                format!("{}/ping/sos", watcher.uri()),
            ),
        ],
    )
    .await;
    // Nothing is stalled yet: clean passes, each followed by a heartbeat.
    assert!(
        eventually(Duration::from_secs(10), || async {
            heartbeats(&watcher).await >= 2
        })
        .await,
        "the heartbeat URL is called after clean passes"
    );
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["auditor"]["role"], "auditing", "{body}");
    assert_eq!(body["auditor"]["stalled"], false, "{body}");

    assert_eq!(
        app.passthru("CallSid=audit-q1&EmergencyType=Heart")
            .await
            .status(),
        200
    );
    // Five minutes pass and no dispatcher runs (dispatch.enabled is off on this replica).
    app.store.clock().advance(Duration::from_secs(300));
    let body = stall(&app, "queued_overdue").await;
    let finding = body["auditor"]["stalls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "queued_overdue")
        .unwrap()
        .clone();
    assert_eq!(
        finding["count"].as_u64(),
        Some(HEART_DELIVERIES as u64),
        "{finding}"
    );
    assert_eq!(body["auditor"]["stalled"], true);
    // A stall is reported, not a reason to take this replica out of the load balancer.
    let (status, _) = readyz(&app).await;
    assert_eq!(status, 200);
    let text = metrics(&app).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("sos_auditor_findings_total{kind=\"queued_overdue\"}")),
        "{text}"
    );
    assert!(text.contains("sos_auditor_stalls 1"), "{text}");
    // Each overdue delivery says so on its trail, once.
    let ds = app.deliveries_of("audit-q1").await;
    for d in &ds {
        let audits = app
            .store
            .events(&d.id)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "audit")
            .count();
        assert_eq!(audits, 1, "{}", d.id);
    }
    // No heartbeat while the stall lasts.
    let before = heartbeats(&watcher).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        heartbeats(&watcher).await,
        before,
        "no heartbeat after a pass with findings"
    );
    let ds = app.deliveries_of("audit-q1").await;
    for d in &ds {
        let audits = app
            .store
            .events(&d.id)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "audit")
            .count();
        assert_eq!(audits, 1, "one event per stall, not per pass");
    }

    // Resolved, nothing is overdue any more: clean again, and the heartbeat resumes.
    let res = app
        .client
        .post(format!(
            "{}/api/v1/incidents/{}/resolve",
            app.base, ds[0].incident_id
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    assert!(
        eventually(Duration::from_secs(10), || async {
            heartbeats(&watcher).await > before
        })
        .await,
        "the heartbeat resumes after a clean pass"
    );
    let (_, body) = readyz(&app).await;
    assert_eq!(body["auditor"]["stalled"], false, "{body}");
    app.stop().await;
}

async fn a_delivery_stuck_in_sending_past_its_lease_is_requeued(db: Db) {
    let app = spawn_app_with(
        db,
        &[
            without_dispatcher(),
            ("SOS_AUDITOR__EVERY", "1s".into()),
            // The reaper's period, of which the auditor allows three (at least a second).
            ("SOS_DISPATCH__POLL_INTERVAL_MS", "100".into()),
        ],
    )
    .await;
    app.passthru("CallSid=audit-s1&EmergencyType=Heart").await;
    let call = app.delivery_of("audit-s1", "call").await;
    // A dispatcher claims the call, then dies: no outcome, no reaper.
    let claimed = app
        .store
        .claim(
            &call.provider,
            "dead-replica",
            Duration::from_millis(100),
            1,
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        app.store.delivery(&call.id).await.unwrap().unwrap().status,
        "sending"
    );
    stall(&app, "sending_expired").await;
    let now = app.store.delivery(&call.id).await.unwrap().unwrap();
    assert_eq!(now.status, "queued", "{now:?}");
    let kinds: Vec<String> = app
        .store
        .events(&call.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"audit".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"lease_expired".to_owned()), "{kinds:?}");
    assert!(metrics(&app)
        .await
        .contains("sos_auditor_findings_total{kind=\"sending_expired\"} 1"));
    app.stop().await;
}

async fn a_held_call_nobody_released_is_released(db: Db) {
    let app = spawn_app_with(
        db,
        &[without_dispatcher(), ("SOS_AUDITOR__EVERY", "1s".into())],
    )
    .await;
    app.passthru("CallSid=audit-h1&EmergencyType=Heart").await;
    let call = app.delivery_of("audit-h1", "call").await;
    // A dispatcher with a cap of 1 places a call (accepted), then a follow-up call of the same incident
    // to the same number: held.
    let first = app
        .store
        .claim_capped(&call.provider, "gone", Duration::from_secs(60), 1, 1)
        .await
        .unwrap();
    let d = &first.rows[0];
    let recorded = app
        .store
        .finish_attempt(
            &d.id,
            d.lease_token.as_deref().unwrap(),
            &exotel_sos::store::Finish::Accepted {
                provider_id: Some("callsid-audit-h".into()),
                detail: "accepted".into(),
                report_due_at: None,
            },
        )
        .await
        .unwrap();
    assert!(recorded.is_some());
    assert!(app
        .store
        .add_followup(&d.incident_id, &d.contact_name, &d.phone, &d.provider)
        .await
        .unwrap());
    let followup = app
        .deliveries_of("audit-h1")
        .await
        .into_iter()
        .find(|f| f.purpose == "followup")
        .unwrap();
    let claimed = app
        .store
        .claim_capped(&call.provider, "gone", Duration::from_secs(60), 10, 1)
        .await
        .unwrap();
    // The other contact's first call goes past the cap; the follow-up is held.
    assert!(
        claimed.rows.iter().all(|r| r.purpose == "alert"),
        "{claimed:?}"
    );
    assert_eq!(claimed.held.len(), 1, "{claimed:?}");
    assert_eq!(claimed.held[0].delivery_id, followup.id);
    let held_id = followup.id.clone();
    assert_eq!(
        app.store.delivery(&held_id).await.unwrap().unwrap().status,
        "held"
    );
    // Its dispatcher is gone; three hours on it is still held.
    app.store.clock().advance(Duration::from_secs(3 * 3600));
    stall(&app, "held_overdue").await;
    let now = app.store.delivery(&held_id).await.unwrap().unwrap();
    assert_eq!(now.status, "queued", "{now:?}");
    let events = app.store.events(&held_id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "released" && e.detail.starts_with("auditor:")),
        "{events:?}"
    );
    app.stop().await;
}

async fn a_report_nobody_looks_up_is_given_up_on_and_the_call_redialled(db: Db) {
    let app = spawn_app_with(
        db,
        &[without_dispatcher(), ("SOS_AUDITOR__EVERY", "1s".into())],
    )
    .await;
    app.passthru("CallSid=audit-r1&EmergencyType=Heart").await;
    let call = app.delivery_of("audit-r1", "call").await;
    let claimed = app
        .store
        .claim(&call.provider, "gone", Duration::from_secs(60), 1)
        .await
        .unwrap();
    let d = &claimed[0];
    let due = app.store.now_ms() + 600_000;
    app.store
        .finish_attempt(
            &d.id,
            d.lease_token.as_deref().unwrap(),
            &exotel_sos::store::Finish::Accepted {
                provider_id: Some("callsid-audit-r".into()),
                detail: "accepted".into(),
                report_due_at: Some(due),
            },
        )
        .await
        .unwrap();
    // No report comes, and no reconciler runs to look it up: 25 minutes on, the auditor steps in.
    app.store.clock().advance(Duration::from_secs(25 * 60));
    stall(&app, "report_stalled").await;
    let now = app.store.delivery(&d.id).await.unwrap().unwrap();
    assert_eq!(now.status, "queued", "redialled: {now:?}");
    assert_eq!(now.redials, 1);
    let events = app.store.events(&d.id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "report_overdue" && e.detail.contains("reconciler has stalled")),
        "{events:?}"
    );
    app.stop().await;
}

/// Two replicas on one PostgreSQL database: one runs the passes, the other stands by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_audits_the_other_stands_by() {
    let env = [without_dispatcher(), ("SOS_AUDITOR__EVERY", "1s".into())];
    let first = spawn_app_with(Db::Postgres, &env).await;
    let settings = test_settings(&TestDb::shared(&first.db.url), &first.stakeholders, &env);
    let second = start(
        TestDb::shared(&first.db.url),
        first.stakeholders.clone(),
        settings,
    )
    .await;
    let roles = |a: Value, b: Value| {
        let mut r = vec![
            a["auditor"]["role"].as_str().unwrap_or("").to_owned(),
            b["auditor"]["role"].as_str().unwrap_or("").to_owned(),
        ];
        r.sort();
        r
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen;
    let settled = loop {
        let ((_, a), (_, b)) = tokio::join!(readyz(&first), readyz(&second));
        seen = roles(a, b);
        if seen == ["auditing", "standby"] {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(settled, "{seen:?}");
    second.stop().await;
    first.stop().await;
}

/// The auditor's wake-up reaches every replica: the dispatcher that should claim overdue work may run
/// on another one. Here the auditing replica sends nothing, and the sending one polls once an hour, so
/// only a wake-up over PostgreSQL moves the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditors_wake_up_reaches_the_dispatcher_of_another_replica() {
    const SID: &str = "audit-wake-elsewhere";
    let auditing = spawn_app_with(
        Db::Postgres,
        &[without_dispatcher(), ("SOS_AUDITOR__EVERY", "1s".into())],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            readyz(&auditing).await.1["auditor"]["role"] == "auditing"
        })
        .await,
        "the first replica audits"
    );
    assert_eq!(
        auditing
            .passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
            .await
            .status(),
        200
    );
    // Not due yet when the sending replica starts (its first look claims what is due).
    let set_due = |due_at: i64| {
        sqlx::query("UPDATE deliveries SET due_at = $1 WHERE status = 'queued'")
            .bind(due_at)
            .execute(auditing.store.pool())
    };
    set_due(auditing.store.now_ms() + 3_600_000).await.unwrap();
    let env = [
        ("SOS_DISPATCH__POLL_INTERVAL_MS", "3600000".into()),
        ("SOS_AUDITOR__EVERY", "1h".into()),
    ];
    let settings = test_settings(
        &TestDb::shared(&auditing.db.url),
        &auditing.stakeholders,
        &env,
    );
    let sending = start(
        TestDb::shared(&auditing.db.url),
        auditing.stakeholders.clone(),
        settings,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        auditing
            .deliveries_of(SID)
            .await
            .iter()
            .all(|d| d.status == "queued"),
        "nothing due yet"
    );
    // Overdue by five minutes, without a commit that wakes anyone: only the auditor notices.
    set_due(auditing.store.now_ms() - 300_000).await.unwrap();
    assert!(
        auditing
            .deliveries_until(SID, Duration::from_secs(15), |ds| {
                ds.iter().all(|d| d.status != "queued")
            })
            .await,
        "the sending replica was woken and claimed the overdue work"
    );
    sending.stop().await;
    auditing.stop().await;
}

async fn raise(app: &TestApp, body: Value) -> String {
    let res = app
        .client
        .post(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let v: Value = res.json().await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

async fn audited(app: &TestApp, incident_id: &str) -> bool {
    audited_in(&app.store, incident_id).await
}

async fn an_open_incident_past_its_unreached_time_is_reported_unless_acknowledged_or_a_drill(
    db: Db,
) {
    let app = spawn_app_with(
        db,
        &[
            without_dispatcher(),
            ("SOS_AUDITOR__EVERY", "1s".into()),
            ("SOS_ACK__DEADLINE", "1m".into()),
        ],
    )
    .await;
    let open = raise(
        &app,
        serde_json::json!({"emergency_type": "Heart", "message": "nobody answers", "dedup_key": "u-open"}),
    )
    .await;
    let acked = raise(
        &app,
        serde_json::json!({"emergency_type": "Brain", "message": "someone has it", "dedup_key": "u-acked"}),
    )
    .await;
    let drill = raise(
        &app,
        serde_json::json!({"emergency_type": "Heart", "message": "drill", "drill_contact": "Dr. Asha Rao"}),
    )
    .await;
    // One stored before the upgrade that brought deadlines: the sweep never alarms it, so it is no stall.
    let old = raise(
        &app,
        serde_json::json!({"emergency_type": "Lungs", "message": "from before", "dedup_key": "u-old"}),
    )
    .await;
    sqlx::query("UPDATE incidents SET unreached_due_at = NULL WHERE id = $1")
        .bind(&old)
        .execute(app.store.pool())
        .await
        .unwrap();
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{acked}/ack", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Duty manager"}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    // Three minutes on: a minute past the deadline and a minute more.
    app.store.clock().advance(Duration::from_secs(180));
    // Either the unreached sweep marked it, or the auditor says the sweep has stalled.
    let store = app.store.clone();
    let seen = eventually(Duration::from_secs(15), || {
        let (store, open) = (store.clone(), open.clone());
        async move {
            let marked = store
                .incident(&open)
                .await
                .ok()
                .flatten()
                .is_some_and(|i| i.unreached_at.is_some());
            marked || audited_in(&store, &open).await
        }
    })
    .await;
    assert!(
        seen,
        "the open incident is neither marked unreached nor reported"
    );
    let marked = app
        .store
        .incident(&open)
        .await
        .unwrap()
        .unwrap()
        .unreached_at
        .is_some();
    if !marked {
        let body = stall(&app, "unreached_overdue").await;
        let finding = body["auditor"]["stalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["kind"] == "unreached_overdue")
            .unwrap()
            .clone();
        assert_eq!(finding["count"], 1, "{finding}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !audited(&app, &acked).await,
        "an acknowledged incident is not a stall"
    );
    assert!(!audited(&app, &drill).await, "a drill never alarms");
    assert!(
        !audited(&app, &old).await,
        "an incident the sweep never alarms is not a stall"
    );
    app.stop().await;
}

async fn audited_in(store: &exotel_sos::store::Store, incident_id: &str) -> bool {
    store
        .incident_timeline(incident_id)
        .await
        .map(|t| t.iter().any(|e| e.kind == "audit"))
        .unwrap_or(false)
}
