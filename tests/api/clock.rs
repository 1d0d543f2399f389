//! Time in one place: redials and retries are due by the store's clock, which a test moves forward, so
//! an hour's wait is tested in seconds and nothing waits on the wall clock behind its back.

use std::time::Duration;

use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    a_redial_an_hour_away_goes_when_the_clock_gets_there,
    a_retry_waits_for_the_clock
);

const DESK: &str = "+919800000004";

async fn calls_to(p: &Providers, phone: &str) -> usize {
    p.requests(CALLS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "From") == Some(phone))
        .count()
}

async fn a_redial_an_hour_away_goes_when_the_clock_gets_there(db: Db) {
    const SID: &str = "clock-redial";
    let p = Providers::start().await;
    mount_happy(&p).await;
    let mut env = p.env();
    env.push(("SOS_DISPATCH__REDIAL_DELAY_SECS", "3600".into()));
    env.push(("SOS_DISPATCH__MAX_REDIALS", "1".into()));
    env.push(("SOS_DISPATCH__POLL_INTERVAL_MS", "50".into()));
    let app = spawn_app_with(db, &env).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    let desk = ds
        .iter()
        .find(|d| d.channel == "call" && d.phone == DESK)
        .unwrap()
        .clone();
    let sid = desk.provider_id.clone().unwrap();
    let res = app
        .post_form(
            "/exotel/call-status",
            &[("CallSid", sid.as_str()), ("Status", "no-answer")],
        )
        .await;
    assert_eq!(res.status(), 200);
    let d = app.store.delivery(&desk.id).await.unwrap().unwrap();
    assert_eq!(d.status, "queued", "the redial waits");
    let wait = d.due_at - app.store.now_ms();
    assert!(
        (3_500_000..=3_600_000).contains(&wait),
        "due in an hour by the store's clock: {wait} ms"
    );
    // Real time passes; the store's clock has not reached the redial yet.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(calls_to(&p, DESK).await, 1);

    app.store.clock().advance(Duration::from_secs(3601));
    let store = app.store.clone();
    let id = desk.id.clone();
    let redialled = eventually(Duration::from_secs(15), || {
        let store = store.clone();
        let id = id.clone();
        async move {
            let d = store.delivery(&id).await.unwrap().unwrap();
            d.redials == 1 && d.status == "accepted"
        }
    })
    .await;
    assert!(
        redialled,
        "the redial went once the clock passed its due time"
    );
    assert_eq!(calls_to(&p, DESK).await, 2);
    app.stop().await;
}

async fn a_retry_waits_for_the_clock(db: Db) {
    const SID: &str = "clock-retry";
    let p = Providers::start().await;
    // The first SMS is refused for a moment; the retry ten minutes later is taken.
    Mock::given(method("POST"))
        .and(path(SMS_PATH))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let mut env = p.env();
    env.push(("SOS_DISPATCH__RETRY_SCHEDULE_SECS", "600".into()));
    env.push(("SOS_DISPATCH__POLL_INTERVAL_MS", "50".into()));
    let app = spawn_app_with(db, &env).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Brain"))
        .await;
    let waiting = app
        .deliveries_until(SID, Duration::from_secs(15), |ds| {
            ds.iter()
                .any(|d| d.channel == "sms" && d.status == "queued" && d.attempts == 1)
        })
        .await;
    assert!(waiting, "the refused SMS waits for its retry");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sms_before = p.requests(SMS_PATH).await.len();
    let still = app.deliveries_of(SID).await;
    assert!(
        still
            .iter()
            .any(|d| d.channel == "sms" && d.status == "queued" && d.attempts == 1),
        "not retried on the wall clock: {still:?}"
    );
    // The schedule's 600 s plus at most 20% jitter.
    app.store.clock().advance(Duration::from_secs(721));
    let sent = app
        .deliveries_until(SID, Duration::from_secs(15), |ds| {
            ds.iter()
                .filter(|d| d.channel == "sms")
                .all(|d| d.status != "queued" && d.status != "sending")
        })
        .await;
    assert!(sent, "the retry went once the clock passed its due time");
    assert!(p.requests(SMS_PATH).await.len() > sms_before);
    app.stop().await;
}
