//! The carrier-safe cap: no number is called more than `dispatch.max_calls_per_number_per_hour` times in
//! an hour, across incidents, counting redials and follow-ups; the first call of an incident to a number
//! always goes; what the cap holds waits as `held`, with an event, and goes when the hour allows it.

use std::time::Duration;

use serde_json::Value;

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    a_burst_calls_each_incident_once_and_holds_the_redials_until_the_hour_allows,
    held_calls_are_cancelled_by_an_acknowledgement_or_a_resolve,
    the_cap_counts_calls_of_other_incidents_and_follow_ups,
    zero_turns_the_cap_off,
    a_call_retried_after_the_acknowledgement_is_cancelled_not_held,
    a_keypress_arriving_after_the_redial_was_held_acknowledges_that_delivery,
    a_call_held_for_an_hour_behind_other_emergencies_is_given_up,
);

const ASHA: &str = "+919800000001";

/// One contact, reached by call only: every call in these tests goes to her.
const ONE_CALLER: &str = r#"
[[contact]]
name = "Dr. Asha Rao"
phone = "+91 98000 00001"
channels = ["call"]
teams = ["cardiology"]

[routes]
default = ["cardiology"]
"#;

/// Live stand-ins, immediate redials (one per call), and `extra`.
async fn app(db: Db, p: &Providers, extra: &[(&'static str, String)]) -> TestApp {
    let test_db = TestDb::new(db).await;
    let stakeholders = test_db.dir().join("stakeholders.toml");
    std::fs::write(&stakeholders, ONE_CALLER).unwrap();
    let mut env = p.env();
    env.push(("SOS_DISPATCH__REDIAL_DELAY_SECS", "0".into()));
    env.push(("SOS_DISPATCH__MAX_REDIALS", "1".into()));
    env.extend(extra.iter().cloned());
    let settings = test_settings(&test_db, &stakeholders, &env);
    start(test_db, stakeholders, settings).await
}

fn cap(n: u32) -> (&'static str, String) {
    ("SOS_DISPATCH__MAX_CALLS_PER_NUMBER_PER_HOUR", n.to_string())
}

/// Calls the Exotel stand-in was asked to place to Asha.
async fn calls_to_asha(p: &Providers) -> usize {
    p.requests(CALLS_PATH)
        .await
        .iter()
        .filter(|(f, _)| field(f, "From") == Some(ASHA))
        .count()
}

/// Waits until the stand-in placed `n` calls to Asha, then checks no more follow for a moment.
async fn exactly_calls(p: &Providers, n: usize) {
    let reached = eventually(Duration::from_secs(20), || async {
        calls_to_asha(p).await >= n
    })
    .await;
    assert!(
        reached,
        "{n} calls expected, {} placed",
        calls_to_asha(p).await
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(calls_to_asha(p).await, n, "no call beyond {n}");
}

/// Raises an incident by Passthru and waits until its call is accepted; the call's delivery.
async fn alert(app: &TestApp, sid: &str) -> exotel_sos::store::DeliveryRow {
    assert_eq!(
        app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
            .await
            .status(),
        200
    );
    accepted(app, sid).await
}

async fn accepted(app: &TestApp, sid: &str) -> exotel_sos::store::DeliveryRow {
    let ok = app
        .deliveries_until(sid, Duration::from_secs(20), |ds| {
            ds.iter().all(|d| d.status == "accepted")
        })
        .await;
    assert!(ok, "{sid}: {:?}", app.deliveries_of(sid).await);
    app.deliveries_of(sid).await.remove(0)
}

async fn no_answer(app: &TestApp, d: &exotel_sos::store::DeliveryRow) {
    let sid = d.provider_id.clone().expect("a call id");
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", sid.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
}

async fn held(app: &TestApp, sid: &str) -> exotel_sos::store::DeliveryRow {
    let ok = app
        .deliveries_until(sid, Duration::from_secs(20), |ds| {
            ds.iter().all(|d| d.status == "held")
        })
        .await;
    assert!(ok, "{sid}: {:?}", app.deliveries_of(sid).await);
    app.deliveries_of(sid).await.remove(0)
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn api_incident(app: &TestApp, id: &str) -> Value {
    app.client
        .get(format!("{}/api/v1/incidents/{id}", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn a_burst_calls_each_incident_once_and_holds_the_redials_until_the_hour_allows(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = app(db, &p, &[]).await;
    let sids: Vec<String> = (0..10).map(|i| format!("cap-burst-{i}")).collect();
    for sid in &sids {
        assert_eq!(
            app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
                .await
                .status(),
            200
        );
    }
    // Ten incidents, ten first calls: each goes, past the cap of 8.
    let mut first = Vec::new();
    for sid in &sids {
        first.push(accepted(&app, sid).await);
    }
    exactly_calls(&p, 10).await;
    assert_eq!(app.store.calls_in_last_hour(ASHA).await.unwrap(), 10);
    let past_cap = {
        let mut n = 0;
        for d in &first {
            let events = app.store.events(&d.id).await.unwrap();
            n += events.iter().filter(|e| e.kind == "cap_passed").count();
        }
        n
    };
    assert_eq!(
        past_cap, 2,
        "the 9th and 10th first calls are noted as past the cap"
    );

    // Nobody answers: each redial would be an 11th, 12th… call within the hour. They wait.
    for d in &first {
        no_answer(&app, d).await;
    }
    for sid in &sids {
        let d = held(&app, sid).await;
        let events = app.store.events(&d.id).await.unwrap();
        let hold = events
            .iter()
            .find(|e| e.kind == "held")
            .expect("a held event");
        assert!(
            hold.detail.contains("carrier-safe cap") && hold.detail.contains("called 10 times"),
            "{}",
            hold.detail
        );
        assert!(
            d.due_at > app.store.now_ms() + 3_500_000,
            "due within the hour's end"
        );
    }
    exactly_calls(&p, 10).await;
    assert_eq!(metric(&app, "sos_calls_held_total").await, 10.0);
    // The API shows them held.
    let detail = api_incident(&app, &first[0].incident_id).await;
    assert_eq!(detail["deliveries"][0]["status"], "held", "{detail}");
    assert!(
        detail["deliveries"][0]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "held"),
        "{detail}"
    );

    // An hour later the window is empty: eight redials go. The last two would wait for yet another
    // hour: held an hour already, they are given up instead, each with an event saying why.
    app.store.clock().advance(Duration::from_secs(3601));
    exactly_calls(&p, 18).await;
    let mut given_up = 0;
    for sid in &sids {
        let ok = app
            .deliveries_until(sid, Duration::from_secs(10), |ds| {
                ds[0].status == "accepted" || ds[0].status == "cancelled"
            })
            .await;
        assert!(ok, "{:?}", app.deliveries_of(sid).await);
        let d = app.deliveries_of(sid).await.remove(0);
        let events = app.store.events(&d.id).await.unwrap();
        assert!(events.iter().any(|e| e.kind == "released"), "{events:?}");
        if d.status == "cancelled" {
            given_up += 1;
            assert!(
                events
                    .iter()
                    .any(|e| e.kind == "cancelled" && e.detail.contains("given up")),
                "{events:?}"
            );
        } else {
            assert_eq!(d.redials, 1);
        }
    }
    assert_eq!(given_up, 2);
    app.store.clock().advance(Duration::from_secs(3601));
    exactly_calls(&p, 18).await;
    app.stop().await;
}

async fn held_calls_are_cancelled_by_an_acknowledgement_or_a_resolve(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = app(db, &p, &[cap(1)]).await;
    let a = alert(&app, "cap-ack-a").await;
    let b = alert(&app, "cap-ack-b").await;
    exactly_calls(&p, 2).await;
    no_answer(&app, &a).await;
    no_answer(&app, &b).await;
    held(&app, "cap-ack-a").await;
    held(&app, "cap-ack-b").await;

    let res = app
        .client
        .post(format!(
            "{}/api/v1/incidents/{}/ack",
            app.base, a.incident_id
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Duty manager"}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let res = app
        .client
        .post(format!(
            "{}/api/v1/incidents/{}/resolve",
            app.base, b.incident_id
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    for d in [&a, &b] {
        let now = app.store.delivery(&d.id).await.unwrap().unwrap();
        assert_eq!(now.status, "cancelled", "{now:?}");
    }
    // The hour passes: nothing held is left to place.
    app.store.clock().advance(Duration::from_secs(7200));
    exactly_calls(&p, 2).await;
    app.stop().await;
}

async fn the_cap_counts_calls_of_other_incidents_and_follow_ups(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = app(db, &p, &[cap(3)]).await;
    let a = alert(&app, "cap-mix-a").await;
    // A follow-up call of incident A (the one that plays a recording that came late) is a call too.
    assert!(app
        .store
        .add_followup(&a.incident_id, &a.contact_name, ASHA, &a.provider)
        .await
        .unwrap());
    app.state.wake.notify_one();
    exactly_calls(&p, 2).await;
    let b = alert(&app, "cap-mix-b").await;
    exactly_calls(&p, 3).await;
    assert_eq!(app.store.calls_in_last_hour(ASHA).await.unwrap(), 3);
    // B's redial would be a 4th call to the number within the hour, though only B's 2nd.
    no_answer(&app, &b).await;
    let d = held(&app, "cap-mix-b").await;
    let events = app.store.events(&d.id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "held" && e.detail.contains("called 3 times")),
        "{events:?}"
    );
    exactly_calls(&p, 3).await;
    app.store.clock().advance(Duration::from_secs(3601));
    exactly_calls(&p, 4).await;
    app.stop().await;
}

async fn zero_turns_the_cap_off(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = app(db, &p, &[cap(0)]).await;
    let sids: Vec<String> = (0..10).map(|i| format!("cap-off-{i}")).collect();
    let mut first = Vec::new();
    for sid in &sids {
        first.push(alert(&app, sid).await);
    }
    for d in &first {
        no_answer(&app, d).await;
    }
    exactly_calls(&p, 20).await;
    for sid in &sids {
        let d = accepted(&app, sid).await;
        assert_eq!(d.redials, 1);
    }
    assert_eq!(metric(&app, "sos_calls_held_total").await, 0.0);
    app.stop().await;
}

/// Two replicas claim redials to one number at the same moment, one call short of the cap: only one
/// call is placed; the per-number advisory lock makes the second claim count the first's placement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_never_both_place_the_call_that_reaches_the_cap() {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = app(Db::Postgres, &p, &[cap(8), without_dispatcher()]).await;
    // Seven incidents, seven first calls placed and accepted, then nobody answers: seven redials
    // wait in the queue, and the number has had seven calls this hour.
    for i in 0..7 {
        app.passthru(&format!("CallSid=cap-race-{i}&EmergencyType=Heart"))
            .await;
    }
    let first = app
        .store
        .claim_capped("exotel:call", "replica-0", Duration::from_secs(60), 7, 8)
        .await
        .unwrap();
    assert_eq!(first.rows.len(), 7);
    for (i, d) in first.rows.iter().enumerate() {
        app.store
            .finish_attempt(
                &d.id,
                d.lease_token.as_deref().unwrap(),
                &exotel_sos::store::Finish::Accepted {
                    provider_id: Some(format!("race-call-{i}")),
                    detail: "accepted".into(),
                    report_due_at: None,
                },
            )
            .await
            .unwrap();
        let d = app.store.delivery(&d.id).await.unwrap().unwrap();
        no_answer(&app, &d).await;
    }
    assert_eq!(app.store.calls_in_last_hour(ASHA).await.unwrap(), 7);
    let other = exotel_sos::store::Store::connect(&app.db.url, 2)
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        app.store
            .claim_capped("exotel:call", "replica-a", Duration::from_secs(60), 4, 8),
        other.claim_capped("exotel:call", "replica-b", Duration::from_secs(60), 4, 8),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.rows.len() + b.rows.len(),
        1,
        "one call reaches the cap: {a:?} {b:?}"
    );
    assert_eq!(a.held.len() + b.held.len(), 6);
    assert_eq!(app.store.calls_in_last_hour(ASHA).await.unwrap(), 8);
    other.close().await;
    app.stop().await;
}

/// A redial in flight when the incident is acknowledged, refused with a 503, comes back to the queue as
/// a retry: the cap would hold it for an hour, but it is never needed. It goes on to the sender, which
/// cancels it at once, and Asha is not called again.
async fn a_call_retried_after_the_acknowledgement_is_cancelled_not_held(db: Db) {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};
    let p = Providers::start().await;
    // The first call is taken; every later one is refused after a while (long enough to acknowledge).
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(FreshIds::new("call"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(ResponseTemplate::new(503).set_delay(Duration::from_millis(1500)))
        .with_priority(2)
        .mount(&p.exotel)
        .await;
    let app = app(
        db,
        &p,
        &[
            cap(2),
            ("SOS_DISPATCH__RETRY_SCHEDULE_SECS", "0.2".into()),
            ("SOS_DISPATCH__POLL_INTERVAL_MS", "50".into()),
        ],
    )
    .await;
    let a = alert(&app, "cap-retry-ack").await;
    no_answer(&app, &a).await;
    // The redial is on its way to the (slow, refusing) stand-in.
    exactly_calls_at_least(&p, 2).await;
    let res = app
        .client
        .post(format!(
            "{}/api/v1/incidents/{}/ack",
            app.base, a.incident_id
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Duty manager"}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let store = app.store.clone();
    let id = a.id.clone();
    let cancelled = eventually(Duration::from_secs(15), || {
        let store = store.clone();
        let id = id.clone();
        async move { store.delivery(&id).await.unwrap().unwrap().status == "cancelled" }
    })
    .await;
    let d = app.store.delivery(&a.id).await.unwrap().unwrap();
    assert!(cancelled, "the retry is cancelled, not held: {d:?}");
    let events = app.store.events(&a.id).await.unwrap();
    assert!(
        !events.iter().any(|e| e.kind == "held"),
        "never held: {events:?}"
    );
    app.store.clock().advance(Duration::from_secs(7200));
    exactly_calls(&p, 2).await;
    app.stop().await;
}

/// Waits until the stand-in was asked for at least `n` calls to Asha.
async fn exactly_calls_at_least(p: &Providers, n: usize) {
    let reached = eventually(Duration::from_secs(20), || async {
        calls_to_asha(p).await >= n
    })
    .await;
    assert!(
        reached,
        "{n} calls expected, {} asked",
        calls_to_asha(p).await
    );
}

/// The call was answered, its "completed" report came before the keypress's Passthru, and the redial
/// that report queued was held by the cap. The keypress still acknowledges, the incident and the
/// contact's own delivery: the API shows who acknowledged as `acknowledged`, and the redial never goes.
async fn a_keypress_arriving_after_the_redial_was_held_acknowledges_that_delivery(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = app(db, &p, &[cap(1)]).await;
    let d = alert(&app, "cap-late-press").await;
    let call_sid = d.provider_id.clone().expect("a call id");
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", call_sid.as_str()), ("Status", "completed")],
        )
        .await;
    assert_eq!(res.status(), 200);
    let d = held(&app, "cap-late-press").await;
    let res = app
        .client
        .get(format!(
            "{}/exotel/ack?token={WEBHOOK_TOKEN}&CustomField={}&digits=%221%22",
            app.base, d.greeting_ref
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        200,
        "{}",
        res.text().await.unwrap_or_default()
    );
    let d = app.deliveries_of("cap-late-press").await.remove(0);
    assert_eq!(d.status, "acknowledged", "{d:?}");
    let detail = api_incident(&app, &d.incident_id).await;
    assert_eq!(detail["status"], "acknowledged", "{detail}");
    // An hour on, the held redial does not go: the contact acknowledged.
    app.store.clock().advance(Duration::from_secs(3601));
    exactly_calls(&p, 1).await;
    app.stop().await;
}

/// A redial held by the cap, and when its hour comes the number is full again with another emergency's
/// first call: it is not held on and on (placed a day later it would ring for an emergency long
/// over). An hour after it was first held it is given up, cancelled with an event that says why.
async fn a_call_held_for_an_hour_behind_other_emergencies_is_given_up(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = app(db, &p, &[cap(1)]).await;
    let first = alert(&app, "cap-starved").await;
    no_answer(&app, &first).await;
    held(&app, "cap-starved").await;
    // Half an hour on, another emergency's first call fills the number's next hour.
    app.store.clock().advance(Duration::from_secs(1800));
    alert(&app, "cap-starver").await;
    exactly_calls(&p, 2).await;
    // The redial's hour comes: the number is still full, and the call has waited an hour.
    app.store.clock().advance(Duration::from_secs(1801));
    let ok = app
        .deliveries_until("cap-starved", Duration::from_secs(20), |ds| {
            ds[0].status == "cancelled"
        })
        .await;
    assert!(ok, "{:?}", app.deliveries_of("cap-starved").await);
    let d = app.deliveries_of("cap-starved").await.remove(0);
    let events = app.store.events(&d.id).await.unwrap();
    let last = events.last().expect("events");
    assert_eq!(last.kind, "cancelled", "{events:?}");
    assert!(
        last.detail.contains("carrier-safe cap") && last.detail.contains("given up"),
        "{}",
        last.detail
    );
    exactly_calls(&p, 2).await;
    app.stop().await;
}
