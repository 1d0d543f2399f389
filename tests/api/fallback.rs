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

both_engines!(unreached_contacts_get_their_messages_again_once);
