//! Acknowledgement: by the call's keypress (`/exotel/ack`), by a message's link (`/a/<ref>`), by the
//! API and the `ack` command; what the first acknowledgement stops and whom it tells.

use std::time::Duration;

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    keypress_acknowledges_once_committed_and_repeats_change_nothing,
    another_or_no_key_an_unknown_reference_answer_302_and_are_recorded,
    with_acknowledgement_off_an_answered_call_is_reached,
    an_answered_call_without_the_keypress_is_redialled,
    a_link_preview_acknowledges_nothing_its_form_does,
    api_and_command_acknowledge_and_later_ones_are_only_recorded,
    the_first_acknowledgement_cancels_calls_not_yet_placed,
    only_the_person_who_acknowledged_gets_the_recording_followup,
    a_keypress_the_database_cannot_take_answers_302,
    an_operator_who_shares_a_contacts_name_leaves_that_contact_told,
    a_later_link_acknowledgement_says_who_had_it_and_when,
    a_link_acknowledgement_after_the_resolve_says_it_was_resolved,
);

const BIN: &str = env!("CARGO_BIN_EXE_exotel-sos");

async fn live_app(db: Db, p: &Providers, extra: &[(&'static str, String)]) -> TestApp {
    let mut env = p.env();
    env.extend(extra.iter().cloned());
    spawn_app_with(db, &env).await
}

/// Every delivery of the incident for `sid` has gone out (none queued or sending).
async fn sent(app: &TestApp, sid: &str) -> Vec<exotel_sos::store::DeliveryRow> {
    assert!(
        app.deliveries_until(sid, Duration::from_secs(20), |ds| {
            ds.iter()
                .all(|d| d.status != "queued" && d.status != "sending")
        })
        .await,
        "the deliveries of {sid} did not go out"
    );
    app.deliveries_of(sid).await
}

async fn keypress(app: &TestApp, reference: &str, digits: Option<&str>) -> reqwest::Response {
    let mut url = format!(
        "{}/exotel/ack?token={WEBHOOK_TOKEN}&CustomField={reference}",
        app.base
    );
    if let Some(d) = digits {
        // As Exotel sends them: the digits in literal double quotes.
        url.push_str(&format!("&digits=%22{d}%22"));
    }
    app.client.get(url).send().await.unwrap()
}

fn call_of<'a>(
    ds: &'a [exotel_sos::store::DeliveryRow],
    name: &str,
) -> &'a exotel_sos::store::DeliveryRow {
    ds.iter()
        .find(|d| d.channel == "call" && d.contact_name == name && d.purpose == "alert")
        .expect("the contact's call")
}

fn notices(ds: &[exotel_sos::store::DeliveryRow]) -> Vec<(String, String)> {
    let mut n: Vec<(String, String)> = ds
        .iter()
        .filter(|d| d.purpose == "ack_notice")
        .map(|d| (d.contact_name.clone(), d.channel.to_string()))
        .collect();
    n.sort();
    n
}

async fn keypress_acknowledges_once_committed_and_repeats_change_nothing(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[]).await;
    let sid = "CA-ack-key";
    assert_eq!(
        app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
            .await
            .status(),
        200
    );
    let ds = sent(&app, sid).await;
    let asha = call_of(&ds, "Dr. Asha Rao").clone();
    let desk = call_of(&ds, "Emergency desk").clone();

    let res = keypress(&app, &asha.greeting_ref, Some("1")).await;
    assert_eq!(res.status(), 200);
    // Committed before the 200: read at once, no waiting.
    let inc = app
        .store
        .incident(&asha.incident_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inc.status, "acknowledged");
    assert_eq!(inc.acknowledged_by.as_deref(), Some("Dr. Asha Rao"));
    assert_eq!(inc.acknowledged_via.as_deref(), Some("call"));
    assert!(inc.acknowledged_at.is_some());
    assert_eq!(
        app.store.delivery(&asha.id).await.unwrap().unwrap().status,
        "acknowledged"
    );
    // Everyone already alerted is told, on each message channel they have; never Asha herself.
    let expected = vec![
        ("Central lab".to_owned(), "sms".to_owned()),
        ("Central lab".to_owned(), "whatsapp".to_owned()),
        ("Emergency desk".to_owned(), "sms".to_owned()),
    ];
    assert_eq!(notices(&app.deliveries_of(sid).await), expected);

    // A repeat answers 200 again and broadcasts nothing more.
    let again = keypress(&app, &asha.greeting_ref, Some("1")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(notices(&app.deliveries_of(sid).await), expected);
    let trail = app.store.incident_timeline(&inc.id).await.unwrap();
    assert_eq!(
        trail.iter().filter(|e| e.kind == "acknowledged").count(),
        1,
        "{trail:?}"
    );
    assert_eq!(
        trail
            .iter()
            .filter(|e| e.kind == "acknowledged_again")
            .count(),
        1,
        "{trail:?}"
    );

    // The notices go out, with the news in the alert's text.
    let told = eventually(Duration::from_secs(20), || async {
        p.requests(SMS_PATH).await.iter().any(|(f, _)| {
            field(f, "To") == Some("+919800000004")
                && field(f, "Body").is_some_and(|b| b.contains("Acknowledged by Dr. Asha Rao"))
        })
    })
    .await;
    assert!(told, "the desk got no acknowledgement notice");
    // A notice in the alert's text carries an acknowledge link of its own, never "NA".
    let notices: Vec<String> = p
        .requests(SMS_PATH)
        .await
        .iter()
        .filter_map(|(f, _)| field(f, "Body").filter(|b| b.contains("Acknowledged by")))
        .map(str::to_owned)
        .collect();
    assert!(
        notices
            .iter()
            .all(|b| b.contains("/a/") && !b.ends_with("Ack: NA")),
        "{notices:?}"
    );
    let told = eventually(Duration::from_secs(20), || async {
        p.requests(GUPSHUP_PATH).await.iter().any(|(f, _)| {
            field(f, "msg")
                .is_some_and(|b| b.contains("Dr. Asha Rao acknowledged the Heart emergency at"))
        })
    })
    .await;
    assert!(told, "the lab got no acknowledgement notice on WhatsApp");
    // Asha's own calls and messages never include a notice.
    let to_asha = p
        .requests(SMS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "To") == Some("+919800000001"))
        .count();
    assert_eq!(to_asha, 1, "Asha got only her alert");

    // The desk's call was placed before; its no-answer is not redialled: someone has it.
    let desk_sid = desk.provider_id.clone().unwrap();
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", desk_sid.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
    let desk_now = app.store.delivery(&desk.id).await.unwrap().unwrap();
    assert_eq!(desk_now.status, "cancelled", "{desk_now:?}");
    // Asha's call completing after her keypress changes nothing.
    let asha_sid = asha.provider_id.clone().unwrap();
    app.post_form(
        "/exotel/call-status",
        &[("CallSid", asha_sid.as_str()), ("Status", "completed")],
    )
    .await;
    assert_eq!(
        app.store.delivery(&asha.id).await.unwrap().unwrap().status,
        "acknowledged"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls_to_desk = p
        .requests(CALLS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "From") == Some("+919800000004"))
        .count();
    assert_eq!(calls_to_desk, 1);
    app.stop().await;
}

async fn another_or_no_key_an_unknown_reference_answer_302_and_are_recorded(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[]).await;
    let sid = "CA-ack-wrong";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let ds = sent(&app, sid).await;
    let asha = call_of(&ds, "Dr. Asha Rao").clone();

    assert_eq!(
        keypress(&app, &asha.greeting_ref, Some("2")).await.status(),
        302
    );
    assert_eq!(keypress(&app, &asha.greeting_ref, None).await.status(), 302);
    assert_eq!(
        keypress(&app, "no-such-reference", Some("1"))
            .await
            .status(),
        302
    );
    let bad_token = app
        .client
        .get(format!(
            "{}/exotel/ack?token=wrong&CustomField={}&digits=%221%22",
            app.base, asha.greeting_ref
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_token.status(), 401);

    let events = app.store.events(&asha.id).await.unwrap();
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "ack_digit_refused")
        .collect();
    assert_eq!(refused.len(), 2, "{events:?}");
    assert!(refused[0].detail.contains("\"2\""), "{:?}", refused[0]);
    assert!(refused[1].detail.contains("no key"), "{:?}", refused[1]);
    let inc = app
        .store
        .incident(&asha.incident_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inc.status, "open");
    assert!(notices(&app.deliveries_of(sid).await).is_empty());
    // A POST form works as the GET does.
    let res = app
        .client
        .post(format!("{}/exotel/ack?token={WEBHOOK_TOKEN}", app.base))
        .form(&[
            ("CustomField", asha.greeting_ref.as_str()),
            ("digits", "\"1\""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    app.stop().await;
}

async fn with_acknowledgement_off_an_answered_call_is_reached(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[("SOS_ACK__DIGIT", String::new())]).await;
    let sid = "CA-ack-off";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let ds = sent(&app, sid).await;
    let asha = call_of(&ds, "Dr. Asha Rao").clone();
    let call_sid = asha.provider_id.clone().unwrap();
    app.post_form(
        "/exotel/call-status",
        &[("CallSid", call_sid.as_str()), ("Status", "completed")],
    )
    .await;
    let d = app.store.delivery(&asha.id).await.unwrap().unwrap();
    assert_eq!(d.status, "delivered");
    assert_eq!(d.redials, 0);
    // The keypress is off: a press acknowledges nothing.
    assert_eq!(
        keypress(&app, &asha.greeting_ref, Some("1")).await.status(),
        302
    );
    let inc = app
        .store
        .incident(&asha.incident_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inc.status, "open");
    app.stop().await;
}

async fn an_answered_call_without_the_keypress_is_redialled(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(
        db,
        &p,
        &[
            ("SOS_DISPATCH__MAX_REDIALS", "1".into()),
            ("SOS_DISPATCH__REDIAL_DELAY_SECS", "0.1".into()),
        ],
    )
    .await;
    let sid = "CA-ack-voicemail";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let ds = sent(&app, sid).await;
    let asha = call_of(&ds, "Dr. Asha Rao").clone();
    let first = asha.provider_id.clone().unwrap();
    // A voicemail box picks up: answered, and nobody pressed the key.
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", first.as_str()), ("Status", "completed")],
        )
        .await;
    assert_eq!(res.status(), 200);
    let redialled = eventually(Duration::from_secs(20), || async {
        let d = app.store.delivery(&asha.id).await.unwrap().unwrap();
        d.redials == 1 && d.status == "accepted" && d.provider_id.as_deref() != Some(&first)
    })
    .await;
    assert!(redialled, "the answered call was not redialled");
    let events = app.store.events(&asha.id).await.unwrap();
    assert!(
        events.iter().any(|e| e
            .detail
            .contains("answered, not acknowledged (call 1 of 2)")),
        "{events:?}"
    );
    // The redial is answered too, without the key, and no redials are left: answered, not reached.
    let second = app
        .store
        .delivery(&asha.id)
        .await
        .unwrap()
        .unwrap()
        .provider_id
        .unwrap();
    app.post_form(
        "/exotel/call-status",
        &[("CallSid", second.as_str()), ("Status", "completed")],
    )
    .await;
    let d = app.store.delivery(&asha.id).await.unwrap().unwrap();
    assert_eq!(d.status, "answered");
    assert_eq!(d.redials, 1);
    let detail: serde_json::Value = app
        .client
        .get(format!(
            "{}/api/v1/incidents/{}",
            app.base, asha.incident_id
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let contact = detail["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["contact_name"] == "Dr. Asha Rao")
        .unwrap();
    assert_eq!(contact["reached"], "answered");
    assert_eq!(contact["channels"]["call"], "answered");
    let lab = detail["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["contact_name"] == "Central lab")
        .unwrap();
    assert_eq!(lab["reached"], "not_reached");
    // The keypress of the last call still acknowledges.
    assert_eq!(
        keypress(&app, &asha.greeting_ref, Some("1")).await.status(),
        200
    );
    assert_eq!(
        app.store.delivery(&asha.id).await.unwrap().unwrap().status,
        "acknowledged"
    );
    app.stop().await;
}

async fn a_link_preview_acknowledges_nothing_its_form_does(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(
        db,
        &p,
        &[(
            "SOS_MESSAGES__SMS",
            "SOS {type} from {caller}. Acknowledge: {ack}".into(),
        )],
    )
    .await;
    let sid = "CA-ack-link";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let ds = sent(&app, sid).await;
    let lab_sms = ds
        .iter()
        .find(|d| d.contact_name == "Central lab" && d.channel == "sms")
        .unwrap()
        .clone();
    let reference = lab_sms.ack_ref.clone().expect("an acknowledge link");
    assert_ne!(Some(&reference), lab_sms.link_ref.as_ref());
    // The SMS carries the recipient's own link.
    let link = format!("{}/a/{reference}", app.base);
    let sent_link = format!("/a/{reference}");
    let bodies: Vec<String> = p
        .requests(SMS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "To") == Some("+919800000005"))
        .filter_map(|(f, _)| field(&f, "Body").map(str::to_owned))
        .collect();
    assert!(
        bodies
            .iter()
            .any(|b| b.starts_with("SOS Heart from ") && b.ends_with(&sent_link)),
        "{bodies:?}"
    );

    // Opening the link (or a preview fetching it) changes nothing.
    for _ in 0..2 {
        let page = app.client.get(&link).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let html = page.text().await.unwrap();
        assert!(html.contains("<form method=\"post\""), "{html}");
        assert!(html.contains("Heart emergency"), "{html}");
    }
    let head = app.client.head(&link).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let inc = app
        .store
        .incident(&lab_sms.incident_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inc.status, "open");
    assert!(app
        .store
        .events(&lab_sms.id)
        .await
        .unwrap()
        .iter()
        .all(|e| e.kind != "acknowledged"));
    assert_eq!(
        app.client
            .get(format!("{}/a/not-a-reference", app.base))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // The page's form acknowledges.
    let done = app.client.post(&link).send().await.unwrap();
    assert_eq!(done.status(), 200);
    assert!(done.text().await.unwrap().contains("Thank you"));
    let inc = app
        .store
        .incident(&lab_sms.incident_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inc.status, "acknowledged");
    assert_eq!(inc.acknowledged_by.as_deref(), Some("Central lab"));
    assert_eq!(inc.acknowledged_via.as_deref(), Some("sms"));
    assert_eq!(
        app.store
            .delivery(&lab_sms.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        "acknowledged"
    );
    // The lab is not told about its own acknowledgement; Asha and the desk are.
    let told = notices(&app.deliveries_of(sid).await);
    assert!(
        told.iter().all(|(name, _)| name != "Central lab"),
        "{told:?}"
    );
    assert!(told.contains(&("Dr. Asha Rao".to_owned(), "whatsapp".to_owned())));
    // The link keeps working: a second press is recorded only.
    assert_eq!(app.client.post(&link).send().await.unwrap().status(), 200);
    assert_eq!(notices(&app.deliveries_of(sid).await), told);
    app.stop().await;
}

async fn api_and_command_acknowledge_and_later_ones_are_only_recorded(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[]).await;
    let sid = "CA-ack-api";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let ds = sent(&app, sid).await;
    let id = ds[0].incident_id.clone();
    let url = format!("{}/api/v1/incidents/{id}/ack", app.base);

    let refused = app
        .client
        .post(&url)
        .json(&serde_json::json!({"by": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let res = app
        .client
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Dr. Ops"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["already_acknowledged"], false);
    assert_eq!(body["incident"]["status"], "acknowledged");
    assert_eq!(body["incident"]["acknowledged_by"], "Dr. Ops");
    assert_eq!(body["incident"]["acknowledged_via"], "api");
    // An operator is nobody's delivery: every contact already alerted is told.
    assert_eq!(body["notices"], 5);
    let first_notices = notices(&app.deliveries_of(sid).await);
    assert_eq!(first_notices.len(), 5);

    // The command line, as another operator: recorded, not broadcast.
    let mut cmd = tokio::process::Command::new(BIN);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOS_") || k == "RUST_LOG") {
        cmd.env_remove(k);
    }
    cmd.env("SOS_DATABASE__URL", &app.db.url)
        .env("SOS_SERVER__PUBLIC_URL", &app.base)
        .args(["ack", &id, "--by", "Night nurse", "--token", ADMIN_TOKEN]);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("already acknowledged by Dr. Ops"),
        "{stdout}"
    );
    assert_eq!(notices(&app.deliveries_of(sid).await), first_notices);
    let trail = app.store.incident_timeline(&id).await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.kind == "acknowledged_again" && e.detail.contains("Night nurse (cli)")),
        "{trail:?}"
    );
    let inc = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(inc.acknowledged_by.as_deref(), Some("Dr. Ops"));

    // Unknown incident: 404, and exit code 7 for the command.
    let missing = app
        .client
        .post(format!(
            "{}/api/v1/incidents/00000000-0000-0000-0000-000000000000/ack",
            app.base
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // The list shows who acknowledged.
    let list: serde_json::Value = app
        .client
        .get(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["incidents"][0]["acknowledged_by"], "Dr. Ops");
    app.stop().await;
}

async fn the_first_acknowledgement_cancels_calls_not_yet_placed(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let sid = "CA-ack-unplaced";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let id = app.deliveries_of(sid).await[0].incident_id.clone();
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{id}/ack", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-Sos-Source", "cli")
        .json(&serde_json::json!({"by": "Desk lead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["cancelled"], 2);
    // Nothing had gone out: nobody was alerted, so nobody is told.
    assert_eq!(body["notices"], 0);
    assert_eq!(body["incident"]["acknowledged_via"], "cli");
    for d in app.deliveries_of(sid).await {
        let want = if d.channel == "call" {
            "cancelled"
        } else {
            "queued"
        };
        assert_eq!(d.status, want, "{d:?}");
        if d.channel == "call" {
            let events = app.store.events(&d.id).await.unwrap();
            assert!(
                events
                    .iter()
                    .any(|e| e.detail == "not placed: Desk lead acknowledged the incident"),
                "{events:?}"
            );
        }
    }
    // Resolving still works after an acknowledgement.
    let resolved = app
        .client
        .post(format!("{}/api/v1/incidents/{id}/resolve", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resolved.status(), 200);
    let inc = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(inc.status, "resolved");
    assert_eq!(inc.acknowledged_by.as_deref(), Some("Desk lead"));
    app.stop().await;
}

async fn only_the_person_who_acknowledged_gets_the_recording_followup(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let sid = "CA-ack-followup";
    app.passthru(&format!(
        "CallSid={sid}&EmergencyType=Heart&RecordingUrl=https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/acme/{sid}.mp3"
    ))
    .await;
    let ds = app.deliveries_of(sid).await;
    let id = ds[0].incident_id.clone();
    let asha = call_of(&ds, "Dr. Asha Rao").clone();
    let desk = call_of(&ds, "Emergency desk").clone();
    // Both calls were answered while the recording was not in yet: their greetings spoke text, and
    // both calls ended. Asha pressed the key.
    let pool = app.store.pool().clone();
    for (d, status) in [(&asha, "answered"), (&desk, "answered")] {
        sqlx::query("UPDATE deliveries SET status = 'sending' WHERE id = $1")
            .bind(&d.id)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("UPDATE deliveries SET status = 'accepted', provider_id = $2 WHERE id = $1")
            .bind(&d.id)
            .bind(format!("call-{}", d.id))
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE deliveries SET status = $2, spoke_text_at = 1, played_at = 1, \
             finished_at = 1 WHERE id = $1",
        )
        .bind(&d.id)
        .bind(status)
        .execute(&pool)
        .await
        .unwrap();
    }
    assert_eq!(
        keypress(&app, &asha.greeting_ref, Some("1")).await.status(),
        200
    );
    // The recording comes in after the acknowledgement.
    sqlx::query(
        "INSERT INTO recordings (incident_id, source_url, status, received_at, deadline_at, due_at, \
         stored_at) VALUES ($1, 'https://example.org/r.mp3', 'stored', 1, 1, 1, 1) \
         ON CONFLICT (incident_id) DO UPDATE SET status = 'stored', stored_at = 1",
    )
    .bind(&id)
    .execute(&pool)
    .await
    .unwrap();
    let added = exotel_sos::app::recordings::queue_followups(&app.state)
        .await
        .unwrap();
    assert_eq!(added, 1);
    let followups: Vec<_> = app
        .deliveries_of(sid)
        .await
        .into_iter()
        .filter(|d| d.purpose == "followup")
        .collect();
    assert_eq!(followups.len(), 1);
    assert_eq!(followups[0].contact_name, "Dr. Asha Rao");
    // Asked again: nothing more, and still nothing for the desk.
    assert_eq!(
        exotel_sos::app::recordings::queue_followups(&app.state)
            .await
            .unwrap(),
        0
    );
    app.stop().await;
}

/// The database gone when the keypress comes: `302`, so the flow repeats its menu or sends the doctor
/// to the desk; never a `200` ("thank you") for an acknowledgement that was not stored.
async fn a_keypress_the_database_cannot_take_answers_302(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[]).await;
    let sid = "CA-ack-db-gone";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let ds = sent(&app, sid).await;
    let asha = call_of(&ds, "Dr. Asha Rao").clone();
    app.store.close().await;
    let res = keypress(&app, &asha.greeting_ref, Some("1")).await;
    assert_eq!(
        res.status(),
        302,
        "{}",
        res.text().await.unwrap_or_default()
    );
    app.stop().await;
}

/// An operator is nobody's delivery, whatever name they type: an acknowledgement through the API in
/// the name "Dr. Asha Rao" tells the contact of that name too (before, the notices left out every
/// recipient whose stored name matched the operator's, so she was never told someone had it).
async fn an_operator_who_shares_a_contacts_name_leaves_that_contact_told(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[]).await;
    let sid = "CA-ack-same-name";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let ds = sent(&app, sid).await;
    let id = ds[0].incident_id.clone();
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{id}/ack", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Dr. Asha Rao"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["incident"]["acknowledged_by"], "Dr. Asha Rao");
    assert_eq!(body["notices"], 5, "{body}");
    let told = notices(&app.deliveries_of(sid).await);
    for channel in ["sms", "whatsapp"] {
        assert!(
            told.contains(&("Dr. Asha Rao".to_owned(), channel.to_owned())),
            "{told:?}"
        );
    }
    app.stop().await;
}

/// The lab's link, after Asha acknowledged by keypress: the page says who had it and when, not a
/// thank-you that suggests the others were told of the lab.
async fn a_later_link_acknowledgement_says_who_had_it_and_when(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[]).await;
    let sid = "CA-ack-link-later";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let ds = sent(&app, sid).await;
    let asha = call_of(&ds, "Dr. Asha Rao").clone();
    assert_eq!(
        keypress(&app, &asha.greeting_ref, Some("1")).await.status(),
        200
    );
    let inc = app
        .store
        .incident(&asha.incident_id)
        .await
        .unwrap()
        .unwrap();
    let at = exotel_sos::messages::format_time(
        inc.acknowledged_at.expect("acknowledged"),
        app.state.settings.messages.utc_offset_minutes,
    );
    let lab_sms = ds
        .iter()
        .find(|d| d.contact_name == "Central lab" && d.channel == "sms")
        .unwrap();
    let link = format!(
        "{}/a/{}",
        app.base,
        lab_sms.ack_ref.as_deref().expect("an acknowledge link")
    );
    let res = app.client.post(&link).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let html = res.text().await.unwrap();
    assert!(
        html.contains(&format!(
            "Dr. Asha Rao had already acknowledged it at {at}, and everyone alerted was told then"
        )),
        "{html}"
    );
    assert!(!html.contains("the others are told"), "{html}");
    let trail = app.store.incident_timeline(&inc.id).await.unwrap();
    assert!(
        trail.iter().any(|e| e.kind == "acknowledged_again"),
        "recorded: {trail:?}"
    );
    app.stop().await;
}

/// A link confirmed after the incident was resolved says so, and when.
async fn a_link_acknowledgement_after_the_resolve_says_it_was_resolved(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = live_app(db, &p, &[]).await;
    let sid = "CA-ack-link-resolved";
    app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
        .await;
    let ds = sent(&app, sid).await;
    let id = ds[0].incident_id.clone();
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{id}/resolve", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let inc = app.store.incident(&id).await.unwrap().unwrap();
    let at = exotel_sos::messages::format_time(
        inc.resolved_at.expect("resolved"),
        app.state.settings.messages.utc_offset_minutes,
    );
    let lab_sms = ds
        .iter()
        .find(|d| d.contact_name == "Central lab" && d.channel == "sms")
        .unwrap();
    let link = format!(
        "{}/a/{}",
        app.base,
        lab_sms.ack_ref.as_deref().expect("an acknowledge link")
    );
    let res = app.client.post(&link).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let html = res.text().await.unwrap();
    assert!(
        html.contains(&format!("This emergency was already resolved at {at}")),
        "{html}"
    );
    assert!(!html.contains("the others are told"), "{html}");
    let inc = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(inc.status, "resolved");
    assert_eq!(
        inc.acknowledged_by, None,
        "a late confirmation is recorded, nothing more"
    );
    app.stop().await;
}
