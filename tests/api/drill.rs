//! Fire drills (`exotel-sos drill` and the API's `drill_contact`) and the start-up warnings about a
//! set-up that could not work live.

use std::time::Duration;

use exotel_sos::App;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    a_drill_reaches_only_the_named_contact_on_every_channel,
    the_drill_command_prints_each_channel_and_fails_in_dry_run,
    the_drill_command_fails_when_a_channel_is_not_reached,
    start_up_warnings_of_an_unreachable_public_url_and_sample_numbers,
);

const BIN: &str = env!("CARGO_BIN_EXE_exotel-sos");

async fn drill(app: &TestApp, contact: &str) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOS_") || k == "RUST_LOG") {
        cmd.env_remove(k);
    }
    cmd.env("SOS_DATABASE__URL", &app.db.url)
        .env("SOS_SERVER__PUBLIC_URL", &app.base)
        .args([
            "drill",
            "--contact",
            contact,
            "--token",
            ADMIN_TOKEN,
            "--wait",
            "20",
        ]);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the drill finishes")
        .expect("the drill runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A drill names one contact: only they are alerted, on each of their channels, whatever the routes,
/// and the incident says it is a drill. An unknown name is refused, naming the field.
async fn api_post(app: &TestApp, body: serde_json::Value) -> reqwest::Response {
    app.client
        .post(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn a_drill_reaches_only_the_named_contact_on_every_channel(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let res = api_post(
        &app,
        serde_json::json!({
            "emergency_type": "Drill",
            "message": "test",
            "drill_contact": "  emergency DESK ",
        }),
    )
    .await;
    assert_eq!(res.status(), 201);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["source"], "drill");
    assert_eq!(body["route"], "drill");
    let deliveries = body["deliveries"].as_array().unwrap();
    let channels: Vec<&str> = deliveries
        .iter()
        .map(|d| d["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["call", "sms"], "{body}");
    assert!(deliveries
        .iter()
        .all(|d| d["contact_name"] == "Emergency desk"));

    let res = api_post(
        &app,
        serde_json::json!({"emergency_type": "Drill", "message": "t", "drill_contact": "Dr. Nobody"}),
    )
    .await;
    assert_eq!(res.status(), 422);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["field"], "drill_contact");
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    app.stop().await;
}

/// In dry-run every channel is simulated: the drill prints each, says nothing was sent, and does not
/// pass (it proves the routing, not the phone).
async fn the_drill_command_prints_each_channel_and_fails_in_dry_run(db: Db) {
    let app = spawn_app(db).await;
    let (code, stdout, stderr) = drill(&app, "Central lab").await;
    assert_eq!(code, 6, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("sms") && stdout.contains("whatsapp"),
        "{stdout}"
    );
    assert!(
        stdout.contains("simulated") && stdout.contains("dry-run"),
        "{stdout}"
    );
    assert!(stdout.contains("NOT passed"), "{stdout}");
    let (code, _, stderr) = drill(&app, "Nobody").await;
    assert_eq!(code, 5, "an unknown contact is invalid input: {stderr}");
    assert!(stderr.contains("drill_contact"), "{stderr}");
    app.stop().await;
}

/// A channel that cannot reach the contact fails the drill (exit 6) and says why.
async fn the_drill_command_fails_when_a_channel_is_not_reached(db: Db) {
    let p = Providers::start().await;
    Mock::given(method("POST"))
        .and(path(SMS_PATH))
        .respond_with(ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "RestException": {"Status": 400, "Message": "The number is in DND"}
        })))
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let app = spawn_app_with(db, &p.env()).await;
    let (code, stdout, stderr) = drill(&app, "Central lab").await;
    assert_eq!(code, 6, "{stdout}\n{stderr}");
    assert!(stdout.contains("failed"), "{stdout}");
    assert!(stdout.contains("NOT passed"), "{stdout}");
    app.stop().await;
}

/// Live channels with a public URL Exotel cannot reach, and the example file's numbers, are named at
/// start.
async fn start_up_warnings_of_an_unreachable_public_url_and_sample_numbers(db: Db) {
    let p = Providers::start().await;
    let db = TestDb::new(db).await;
    let stakeholders = db.dir().join("stakeholders.toml");
    std::fs::write(&stakeholders, STAKEHOLDERS).unwrap();
    let mut env = p.env();
    env.push(("SOS_SERVER__PUBLIC_URL", "http://127.0.0.1:8080".into()));
    let app = App::build(test_settings(&db, &stakeholders, &env))
        .await
        .unwrap();
    let warnings = app.warnings().join("\n");
    assert!(warnings.contains("server.public_url"), "{warnings}");
    assert!(warnings.contains("sample number"), "{warnings}");
    assert!(app.banner().contains("WARNING: server.public_url"));
    app.state.store.close().await;
    drop(db);
}
