//! `HEAD /exotel/passthru` is a probe, never an emergency.

use crate::helpers::*;

const SID: &str = "e12eb6e6fcd920019d7174b60099187v";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_the_passthru_stores_nothing_and_pages_nobody() {
    let app = spawn_app_with(Db::Sqlite, &[without_dispatcher()]).await;
    let res = app
        .client
        .head(format!(
            "{}/exotel/passthru?token={WEBHOOK_TOKEN}&CallSid={SID}&EmergencyType=Heart",
            app.base
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 200);
    assert_eq!(app.store.count_incidents().await.unwrap(), 0);
    assert!(app.store.incident_by_call_sid(SID).await.unwrap().is_none());
    // The GET that follows the probe is the emergency.
    assert_eq!(
        app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
            .await
            .status(),
        200
    );
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    app.stop().await;
}
