//! Fault-proof delivery: a bad outcome cannot poison a batch, an answer without an id is not a send,
//! reports follow the attempt they name, pauses and resolves never cause a stray call, and every
//! delivery that is not confirmed in time ends visibly.

use std::time::Duration;

use wiremock::matchers::{body_string_contains, method, path, path_regex};
use wiremock::{Mock, ResponseTemplate};

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    a_provider_error_with_a_nul_byte_poisons_nothing,
    a_success_answer_without_an_id_is_sent_again,
    a_redial_answered_in_xml_is_matched_by_its_own_call_sid,
    a_delivery_never_confirmed_ends_at_its_deadline,
    a_resolve_during_a_rate_wait_sends_nothing_more,
    a_report_that_cancels_says_so_and_finishes_the_delivery,
    unreported_whatsapp_rows_become_unconfirmed_once_at_the_report_deadline,
);

const SID: &str = "f00d0e6fcd920019d7174b60099187v";

async fn live_app(db: Db, p: &Providers, extra: &[(&'static str, String)]) -> TestApp {
    let mut env = p.env();
    env.extend(extra.iter().cloned());
    spawn_app_with(db, &env).await
}

/// Sends per phone number on one stand-in path.
async fn sends_to(p: &Providers, path: &str, key: &str, phone: &str) -> usize {
    p.requests(path)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, key) == Some(phone))
        .count()
}

/// One SMS answer carrying a NUL byte (PostgreSQL refuses `\0` in text) must not make the other
/// outcomes recorded with it fail, must not be sent again, and must itself end.
async fn a_provider_error_with_a_nul_byte_poisons_nothing(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    Mock::given(method("POST"))
        .and(path(SMS_PATH))
        .and(body_string_contains("To=%2B919800000004"))
        .respond_with(ResponseTemplate::new(400).set_body_raw(
            "{\"RestException\":{\"Status\":400,\"Message\":\"bad\\u0000number\"}}",
            "application/json",
        ))
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    let app = live_app(
        db,
        &p,
        &[
            ("SOS_EXOTEL__CALL_TIMEOUT_SECS", "1".into()),
            ("SOS_EXOTEL__SMS_TIMEOUT_SECS", "1".into()),
            ("SOS_GUPSHUP__TIMEOUT_SECS", "1".into()),
            ("SOS_DISPATCH__LEASE_SECS", "4".into()),
        ],
    )
    .await;
    for n in 0..3 {
        let res = app
            .passthru(&format!("CallSid={SID}{n}&EmergencyType=Heart"))
            .await;
        assert_eq!(res.status(), 200);
    }
    for n in 0..3 {
        let ds = app.settled(&format!("{SID}{n}")).await;
        let poisoned = ds
            .iter()
            .find(|d| d.channel == "sms" && d.phone == "+919800000004")
            .expect("the desk's SMS");
        assert_eq!(poisoned.status, "failed", "{poisoned:?}");
        let reason = poisoned.last_error.clone().unwrap_or_default();
        assert!(
            reason.contains("bad") && !reason.contains('\0'),
            "{reason:?}"
        );
        assert!(poisoned.attempts <= 1, "{poisoned:?}");
    }
    // Let any lease that was lost run out, then count: one request per delivery, none twice.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for phone in ["+919800000001", "+919800000005"] {
        assert_eq!(sends_to(&p, SMS_PATH, "To", phone).await, 3, "{phone}");
    }
    assert_eq!(sends_to(&p, SMS_PATH, "To", "+919800000004").await, 3);
    assert_eq!(p.requests(CALLS_PATH).await.len(), 6);
    app.stop().await;
}

/// A 200 that names no call (a wrong base_url, a captive portal, a proxy page) leaves it unknown
/// whether anybody is being called: send again rather than wait for a report that cannot come.
async fn a_success_answer_without_an_id_is_sent_again(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw("<html>Welcome to the hotel Wi-Fi</html>", "text/html"),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    let app = live_app(db, &p, &[]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=brain"))
        .await;
    let sent = app
        .deliveries_until(SID, Duration::from_secs(20), |ds| {
            ds.iter()
                .filter(|d| d.channel == "call")
                .all(|d| d.status == "accepted" && d.provider_id.is_some())
        })
        .await;
    assert!(sent, "every call ends accepted with Exotel's CallSid");
    // Brain has three calls; one of them met the captive page first and was dialled again.
    assert_eq!(p.requests(CALLS_PATH).await.len(), 4);
    app.stop().await;
}

/// A redial whose answer comes in Exotel's XML shape still names its call: the report for that call
/// finishes the delivery, and a late report for the first call changes nothing.
async fn a_redial_answered_in_xml_is_matched_by_its_own_call_sid(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(
        db,
        &p,
        &[
            ("SOS_DISPATCH__REDIAL_DELAY_SECS", "0.1".into()),
            ("SOS_DISPATCH__MAX_REDIALS", "2".into()),
            // Keypress off: the redial's "completed" is final (the keypress is tested in `ack`).
            ("SOS_ACK__DIGIT", String::new()),
        ],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    let desk = ds
        .iter()
        .find(|d| d.channel == "call" && d.phone == "+919800000004")
        .unwrap()
        .clone();
    let first = desk.provider_id.clone().expect("first CallSid");
    // From now on Exotel answers in XML.
    let xml_sid = "b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6";
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<TwilioResponse><Call><Sid>{xml_sid}</Sid>\
                 <Status>in-progress</Status><From>+919800000004</From></Call></TwilioResponse>"
            ),
            "application/xml",
        ))
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", first.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
    let store = app.store.clone();
    let id = desk.id.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let store = store.clone();
            let id = id.clone();
            async move {
                let d = store.delivery(&id).await.unwrap().unwrap();
                d.status == "accepted" && d.redials == 1
            }
        })
        .await,
        "redialled"
    );
    let d = app.store.delivery(&desk.id).await.unwrap().unwrap();
    assert_eq!(d.provider_id.as_deref(), Some(xml_sid));
    let res = app
        .post_form(
            "/exotel/call-status",
            &[
                ("CallSid", xml_sid),
                ("CustomField", desk.greeting_ref.as_str()),
                ("Status", "completed"),
            ],
        )
        .await;
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    // The first call's report, repeated late, is recorded and ignored.
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", first.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
    let d = app.store.delivery(&desk.id).await.unwrap().unwrap();
    assert_eq!(d.status, "delivered");
    assert_eq!(d.redials, 1);
    assert_eq!(sends_to(&p, CALLS_PATH, "From", "+919800000004").await, 2);
    app.stop().await;
}

/// Accepted calls and SMS whose report never comes and cannot be looked up are counted on /metrics
/// while they wait, and end at their deadline: a call counts as not reached, an SMS as unconfirmed.
async fn a_delivery_never_confirmed_ends_at_its_deadline(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    // The details API is down for good.
    Mock::given(method("GET"))
        .and(path_regex(r"^/v1/Accounts/acme/(Calls|SMS/Messages)/.*$"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&p.exotel)
        .await;
    let app = live_app(
        db,
        &p,
        &[
            ("SOS_DISPATCH__REPORT_WAIT_SECS", "0.4".into()),
            ("SOS_DISPATCH__MAX_REDIALS", "0".into()),
        ],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=default"))
        .await;
    app.settled(SID).await;
    let client = app.client.clone();
    let base = app.base.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let client = client.clone();
            let base = base.clone();
            async move {
                let text = client
                    .get(format!("{base}/metrics"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                text.lines().any(|l| {
                    l.starts_with("sos_deliveries_unconfirmed ")
                        && l.split_whitespace().nth(1).is_some_and(|v| v != "0")
                })
            }
        })
        .await,
        "the gauge shows deliveries waiting past their report deadline"
    );
    assert!(
        app.deliveries_until(SID, Duration::from_secs(30), |ds| {
            ds.iter()
                .filter(|d| d.channel != "whatsapp")
                .all(|d| d.status == "failed")
        })
        .await,
        "calls and SMS without any report end"
    );
    let call = app.delivery_of(SID, "call").await;
    assert!(
        call.last_error
            .as_deref()
            .is_some_and(|e| e.contains("no status report")),
        "{call:?}"
    );
    app.stop().await;
}

/// A call held back by the rate limit when its incident is resolved is not placed, and the wait
/// spends no attempt.
async fn a_resolve_during_a_rate_wait_sends_nothing_more(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(
        db,
        &p,
        &[
            // One call every 20 s with no burst beyond one: the second call waits in the limiter.
            ("SOS_DISPATCH__CALL_PER_MINUTE", "3".into()),
            ("SOS_DISPATCH__CALL_CONCURRENCY", "1".into()),
        ],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert!(
        app.deliveries_until(SID, Duration::from_secs(10), |ds| {
            ds.iter()
                .filter(|d| d.channel == "call")
                .any(|d| d.status == "accepted")
                && ds
                    .iter()
                    .filter(|d| d.channel == "call")
                    .any(|d| d.status == "sending")
        })
        .await,
        "one call placed, the other waiting for the rate limit"
    );
    let inc = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{}/resolve", app.base, inc.id))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The waiting call leaves the limiter by itself (its lease would end first) and is cancelled.
    assert!(
        app.deliveries_until(SID, Duration::from_secs(60), |ds| {
            ds.iter()
                .any(|d| d.channel == "call" && d.status == "cancelled")
        })
        .await,
        "the waiting call is cancelled"
    );
    assert_eq!(p.requests(CALLS_PATH).await.len(), 1);
    let waiting = app
        .deliveries_of(SID)
        .await
        .into_iter()
        .find(|d| d.channel == "call" && d.provider_id.is_none())
        .expect("the call that waited");
    assert_eq!(waiting.status, "cancelled");
    assert_eq!(
        waiting.attempts, 0,
        "a wait without a send spends no attempt"
    );
    assert!(waiting.finished_at.is_some());
    app.stop().await;
}

/// A no-answer report for a call whose incident was resolved meanwhile cancels the redial: the trail
/// says so, the delivery is finished, and the metric counts it.
async fn a_report_that_cancels_says_so_and_finishes_the_delivery(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[("SOS_DISPATCH__MAX_REDIALS", "2".into())]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=default"))
        .await;
    app.settled(SID).await;
    let call = app.delivery_of(SID, "call").await;
    let inc = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{}/resolve", app.base, inc.id))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let sid = call.provider_id.clone().unwrap();
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", sid.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
    let d = app.store.delivery(&call.id).await.unwrap().unwrap();
    assert_eq!(d.status, "cancelled");
    assert!(d.finished_at.is_some(), "{d:?}");
    let events = app.store.events(&call.id).await.unwrap();
    let last = events.last().unwrap();
    assert!(
        last.detail.contains("now cancelled") && !last.detail.contains("now queued"),
        "{last:?}"
    );
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sos_deliveries_total{") && l.contains("state=\"cancelled\"")),
        "{metrics}"
    );
    app.stop().await;
}

/// WhatsApp has no report to look up: at the deadline its rows become `unconfirmed` once, and the
/// sweep for overdue reports leaves them alone from then on.
async fn unreported_whatsapp_rows_become_unconfirmed_once_at_the_report_deadline(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[("SOS_DISPATCH__REPORT_WAIT_SECS", "0.2".into())]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=brain"))
        .await;
    app.settled(SID).await;
    let unconfirmed = app
        .deliveries_until(SID, Duration::from_secs(10), |ds| {
            ds.iter()
                .filter(|d| d.channel == "whatsapp")
                .all(|d| d.status == "unconfirmed")
        })
        .await;
    assert!(unconfirmed, "{:?}", app.deliveries_of(SID).await);
    let before = app.delivery_of(SID, "whatsapp").await;
    assert!(
        before
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("no status report"),
        "{before:?}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = app.store.delivery(&before.id).await.unwrap().unwrap();
    assert_eq!(before.updated_at, after.updated_at);
    app.stop().await;
}

both_engines!(
    a_stale_claim_cannot_overwrite_a_newer_one,
    healthz_fails_once_the_dispatcher_is_dead,
    a_delivery_whose_lease_keeps_running_out_ends_failed,
    a_late_answer_stops_a_redial_that_is_still_queued,
    a_report_for_a_redial_still_being_recorded_waits_for_it,
    a_wait_that_would_outlast_the_lease_hands_the_call_back_unsent,
    a_stray_nul_in_the_stakeholder_file_stores_the_emergency,
);

/// While a redial's outcome is still on its way to the database, its row holds the previous call's id;
/// the new call's report, found by its CustomField, waits for that record instead of getting 404.
async fn a_report_for_a_redial_still_being_recorded_waits_for_it(db: Db) {
    // Keypress off, so that "completed" settles the redial at once.
    let app = spawn_app_with(
        db,
        &[without_dispatcher(), ("SOS_ACK__DIGIT", String::new())],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=default"))
        .await;
    let call = app.delivery_of(SID, "call").await;
    sqlx::query(
        "UPDATE deliveries SET status = 'sending', provider_id = 'first-call', redials = 1 WHERE id = $1",
    )
    .bind(&call.id)
    .execute(app.store.pool())
    .await
    .unwrap();
    let pool = app.store.pool().clone();
    let id = call.id.clone();
    let recorder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        sqlx::query(
            "UPDATE deliveries SET status = 'accepted', provider_id = 'second-call' WHERE id = $1",
        )
        .bind(&id)
        .execute(&pool)
        .await
        .unwrap();
    });
    let res = app
        .post_form(
            "/exotel/call-status",
            &[
                ("CallSid", "second-call"),
                ("CustomField", call.greeting_ref.as_str()),
                ("Status", "completed"),
            ],
        )
        .await;
    recorder.await.unwrap();
    assert_eq!(res.status(), 200);
    let d = app.store.delivery(&call.id).await.unwrap().unwrap();
    assert_eq!(d.status, "delivered");
    assert_eq!(d.provider_id.as_deref(), Some("second-call"));
    app.stop().await;
}

/// A call whose wait for the rate limit would outlast its lease is handed back unsent, without spending
/// an attempt, and goes out once the limit allows: one request, one attempt.
async fn a_wait_that_would_outlast_the_lease_hands_the_call_back_unsent(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(
        db,
        &p,
        &[
            // A second call may go 12 s after the first; a lease of 4 s lets a claim wait 2 s at most.
            ("SOS_DISPATCH__CALL_PER_MINUTE", "5".into()),
            ("SOS_DISPATCH__CALL_CONCURRENCY", "1".into()),
            ("SOS_EXOTEL__CALL_TIMEOUT_SECS", "1".into()),
            ("SOS_EXOTEL__SMS_TIMEOUT_SECS", "1".into()),
            ("SOS_GUPSHUP__TIMEOUT_SECS", "1".into()),
            ("SOS_DISPATCH__LEASE_SECS", "4".into()),
        ],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert!(
        app.deliveries_until(SID, Duration::from_secs(60), |ds| {
            ds.iter()
                .filter(|d| d.channel == "call")
                .all(|d| d.status == "accepted")
        })
        .await,
        "both calls placed in the end"
    );
    assert_eq!(p.requests(CALLS_PATH).await.len(), 2);
    let calls: Vec<_> = app
        .deliveries_of(SID)
        .await
        .into_iter()
        .filter(|d| d.channel == "call")
        .collect();
    for d in &calls {
        assert_eq!(d.attempts, 1, "{d:?}");
    }
    let mut handed_back = 0;
    for d in &calls {
        handed_back += app
            .store
            .events(&d.id)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.kind == "requeued")
            .count();
    }
    assert!(
        handed_back >= 1,
        "the second call was handed back while it waited"
    );
    app.stop().await;
}

/// Names come from the operators' file: a stray NUL in one (PostgreSQL refuses `\0` in text) must not
/// make an emergency unstorable.
async fn a_stray_nul_in_the_stakeholder_file_stores_the_emergency(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    std::fs::write(
        &app.stakeholders,
        STAKEHOLDERS.replace("Emergency desk", "Emergency\\u0000desk"),
    )
    .unwrap();
    app.state.routing.reload().expect("the edited file loads");
    let res = app
        .passthru(&format!("CallSid={SID}&EmergencyType=default"))
        .await;
    assert_eq!(res.status(), 200);
    let ds = app.deliveries_of(SID).await;
    assert!(
        ds.iter().any(|d| d.contact_name == "Emergencydesk"),
        "{ds:?}"
    );
    app.stop().await;
}

/// A lease that keeps running out (the process dies, or the outcome can never be recorded) ends the
/// delivery after `max_attempts` losses instead of sending it forever.
async fn a_delivery_whose_lease_keeps_running_out_ends_failed(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=default"))
        .await;
    let store = &app.store;
    let mut last = Vec::new();
    for _ in 0..3 {
        let claimed = store
            .claim("exotel:sms", "me", Duration::from_millis(50), 10)
            .await
            .unwrap();
        assert!(!claimed.is_empty());
        tokio::time::sleep(Duration::from_millis(150)).await;
        last = store.requeue_expired_leases(3).await.unwrap();
    }
    assert!(!last.is_empty());
    assert!(last.iter().all(|m| m.status == "failed"), "{last:?}");
    let sms = app.delivery_of(SID, "sms").await;
    assert_eq!(sms.status, "failed");
    assert_eq!(sms.lease_losses, 3);
    assert!(sms.finished_at.is_some());
    assert!(
        sms.last_error
            .as_deref()
            .is_some_and(|e| e.contains("may have been sent")),
        "{sms:?}"
    );
    app.stop().await;
}

/// With acknowledgement by keypress off, a redial waits after a no-answer; if Exotel's "completed" for
/// that same call comes meanwhile, the doctor did answer: the delivery is delivered and the redial
/// never dialled. (With the keypress on, an answer without it does not stop the redial: see `ack`.)
async fn a_late_answer_stops_a_redial_that_is_still_queued(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(
        db,
        &p,
        &[
            // Long enough that both reports surely come before the redial would be dialled.
            ("SOS_DISPATCH__REDIAL_DELAY_SECS", "300".into()),
            ("SOS_DISPATCH__MAX_REDIALS", "2".into()),
            ("SOS_ACK__DIGIT", String::new()),
        ],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=default"))
        .await;
    app.settled(SID).await;
    let call = app.delivery_of(SID, "call").await;
    let sid = call.provider_id.clone().unwrap();
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", sid.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        app.store.delivery(&call.id).await.unwrap().unwrap().status,
        "queued"
    );
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", sid.as_str()), ("Status", "completed")],
        )
        .await;
    assert_eq!(res.status(), 200);
    // Delivered is final: no claim can take it for a redial any more.
    let d = app.store.delivery(&call.id).await.unwrap().unwrap();
    assert_eq!(d.status, "delivered");
    assert_eq!(sends_to(&p, CALLS_PATH, "From", &call.phone).await, 1);
    app.stop().await;
}

/// On PostgreSQL, an outcome the database refuses (here a trigger stands in for any such fault) holds
/// back no other outcome, and its own delivery ends within `max_attempts`, each try sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_database_refuses_poisons_nothing_and_ends() {
    let p = Providers::start().await;
    mount_happy(&p).await;
    Mock::given(method("POST"))
        .and(path(SMS_PATH))
        .and(body_string_contains("To=%2B919800000004"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            serde_json::json!({"RestException": {"Status": 400, "Message": "poison"}}),
        ))
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    let app = live_app(
        Db::Postgres,
        &p,
        &[
            ("SOS_EXOTEL__CALL_TIMEOUT_SECS", "1".into()),
            ("SOS_EXOTEL__SMS_TIMEOUT_SECS", "1".into()),
            ("SOS_GUPSHUP__TIMEOUT_SECS", "1".into()),
            ("SOS_DISPATCH__LEASE_SECS", "3".into()),
            ("SOS_DISPATCH__MAX_ATTEMPTS", "2".into()),
            ("SOS_DISPATCH__POLL_INTERVAL_MS", "100".into()),
        ],
    )
    .await;
    for sql in [
        "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN            IF NEW.last_error LIKE '%poison%' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW;          END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_poison BEFORE UPDATE ON deliveries FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ] {
        sqlx::query(sql).execute(app.store.pool()).await.unwrap();
    }
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert!(
        app.deliveries_until(SID, Duration::from_secs(40), |ds| {
            ds.iter()
                .all(|d| d.status != "queued" && d.status != "sending")
        })
        .await,
        "every delivery ends, the refused one too"
    );
    let ds = app.deliveries_of(SID).await;
    let poisoned = ds
        .iter()
        .find(|d| d.channel == "sms" && d.phone == "+919800000004")
        .unwrap();
    assert_eq!(poisoned.status, "failed", "{poisoned:?}");
    assert_eq!(poisoned.lease_losses, 2, "{poisoned:?}");
    // Each loss was one send; nothing else was sent twice.
    assert_eq!(sends_to(&p, SMS_PATH, "To", "+919800000004").await, 2);
    for phone in ["+919800000001", "+919800000005"] {
        assert_eq!(sends_to(&p, SMS_PATH, "To", phone).await, 1, "{phone}");
    }
    assert_eq!(p.requests(CALLS_PATH).await.len(), 2);
    assert!(ds
        .iter()
        .filter(|d| d.id != poisoned.id)
        .all(|d| d.status == "accepted"));
    app.stop().await;
}

/// A claim whose lease ran out, and whose delivery was claimed again (even by the same process), can
/// no longer record an outcome: the newer claim's is the one that counts.
async fn a_stale_claim_cannot_overwrite_a_newer_one(db: Db) {
    use exotel_sos::store::Finish;
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=default"))
        .await;
    let store = &app.store;
    let first = store
        .claim("exotel:call", "me", Duration::from_millis(200), 1)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    let old_token = first[0].lease_token.clone().unwrap();
    // The lease runs out by the database's clock; the same process claims the delivery again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let moved = store.requeue_expired_leases(8).await.unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].status, "queued");
    let second = store
        .claim("exotel:call", "me", Duration::from_secs(60), 10)
        .await
        .unwrap();
    let again = second
        .iter()
        .find(|d| d.id == first[0].id)
        .expect("claimed again");
    let new_token = again.lease_token.clone().unwrap();
    assert_ne!(old_token, new_token);
    let stale = store
        .finish_attempt(
            &first[0].id,
            &old_token,
            &Finish::Failed {
                reason: "stale".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(stale, None, "the stale claim records nothing");
    let fresh = store
        .finish_attempt(
            &first[0].id,
            &new_token,
            &Finish::Accepted {
                provider_id: Some("sid-2".into()),
                detail: "ok".into(),
                report_due_at: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(fresh, Some(exotel_sos::domain::DeliveryState::Accepted));
    let d = store.delivery(&first[0].id).await.unwrap().unwrap();
    assert_eq!(d.status, "accepted");
    assert_eq!(d.provider_id.as_deref(), Some("sid-2"));
    assert_eq!(d.lease_losses, 1);
    app.stop().await;
}

async fn healthz_fails_once_the_dispatcher_is_dead(db: Db) {
    let app = spawn_app(db).await;
    let url = format!("{}/healthz", app.base);
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 200);
    app.state
        .dispatcher_dead
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 503);
    app.stop().await;
}

/// Two replicas drawing from one account-wide bucket are granted no more than the bucket allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_rate_limit_on_postgres() {
    let db = TestDb::new(Db::Postgres).await;
    let a = exotel_sos::store::Store::connect(&db.url, 2).await.unwrap();
    a.migrate().await.unwrap();
    let b = exotel_sos::store::Store::connect(&db.url, 2).await.unwrap();
    // 60 a minute with a burst of 3: in the first second at most 3 + 1 are granted, whoever asks.
    let started = std::time::Instant::now();
    let mut granted = 0;
    for i in 0..20 {
        let store = if i % 2 == 0 { &a } else { &b };
        if store
            .take_rate_token("exotel:call", 60, 3)
            .await
            .unwrap()
            .is_none()
        {
            granted += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        granted as f64 <= 3.0 + elapsed + 1.0,
        "{granted} granted in {elapsed:.2}s"
    );
    assert!(granted >= 3, "the burst is granted at once");
    // A refused request is told how long to wait: about a second at 60 a minute.
    let wait = a.take_rate_token("exotel:call", 60, 3).await.unwrap();
    assert!(
        wait.is_some_and(|w| w <= Duration::from_millis(1000)),
        "{wait:?}"
    );
    a.close().await;
    b.close().await;
}
