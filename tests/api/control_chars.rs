//! A stray NUL or control byte never drops an emergency: PostgreSQL refuses `\0` in text, so the edge
//! strips control characters before anything is stored.

use serde_json::json;

use crate::both_engines;
use crate::helpers::*;
use crate::op::*;

both_engines!(
    passthru_with_nul_bytes_in_every_field_is_stored,
    api_trigger_with_nul_in_the_message_is_stored,
    alertmanager_with_nul_in_labels_is_stored,
);

const SID: &str = "e12eb6e6fcd920019d7174b60099187v";

async fn passthru_with_nul_bytes_in_every_field_is_stored(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let res = app
        .passthru(&format!(
            "CallSid={SID}%00&EmergencyType=He%00art%01&CallFrom=0990132%000691&Odd%00Key=a%00b%1Bc\
             &RecordingUrl=https%3A%2F%2Frecordings.exotel.com%2Fa%00.mp3&digits=%221%00%22"
        ))
        .await;
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    let inc = app
        .store
        .incident_by_call_sid(SID)
        .await
        .unwrap()
        .expect("stored under the CallSid without the NUL");
    assert_eq!(inc.emergency_type, "Heart");
    assert_eq!(inc.caller.as_deref(), Some("+919901320691"));
    assert!(!inc.raw_params.contains('\0'));
    assert!(!inc.raw_params.contains("\\u0000"), "{}", inc.raw_params);
    assert_eq!(
        app.store.deliveries(&inc.id).await.unwrap().len(),
        HEART_DELIVERIES
    );
    // A POST form with NULs, and a NUL-only CallSid (nothing left: a clear 400, not a 302).
    let res = app
        .client
        .post(format!(
            "{}/exotel/passthru?token={WEBHOOK_TOKEN}",
            app.base
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("CallSid=abc%00def&EmergencyType=Brain%00")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(app
        .store
        .incident_by_call_sid("abcdef")
        .await
        .unwrap()
        .is_some());
    assert_eq!(app.passthru("CallSid=%00%00").await.status(), 400);
    app.stop().await;
}

async fn api_trigger_with_nul_in_the_message_is_stored(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let (status, body) = post_incident(
        &app,
        &json!({"emergency_type": "Heart\u{0}", "message": "db1\u{0} is\u{7} down\n", "dedup_key": "k\u{0}1"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["message"], "db1 is down");
    assert_eq!(body["emergency_type"], "Heart");
    assert_eq!(body["dedup_key"], "k1");
    let inc = app.store.incident(&id_of(&body)).await.unwrap().unwrap();
    assert!(!inc.raw_params.contains('\0'));
    assert!(!inc.raw_params.contains("\\u0000"), "{}", inc.raw_params);
    // Ids and filters with NUL name nothing: 404 or an empty page, never a 500.
    assert_eq!(get(&app, "/api/v1/incidents/a%00b").await.0, 404);
    assert_eq!(
        post_raw(&app, "/api/v1/incidents/%00/resolve", String::new())
            .await
            .0,
        404
    );
    assert_eq!(
        get(&app, "/api/v1/incidents?emergency_type=He%00art&before=%00")
            .await
            .0,
        200
    );
    assert_eq!(
        app.client
            .get(format!("{}/r/ab%00c", app.base))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // A raw control byte between JSON tokens is not a reason to refuse an emergency either.
    let (status, body) = post_raw(
        &app,
        "/api/v1/incidents",
        "{\u{0}\"emergency_type\": \"Brain\",\u{1} \"message\": \"x\"}".to_owned(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    app.stop().await;
}

async fn alertmanager_with_nul_in_labels_is_stored(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let payload = json!({
        "version": "4", "groupKey": "{}:{alertname=\"Db\u{0}Down\"}", "status": "firing",
        "receiver": "sos\u{0}", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://am\u{0}", "truncatedAlerts": 0,
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "DbDown\u{0}", "emergency_type": "Heart\u{0}", "x\u{0}": "y"},
            "annotations": {"summary": "db1\u{0} is down"},
            "startsAt": "2024-07-31T11:12:56Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prom\u{0}", "fingerprint": "ab\u{0}cd"
        }]
    });
    let (status, body) = post_raw(&app, "/api/v1/alertmanager", payload.to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["created"].as_array().map(Vec::len), Some(1), "{body}");
    let id = body["created"][0].as_str().unwrap().to_owned();
    let inc = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(inc.message.as_deref(), Some("db1 is down"));
    assert!(!inc.raw_params.contains("\\u0000"), "{}", inc.raw_params);
    app.stop().await;
}
