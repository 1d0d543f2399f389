//! The outbound half against stand-ins for Exotel and GupShup: exactly what is sent, how answers are
//! read, retries, throttling, timeouts, redials, callbacks, and the final states.

use std::time::{Duration, Instant};

use base64::Engine as _;

use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    each_client_sends_exactly_the_documented_request,
    passthru_to_final_states_through_status_callbacks,
    transient_failures_are_retried_until_success,
    permanent_failures_are_not_retried,
    too_many_requests_pauses_only_that_provider,
    a_provider_that_hangs_is_timed_out_and_retried,
    unanswered_calls_are_redialled_then_failed,
    duplicate_and_out_of_order_callbacks_change_nothing,
    dry_run_stores_the_exact_request_without_secrets,
    retries_stop_at_the_maximum_with_the_last_reason,
);

const SID: &str = "e12eb6e6fcd920019d7174b60099187v";
const REC: &str = "https%3A%2F%2Frecordings.exotel.com%2Fexotelrecordings%2Facme%2Fa.mp3";

async fn live_app(db: Db, p: &Providers, extra: &[(&'static str, String)]) -> TestApp {
    let mut env = p.env();
    env.extend(extra.iter().cloned());
    spawn_app_with(db, &env).await
}

async fn each_client_sends_exactly_the_documented_request(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[]).await;
    assert_eq!(
        app.passthru(&format!(
            "CallSid={SID}&CallFrom=09901320691&EmergencyType=Heart&RecordingUrl={REC}"
        ))
        .await
        .status(),
        200
    );
    let ds = app.settled(SID).await;
    assert!(ds.iter().all(|d| d.status == "accepted"), "{ds:#?}");
    assert!(ds.iter().all(|d| d.provider_id.is_some()));

    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("key123:tok456")
    );
    let calls = p.requests(CALLS_PATH).await;
    assert_eq!(calls.len(), 2, "Asha and the desk are called");
    let asha_call = ds
        .iter()
        .find(|d| d.channel == "call" && d.phone == "+919800000001")
        .unwrap();
    let (form, req) = calls
        .iter()
        .find(|(f, _)| field(f, "From") == Some("+919800000001"))
        .unwrap();
    assert_eq!(req.method.as_str(), "POST");
    assert_eq!(req.headers["authorization"].to_str().unwrap(), auth);
    assert_eq!(
        req.headers["content-type"].to_str().unwrap(),
        "application/x-www-form-urlencoded"
    );
    let callback = format!(
        "{}/exotel/call-status?token={WEBHOOK_TOKEN}",
        "http://127.0.0.1:8080"
    );
    let expected: Vec<(&str, &str)> = vec![
        ("From", "+919800000001"),
        ("CallerId", "08069891522"),
        ("Url", "http://my.exotel.com/acme/exoml/start_voice/926"),
        ("CustomField", asha_call.greeting_ref.as_str()),
        ("CallType", "trans"),
        ("TimeOut", "30"),
        ("StatusCallback", callback.as_str()),
        ("StatusCallbackEvents[0]", "terminal"),
        ("StatusCallbackContentType", "application/json"),
    ];
    let got: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(got, expected);
    assert!(asha_call
        .provider_id
        .as_deref()
        .unwrap()
        .starts_with("call"));

    let sms = p.requests(SMS_PATH).await;
    assert_eq!(sms.len(), 3, "Asha, the desk and the lab get an SMS");
    let (form, req) = sms
        .iter()
        .find(|(f, _)| field(f, "To") == Some("+919800000005"))
        .unwrap();
    assert_eq!(req.headers["authorization"].to_str().unwrap(), auth);
    assert_eq!(field(form, "From"), Some("HOSPTL"));
    assert_eq!(field(form, "DltEntityId"), Some("1101000000000000001"));
    assert_eq!(field(form, "DltTemplateId"), Some("1107000000000000002"));
    assert_eq!(
        field(form, "StatusCallback").unwrap(),
        format!("http://127.0.0.1:8080/exotel/sms-status?token={WEBHOOK_TOKEN}")
    );
    let body = field(form, "Body").unwrap();
    assert!(body.contains("Heart"), "{body}");
    assert!(body.contains("+919901320691"), "names the caller: {body}");
    // The 57-character recording URL is over DLT's 50 for a link: the SMS carries the short link to
    // the same recording instead, WhatsApp the URL itself.
    let lab_sms = ds
        .iter()
        .find(|d| d.channel == "sms" && d.phone == "+919800000005")
        .unwrap();
    assert!(
        body.contains(&format!(
            "http://127.0.0.1:8080/r/{}",
            lab_sms.link_ref.as_deref().unwrap()
        )),
        "{body}"
    );
    assert!(body.chars().count() <= 2000);

    let wa = p.requests(GUPSHUP_PATH).await;
    assert_eq!(wa.len(), 2, "Asha and the lab get WhatsApp");
    let (form, _) = wa
        .iter()
        .find(|(f, _)| field(f, "send_to") == Some("919800000001"))
        .unwrap();
    for (k, v) in [
        ("method", "SendMessage"),
        ("userid", "2000123456"),
        ("password", "gs-secret"),
        ("auth_scheme", "plain"),
        ("v", "1.1"),
        ("format", "json"),
        ("msg_type", "HSM"),
        ("isTemplate", "true"),
    ] {
        assert_eq!(field(form, k), Some(v), "{k}");
    }
    assert!(field(form, "msg").unwrap().contains("Heart"));
    assert!(field(form, "msg")
        .unwrap()
        .contains("https://recordings.exotel.com/exotelrecordings/acme/a.mp3"));
    let wa_delivery = ds
        .iter()
        .find(|d| d.channel == "whatsapp" && d.phone == "+919800000001")
        .unwrap();
    assert!(
        wa_delivery.provider_id.as_deref().unwrap().contains('-'),
        "GupShup's id is stored"
    );
    app.stop().await;
}

async fn passthru_to_final_states_through_status_callbacks(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[("SOS_DISPATCH__MAX_REDIALS", "0".into())]).await;
    app.passthru(&format!(
        "CallSid={SID}&EmergencyType=Heart&RecordingUrl={REC}"
    ))
    .await;
    let ds = app.settled(SID).await;
    let call = |phone: &str| {
        ds.iter()
            .find(|d| d.channel == "call" && d.phone == phone)
            .unwrap()
            .clone()
    };
    let asha = call("+919800000001");
    let desk = call("+919800000004");

    // Exotel plays the greeting to Asha, then reports the call completed (JSON, as we asked).
    let res = app.greeting(reqwest::Method::GET, &asha.greeting_ref).await;
    assert_eq!(res.status(), 200);
    let store = app.store.clone();
    let asha_id = asha.id.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let store = store.clone();
            let id = asha_id.clone();
            async move {
                store
                    .delivery(&id)
                    .await
                    .unwrap()
                    .unwrap()
                    .played_at
                    .is_some()
            }
        })
        .await,
        "the play is recorded"
    );
    let res = app
        .post_json(
            "/exotel/call-status",
            serde_json::json!({
                "CallSid": asha.provider_id, "EventType": "terminal", "Status": "completed",
                "DateCreated": "2024-07-31 16:42:56", "DateUpdated": "2024-07-31 16:44:02",
                "To": null, "From": "+919800000001", "PhoneNumberSid": "08069891522",
                "StartTime": "2024-07-31 16:42:56", "EndTime": "2024-07-31 16:44:02",
                "ConversationDuration": 54, "Direction": "outbound-api",
                "CustomField": asha.greeting_ref, "RecordingUrl": null,
                "Legs": [{"OnCallDuration": 54, "Status": "completed"}]
            }),
        )
        .await;
    assert_eq!(res.status(), 200);
    // The desk did not answer; no RecordingUrl at all (nammayatri #917). As a form this time.
    let res = app
        .post_form(
            "/exotel/call-status",
            &[
                ("CallSid", desk.provider_id.as_deref().unwrap()),
                ("Status", "no-answer"),
            ],
        )
        .await;
    assert_eq!(res.status(), 200);

    // SMS: one delivered, one blocked by DND, one still pending.
    let sms: Vec<_> = ds.iter().filter(|d| d.channel == "sms").cloned().collect();
    let sid = |i: usize| sms[i].provider_id.clone().unwrap();
    for (i, status, code, name) in [
        (0, "sent", "20005", "DELIVERED_TO_HANDSET"),
        (1, "failed_dnd", "23080", "SENDER_BLOCKED_BY_DLT"),
        (2, "submitted", "21020", "PENDING_ON_OPERATOR"),
    ] {
        let res = app
            .post_form(
                "/exotel/sms-status",
                &[
                    ("SmsSid", sid(i).as_str()),
                    ("To", "09800000001"),
                    ("Status", status),
                    ("DetailedStatus", name),
                    ("DetailedStatusCode", code),
                    ("DateSent", "2024-07-31 16:43:00"),
                    ("SmsUnits", "1"),
                ],
            )
            .await;
        assert_eq!(res.status(), 200);
    }

    let get = |id: String| {
        let store = app.store.clone();
        async move { store.delivery(&id).await.unwrap().unwrap() }
    };
    let asha = get(asha.id.clone()).await;
    // Picked up, and nobody pressed the acknowledge key (with no redials left): answered, not
    // reached. The keypress itself is tested in `ack`.
    assert_eq!(asha.status, "answered");
    assert!(asha.played_at.is_some() && asha.finished_at.is_some());
    let desk = get(desk.id.clone()).await;
    assert_eq!(desk.status, "failed");
    assert!(
        desk.last_error.as_deref().unwrap().contains("no-answer"),
        "{:?}",
        desk.last_error
    );
    assert_eq!(get(sms[0].id.clone()).await.status, "delivered");
    let dnd = get(sms[1].id.clone()).await;
    assert_eq!(dnd.status, "failed");
    assert_eq!(
        dnd.last_error.as_deref(),
        Some("failed_dnd: 23080 SENDER_BLOCKED_BY_DLT")
    );
    let pending = get(sms[2].id.clone()).await;
    assert_eq!(pending.status, "accepted");
    assert_eq!(pending.provider_status.as_deref(), Some("submitted"));

    // The life of Asha's call can be replayed from its events.
    let kinds: Vec<String> = app
        .store
        .events(&asha.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        ["attempt", "accepted", "greeting_played", "call_status"]
    );

    // Unknown ids are 404; a wrong token 401; a report without CallSid 400.
    assert_eq!(
        app.post_form(
            "/exotel/call-status",
            &[("CallSid", "nope"), ("Status", "completed")]
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        app.post_form(
            "/exotel/sms-status",
            &[("SmsSid", "nope"), ("Status", "sent")]
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        app.post_form("/exotel/call-status", &[("Status", "completed")])
            .await
            .status(),
        400
    );
    let res = app
        .client
        .post(format!("{}/exotel/call-status?token=bad", app.base))
        .form(&[("CallSid", "x"), ("Status", "completed")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    app.stop().await;
}

async fn transient_failures_are_retried_until_success(db: Db) {
    let p = Providers::start().await;
    // Twice a 5xx from Calls/connect (it may or may not have dialled: dial again), then success.
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(ResponseTemplate::new(503).set_body_string("<html>busy</html>"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(ResponseTemplate::new(500).set_body_json(
            serde_json::json!({"RestException": {"Status": 500, "Message": "Internal error"}}),
        ))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=brain"))
        .await;
    let ds = app.settled(SID).await;
    assert!(ds.iter().all(|d| d.status == "accepted"), "{ds:#?}");
    let retried: Vec<_> = ds.iter().filter(|d| d.attempts > 1).collect();
    assert_eq!(retried.len(), 2, "two calls each met one failure");
    let events = app.store.events(&retried[0].id).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["attempt", "transient_failure", "attempt", "accepted"]
    );
    assert!(
        events[1].detail.starts_with("HTTP 50"),
        "{}",
        events[1].detail
    );
    app.stop().await;
}

async fn permanent_failures_are_not_retried(db: Db) {
    let p = Providers::start().await;
    // India's DND block on calls, a bad sender on SMS, GupShup's "invalid number" with HTTP 200.
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(ResponseTemplate::new(403).set_body_string(
            "<TwilioResponse><RestException><Status>403</Status><Message>Call to [09800000001] cannot be made because of TRAI NDNC regulations</Message></RestException></TwilioResponse>",
        ))
        .mount(&p.exotel)
        .await;
    Mock::given(method("POST"))
        .and(path(SMS_PATH))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            serde_json::json!({"RestException": {"Status": 400, "Message": "No valid sender ID"}}),
        ))
        .mount(&p.exotel)
        .await;
    Mock::given(method("POST"))
        .and(path(GUPSHUP_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!(
            {"response": {"id": "105", "phone": "", "details": "The phone number \"666\" is not a valid phone number", "status": "error"}}
        )))
        .mount(&p.gupshup)
        .await;
    let app = live_app(db, &p, &[]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    for d in &ds {
        assert_eq!(d.status, "failed", "{d:?}");
        assert_eq!(d.attempts, 1, "not retried: {d:?}");
        let reason = d.last_error.as_deref().unwrap();
        match d.channel.as_str() {
            "call" => assert!(reason.contains("TRAI NDNC"), "{reason}"),
            "sms" => assert_eq!(reason, "HTTP 400: No valid sender ID"),
            _ => assert!(reason.starts_with("GupShup error 105"), "{reason}"),
        }
    }
    app.stop().await;
}

async fn too_many_requests_pauses_only_that_provider(db: Db) {
    let p = Providers::start().await;
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    // One call at a time so the order is plain.
    let app = live_app(db, &p, &[("SOS_DISPATCH__CALL_CONCURRENCY", "1".into())]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    assert!(ds.iter().all(|d| d.status == "accepted"), "{ds:#?}");

    let retried = ds
        .iter()
        .find(|d| d.attempts == 2)
        .expect("the throttled call was retried");
    let events = app.store.events(&retried.id).await.unwrap();
    let failed_at = events
        .iter()
        .find(|e| e.kind == "transient_failure")
        .unwrap()
        .at;
    let second_attempt_at = events
        .iter()
        .filter(|e| e.kind == "attempt")
        .nth(1)
        .unwrap()
        .at;
    assert!(
        second_attempt_at - failed_at >= 900,
        "Retry-After: 1 honoured ({} ms)",
        second_attempt_at - failed_at
    );
    // GupShup was not slowed by Exotel's 429: its messages went out before the retry.
    let wa_done = ds
        .iter()
        .filter(|d| d.channel == "whatsapp")
        .map(|d| d.updated_at)
        .max()
        .unwrap();
    assert!(
        wa_done < second_attempt_at,
        "WhatsApp was not held back by Exotel's pause"
    );
    app.stop().await;
}

async fn a_provider_that_hangs_is_timed_out_and_retried(db: Db) {
    let p = Providers::start().await;
    Mock::given(method("POST"))
        .and(path(GUPSHUP_PATH))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(10)))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&p.gupshup)
        .await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[("SOS_GUPSHUP__TIMEOUT_SECS", "1".into())]).await;
    let started = Instant::now();
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the hang did not block the dispatcher"
    );
    let wa: Vec<_> = ds.iter().filter(|d| d.channel == "whatsapp").collect();
    assert!(wa.iter().all(|d| d.status == "accepted"));
    assert_eq!(
        wa.iter().map(|d| d.attempts).sum::<i64>(),
        4,
        "each timed out once, then went through"
    );
    let events = app.store.events(&wa[0].id).await.unwrap();
    assert!(events
        .iter()
        .any(|e| e.kind == "transient_failure" && e.detail.contains("outcome unknown")));
    app.stop().await;
}

async fn unanswered_calls_are_redialled_then_failed(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(
        db,
        &p,
        &[
            ("SOS_DISPATCH__REDIAL_DELAY_SECS", "0.1".into()),
            ("SOS_DISPATCH__MAX_REDIALS", "2".into()),
        ],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    let desk_id = ds
        .iter()
        .find(|d| d.channel == "call" && d.phone == "+919800000004")
        .unwrap()
        .id
        .clone();
    let mut sids = Vec::new();
    for (round, status) in ["no-answer", "busy", "no-answer"].into_iter().enumerate() {
        let store = app.store.clone();
        let id = desk_id.clone();
        let seen = sids.clone();
        assert!(
            eventually(Duration::from_secs(10), || {
                let store = store.clone();
                let id = id.clone();
                let seen = seen.clone();
                async move {
                    let d = store.delivery(&id).await.unwrap().unwrap();
                    d.status == "accepted"
                        && d.provider_id.as_ref().is_some_and(|s| !seen.contains(s))
                }
            })
            .await,
            "call {round} placed"
        );
        let d = app.store.delivery(&desk_id).await.unwrap().unwrap();
        let sid = d.provider_id.clone().unwrap();
        sids.push(sid.clone());
        let res = app
            .post_form(
                "/exotel/call-status",
                &[("CallSid", sid.as_str()), ("Status", status)],
            )
            .await;
        assert_eq!(res.status(), 200);
    }
    let d = app.store.delivery(&desk_id).await.unwrap().unwrap();
    assert_eq!(d.status, "failed");
    assert_eq!(d.redials, 2);
    assert_eq!(
        d.last_error.as_deref(),
        Some("not reached: no-answer (call 3 of 3)")
    );
    let desk_calls = p
        .requests(CALLS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "From") == Some("+919800000004"))
        .count();
    assert_eq!(desk_calls, 3);
    // A late report for the first call changes nothing and is still accepted.
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", sids[0].as_str()), ("Status", "completed")],
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        app.store.delivery(&desk_id).await.unwrap().unwrap().status,
        "failed"
    );
    app.stop().await;
}

async fn duplicate_and_out_of_order_callbacks_change_nothing(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    // Acknowledgement by keypress off: "completed" is final, so every later report must be ignored.
    // With it on, `ack` tests the answered call's redial.
    let app = live_app(db, &p, &[("SOS_ACK__DIGIT", String::new())]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    let call = ds.iter().find(|d| d.channel == "call").unwrap();
    let sid = call.provider_id.clone().unwrap();
    for status in [
        "ringing",
        "completed",
        "completed",
        "ringing",
        "in-progress",
        "no-answer",
    ] {
        let res = app
            .post_json(
                "/exotel/call-status",
                serde_json::json!({"CallSid": sid, "Status": status}),
            )
            .await;
        assert_eq!(res.status(), 200, "{status}");
    }
    let d = app.store.delivery(&call.id).await.unwrap().unwrap();
    assert_eq!(d.status, "delivered");
    assert_eq!(d.provider_status.as_deref(), Some("completed"));
    assert_eq!(d.redials, 0);
    let sms = ds.iter().find(|d| d.channel == "sms").unwrap();
    let sms_sid = sms.provider_id.clone().unwrap();
    for status in ["sent", "submitted", "failed"] {
        app.post_form(
            "/exotel/sms-status",
            &[("SmsSid", sms_sid.as_str()), ("Status", status)],
        )
        .await;
    }
    assert_eq!(
        app.store.delivery(&sms.id).await.unwrap().unwrap().status,
        "delivered"
    );
    // Every report is in the audit trail, applied or not.
    let callbacks = app
        .store
        .events(&call.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "call_status")
        .count();
    assert_eq!(callbacks, 6);
    app.stop().await;
}

async fn dry_run_stores_the_exact_request_without_secrets(db: Db) {
    // No credentials: every channel is dry-run, nothing is sent anywhere.
    let app = spawn_app_with(db, &[("SOS_GUPSHUP__USERID", "2000123456".into())]).await;
    app.passthru(&format!(
        "CallSid={SID}&EmergencyType=Heart&RecordingUrl={REC}"
    ))
    .await;
    let ds = app.settled(SID).await;
    assert!(ds.iter().all(|d| d.status == "simulated"), "{ds:#?}");
    let call = ds.iter().find(|d| d.channel == "call").unwrap();
    let request: serde_json::Value =
        serde_json::from_str(call.last_request.as_deref().unwrap()).unwrap();
    assert!(request["url"]
        .as_str()
        .unwrap()
        .ends_with("/Calls/connect.json"));
    let form = request["form"].as_array().unwrap();
    assert!(form
        .iter()
        .any(|kv| kv[0] == "CustomField" && kv[1] == call.greeting_ref.as_str()));
    let text = call.last_request.as_deref().unwrap();
    assert!(
        !text.contains(WEBHOOK_TOKEN),
        "webhook token redacted: {text}"
    );
    assert!(text.contains("token=[REDACTED]"));
    let events = app.store.events(&call.id).await.unwrap();
    assert_eq!(events.last().unwrap().kind, "simulated");
    app.stop().await;
}

async fn retries_stop_at_the_maximum_with_the_last_reason(db: Db) {
    let p = Providers::start().await;
    Mock::given(method("POST"))
        .and(path(SMS_PATH))
        .respond_with(ResponseTemplate::new(502).set_body_string("bad gateway"))
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[("SOS_DISPATCH__MAX_ATTEMPTS", "3".into())]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    for d in ds.iter().filter(|d| d.channel == "sms") {
        assert_eq!(d.status, "failed");
        assert_eq!(d.attempts, 3);
        assert_eq!(
            d.last_error.as_deref(),
            Some("gave up after 3 attempts; last: HTTP 502: bad gateway")
        );
    }
    assert!(ds
        .iter()
        .filter(|d| d.channel != "sms")
        .all(|d| d.status == "accepted"));
    app.stop().await;
}

/// Short recording links for DLT templates: the SMS carries `/r/<ref>`, which redirects to the recording.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_recording_links_redirect_to_the_stored_recording() {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(
        Db::Sqlite,
        &p,
        &[("SOS_MESSAGES__RECORDING_LINK", "short".into())],
    )
    .await;
    app.passthru(&format!(
        "CallSid={SID}&EmergencyType=Heart&RecordingUrl={REC}"
    ))
    .await;
    let ds = app.settled(SID).await;
    let sms = ds.iter().find(|d| d.channel == "sms").unwrap();
    let (form, _) = p
        .requests(SMS_PATH)
        .await
        .into_iter()
        .find(|(f, _)| field(f, "CustomField") == Some(sms.greeting_ref.as_str()))
        .unwrap();
    let link_ref = sms.link_ref.as_deref().unwrap();
    let link = format!("http://127.0.0.1:8080/r/{link_ref}");
    assert!(field(&form, "Body").unwrap().contains(&link));
    let res = app
        .client
        .get(format!("{}/r/{link_ref}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 302);
    assert_eq!(
        res.headers()["location"],
        "https://recordings.exotel.com/exotelrecordings/acme/a.mp3"
    );
    let res = app
        .client
        .get(format!("{}/r/unknown", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    app.stop().await;
}

/// Exotel does not guarantee callbacks: an overdue report is looked up in the details API and applied,
/// so an unanswered call is still redialled and a delivered SMS still counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdue_reports_are_looked_up_when_callbacks_never_come() {
    let p = Providers::start().await;
    mount_happy(&p).await;
    Mock::given(method("GET"))
        .and(wiremock::matchers::path_regex(
            r"^/v1/Accounts/acme/Calls/[a-z0-9]+\.json$",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            serde_json::json!({"Call": {"Sid": "x", "Status": "no-answer", "Duration": 0}}),
        ))
        .mount(&p.exotel)
        .await;
    Mock::given(method("GET"))
        .and(wiremock::matchers::path_regex(r"^/v1/Accounts/acme/SMS/Messages/[a-z0-9]+\.json$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!(
            {"SMSMessage": {"Sid": "x", "Status": "sent", "DetailedStatusCode": 20005, "DetailedStatus": "DELIVERED_TO_HANDSET"}}
        )))
        .mount(&p.exotel)
        .await;
    let app = live_app(
        Db::Sqlite,
        &p,
        &[
            ("SOS_DISPATCH__REPORT_WAIT_SECS", "0.3".into()),
            ("SOS_DISPATCH__MAX_REDIALS", "1".into()),
            ("SOS_DISPATCH__REDIAL_DELAY_SECS", "0".into()),
        ],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=brain"))
        .await;
    let store = app.store.clone();
    let done = eventually(Duration::from_secs(20), || {
        let store = store.clone();
        async move {
            let inc = store.incident_by_call_sid(SID).await.unwrap().unwrap();
            let ds = store.deliveries(&inc.id).await.unwrap();
            ds.iter()
                .filter(|d| d.channel == "call")
                .all(|d| d.status == "failed")
                && ds
                    .iter()
                    .filter(|d| d.channel == "sms")
                    .all(|d| d.status == "delivered")
        }
    })
    .await;
    assert!(
        done,
        "calls redialled then failed, SMS delivered, without a single callback"
    );
    let call = app.delivery_of(SID, "call").await;
    assert_eq!(call.redials, 1);
    let events = app.store.events(&call.id).await.unwrap();
    assert!(events
        .iter()
        .any(|e| e.detail.starts_with("Call Details API: Status=no-answer")));
    app.stop().await;
}

/// A status report can arrive before our own record of the request it reports on is committed: it
/// waits for that record instead of being dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_that_beats_our_own_record_waits_for_it() {
    // Acknowledgement by keypress off, so that "completed" settles the call at once.
    let app = spawn_app_with(
        Db::Sqlite,
        &[without_dispatcher(), ("SOS_ACK__DIGIT", String::new())],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let call = app.delivery_of(SID, "call").await;
    // As if a dispatcher had sent the call and its outcome were still on its way to the database.
    sqlx::query("UPDATE deliveries SET status = 'sending' WHERE id = $1")
        .bind(&call.id)
        .execute(app.store.pool())
        .await
        .unwrap();
    let pool = app.store.pool().clone();
    let id = call.id.clone();
    let recorder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        sqlx::query(
            "UPDATE deliveries SET status = 'accepted', provider_id = 'sid-early' WHERE id = $1",
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
                ("CallSid", "sid-early"),
                ("CustomField", call.greeting_ref.as_str()),
                ("Status", "completed"),
            ],
        )
        .await;
    recorder.await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        app.store.delivery(&call.id).await.unwrap().unwrap().status,
        "delivered"
    );
    app.stop().await;
}
