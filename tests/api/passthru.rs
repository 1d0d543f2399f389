//! The Passthru store endpoint: every quirk of what Exotel sends, idempotency, auth, limits, failure.

use std::collections::HashSet;

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    stores_incident_and_one_delivery_per_contact_and_channel,
    post_form_is_accepted_like_get,
    repeated_call_sid_changes_nothing,
    concurrent_repeats_make_exactly_one_incident,
    bad_or_missing_token_is_401_and_stores_nothing,
    missing_or_empty_call_sid_is_400_with_a_clear_message,
    digits_in_quotes_route_through_the_ivr_table,
    emergency_type_matches_case_insensitively_and_wins_over_digits,
    unknown_or_missing_type_uses_the_default_route,
    missing_or_non_http_recording_still_alerts,
    exotel_quirks_are_tolerated_and_kept_for_audit,
    oversized_requests_are_refused_and_oversized_fields_cut,
    repeat_with_a_recording_fills_a_missing_one,
);

const SID: &str = "e12eb6e6fcd920019d7174b60099187v";
const REC: &str = "https%3A%2F%2Frecordings.exotel.com%2Fexotelrecordings%2Facme%2Fe12eb6e6fcd920019d7174b60099187v.mp3";

async fn stores_incident_and_one_delivery_per_contact_and_channel(db: Db) {
    let app = spawn_app(db).await;
    let res = app
        .passthru(&format!(
            "CallSid={SID}&CallFrom=09901320691&CallTo=08069891522&EmergencyType=Heart&RecordingUrl={REC}"
        ))
        .await;
    assert_eq!(res.status(), 200);
    let inc = app
        .store
        .incident_by_call_sid(SID)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(inc.emergency_type, "Heart");
    assert_eq!(inc.route, "heart");
    assert_eq!(inc.source, "exotel");
    assert_eq!(inc.caller.as_deref(), Some("+919901320691"));
    assert_eq!(
        inc.recording_url.as_deref(),
        Some("https://recordings.exotel.com/exotelrecordings/acme/e12eb6e6fcd920019d7174b60099187v.mp3")
    );
    let deliveries = app.store.deliveries(&inc.id).await.unwrap();
    assert_eq!(deliveries.len(), HEART_DELIVERIES);
    let pairs: HashSet<(String, String)> = deliveries
        .iter()
        .map(|d| (d.phone.clone(), d.channel.to_string()))
        .collect();
    assert_eq!(
        pairs.len(),
        HEART_DELIVERIES,
        "each contact once per channel"
    );
    // Dry-run (no credentials in tests): queued, then simulated by the dispatcher.
    assert!(deliveries
        .iter()
        .all(|d| ["queued", "sending", "simulated"].contains(&d.status.as_str())));
    // Asha is in two routed teams and still gets one call.
    assert_eq!(
        deliveries
            .iter()
            .filter(|d| d.phone == "+919800000001" && d.channel == "call")
            .count(),
        1
    );
    let refs: HashSet<&str> = deliveries.iter().map(|d| d.greeting_ref.as_str()).collect();
    assert_eq!(
        refs.len(),
        deliveries.len(),
        "greeting references are unique"
    );
    assert!(
        !inc.raw_params.contains(WEBHOOK_TOKEN),
        "the token is not kept"
    );
    app.stop().await;
}

async fn post_form_is_accepted_like_get(db: Db) {
    let app = spawn_app(db).await;
    let res = app
        .client
        .post(format!(
            "{}/exotel/passthru?token={WEBHOOK_TOKEN}",
            app.base
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "CallSid={SID}&EmergencyType=brain&RecordingUrl={REC}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let inc = app
        .store
        .incident_by_call_sid(SID)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(inc.emergency_type, "Brain");
    assert_eq!(
        app.store.deliveries(&inc.id).await.unwrap().len(),
        BRAIN_DELIVERIES
    );
    app.stop().await;
}

async fn repeated_call_sid_changes_nothing(db: Db) {
    let app = spawn_app(db).await;
    assert_eq!(
        app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
            .await
            .status(),
        200
    );
    let first = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    let res = app
        .passthru(&format!("CallSid={SID}&EmergencyType=Brain"))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    let again = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    assert_eq!(again.emergency_type, "Heart");
    assert_eq!(again.id, first.id);
    assert_eq!(
        app.store.deliveries(&first.id).await.unwrap().len(),
        HEART_DELIVERIES
    );
    app.stop().await;
}

async fn concurrent_repeats_make_exactly_one_incident(db: Db) {
    let app = spawn_app(db).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = app.client.clone();
        let url = format!(
            "{}/exotel/passthru?token={WEBHOOK_TOKEN}&CallSid={SID}&EmergencyType=Heart",
            app.base
        );
        tasks.push(tokio::spawn(async move {
            client.get(url).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    let inc = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    assert_eq!(
        app.store.deliveries(&inc.id).await.unwrap().len(),
        HEART_DELIVERIES
    );
    app.stop().await;
}

async fn bad_or_missing_token_is_401_and_stores_nothing(db: Db) {
    let app = spawn_app(db).await;
    for query in [
        format!("CallSid={SID}"),
        format!("token=&CallSid={SID}"),
        format!("token=wrong&CallSid={SID}"),
        format!("token={WEBHOOK_TOKEN}x&CallSid={SID}"),
        format!("token={}&CallSid={SID}", &WEBHOOK_TOKEN[..10]),
    ] {
        let res = app
            .client
            .get(format!("{}/exotel/passthru?{query}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{query}");
        let body = res.text().await.unwrap();
        assert!(!body.contains(WEBHOOK_TOKEN));
    }
    assert_eq!(app.store.count_incidents().await.unwrap(), 0);
    app.stop().await;
}

async fn missing_or_empty_call_sid_is_400_with_a_clear_message(db: Db) {
    let app = spawn_app(db).await;
    for query in [
        "EmergencyType=Heart",
        "CallSid=&EmergencyType=Heart",
        "CallSid=%22%22",
        "CallSid=a%20b",
    ] {
        let res = app.passthru(query).await;
        assert_eq!(res.status(), 400, "{query}");
        let body = res.text().await.unwrap();
        assert!(body.contains("CallSid"), "{body}");
    }
    assert_eq!(app.store.count_incidents().await.unwrap(), 0);
    app.stop().await;
}

async fn digits_in_quotes_route_through_the_ivr_table(db: Db) {
    let app = spawn_app(db).await;
    assert_eq!(
        app.passthru(&format!("CallSid={SID}&digits=%222%22"))
            .await
            .status(),
        200
    );
    let inc = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    assert_eq!(inc.emergency_type, "Brain");
    assert_eq!(
        app.store.deliveries(&inc.id).await.unwrap().len(),
        BRAIN_DELIVERIES
    );
    app.stop().await;
}

async fn emergency_type_matches_case_insensitively_and_wins_over_digits(db: Db) {
    let app = spawn_app(db).await;
    assert_eq!(
        app.passthru(&format!(
            "CallSid={SID}&digits=%222%22&EmergencyType=%20hEaRt%20"
        ))
        .await
        .status(),
        200
    );
    let inc = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    assert_eq!(inc.emergency_type, "Heart");
    app.stop().await;
}

async fn unknown_or_missing_type_uses_the_default_route(db: Db) {
    let app = spawn_app(db).await;
    for (sid, query) in [
        ("aaaa0000000000000000000000000001", "EmergencyType=Volcano"),
        ("aaaa0000000000000000000000000002", "digits=%229%22"),
        ("aaaa0000000000000000000000000003", "EmergencyType="),
    ] {
        assert_eq!(
            app.passthru(&format!("CallSid={sid}&{query}"))
                .await
                .status(),
            200
        );
        let inc = app.store.incident_by_call_sid(sid).await.unwrap().unwrap();
        assert_eq!(inc.route, "default", "{query}");
        assert_eq!(
            app.store.deliveries(&inc.id).await.unwrap().len(),
            DEFAULT_DELIVERIES
        );
    }
    let volcano = app
        .store
        .incident_by_call_sid("aaaa0000000000000000000000000001")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        volcano.emergency_type, "Volcano",
        "the type as received is kept"
    );
    app.stop().await;
}

async fn missing_or_non_http_recording_still_alerts(db: Db) {
    let app = spawn_app(db).await;
    for (sid, query) in [
        ("bbbb0000000000000000000000000001", "EmergencyType=Heart"),
        (
            "bbbb0000000000000000000000000002",
            "EmergencyType=Heart&RecordingUrl=ftp%3A%2F%2Fevil%2Fx.mp3",
        ),
        (
            "bbbb0000000000000000000000000003",
            "EmergencyType=Heart&RecordingUrl=javascript%3Aalert(1)",
        ),
        (
            "bbbb0000000000000000000000000004",
            "EmergencyType=Heart&RecordingUrl=%22%22",
        ),
    ] {
        assert_eq!(
            app.passthru(&format!("CallSid={sid}&{query}"))
                .await
                .status(),
            200,
            "{query}"
        );
        let inc = app.store.incident_by_call_sid(sid).await.unwrap().unwrap();
        assert_eq!(inc.recording_url, None, "{query}");
        assert_eq!(
            app.store.deliveries(&inc.id).await.unwrap().len(),
            HEART_DELIVERIES
        );
    }
    let ftp = app
        .store
        .incident_by_call_sid("bbbb0000000000000000000000000002")
        .await
        .unwrap()
        .unwrap();
    assert!(
        ftp.raw_params.contains("ftp://evil/x.mp3"),
        "kept in the raw record"
    );
    app.stop().await;
}

async fn exotel_quirks_are_tolerated_and_kept_for_audit(db: Db) {
    let app = spawn_app(db).await;
    // A real-shaped Passthru: empty values, bracketed keys, repeated keys, unknown keys, both date forms,
    // 0-prefixed numbers, the epoch EndTime, a static EmergencyType from the applet URL plus Exotel's own.
    let query = format!(
        "CallSid={SID}&CallFrom=09901320691&CallTo=08069891522&Direction=incoming\
         &Created=Wed%2C+31+Jul+2024+16%3A42%3A56&DialCallDuration=0&StartTime=2024-07-31+16%3A42%3A56\
         &EndTime=1970-01-01+05%3A30%3A00&CallType=voicemail&DialWhomNumber=&flow_id=11754&tenant_id=1409\
         &From=09901320691&To=08069891522&CurrentTime=2024-07-31+16%3A43%3A02&digits=%221%22\
         &RecordingUrl={REC}&RecordingAvailableBy=Wed%2C+31+Jul+2024+16%3A45%3A00\
         &Legs%5B1%5D%5BInsights%5D%5BStatus%5D=completed&Stream%5BRecordingUrl%5D=\
         &HangupLatencyStartTime%28Exocc%29=&EmergencyType=Heart&EmergencyType=Brain&Unknown=%F0%9F%9A%91"
    );
    assert_eq!(app.passthru(&query).await.status(), 200);
    let inc = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    assert_eq!(
        inc.emergency_type, "Heart",
        "the first of repeated keys wins"
    );
    assert_eq!(inc.caller.as_deref(), Some("+919901320691"));
    assert_eq!(
        inc.occurred_at,
        Some(1_722_424_376_000),
        "StartTime read in IST"
    );
    let raw: Vec<(String, String)> = serde_json::from_str(&inc.raw_params).unwrap();
    assert!(raw.contains(&("Legs[1][Insights][Status]".into(), "completed".into())));
    assert!(
        raw.contains(&("EmergencyType".into(), "Brain".into())),
        "repeats kept"
    );
    assert!(raw.contains(&("Unknown".into(), "\u{1F691}".into())));
    assert!(raw.iter().all(|(k, _)| k != "token"));
    app.stop().await;
}

async fn oversized_requests_are_refused_and_oversized_fields_cut(db: Db) {
    let app = spawn_app(db).await;
    // Whole URI past the limit: refused before any handler reads it.
    let huge = "x".repeat(20_000);
    let res = app.passthru(&format!("CallSid={SID}&Junk={huge}")).await;
    assert_eq!(res.status(), 414);
    // A POST body past the limit.
    let res = app
        .client
        .post(format!(
            "{}/exotel/passthru?token={WEBHOOK_TOKEN}",
            app.base
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("CallSid={SID}&Junk={}", "y".repeat(100_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(app.store.count_incidents().await.unwrap(), 0);
    // A long field inside the limits: the emergency is stored, the label cut.
    let long_type = "Z".repeat(5_000);
    let res = app
        .passthru(&format!("CallSid={SID}&EmergencyType={long_type}"))
        .await;
    assert_eq!(res.status(), 200);
    let inc = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    assert_eq!(inc.emergency_type.len(), 64);
    assert_eq!(inc.route, "default");
    // An oversized CallSid is not an Exotel id.
    let res = app.passthru(&format!("CallSid={}", "a".repeat(500))).await;
    assert_eq!(res.status(), 400);
    app.stop().await;
}

async fn repeat_with_a_recording_fills_a_missing_one(db: Db) {
    let app = spawn_app(db).await;
    assert_eq!(
        app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.passthru(&format!(
            "CallSid={SID}&EmergencyType=Heart&RecordingUrl={REC}"
        ))
        .await
        .status(),
        200
    );
    let inc = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    assert!(
        inc.recording_url.is_some(),
        "a later Passthru's recording is not lost"
    );
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    assert_eq!(
        app.store.deliveries(&inc.id).await.unwrap().len(),
        HEART_DELIVERIES
    );
    app.stop().await;
}

/// The database stops answering while Exotel's caller waits: 302 sends the flow to its fallback branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_answers_302_on_postgres() {
    let app = spawn_app(Db::Postgres).await;
    let outage = app.db.take_down().await;
    let res = app
        .passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert_eq!(res.status(), 302);
    outage.end().await;
    // Once the database is back, Exotel's next Passthru is stored.
    let res = app
        .passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert_eq!(res.status(), 200);
    app.stop().await;
}

/// SQLite: the database file becomes unwritable under the running server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_answers_302_on_sqlite() {
    let app = spawn_app(Db::Sqlite).await;
    // Closing the pool is what a failed disk looks like to the handler: no connection can be had.
    app.store.close().await;
    let res = app
        .passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert_eq!(res.status(), 302);
    app.stop().await;
}
