//! The Dynamic Greeting endpoint: exact content type, recording or spoken text, never an error page.

use reqwest::Method;

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    greeting_plays_the_recording_with_exact_content_type,
    greeting_speaks_text_without_a_recording,
    unknown_missing_or_unauthorised_references_get_the_generic_alert,
    head_has_no_side_effects_and_get_records_the_play,
);

const REC: &str = "https%3A%2F%2Frecordings.exotel.com%2Fexotelrecordings%2Facme%2Fabc.mp3";

async fn first_call_ref(app: &TestApp, sid: &str) -> (String, String) {
    let d = app.delivery_of(sid, "call").await;
    (d.greeting_ref, d.id)
}

async fn greeting_plays_the_recording_with_exact_content_type(db: Db) {
    let app = spawn_app(db).await;
    let sid = "cccc0000000000000000000000000001";
    app.passthru(&format!(
        "CallSid={sid}&EmergencyType=Heart&RecordingUrl={REC}"
    ))
    .await;
    let (reference, _) = first_call_ref(&app, sid).await;
    for method in [Method::GET, Method::HEAD] {
        let res = app.greeting(method.clone(), &reference).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "text/plain", "{method}");
        let body = res.text().await.unwrap();
        if method == Method::GET {
            let url = "https://recordings.exotel.com/exotelrecordings/acme/abc.mp3";
            assert_eq!(
                body,
                format!("{url}\n{url}"),
                "played twice, one URL a line"
            );
        } else {
            assert!(body.is_empty());
        }
    }
    app.stop().await;
}

async fn greeting_speaks_text_without_a_recording(db: Db) {
    let app = spawn_app(db).await;
    let sid = "cccc0000000000000000000000000002";
    app.passthru(&format!("CallSid={sid}&EmergencyType=brain"))
        .await;
    let (reference, _) = first_call_ref(&app, sid).await;
    let res = app.greeting(Method::GET, &reference).await;
    assert_eq!(res.headers()["content-type"], "text/plain");
    let body = res.text().await.unwrap();
    assert!(
        body.starts_with("Emergency alert. Brain emergency"),
        "{body}"
    );
    assert!(!body.contains('\n'));
    assert!(!body.starts_with("http"));
    app.stop().await;
}

async fn unknown_missing_or_unauthorised_references_get_the_generic_alert(db: Db) {
    let app = spawn_app(db).await;
    let sid = "cccc0000000000000000000000000003";
    app.passthru(&format!(
        "CallSid={sid}&EmergencyType=Heart&RecordingUrl={REC}"
    ))
    .await;
    let (reference, _) = first_call_ref(&app, sid).await;
    let urls = [
        format!(
            "{}/exotel/greeting?token={WEBHOOK_TOKEN}&CustomField=nope",
            app.base
        ),
        format!("{}/exotel/greeting?token={WEBHOOK_TOKEN}", app.base),
        format!(
            "{}/exotel/greeting?token={WEBHOOK_TOKEN}&CustomField=",
            app.base
        ),
        format!(
            "{}/exotel/greeting?token={WEBHOOK_TOKEN}&CustomField={}",
            app.base,
            "r".repeat(5000)
        ),
        format!(
            "{}/exotel/greeting?token={WEBHOOK_TOKEN}&CustomField=%27%3Cscript%3E%27",
            app.base
        ),
        // Right reference, wrong token: nothing stored is revealed.
        format!(
            "{}/exotel/greeting?token=wrong&CustomField={reference}",
            app.base
        ),
        format!("{}/exotel/greeting?CustomField={reference}", app.base),
    ];
    for url in urls {
        let res = app.client.get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200, "{url}");
        assert_eq!(res.headers()["content-type"], "text/plain");
        let body = res.text().await.unwrap();
        assert!(
            body.starts_with("Emergency alert from the hospital"),
            "{body}"
        );
        assert!(!body.contains("recordings.exotel.com"));
    }
    app.stop().await;
}

async fn head_has_no_side_effects_and_get_records_the_play(db: Db) {
    let app = spawn_app(db).await;
    let sid = "cccc0000000000000000000000000004";
    app.passthru(&format!(
        "CallSid={sid}&EmergencyType=Heart&RecordingUrl={REC}"
    ))
    .await;
    let (reference, delivery_id) = first_call_ref(&app, sid).await;
    app.greeting(Method::HEAD, &reference).await;
    app.greeting(Method::HEAD, &reference).await;
    let plays = |events: Vec<exotel_sos::store::EventRow>| {
        events
            .iter()
            .filter(|e| e.kind == "greeting_played")
            .count()
    };
    assert_eq!(plays(app.store.events(&delivery_id).await.unwrap()), 0);
    app.greeting(Method::GET, &reference).await;
    // Recorded beside the answer, so a moment later.
    let store = app.store.clone();
    assert!(
        eventually(std::time::Duration::from_secs(5), || {
            let store = store.clone();
            let id = delivery_id.clone();
            async move { plays(store.events(&id).await.unwrap()) == 1 }
        })
        .await
    );
    app.stop().await;
}
