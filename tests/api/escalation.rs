//! Escalation policies: tiers of teams alerted in turn, each tier `wait` after the one before, the
//! whole policy run again `repeat` times, until someone acknowledges. Time is moved with the store's
//! clock, never slept through.

use std::time::Duration;

use exotel_sos::store::DeliveryRow;

use crate::both_engines;
use crate::helpers::*;

/// Asha (cardiology, all channels), Vikram (neurology, all), Desk (desk, call + SMS), Lab (lab, SMS +
/// WhatsApp). Heart escalates cardiology → desk → lab every 2 minutes, twice through; unknown types
/// go desk → neurology; Brain has a route and no policy (one tier, everyone at once).
const ESCALATING: &str = r#"
[[contact]]
name = "Dr. Asha Rao"
phone = "+91 98000 00001"
teams = ["cardiology", "emergency-desk"]

[[contact]]
name = "Dr. Vikram Iyer"
phone = "09800000002"
teams = ["neurology"]

[[contact]]
name = "Emergency desk"
phone = "+919800000004"
channels = ["call", "sms"]
teams = ["emergency-desk"]

[[contact]]
name = "Central lab"
phone = "+919800000005"
channels = ["sms", "whatsapp"]
teams = ["lab"]

[routes]
Heart = ["cardiology", "emergency-desk", "lab"]
Brain = ["neurology", "emergency-desk"]
default = ["emergency-desk"]

[[escalation]]
type = "Heart"
tiers = [["cardiology"], ["emergency-desk"], ["lab"]]
wait = "2m"
repeat = 1

[[escalation]]
type = "default"
tiers = [["emergency-desk"], ["neurology"]]
wait = "2m"
"#;

const ASHA: &str = "+919800000001";
const VIKRAM: &str = "+919800000002";
const DESK: &str = "+919800000004";
const LAB: &str = "+919800000005";
const WAIT_MS: i64 = 120_000;

/// The app on `stakeholders`, live against the stand-ins (when given). Reports are never awaited long
/// enough to be looked up while the clock is moved minutes ahead, and calls are not redialled unless
/// a test asks.
async fn spawn(
    db: Db,
    stakeholders: &str,
    p: Option<&Providers>,
    extra: &[(&'static str, String)],
) -> TestApp {
    let mut env = p.map(Providers::env).unwrap_or_default();
    env.push(("SOS_DISPATCH__REPORT_WAIT_SECS", "86400".into()));
    env.push(("SOS_DISPATCH__MAX_REDIALS", "0".into()));
    env.extend(extra.iter().cloned());
    let tdb = TestDb::new(db).await;
    let path = tdb.dir().join("stakeholders.toml");
    std::fs::write(&path, stakeholders).unwrap();
    let settings = test_settings(&tdb, &path, &env);
    start(tdb, path, settings).await
}

async fn live(db: Db, extra: &[(&'static str, String)]) -> (TestApp, Providers) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn(db, ESCALATING, Some(&p), extra).await;
    (app, p)
}

/// How many requests each stand-in got for `phone`: (calls, SMS, WhatsApp).
async fn sent_to(p: &Providers, phone: &str) -> (usize, usize, usize) {
    let digits = phone.trim_start_matches('+');
    let calls = p
        .requests(CALLS_PATH)
        .await
        .iter()
        .filter(|(f, _)| field(f, "From") == Some(phone))
        .count();
    let sms = p
        .requests(SMS_PATH)
        .await
        .iter()
        .filter(|(f, _)| field(f, "To") == Some(phone))
        .count();
    let whatsapp = p
        .requests(GUPSHUP_PATH)
        .await
        .iter()
        .filter(|(f, _)| field(f, "send_to") == Some(digits))
        .count();
    (calls, sms, whatsapp)
}

/// Waits until the stand-ins have received `want` for `phone`.
async fn until_sent(p: &Providers, phone: &str, want: (usize, usize, usize)) -> bool {
    eventually(Duration::from_secs(15), || async move {
        sent_to(p, phone).await == want
    })
    .await
}

fn tier_run(ds: &[DeliveryRow], phone: &str, channel: &str) -> Vec<(i64, i64)> {
    let mut v: Vec<(i64, i64)> = ds
        .iter()
        .filter(|d| d.phone == phone && d.channel == channel && d.purpose == "alert")
        .map(|d| (d.tier, d.run))
        .collect();
    v.sort();
    v
}

/// Moves the store's clock on once every attempt of the incident has its outcome recorded: an outcome
/// recorded after the move would be stamped with the later time (and a call accepted "just now" holds
/// back the same contact's next tier).
async fn advance(app: &TestApp, sid: &str, secs: u64) {
    assert!(
        app.deliveries_until(sid, Duration::from_secs(15), |ds| {
            ds.iter().all(|d| d.status != "sending")
        })
        .await,
        "attempts of {sid} recorded"
    );
    app.store.clock().advance(Duration::from_secs(secs));
}

/// The dispatcher polls every 50 ms: a few rounds in which nothing that is not due may go out.
async fn a_few_rounds() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}

async fn tiers_are_alerted_in_turn_and_repeat_runs_call_tier_zero_again(db: Db) {
    const SID: &str = "esc-tiers";
    let (app, p) = live(db, &[]).await;
    assert_eq!(
        app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
            .await
            .status(),
        200
    );
    let incident = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    let received = incident.received_at;
    let ds = app.deliveries_of(SID).await;

    // Every tier and every pass stored with the incident: calls per tier per pass, messages once per
    // contact in its first tier.
    assert_eq!(
        tier_run(&ds, ASHA, "call"),
        vec![(0, 0), (0, 1), (1, 0), (1, 1)]
    );
    assert_eq!(tier_run(&ds, ASHA, "sms"), vec![(0, 0)]);
    assert_eq!(tier_run(&ds, ASHA, "whatsapp"), vec![(0, 0)]);
    assert_eq!(tier_run(&ds, DESK, "call"), vec![(1, 0), (1, 1)]);
    assert_eq!(tier_run(&ds, DESK, "sms"), vec![(1, 0)]);
    assert_eq!(tier_run(&ds, LAB, "sms"), vec![(2, 0)]);
    assert_eq!(tier_run(&ds, LAB, "whatsapp"), vec![(2, 0)]);
    assert_eq!(ds.len(), 11, "{ds:?}");
    for d in &ds {
        assert_eq!(
            d.due_at - received,
            (d.run * 3 + d.tier) * WAIT_MS,
            "due when its tier comes: {d:?}"
        );
    }
    // Unreached at the end of the policy (3 tiers × 2m × 2 passes = 12m), before ack.deadline (15m).
    assert_eq!(incident.unreached_due_at, Some(received + 720_000));
    // A repeated Passthru stores nothing new.
    assert_eq!(
        app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
            .await
            .status(),
        200
    );
    assert_eq!(app.deliveries_of(SID).await.len(), 11);

    // Tier 0 at once; nothing of tier 1 before its wait has passed.
    assert!(
        until_sent(&p, ASHA, (1, 1, 1)).await,
        "{:?}",
        sent_to(&p, ASHA).await
    );
    advance(&app, SID, 119).await;
    a_few_rounds().await;
    assert_eq!(
        sent_to(&p, DESK).await,
        (0, 0, 0),
        "tier 1 waits its 2 minutes"
    );
    assert_eq!(sent_to(&p, ASHA).await, (1, 1, 1));

    // Past the wait: tier 1 (the desk, and Asha again: she is in it too, called, not messaged).
    advance(&app, SID, 2).await;
    assert!(
        until_sent(&p, DESK, (1, 1, 0)).await,
        "{:?}",
        sent_to(&p, DESK).await
    );
    assert!(
        until_sent(&p, ASHA, (2, 1, 1)).await,
        "{:?}",
        sent_to(&p, ASHA).await
    );
    assert_eq!(sent_to(&p, LAB).await, (0, 0, 0), "tier 2 not yet");

    // Tier 2: the lab's messages.
    advance(&app, SID, 120).await;
    assert!(
        until_sent(&p, LAB, (0, 1, 1)).await,
        "{:?}",
        sent_to(&p, LAB).await
    );

    // The second pass calls tier 0 again, and tier 1 after it; messages never go twice.
    advance(&app, SID, 120).await;
    assert!(
        until_sent(&p, ASHA, (3, 1, 1)).await,
        "{:?}",
        sent_to(&p, ASHA).await
    );
    a_few_rounds().await;
    assert_eq!(sent_to(&p, DESK).await, (1, 1, 0), "pass 2's tier 1 waits");
    advance(&app, SID, 120).await;
    assert!(
        until_sent(&p, DESK, (2, 1, 0)).await,
        "{:?}",
        sent_to(&p, DESK).await
    );
    assert!(
        until_sent(&p, ASHA, (4, 1, 1)).await,
        "{:?}",
        sent_to(&p, ASHA).await
    );
    a_few_rounds().await;
    assert_eq!(
        sent_to(&p, LAB).await,
        (0, 1, 1),
        "messages once per contact"
    );
    assert_eq!(
        sent_to(&p, VIKRAM).await,
        (0, 0, 0),
        "not on the Heart policy"
    );

    // The API shows the policy and each delivery's tier and pass.
    let res = app
        .client
        .get(format!("{}/api/v1/incidents/{}", app.base, incident.id))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        body["escalation"],
        serde_json::json!({"type": "Heart", "tiers": [["cardiology"], ["emergency-desk"], ["lab"]],
            "wait_secs": 120, "repeat": 1})
    );
    let deliveries = body["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 11);
    assert!(deliveries
        .iter()
        .any(|d| d["tier"] == 2 && d["run"] == 0 && d["channel"] == "whatsapp"));
    assert!(deliveries
        .iter()
        .any(|d| d["tier"] == 1 && d["run"] == 1 && d["channel"] == "call"));
    app.stop().await;
}

async fn the_first_acknowledgement_stops_later_tiers(db: Db) {
    const SID: &str = "esc-ack";
    let (app, p) = live(db, &[]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert!(until_sent(&p, ASHA, (1, 1, 1)).await);
    let id = app.deliveries_of(SID).await[0].incident_id.clone();
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{id}/ack", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Dr. Ops"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    // Asha's 3 later calls and the desk's 2, the desk's SMS and the lab's SMS and WhatsApp.
    assert_eq!(body["cancelled"], 8, "{body}");

    let ds = app.deliveries_of(SID).await;
    for d in ds.iter().filter(|d| d.tier > 0 || d.run > 0) {
        assert_eq!(d.status, "cancelled", "{d:?}");
        assert_eq!(d.attempts, 0, "{d:?}");
        let events = app.store.events(&d.id).await.unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.kind == "cancelled" && e.detail.contains("Dr. Ops acknowledged")),
            "{events:?}"
        );
    }
    // Nothing of a later tier ever goes out, however long the clock runs on.
    for _ in 0..4 {
        advance(&app, SID, 121).await;
        a_few_rounds().await;
    }
    assert_eq!(sent_to(&p, DESK).await, (0, 0, 0));
    assert_eq!(sent_to(&p, LAB).await, (0, 0, 0));
    // Asha was alerted: she gets the acknowledgement notice on her message channels, no other call.
    assert!(
        until_sent(&p, ASHA, (1, 2, 2)).await,
        "{:?}",
        sent_to(&p, ASHA).await
    );
    app.stop().await;
}

/// A later tier's call can be placed in the moment the acknowledgement is stored (its last look at the
/// incident came just before): whoever answers it hears that someone already acknowledged, not the
/// alert as if nobody had. The first tier's calls, part of the alert itself, still play it.
async fn a_later_tier_call_answered_after_the_acknowledgement_says_who_acknowledged(db: Db) {
    const SID: &str = "esc-ack-greeting";
    let (app, p) = live(db, &[("SOS_RECORDINGS__MODE", "direct".into())]).await;
    app.passthru(&format!(
        "CallSid={SID}&EmergencyType=Heart&RecordingUrl=https%3A%2F%2Frec.example%2Fa.mp3"
    ))
    .await;
    assert!(until_sent(&p, ASHA, (1, 1, 1)).await);
    advance(&app, SID, 121).await;
    assert!(until_sent(&p, DESK, (1, 1, 0)).await);
    let ds = app.deliveries_of(SID).await;
    let call_of = |phone: &str, tier: i64| {
        ds.iter()
            .find(|d| d.phone == phone && d.channel == "call" && d.tier == tier && d.run == 0)
            .map(|d| d.greeting_ref.clone())
            .unwrap()
    };
    let (asha_ref, desk_ref) = (call_of(ASHA, 0), call_of(DESK, 1));
    let before = app.greeting(reqwest::Method::GET, &desk_ref).await;
    assert_eq!(
        before.text().await.unwrap().lines().count(),
        2,
        "the recording, twice"
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

    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let res = app.greeting(method.clone(), &desk_ref).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "text/plain", "{method}");
        if method == reqwest::Method::GET {
            let body = res.text().await.unwrap();
            assert!(
                body.contains("Dr. Ops") && body.contains("acknowledged") && body.contains("Heart"),
                "{body}"
            );
            assert!(
                !body.contains("https://"),
                "spoken, not the recording: {body}"
            );
        }
    }
    let asha = app.greeting(reqwest::Method::GET, &asha_ref).await;
    assert_eq!(
        asha.text().await.unwrap(),
        "https://rec.example/a.mp3\nhttps://rec.example/a.mp3",
        "the first tier's call plays the alert"
    );
    app.stop().await;
}

async fn a_type_without_a_policy_is_one_tier_and_default_covers_unknown_types(db: Db) {
    let app = spawn(db, ESCALATING, None, &[without_dispatcher()]).await;
    // Brain has a route and no policy: one tier, everyone at once, unreached after ack.deadline.
    app.passthru("CallSid=esc-brain&EmergencyType=Brain").await;
    let brain = app
        .store
        .incident_by_call_sid("esc-brain")
        .await
        .unwrap()
        .unwrap();
    let ds = app.deliveries_of("esc-brain").await;
    assert_eq!(ds.len(), BRAIN_DELIVERIES);
    assert!(ds
        .iter()
        .all(|d| d.tier == 0 && d.run == 0 && d.due_at == brain.received_at));
    assert_eq!(brain.escalation, None);
    assert_eq!(brain.unreached_due_at, Some(brain.received_at + 900_000));

    // An unknown type takes the default route, and so the default policy: desk, then neurology.
    app.passthru("CallSid=esc-unknown&EmergencyType=Volcano")
        .await;
    let unknown = app
        .store
        .incident_by_call_sid("esc-unknown")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unknown.route, "default");
    let policy: serde_json::Value =
        serde_json::from_str(unknown.escalation.as_deref().unwrap()).unwrap();
    assert_eq!(policy["type"], "default");
    let ds = app.deliveries_of("esc-unknown").await;
    assert_eq!(tier_run(&ds, DESK, "call"), vec![(0, 0)]);
    assert_eq!(
        tier_run(&ds, ASHA, "call"),
        vec![(0, 0)],
        "Asha is on the desk team"
    );
    assert_eq!(tier_run(&ds, VIKRAM, "call"), vec![(1, 0)]);
    assert_eq!(tier_run(&ds, VIKRAM, "whatsapp"), vec![(1, 0)]);
    // 2 tiers × 2m: unreached after 4 minutes.
    assert_eq!(
        unknown.unreached_due_at,
        Some(unknown.received_at + 240_000)
    );

    // The default policy does not cover a type with a route of its own (Brain above), nor a known
    // type asked in another case.
    app.passthru("CallSid=esc-heart&EmergencyType=hEaRt").await;
    let heart = app
        .store
        .incident_by_call_sid("esc-heart")
        .await
        .unwrap()
        .unwrap();
    assert!(heart
        .escalation
        .as_deref()
        .unwrap()
        .contains("\"type\":\"Heart\""));
    app.stop().await;
}

async fn drills_do_not_escalate(db: Db) {
    let app = spawn(db, ESCALATING, None, &[without_dispatcher()]).await;
    let res = app
        .client
        .post(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({
            "emergency_type": "Heart",
            "message": "drill",
            "drill_contact": "Dr. Asha Rao",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body.get("escalation").is_none(), "{body}");
    let id = body["id"].as_str().unwrap();
    let incident = app.store.incident(id).await.unwrap().unwrap();
    assert_eq!(incident.source, "drill");
    assert_eq!(incident.escalation, None);
    assert_eq!(
        incident.unreached_due_at, None,
        "a drill never raises the alarm"
    );
    let ds = app.store.deliveries(id).await.unwrap();
    assert_eq!(ds.len(), 3, "Asha on each channel once: {ds:?}");
    assert!(ds
        .iter()
        .all(|d| d.tier == 0 && d.run == 0 && d.due_at == incident.received_at));
    app.stop().await;
}

/// The Heart policy after an edit: the desk alone, every 5 minutes.
const EDITED: &str = r#"
[[contact]]
name = "Dr. Asha Rao"
phone = "+91 98000 00001"
teams = ["cardiology", "emergency-desk"]

[[contact]]
name = "Emergency desk"
phone = "+919800000004"
channels = ["call", "sms"]
teams = ["emergency-desk"]

[routes]
default = ["emergency-desk"]

[[escalation]]
type = "Heart"
tiers = [["emergency-desk"]]
wait = "5m"
"#;

async fn the_policy_is_fixed_when_the_incident_is_stored(db: Db) {
    const SID: &str = "esc-fixed";
    let (app, p) = live(db, &[]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert!(until_sent(&p, ASHA, (1, 1, 1)).await);
    let before = app.deliveries_of(SID).await;

    std::fs::write(&app.stakeholders, EDITED).unwrap();
    let routing = app.state.routing.clone();
    // The reload SIGHUP and the file watcher run, here at once (the watcher may not be watching yet).
    routing.reload().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = routing.clone();
            async move { r.current().contact_count() == 2 }
        })
        .await,
        "the edit was picked up"
    );

    // The incident under way keeps its policy: its tier 1 (the desk, and Asha) comes after 2m.
    let incident = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    assert!(incident.escalation.as_deref().unwrap().contains("\"lab\""));
    advance(&app, SID, 121).await;
    assert!(
        until_sent(&p, DESK, (1, 1, 0)).await,
        "{:?}",
        sent_to(&p, DESK).await
    );
    assert!(until_sent(&p, ASHA, (2, 1, 1)).await);
    let after = app.deliveries_of(SID).await;
    assert_eq!(before.len(), after.len(), "nothing added or taken away");

    // A new incident follows the new policy: the desk team, one tier of 5 minutes.
    app.passthru("CallSid=esc-fixed-2&EmergencyType=Heart")
        .await;
    let second = app
        .store
        .incident_by_call_sid("esc-fixed-2")
        .await
        .unwrap()
        .unwrap();
    assert!(second
        .escalation
        .as_deref()
        .unwrap()
        .contains("\"wait_secs\":300"));
    assert_eq!(second.unreached_due_at, Some(second.received_at + 300_000));
    app.stop().await;
}

async fn redials_stay_within_their_tier_and_the_fallback_waits_for_calls_placed(db: Db) {
    const SID: &str = "esc-redial";
    let (app, p) = live(
        db,
        &[
            ("SOS_DISPATCH__MAX_REDIALS", "1".into()),
            ("SOS_DISPATCH__REDIAL_DELAY_SECS", "0.05".into()),
        ],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert!(until_sent(&p, ASHA, (1, 1, 1)).await);
    let first_call = |ds: &[DeliveryRow]| {
        ds.iter()
            .find(|d| d.phone == ASHA && d.channel == "call" && d.tier == 0 && d.run == 0)
            .cloned()
            .unwrap()
    };
    let mut answered_ids = Vec::new();
    // Two attempts (the call and max_redials = 1 redial), each not answered.
    for attempt in 0..2 {
        assert!(
            app.deliveries_until(SID, Duration::from_secs(15), |ds| {
                let d = first_call(ds);
                d.status == "accepted"
                    && d.provider_id
                        .as_ref()
                        .is_some_and(|id| !answered_ids.contains(id))
            })
            .await,
            "attempt {attempt} placed"
        );
        let sid = first_call(&app.deliveries_of(SID).await)
            .provider_id
            .unwrap();
        let res = app
            .post_form(
                "/exotel/call-status",
                &[("CallSid", sid.as_str()), ("Status", "no-answer")],
            )
            .await;
        assert_eq!(res.status(), 200);
        answered_ids.push(sid);
    }
    assert!(
        app.deliveries_until(SID, Duration::from_secs(15), |ds| first_call(ds).status
            == "failed")
            .await
    );
    let d = first_call(&app.deliveries_of(SID).await);
    assert_eq!(d.redials, 1, "{d:?}");
    assert_eq!(sent_to(&p, ASHA).await.0, 2, "the call and one redial");

    // Her tier-1 call is not due yet: it neither blocks the fallback nor counts as placed. Every call
    // placed so far failed, so her messages go again with the fallback text.
    assert!(
        app.deliveries_until(SID, Duration::from_secs(15), |ds| {
            ds.iter().filter(|d| d.purpose == "fallback").count() == 2
        })
        .await,
        "fallback for Asha"
    );
    let ds = app.deliveries_of(SID).await;
    assert!(ds
        .iter()
        .filter(|d| d.purpose == "fallback")
        .all(|d| d.phone == ASHA));
    assert!(ds
        .iter()
        .any(|d| d.phone == ASHA && d.channel == "call" && d.tier == 1 && d.status == "queued"));
    assert!(
        until_sent(&p, ASHA, (2, 2, 2)).await,
        "{:?}",
        sent_to(&p, ASHA).await
    );

    // Her tier-1 call goes when its tier comes, with redials of its own; the fallback does not repeat.
    advance(&app, SID, 121).await;
    assert!(
        until_sent(&p, ASHA, (3, 2, 2)).await,
        "{:?}",
        sent_to(&p, ASHA).await
    );
    a_few_rounds().await;
    let fallbacks = app
        .deliveries_of(SID)
        .await
        .iter()
        .filter(|d| d.purpose == "fallback")
        .count();
    assert_eq!(fallbacks, 2);
    app.stop().await;
}

/// The provider id of the accepted attempt of `pick`'s delivery, once there is a new one.
async fn accepted_attempt(
    app: &TestApp,
    sid: &str,
    pick: impl Fn(&DeliveryRow) -> bool,
    not: &[String],
) -> String {
    let found = |ds: &[DeliveryRow]| {
        ds.iter()
            .find(|d| pick(d))
            .filter(|d| d.status == "accepted")
            .and_then(|d| d.provider_id.clone())
            .filter(|id| !not.contains(id))
    };
    assert!(
        app.deliveries_until(sid, Duration::from_secs(15), |ds| found(ds).is_some())
            .await,
        "a new attempt accepted"
    );
    found(&app.deliveries_of(sid).await).unwrap()
}

async fn a_contact_still_ringing_is_not_rung_again_by_the_next_tier(db: Db) {
    const SID: &str = "esc-ringing";
    let (app, p) = live(
        db,
        &[
            ("SOS_DISPATCH__MAX_REDIALS", "1".into()),
            ("SOS_DISPATCH__REDIAL_DELAY_SECS", "0.05".into()),
        ],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let tier0 =
        |d: &DeliveryRow| d.phone == ASHA && d.channel == "call" && d.tier == 0 && d.run == 0;
    let first = accepted_attempt(&app, SID, tier0, &[]).await;
    // 100 s on, her first call is not answered: the redial rings from then on.
    advance(&app, SID, 100).await;
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", first.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
    let redial = accepted_attempt(&app, SID, tier0, std::slice::from_ref(&first)).await;
    assert!(until_sent(&p, ASHA, (2, 1, 1)).await);

    // Tier 1 comes while the redial rings: the desk is called, Asha's tier-1 call waits.
    advance(&app, SID, 21).await;
    assert!(
        until_sent(&p, DESK, (1, 1, 0)).await,
        "{:?}",
        sent_to(&p, DESK).await
    );
    a_few_rounds().await;
    assert_eq!(sent_to(&p, ASHA).await.0, 2, "not rung twice at once");
    let tier1 =
        |d: &DeliveryRow| d.phone == ASHA && d.channel == "call" && d.tier == 1 && d.run == 0;
    let waiting = app
        .deliveries_of(SID)
        .await
        .into_iter()
        .find(|d| tier1(d))
        .unwrap();
    assert_eq!(waiting.status, "queued");
    let events = app.store.events(&waiting.id).await.unwrap();
    assert!(
        events.iter().any(|e| e.detail.contains("still ringing")),
        "{events:?}"
    );

    // The redial ends unanswered: her tier-1 call goes at its next look.
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", redial.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
    advance(&app, SID, 6).await;
    assert!(
        until_sent(&p, ASHA, (3, 1, 1)).await,
        "{:?}",
        sent_to(&p, ASHA).await
    );
    app.stop().await;
}

/// Asha's tier-0 call is not answered and its redial is due just after her tier-1 call went out: the
/// redial waits while that call still rings, instead of ringing her phone a second time at once.
async fn a_first_tier_redial_waits_while_the_next_tier_still_rings_the_same_contact(db: Db) {
    const SID: &str = "esc-redial";
    let (app, p) = live(
        db,
        &[
            ("SOS_DISPATCH__MAX_REDIALS", "1".into()),
            ("SOS_DISPATCH__REDIAL_DELAY_SECS", "25".into()),
        ],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let tier0 =
        |d: &DeliveryRow| d.phone == ASHA && d.channel == "call" && d.tier == 0 && d.run == 0;
    let first = accepted_attempt(&app, SID, tier0, &[]).await;
    // 100 s on, her first call is not answered: the redial is due 25 s later, at 125 s.
    advance(&app, SID, 100).await;
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", first.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
    // Tier 1 at 121 s: her tier-1 call rings.
    advance(&app, SID, 21).await;
    assert!(
        until_sent(&p, DESK, (1, 1, 0)).await,
        "{:?}",
        sent_to(&p, DESK).await
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            sent_to(&p, ASHA).await.0 == 2
        })
        .await,
        "{:?}",
        sent_to(&p, ASHA).await
    );
    // 126 s: the tier-0 redial is due while the tier-1 call still rings.
    advance(&app, SID, 5).await;
    a_few_rounds().await;
    a_few_rounds().await;
    assert_eq!(sent_to(&p, ASHA).await.0, 2, "not rung twice at once");
    let redial = app
        .deliveries_of(SID)
        .await
        .into_iter()
        .find(|d| tier0(d))
        .unwrap();
    assert_eq!((redial.status.as_str(), redial.redials), ("queued", 1));
    let events = app.store.events(&redial.id).await.unwrap();
    assert!(
        events.iter().any(|e| e.detail.contains("still ringing")),
        "{events:?}"
    );
    // A minute and more after the tier-1 call was placed it no longer rings: the redial goes.
    advance(&app, SID, 65).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            sent_to(&p, ASHA).await.0 >= 3
        })
        .await,
        "{:?}",
        sent_to(&p, ASHA).await
    );
    app.stop().await;
}

async fn a_later_tier_message_retried_after_the_acknowledgement_is_not_sent(db: Db) {
    const SID: &str = "esc-retry";
    let p = Providers::start().await;
    // The desk's SMS (tier 1) is slow and then refused for now: it is in flight while someone
    // acknowledges, and comes back to the queue afterwards.
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path(SMS_PATH))
        .and(wiremock::matchers::body_string_contains(
            "To=%2B919800000004",
        ))
        .respond_with(wiremock::ResponseTemplate::new(503).set_delay(Duration::from_millis(1500)))
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let app = spawn(db, ESCALATING, Some(&p), &[]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert!(until_sent(&p, ASHA, (1, 1, 1)).await);
    advance(&app, SID, 121).await;
    let desk_sms = |d: &DeliveryRow| d.phone == DESK && d.channel == "sms" && d.purpose == "alert";
    assert!(
        app.deliveries_until(SID, Duration::from_secs(15), |ds| {
            ds.iter().any(|d| desk_sms(d) && d.status == "sending")
        })
        .await
    );
    let id = app.deliveries_of(SID).await[0].incident_id.clone();
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{id}/ack", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Dr. Ops"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        app.deliveries_until(SID, Duration::from_secs(15), |ds| {
            ds.iter().any(|d| desk_sms(d) && d.status == "cancelled")
        })
        .await,
        "{:?}",
        app.deliveries_of(SID).await
    );
    a_few_rounds().await;
    // The desk was alerted (its tier-1 call went out), so it gets the acknowledgement notice; its
    // alert SMS was tried once only.
    let d = app
        .deliveries_of(SID)
        .await
        .into_iter()
        .find(|d| desk_sms(d))
        .unwrap();
    assert_eq!((d.status.as_str(), d.attempts), ("cancelled", 1), "{d:?}");
    let alerts = p
        .requests(SMS_PATH)
        .await
        .iter()
        .filter(|(f, _)| {
            field(f, "To") == Some(DESK) && !field(f, "Body").unwrap_or("").contains("cknowledged")
        })
        .count();
    assert_eq!(alerts, 1, "the refused attempt only");
    let events = app.store.events(&d.id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.detail.contains("escalation stopped")),
        "{events:?}"
    );
    app.stop().await;
}

async fn unreached_is_due_at_the_earlier_of_the_policy_end_and_ack_deadline(db: Db) {
    let app = spawn(
        db,
        ESCALATING,
        None,
        &[without_dispatcher(), ("SOS_ACK__DEADLINE", "10m".into())],
    )
    .await;
    for (sid, ty, after_ms) in [
        // 3 tiers × 2m × 2 passes = 12m: the deadline comes first.
        ("esc-u-heart", "Heart", 600_000),
        // No policy: the deadline.
        ("esc-u-brain", "Brain", 600_000),
        // The default policy: 2 tiers × 2m.
        ("esc-u-other", "Other", 240_000),
    ] {
        app.passthru(&format!("CallSid={sid}&EmergencyType={ty}"))
            .await;
        let i = app.store.incident_by_call_sid(sid).await.unwrap().unwrap();
        assert_eq!(i.unreached_due_at, Some(i.received_at + after_ms), "{ty}");
    }
    // Escalation still goes on to the end of the policy: the second pass is stored all the same.
    let ds = app.deliveries_of("esc-u-heart").await;
    assert!(ds.iter().any(|d| d.run == 1 && d.tier == 1));
    app.stop().await;
}

async fn resolving_cancels_every_tier_still_waiting(db: Db) {
    const SID: &str = "esc-resolve";
    let (app, p) = live(db, &[]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert!(until_sent(&p, ASHA, (1, 1, 1)).await);
    let id = app.deliveries_of(SID).await[0].incident_id.clone();
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{id}/resolve", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["cancelled"], 8, "{body}");
    let ds = app.deliveries_of(SID).await;
    assert!(ds
        .iter()
        .filter(|d| d.tier > 0 || d.run > 0)
        .all(|d| d.status == "cancelled"));
    advance(&app, SID, 20 * 60).await;
    a_few_rounds().await;
    assert_eq!(sent_to(&p, DESK).await, (0, 0, 0));
    assert_eq!(sent_to(&p, LAB).await, (0, 0, 0));
    assert_eq!(sent_to(&p, ASHA).await, (1, 1, 1));
    app.stop().await;
}

both_engines!(
    unreached_is_due_at_the_earlier_of_the_policy_end_and_ack_deadline,
    a_later_tier_message_retried_after_the_acknowledgement_is_not_sent,
    a_contact_still_ringing_is_not_rung_again_by_the_next_tier,
    a_first_tier_redial_waits_while_the_next_tier_still_rings_the_same_contact,
    resolving_cancels_every_tier_still_waiting,
    tiers_are_alerted_in_turn_and_repeat_runs_call_tier_zero_again,
    the_first_acknowledgement_stops_later_tiers,
    a_later_tier_call_answered_after_the_acknowledgement_says_who_acknowledged,
    a_type_without_a_policy_is_one_tier_and_default_covers_unknown_types,
    drills_do_not_escalate,
    the_policy_is_fixed_when_the_incident_is_stored,
    redials_stay_within_their_tier_and_the_fallback_waits_for_calls_placed,
);

/// `check-config` on a file with policies, through the real binary.
fn check_config(stakeholders: &str, extra: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stakeholders.toml");
    std::fs::write(&file, stakeholders).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_exotel-sos"))
        .arg("check-config")
        .env("SOS_STAKEHOLDERS__FILE", &file)
        .env(
            "SOS_DATABASE__URL",
            format!("sqlite://{}/x.db?mode=rwc", dir.path().display()),
        )
        .envs(extra.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_config_prints_each_policy_and_its_unreached_time() {
    let (ok, text) = check_config(ESCALATING, &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains(
            "Heart: cardiology → emergency-desk → lab, every 2m, repeat 1 (unreached after 12m)"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "default: emergency-desk → neurology, every 2m, repeat 0 (unreached after 4m)"
        ),
        "{text}"
    );
    // A policy longer than ack.deadline: allowed, with a warning (the alarm comes first).
    let (ok, text) = check_config(ESCALATING, &[("SOS_ACK__DEADLINE", "10m")]);
    assert!(ok, "{text}");
    assert!(
        text.contains("warning:") && text.contains("escalation \"Heart\": lasts 12m"),
        "{text}"
    );
    assert!(text.contains("(unreached after 10m)"), "{text}");
}

#[test]
fn check_config_refuses_broken_policies_and_a_wait_shorter_than_a_call() {
    let broken = ESCALATING.replace(
        "tiers = [[\"emergency-desk\"], [\"neurology\"]]",
        "tiers = [[\"emergency-desk\"], [], [\"nobody\"]]",
    );
    let (ok, text) = check_config(&broken, &[]);
    assert!(!ok, "{text}");
    for needle in [
        "stakeholders.toml: escalation[1] \"default\": tier 2 is empty",
        "stakeholders.toml: escalation[1] \"default\": tier 3: team \"nobody\" has no contacts",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // The default policy's 45s is shorter than a 30 s ring and the margin to place and answer the
    // call: the next tier would be woken while the first one's phones still ring.
    let at = ESCALATING.rfind("wait = \"2m\"").unwrap();
    let short = format!("{}wait = \"45s\"\n", &ESCALATING[..at]);
    let (ok, text) = check_config(&short, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("escalation \"default\": wait 45s is shorter than a call needs"),
        "{text}"
    );
    // With a 15 s ring it is enough.
    let (ok, text) = check_config(&short, &[("SOS_EXOTEL__RING_TIMEOUT_SECS", "15")]);
    assert!(ok, "{text}");
    assert!(!text.contains("9800000001"), "numbers masked: {text}");
}

/// A reload checks policies against the settings as start-up does: a wait too short for a call is
/// refused, and the routing in force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_wait_too_short_for_a_call_is_refused() {
    let app = spawn(Db::Sqlite, ESCALATING, None, &[without_dispatcher()]).await;
    let at = ESCALATING.rfind("wait = \"2m\"").unwrap();
    std::fs::write(
        &app.stakeholders,
        format!("{}wait = \"45s\"\n", &ESCALATING[..at]),
    )
    .unwrap();
    // Reloaded here rather than awaiting the file watcher, which may not be watching yet: the same
    // reload that SIGHUP and a change on disk run.
    let routing = app.state.routing.clone();
    let errors = routing.reload().unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("escalation \"default\": wait 45s is shorter than a call needs")),
        "{errors:?}"
    );
    assert!(routing.rejected_edits() >= 1);
    assert_eq!(
        routing.current().escalation("default").unwrap().wait_secs,
        120
    );
    app.stop().await;
}
