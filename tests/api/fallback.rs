//! Channel fallback: a contact whose every call ended unanswered or failed gets their SMS and WhatsApp
//! once more, with the fallback text; a contact a call reached does not.

use std::time::Duration;

use crate::both_engines;
use crate::helpers::*;

async fn unreached_contacts_get_their_messages_again_once(db: Db) {
    const SID: &str = "fallback1";
    let p = Providers::start().await;
    mount_happy(&p).await;
    let mut env = p.env();
    env.push(("SOS_DISPATCH__MAX_REDIALS", "0".into()));
    // A completed call counts as reached here, so the desk is the contact a call reached.
    env.push(("SOS_ACK__DIGIT", "".into()));
    let app = spawn_app_with(db, &env).await;
    app.passthru(&format!(
        "CallSid={SID}&EmergencyType=Heart&CallFrom=09901320691"
    ))
    .await;
    let ds = app.settled(SID).await;
    let call_to = |phone: &str| {
        ds.iter()
            .find(|d| d.channel == "call" && d.phone == phone)
            .unwrap()
            .provider_id
            .clone()
            .unwrap()
    };
    for (sid, status) in [
        (call_to("+919800000001"), "no-answer"),
        (call_to("+919800000004"), "completed"),
    ] {
        let res = app
            .post_form(
                "/exotel/call-status",
                &[("CallSid", sid.as_str()), ("Status", status)],
            )
            .await;
        assert_eq!(res.status(), 200);
    }
    let sent = app
        .deliveries_until(SID, Duration::from_secs(15), |ds| {
            ds.iter()
                .filter(|d| {
                    d.purpose == "fallback" && d.status != "queued" && d.status != "sending"
                })
                .count()
                == 2
        })
        .await;
    assert!(sent, "Asha's SMS and WhatsApp go again");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let fallbacks: Vec<_> = app
        .deliveries_of(SID)
        .await
        .into_iter()
        .filter(|d| d.purpose == "fallback")
        .collect();
    assert_eq!(fallbacks.len(), 2, "once: {fallbacks:?}");
    assert!(fallbacks.iter().all(|d| d.phone == "+919800000001"));
    let asha_sms: Vec<String> = p
        .requests(SMS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "To") == Some("+919800000001"))
        .map(|(f, _)| field(&f, "Body").unwrap().to_owned())
        .collect();
    assert_eq!(asha_sms.len(), 2, "{asha_sms:?}");
    assert!(
        asha_sms
            .iter()
            .any(|b| b.contains("Could not reach you by phone")),
        "{asha_sms:?}"
    );
    let desk_sms = p
        .requests(SMS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "To") == Some("+919800000004"))
        .count();
    assert_eq!(desk_sms, 1, "a call reached the desk: no fallback");
    app.stop().await;
}

both_engines!(
    unreached_contacts_get_their_messages_again_once,
    an_acknowledgement_stops_a_fallback_message_not_yet_sent,
);

/// Someone acknowledges while a contact's fallback SMS is in flight and then refused for now: the retry
/// is not sent ("we could not reach you by phone" is no news once someone has the emergency; the
/// acknowledgement notice tells them instead).
async fn an_acknowledgement_stops_a_fallback_message_not_yet_sent(db: Db) {
    const SID: &str = "fallback-ack";
    let p = Providers::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path(SMS_PATH))
        .and(wiremock::matchers::body_string_contains("Could+not+reach"))
        .respond_with(wiremock::ResponseTemplate::new(503).set_delay(Duration::from_millis(1500)))
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let mut env = p.env();
    env.push(("SOS_DISPATCH__MAX_REDIALS", "0".into()));
    let app = spawn_app_with(db, &env).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    let asha_call = ds
        .iter()
        .find(|d| d.channel == "call" && d.phone == "+919800000001")
        .and_then(|d| d.provider_id.clone())
        .unwrap();
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", asha_call.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
    let fallback_sms =
        |d: &exotel_sos::store::DeliveryRow| d.purpose == "fallback" && d.channel == "sms";
    assert!(
        app.deliveries_until(SID, Duration::from_secs(15), |ds| {
            ds.iter().any(|d| fallback_sms(d) && d.status == "sending")
        })
        .await,
        "{:?}",
        app.deliveries_of(SID).await
    );
    let id = ds[0].incident_id.clone();
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{id}/ack", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Dr. Ops"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The refused attempt comes back to the queue; its retry, whenever due, is cancelled.
    app.store.clock().advance(Duration::from_secs(3600));
    assert!(
        app.deliveries_until(SID, Duration::from_secs(15), |ds| {
            ds.iter()
                .any(|d| fallback_sms(d) && d.status == "cancelled")
        })
        .await,
        "{:?}",
        app.deliveries_of(SID).await
    );
    let d = app
        .deliveries_of(SID)
        .await
        .into_iter()
        .find(|d| fallback_sms(d))
        .unwrap();
    assert_eq!(d.attempts, 1, "{d:?}");
    let tried = p
        .requests(SMS_PATH)
        .await
        .iter()
        .filter(|(f, _)| field(f, "Body").is_some_and(|b| b.contains("Could not reach")))
        .count();
    assert_eq!(tried, 1, "the refused attempt only");
    app.stop().await;
}
