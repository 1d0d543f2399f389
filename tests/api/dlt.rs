//! SMS under India's DLT rules, against the Exotel stand-in: the SMS type and priority, Unicode for text
//! outside GSM-7, each message kind's DLT template id, byte-exact text; and `check-config`'s report of
//! the templates to register.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    passthru_and_api_alerts_carry_their_own_template_and_id,
    a_hindi_name_goes_as_unicode_in_the_registered_text,
    empty_settings_leave_the_fields_out,
);

const SID: &str = "d1t0b6e6fcd920019d7174b60099187a";

/// The SMS requests the stand-in received for these deliveries (matched by `CustomField`).
async fn sms_for(
    p: &Providers,
    deliveries: &[exotel_sos::store::DeliveryRow],
) -> Vec<Vec<(String, String)>> {
    let refs: Vec<&str> = deliveries
        .iter()
        .filter(|d| d.channel == "sms")
        .map(|d| d.greeting_ref.as_str())
        .collect();
    p.requests(SMS_PATH)
        .await
        .into_iter()
        .map(|(form, _)| form)
        .filter(|form| field(form, "CustomField").is_some_and(|r| refs.contains(&r)))
        .collect()
}

/// Raises an incident through the API; its id.
async fn api_trigger(app: &TestApp, body: serde_json::Value) -> String {
    let res = app
        .client
        .post(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: serde_json::Value = res.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

/// Waits until every SMS of the incident has been sent.
async fn sent_sms(app: &TestApp, p: &Providers, incident_id: &str) -> Vec<Vec<(String, String)>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ds = app.store.deliveries(incident_id).await.unwrap_or_default();
        let expected = ds.iter().filter(|d| d.channel == "sms").count();
        let found = sms_for(p, &ds).await;
        if expected > 0 && found.len() >= expected {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the SMS of {incident_id} were not sent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn passthru_and_api_alerts_carry_their_own_template_and_id(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let mut env = p.env();
    env.extend([
        ("SOS_MESSAGES__BRAND", "City Hospital".to_owned()),
        (
            "SOS_MESSAGES__KINDS__API_ALERT__SMS",
            "{brand}: {type} alert. {message}".to_owned(),
        ),
        (
            "SOS_MESSAGES__KINDS__API_ALERT__DLT_TEMPLATE_ID",
            "1107000000000000003".to_owned(),
        ),
    ]);
    let app = spawn_app_with(db, &env).await;

    assert_eq!(
        app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
            .await
            .status(),
        200
    );
    let passthru = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    let sms = sent_sms(&app, &p, &passthru.id).await;
    assert_eq!(sms.len(), 3, "Asha, the desk and the lab");
    for form in &sms {
        assert_eq!(field(form, "SmsType"), Some("transactional"));
        assert_eq!(field(form, "Priority"), Some("high"));
        assert_eq!(field(form, "DltEntityId"), Some("1101000000000000001"));
        assert_eq!(field(form, "DltTemplateId"), Some("1107000000000000002"));
        assert_eq!(field(form, "EncodingType"), None, "GSM-7 text goes plain");
        let body = field(form, "Body").unwrap();
        // The alert's text, byte for byte: no message and no recording are NA, nothing collapsed.
        assert!(
            body.starts_with("SOS Heart alert from exotel at "),
            "{body}"
        );
        // Then this recipient's own acknowledge link.
        let (text, link) = body.rsplit_once(" Ack: ").expect("an acknowledge link");
        assert!(text.ends_with(". NA NA"), "{body}");
        assert!(link.contains("/a/") && !link.contains(' '), "{body}");
    }

    let id = api_trigger(
        &app,
        json!({"emergency_type": "Brain", "message": "Core switch down in the server room, all floors"}),
    )
    .await;
    let sms = sent_sms(&app, &p, &id).await;
    assert_eq!(sms.len(), 3, "Vikram, Asha and the desk");
    for form in &sms {
        assert_eq!(field(form, "DltTemplateId"), Some("1107000000000000003"));
        assert_eq!(
            field(form, "Body"),
            Some("City Hospital: Brain alert. Core switch down in the..")
        );
    }
    app.stop().await;
}

async fn a_hindi_name_goes_as_unicode_in_the_registered_text(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let test_db = TestDb::new(db).await;
    let stakeholders = test_db.dir().join("stakeholders.toml");
    std::fs::write(
        &stakeholders,
        r#"
[[contact]]
name = "डॉ. आशा राव"
phone = "+919800000001"
channels = ["sms"]
teams = ["desk"]

[[contact]]
name = "Dr. Vikram Iyer"
phone = "+919800000002"
channels = ["sms"]
teams = ["desk"]

[routes]
default = ["desk"]
"#,
    )
    .unwrap();
    let mut env = p.env();
    env.extend([
        (
            "SOS_SERVER__PUBLIC_URL",
            "https://sos.example.org".to_owned(),
        ),
        ("SOS_MESSAGES__BRAND", "City Hospital".to_owned()),
        (
            "SOS_MESSAGES__SMS",
            "{brand}: {name}, SOS {type}  from {caller}. Listen: {public_url}/r/{ref}".to_owned(),
        ),
    ]);
    let settings = test_settings(&test_db, &stakeholders, &env);
    let app = start(test_db, stakeholders, settings).await;
    app.passthru(&format!(
        "CallSid={SID}&CallFrom=09901320691&EmergencyType=Heart&RecordingUrl=https%3A%2F%2Frecordings.exotel.com%2Fa.mp3"
    ))
    .await;
    let ds = app.settled(SID).await;
    let sms = sms_for(&p, &ds).await;
    assert_eq!(sms.len(), 2);
    for d in &ds {
        let form = sms
            .iter()
            .find(|f| field(f, "CustomField") == Some(d.greeting_ref.as_str()))
            .unwrap();
        let link_ref = d.link_ref.as_deref().unwrap();
        let expected = format!(
            "City Hospital: {}, SOS Heart  from +919901320691. Listen: https://sos.example.org/r/{link_ref}",
            d.contact_name
        );
        assert_eq!(field(form, "Body"), Some(expected.as_str()));
        assert_eq!(link_ref.len(), 22, "a reference fits one DLT variable");
        let unicode = d.contact_name.starts_with("डॉ");
        assert_eq!(
            field(form, "EncodingType"),
            unicode.then_some("unicode"),
            "{}",
            d.contact_name
        );
    }
    app.stop().await;
}

async fn empty_settings_leave_the_fields_out(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let mut env = p.env();
    env.extend([
        ("SOS_EXOTEL__SMS_TYPE", String::new()),
        ("SOS_EXOTEL__SMS_PRIORITY", String::new()),
        ("SOS_EXOTEL__DLT_TEMPLATE_ID", String::new()),
        ("SOS_EXOTEL__DLT_ENTITY_ID", String::new()),
    ]);
    let app = spawn_app_with(db, &env).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Brain"))
        .await;
    let ds = app.settled(SID).await;
    let sms = sms_for(&p, &ds).await;
    assert_eq!(sms.len(), 3);
    for form in &sms {
        for key in [
            "SmsType",
            "Priority",
            "DltTemplateId",
            "DltEntityId",
            "EncodingType",
        ] {
            assert_eq!(field(form, key), None, "{key}");
        }
    }
    app.stop().await;
}

/// `exotel-sos check-config` with these settings: (exit status ok, stdout and stderr).
fn check_config(env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stakeholders.toml");
    std::fs::write(&file, STAKEHOLDERS).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_exotel-sos"));
    cmd.arg("check-config")
        .env("SOS_STAKEHOLDERS__FILE", &file)
        .env(
            "SOS_DATABASE__URL",
            format!("sqlite://{}/x.db?mode=rwc", dir.path().display()),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const LIVE_SMS: [(&str, &str); 4] = [
    ("SOS_EXOTEL__ACCOUNT_SID", "acme"),
    ("SOS_EXOTEL__API_KEY", "key123"),
    ("SOS_EXOTEL__API_TOKEN", "tok456"),
    ("SOS_EXOTEL__SMS_FROM", "HOSPTL"),
];

#[test]
fn check_config_prints_each_template_as_it_must_be_registered() {
    let mut env = LIVE_SMS.to_vec();
    env.extend([
        ("SOS_SERVER__PUBLIC_URL", "https://sos.example.org"),
        ("SOS_MESSAGES__BRAND", "City Hospital"),
        ("SOS_EXOTEL__DLT_TEMPLATE_ID", "1107000000000000002"),
        (
            "SOS_MESSAGES__SMS",
            "{brand} SOS: {type} from {caller} at {time}. Listen: {public_url}/r/{ref}",
        ),
        (
            "SOS_MESSAGES__KINDS__API_ALERT__SMS",
            "City Hospital alert: {type}. {message}",
        ),
        (
            "SOS_MESSAGES__KINDS__API_ALERT__DLT_TEMPLATE_ID",
            "1107000000000000003",
        ),
        ("SOS_MESSAGES__KINDS__DRILL__WHATSAPP_TEMPLATE", "sos_drill"),
    ]);
    let (ok, text) = check_config(&env);
    assert!(ok, "{text}");
    for needle in [
        "alert: DLT template id 1107000000000000002",
        "register: City Hospital SOS: {#var#} from {#var#} at {#var#}. Listen: https://sos.example.org/r/{#var#}",
        "whitelist the URL: https://sos.example.org/r/",
        "api_alert: DLT template id 1107000000000000003",
        "register: City Hospital alert: {#var#}. {#var#}",
        "2 variable(s)",
        "ack_notice: the alert's SMS text; DLT template id 1107000000000000002",
        "drill: the alert's SMS text; DLT template id 1107000000000000002; WhatsApp template sos_drill",
        "fallback:",
        "unreached_alarm:",
        "up to 1 SMS in GSM-7",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(!text.contains("error:"), "{text}");
}

#[test]
fn template_problems_are_errors_when_sms_is_live_and_warnings_otherwise() {
    // The defaults: no brand, and a recording link that may be longer than a DLT link variable.
    let long_url = [(
        "SOS_SERVER__PUBLIC_URL",
        "https://emergency-alerts.city-hospital.example.org",
    )];
    let (ok, text) = check_config(&long_url);
    assert!(ok, "dry-run: warnings only\n{text}");
    assert!(text.contains("warning: messages.brand is empty"), "{text}");
    assert!(
        text.contains("warning: messages kind alert: {recording} can hold"),
        "{text}"
    );

    let mut env = LIVE_SMS.to_vec();
    env.extend(long_url);
    let (ok, text) = check_config(&env);
    assert!(!ok, "live SMS: errors\n{text}");
    assert!(text.contains("error: messages.brand is empty"), "{text}");
    assert!(
        text.contains("error: messages kind alert: {recording} can hold"),
        "{text}"
    );
    assert!(
        text.contains(
            "register: SOS {#var#} alert from {#var#} at {#var#}. {#var#} {#var#} Ack: {#var#}"
        ),
        "the template is printed even when it fails: {text}"
    );

    env.extend([
        ("SOS_MESSAGES__BRAND", "City Hospital"),
        ("SOS_MESSAGES__SMS", "City Hospital: {type}{caller}"),
        (
            "SOS_MESSAGES__KINDS__ACK_NOTICE__SMS",
            "{type} acknowledged",
        ),
    ]);
    let (ok, text) = check_config(&env);
    assert!(!ok, "{text}");
    for needle in [
        "error: messages kind alert: two placeholders stand side by side",
        "error: messages kind ack_notice: the static text does not name the brand \"City Hospital\"",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn an_unknown_kind_or_sms_type_is_a_settings_error() {
    let (ok, text) = check_config(&[
        ("SOS_MESSAGES__KINDS__ACK__SMS", "x"),
        ("SOS_EXOTEL__SMS_TYPE", "urgent"),
    ]);
    assert!(!ok);
    assert!(
        text.contains("messages.kinds.ack is not a message kind"),
        "{text}"
    );
    assert!(text.contains("exotel.sms_type \"urgent\""), "{text}");
}

#[test]
fn acknowledge_links_are_dlt_variables_like_the_recording_link() {
    let mut env = LIVE_SMS.to_vec();
    env.extend([
        ("SOS_SERVER__PUBLIC_URL", "https://sos.example.org"),
        ("SOS_MESSAGES__BRAND", "City Hospital"),
        ("SOS_EXOTEL__DLT_TEMPLATE_ID", "1107000000000000002"),
        (
            "SOS_MESSAGES__SMS",
            "{brand} SOS: {type} at {time}. Acknowledge: {public_url}/a/{ack_ref}",
        ),
        (
            "SOS_MESSAGES__KINDS__ACK_NOTICE__SMS",
            "{brand}: {by} acknowledged the {type} emergency at {ack_time}.",
        ),
        (
            "SOS_MESSAGES__KINDS__ACK_NOTICE__DLT_TEMPLATE_ID",
            "1107000000000000004",
        ),
    ]);
    let (ok, text) = check_config(&env);
    assert!(ok, "{text}");
    for needle in [
        "register: City Hospital SOS: {#var#} at {#var#}. Acknowledge: https://sos.example.org/a/{#var#}",
        "whitelist the URL: https://sos.example.org/a/",
        "register: City Hospital: {#var#} acknowledged the {#var#} emergency at {#var#}.",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(!text.contains("is no placeholder"), "{text}");

    // The whole link as one variable must fit DLT's 50 characters: a long public_url does not.
    env.extend([
        (
            "SOS_SERVER__PUBLIC_URL",
            "https://emergency-alerts.city-hospital.example.org",
        ),
        (
            "SOS_MESSAGES__SMS",
            "{brand} SOS: {type}. Acknowledge: {ack}",
        ),
    ]);
    let (ok, text) = check_config(&env);
    assert!(!ok, "{text}");
    assert!(
        text.contains("error: messages kind alert: {ack} can hold"),
        "{text}"
    );
}
