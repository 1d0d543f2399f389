//! Multipart bodies as senders really spell them: the boundary is case-sensitive, the media type is not.

use crate::helpers::*;

const SID: &str = "e12eb6e6fcd920019d7174b60099187v";

/// A multipart/form-data body of `fields` with this boundary.
fn multipart(boundary: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut body = String::new();
    for (name, value) in fields {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    body.into_bytes()
}

async fn post_multipart(
    app: &TestApp,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> reqwest::Response {
    app.client
        .post(format!("{}{path}?token={WEBHOOK_TOKEN}", app.base))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_case_boundary_is_read_on_the_passthru() {
    let app = spawn_app_with(Db::Sqlite, &[without_dispatcher()]).await;
    let body = multipart(
        "XyZ-Boundary-9aB",
        &[("CallSid", SID), ("EmergencyType", "Heart")],
    );
    let res = post_multipart(
        &app,
        "/exotel/passthru",
        "Multipart/Form-Data; boundary=XyZ-Boundary-9aB",
        body,
    )
    .await;
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    let inc = app
        .store
        .incident_by_call_sid(SID)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(inc.emergency_type, "Heart");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_case_boundary_is_read_on_the_call_status_callback() {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn_app_with(Db::Sqlite, &p.env()).await;
    assert_eq!(
        app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
            .await
            .status(),
        200
    );
    app.settled(SID).await;
    let call = app.delivery_of(SID, "call").await;
    let provider_id = call.provider_id.clone().expect("a call sid");
    let body = multipart(
        "----WebKitFormBoundaryQz7Xk",
        &[
            ("CallSid", provider_id.as_str()),
            ("Status", "completed"),
            ("EventType", "terminal"),
        ],
    );
    let res = post_multipart(
        &app,
        "/exotel/call-status",
        "multipart/form-data; boundary=----WebKitFormBoundaryQz7Xk",
        body,
    )
    .await;
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    let after = app.store.delivery(&call.id).await.unwrap().unwrap();
    assert_eq!(after.provider_status.as_deref(), Some("completed"));
    app.stop().await;
}
