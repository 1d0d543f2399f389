//! Alarms: an incident nobody acknowledged by `ack.deadline` is marked unreached and alarmed to the
//! `[unreached]` teams and the alarm webhook; provider answers that refuse the account, and bursts of
//! bad webhook tokens, raise one account alarm and mark `/readyz` degraded. Time is moved with the
//! store's clock.

use std::time::Duration;

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    an_incident_nobody_acknowledged_is_marked_unreached_after_the_deadline_not_before,
    the_alarm_webhook_failing_twice_is_retried_and_sent_once,
    an_alarm_webhook_refusing_with_404_is_not_retried,
    an_unreached_incident_keeps_its_dedup_key_and_can_be_resolved,
    an_acknowledged_incident_is_never_marked_unreached,
    a_drill_is_never_marked_unreached,
    a_keypress_on_the_alarm_call_acknowledges_the_incident,
    exotel_refusing_the_account_raises_one_alarm_and_degrades_readyz,
    exotel_402_raises_the_payment_alarm,
    a_gupshup_credit_error_raises_one_alarm,
    a_burst_of_bad_webhook_tokens_raises_one_alarm,
    wrong_tokens_from_scanners_page_nobody_and_are_reported,
    a_wrong_token_on_a_genuine_looking_passthru_still_pages,
    a_dlt_template_block_in_the_sms_report_raises_one_alarm,
    gupshup_requests_neither_raise_nor_clear_the_token_alarm_and_it_pages_once_an_hour,
    a_flow_url_saved_without_its_token_raises_the_token_alarm,
    a_delivered_sms_of_another_template_does_not_clear_a_template_alarm,
    an_sms_accepted_with_a_dlt_block_code_raises_the_template_alarm,
    the_first_acknowledgement_cancels_alarm_messages_still_queued,
    incidents_stored_without_a_deadline_are_never_marked_unreached,
    an_alarm_call_waits_while_the_incidents_own_call_still_rings,
    an_account_alarm_pages_its_people_while_the_alarm_webhook_hangs,
    alarm_webhook_posts_run_side_by_side_up_to_a_bound,
    a_hanging_webhook_post_holds_no_other_and_is_retried_until_taken,
);

/// [`STAKEHOLDERS`] with a duty manager (call and SMS) alarmed when nobody acknowledges.
fn stakeholders_with_unreached() -> String {
    stakeholders_with_duty_on("[\"call\", \"sms\"]")
}

/// [`STAKEHOLDERS`] with a duty manager on `channels` (a TOML array) alarmed when nobody acknowledges.
fn stakeholders_with_duty_on(channels: &str) -> String {
    let (contacts, rest) = STAKEHOLDERS.split_once("[routes]").unwrap();
    format!(
        "{contacts}
[[contact]]
name = \"Duty manager\"
phone = \"+919800000009\"
channels = {channels}
teams = [\"duty-manager\"]

[routes]{rest}
[unreached]
teams = [\"duty-manager\"]
"
    )
}

const DUTY: &str = "+919800000009";
const DEADLINE_MINUTES: u64 = 15;

async fn spawn_alarm_app(db: Db, p: &Providers, extra: &[(&'static str, String)]) -> TestApp {
    spawn_alarm_app_on(db, p, extra, &stakeholders_with_unreached()).await
}

async fn spawn_alarm_app_on(
    db: Db,
    p: &Providers,
    extra: &[(&'static str, String)],
    stakeholders_text: &str,
) -> TestApp {
    let db = TestDb::new(db).await;
    let stakeholders = db.dir().join("stakeholders.toml");
    std::fs::write(&stakeholders, stakeholders_text).unwrap();
    let mut env = p.env();
    env.push(("SOS_DISPATCH__MAX_REDIALS", "0".into()));
    env.push(("SOS_ACK__DEADLINE", format!("{DEADLINE_MINUTES}m")));
    env.extend(extra.iter().cloned());
    let settings = test_settings(&db, &stakeholders, &env);
    start(db, stakeholders, settings).await
}

/// A receiver for the alarm webhook at `/hook`.
async fn hook() -> (MockServer, String) {
    let server = MockServer::start().await;
    let url = format!("{}/hook", server.uri());
    (server, url)
}

async fn hook_posts(server: &MockServer) -> Vec<serde_json::Value> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path() == "/hook")
        .map(|r| serde_json::from_slice(&r.body).expect("the alarm is JSON"))
        .collect()
}

async fn incident_of(app: &TestApp, sid: &str) -> exotel_sos::store::IncidentRow {
    app.store.incident_by_call_sid(sid).await.unwrap().unwrap()
}

async fn alarm_deliveries(app: &TestApp, incident_id: &str) -> Vec<exotel_sos::store::DeliveryRow> {
    app.store
        .deliveries(incident_id)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.purpose == "alarm")
        .collect()
}

async fn wait_unreached(app: &TestApp, sid: &str) -> exotel_sos::store::IncidentRow {
    let store = app.store.clone();
    let sid2 = sid.to_owned();
    let marked = eventually(Duration::from_secs(10), || {
        let store = store.clone();
        let sid = sid2.clone();
        async move {
            store
                .incident_by_call_sid(&sid)
                .await
                .ok()
                .flatten()
                .is_some_and(|i| i.unreached_at.is_some())
        }
    })
    .await;
    assert!(marked, "{sid} is marked unreached");
    incident_of(app, sid).await
}

async fn metrics(app: &TestApp) -> String {
    app.client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn readyz(app: &TestApp) -> (u16, serde_json::Value) {
    let res = app
        .client
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

async fn alarms_api(app: &TestApp) -> Vec<serde_json::Value> {
    let res = app
        .client
        .get(format!("{}/api/v1/alarms", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// Nothing before the deadline; once it passes: the flag, an `unreached` event, the metric, the duty
/// manager alarmed on call and SMS (the SMS with the alarm's news) and one webhook POST with the
/// incident, who was tried and the links. Nothing of the incident's own deliveries is cancelled.
async fn an_incident_nobody_acknowledged_is_marked_unreached_after_the_deadline_not_before(db: Db) {
    const SID: &str = "unreached1";
    let p = Providers::start().await;
    mount_happy(&p).await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let app = spawn_alarm_app(db, &p, &[("SOS_ALARMS__WEBHOOK_URL", url)]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let before = app.settled(SID).await;
    assert_eq!(before.len(), HEART_DELIVERIES);

    app.store
        .clock()
        .advance(Duration::from_secs(DEADLINE_MINUTES * 60 - 60));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let inc = incident_of(&app, SID).await;
    assert_eq!(inc.unreached_at, None, "not before the deadline");
    assert!(alarm_deliveries(&app, &inc.id).await.is_empty());
    assert!(hook_posts(&server).await.is_empty());

    app.store.clock().advance(Duration::from_secs(120));
    let inc = wait_unreached(&app, SID).await;
    assert_eq!(inc.status, "open", "a flag, not a status");
    let timeline = app.store.incident_timeline(&inc.id).await.unwrap();
    assert_eq!(
        timeline.iter().filter(|e| e.kind == "unreached").count(),
        1,
        "{timeline:?}"
    );
    let settled = eventually(Duration::from_secs(15), || async {
        let ds = alarm_deliveries(&app, &inc.id).await;
        ds.len() == 2
            && ds
                .iter()
                .all(|d| d.status != "queued" && d.status != "sending")
    })
    .await;
    let alarms = alarm_deliveries(&app, &inc.id).await;
    assert!(settled, "{alarms:?}");
    assert!(alarms.iter().all(|d| d.phone == DUTY), "{alarms:?}");
    let mut channels: Vec<String> = alarms.iter().map(|d| d.channel.to_string()).collect();
    channels.sort();
    assert_eq!(channels, ["call", "sms"]);
    let duty_sms: Vec<String> = p
        .requests(SMS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "To") == Some(DUTY))
        .map(|(f, _)| field(&f, "Body").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(duty_sms.len(), 1, "{duty_sms:?}");
    assert!(duty_sms[0].contains("NOT ACKNOWLEDGED"), "{duty_sms:?}");
    // Escalation goes on: nothing of the incident was cancelled by the alarm.
    let own = app.store.deliveries(&inc.id).await.unwrap();
    assert!(own.iter().all(|d| d.status != "cancelled"), "{own:?}");

    let posted = eventually(Duration::from_secs(10), || async {
        !hook_posts(&server).await.is_empty()
    })
    .await;
    assert!(posted, "the webhook is called");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let posts = hook_posts(&server).await;
    assert_eq!(posts.len(), 1, "once: {posts:?}");
    let body = &posts[0];
    assert_eq!(body["type"], "unreached");
    assert_eq!(body["incident_id"], inc.id.as_str());
    assert_eq!(body["emergency_type"], "Heart");
    assert_eq!(body["received_at"], inc.received_at);
    assert_eq!(
        body["tried"].as_array().map(Vec::len),
        Some(HEART_DELIVERIES),
        "{body}"
    );
    assert!(
        body["console"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/console/incidents/{}", inc.id)),
        "{body}"
    );
    assert!(
        !body.to_string().contains("9800000001"),
        "numbers masked: {body}"
    );

    let text = metrics(&app).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("sos_incidents_unreached_total") && l.ends_with(" 1")),
        "{text}"
    );
    let listed = alarms_api(&app).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["status"], "sent");
    assert_eq!(listed[0]["dedup_key"], format!("unreached:{}", inc.id));

    // Later rounds mark nothing again.
    app.store.clock().advance(Duration::from_secs(600));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(alarm_deliveries(&app, &inc.id).await.len(), 2);
    assert_eq!(hook_posts(&server).await.len(), 1);

    // Someone acknowledges at last: the duty manager, already alarmed, is told like everyone alerted.
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{}/ack", app.base, inc.id))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Dr. Asha Rao"}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    let notices: Vec<_> = app
        .store
        .deliveries(&inc.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.purpose == "ack_notice" && d.phone == DUTY)
        .collect();
    assert_eq!(notices.len(), 1, "one notice on SMS: {notices:?}");
    app.stop().await;
}

/// The webhook answers 500 twice, then 200: three POSTs, the alarm `sent` once.
async fn the_alarm_webhook_failing_twice_is_retried_and_sent_once(db: Db) {
    const SID: &str = "unreached2";
    let p = Providers::start().await;
    mount_happy(&p).await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&server)
        .await;
    let app = spawn_alarm_app(db, &p, &[("SOS_ALARMS__WEBHOOK_URL", url)]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Brain"))
        .await;
    app.settled(SID).await;
    app.store
        .clock()
        .advance(Duration::from_secs(DEADLINE_MINUTES * 60 + 1));
    wait_unreached(&app, SID).await;
    let sent = eventually(Duration::from_secs(15), || async {
        alarms_api(&app)
            .await
            .first()
            .is_some_and(|a| a["status"] == "sent")
    })
    .await;
    let listed = alarms_api(&app).await;
    assert!(sent, "{listed:?}");
    assert_eq!(listed[0]["attempts"], 3, "{listed:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let posts = hook_posts(&server).await;
    assert_eq!(posts.len(), 3, "two failures, one success, no more");
    assert!(
        posts.iter().all(|b| b == &posts[0]),
        "the same alarm each time"
    );
    app.stop().await;
}

/// A webhook answering 404 (a wrong URL) refuses the same way every time: the alarm is `failed` after
/// one POST, with the reason kept, and the people are alarmed all the same.
async fn an_alarm_webhook_refusing_with_404_is_not_retried(db: Db) {
    const SID: &str = "unreached404";
    let p = Providers::start().await;
    mount_happy(&p).await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(404).set_body_string("<html>Not Found</html>"))
        .mount(&server)
        .await;
    let app = spawn_alarm_app(db, &p, &[("SOS_ALARMS__WEBHOOK_URL", url)]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    app.settled(SID).await;
    app.store
        .clock()
        .advance(Duration::from_secs(DEADLINE_MINUTES * 60 + 1));
    let inc = wait_unreached(&app, SID).await;
    let failed = eventually(Duration::from_secs(10), || async {
        alarms_api(&app)
            .await
            .first()
            .is_some_and(|a| a["status"] == "failed")
    })
    .await;
    let listed = alarms_api(&app).await;
    assert!(failed, "{listed:?}");
    assert_eq!(listed[0]["attempts"], 1);
    assert_eq!(listed[0]["last_error"], "HTTP 404");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(hook_posts(&server).await.len(), 1);
    assert_eq!(alarm_deliveries(&app, &inc.id).await.len(), 2);
    app.stop().await;
}

/// Unreached is a flag, not a status: the incident's dedup key keeps suppressing repeats, and it
/// resolves like any open incident.
async fn an_unreached_incident_keeps_its_dedup_key_and_can_be_resolved(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn_alarm_app(db, &p, &[]).await;
    let trigger = || async {
        app.client
            .post(format!("{}/api/v1/incidents", app.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({
                "emergency_type": "ServerDown", "message": "db1 is down", "dedup_key": "db1-down"
            }))
            .send()
            .await
            .unwrap()
    };
    let res = trigger().await;
    assert_eq!(res.status(), 201);
    let id = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.store
        .clock()
        .advance(Duration::from_secs(DEADLINE_MINUTES * 60 + 1));
    let store = app.store.clone();
    let marked = eventually(Duration::from_secs(10), || async {
        store
            .incident(&id)
            .await
            .ok()
            .flatten()
            .is_some_and(|i| i.unreached_at.is_some())
    })
    .await;
    assert!(marked);
    let res = trigger().await;
    assert_eq!(res.status(), 200, "the repeat finds the unreached incident");
    assert_eq!(
        res.json::<serde_json::Value>().await.unwrap()["id"],
        id.as_str()
    );
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{id}/resolve", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let inc = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(inc.status, "resolved");
    assert!(inc.unreached_at.is_some());
    app.stop().await;
}

/// Acknowledged before the deadline: never marked, nobody alarmed, no webhook.
async fn an_acknowledged_incident_is_never_marked_unreached(db: Db) {
    const SID: &str = "unreached3";
    let p = Providers::start().await;
    mount_happy(&p).await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let app = spawn_alarm_app(db, &p, &[("SOS_ALARMS__WEBHOOK_URL", url)]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    app.settled(SID).await;
    let inc = incident_of(&app, SID).await;
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{}/ack", app.base, inc.id))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Dr. Asha Rao"}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    app.store
        .clock()
        .advance(Duration::from_secs(DEADLINE_MINUTES * 60 * 3));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let inc = incident_of(&app, SID).await;
    assert_eq!(inc.unreached_at, None);
    assert!(alarm_deliveries(&app, &inc.id).await.is_empty());
    assert!(hook_posts(&server).await.is_empty());
    assert!(alarms_api(&app).await.is_empty());
    app.stop().await;
}

/// A drill never escalates or alarms, however long nobody acknowledges it.
async fn a_drill_is_never_marked_unreached(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn_alarm_app(db, &p, &[]).await;
    let res = app
        .client
        .post(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({
            "emergency_type": "Drill", "message": "test", "drill_contact": "Emergency desk"
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: serde_json::Value = res.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    app.store
        .clock()
        .advance(Duration::from_secs(DEADLINE_MINUTES * 60 * 2));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let inc = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(inc.source, "drill");
    assert_eq!(inc.unreached_at, None);
    assert!(alarm_deliveries(&app, &id).await.is_empty());
    assert!(alarms_api(&app).await.is_empty());
    app.stop().await;
}

/// The alarm call's greeting speaks the alarm; pressing the acknowledge key on it acknowledges the
/// incident, by the duty manager, and the incident's calls not yet placed are cancelled.
async fn a_keypress_on_the_alarm_call_acknowledges_the_incident(db: Db) {
    const SID: &str = "unreached4";
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn_alarm_app(db, &p, &[]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    app.settled(SID).await;
    app.store
        .clock()
        .advance(Duration::from_secs(DEADLINE_MINUTES * 60 + 1));
    let inc = wait_unreached(&app, SID).await;
    let placed = eventually(Duration::from_secs(10), || async {
        alarm_deliveries(&app, &inc.id)
            .await
            .iter()
            .any(|d| d.channel == "call" && d.status != "queued" && d.status != "sending")
    })
    .await;
    assert!(placed);
    let call = alarm_deliveries(&app, &inc.id)
        .await
        .into_iter()
        .find(|d| d.channel == "call")
        .unwrap();
    let res = app.greeting(reqwest::Method::GET, &call.greeting_ref).await;
    assert_eq!(res.status(), 200);
    let spoken = res.text().await.unwrap();
    assert!(
        spoken.contains("Nobody has acknowledged the Heart emergency")
            && spoken.contains("Press 1 to acknowledge"),
        "{spoken}"
    );
    let res = app
        .client
        .get(format!(
            "{}/exotel/ack?token={WEBHOOK_TOKEN}&CustomField={}&digits=%221%22",
            app.base, call.greeting_ref
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
    let inc = incident_of(&app, SID).await;
    assert_eq!(inc.status, "acknowledged");
    assert_eq!(inc.acknowledged_by.as_deref(), Some("Duty manager"));
    assert_eq!(inc.acknowledged_via.as_deref(), Some("call"));
    assert!(inc.unreached_at.is_some(), "the flag stays");
    let call = app.store.delivery(&call.id).await.unwrap().unwrap();
    assert_eq!(call.status, "acknowledged");
    app.stop().await;
}

/// A stand-in for Exotel that refuses the account with `status`: its calls and SMS alike, as one
/// account's credentials and balance are shared.
async fn mount_refusing_exotel(p: &Providers, status: u16, message: &str) {
    for endpoint in [CALLS_PATH, SMS_PATH] {
        Mock::given(method("POST"))
            .and(path(endpoint))
            .respond_with(ResponseTemplate::new(status).set_body_json(
                serde_json::json!({"RestException": {"Status": status, "Message": message}}),
            ))
            .mount(&p.exotel)
            .await;
    }
    Mock::given(method("POST"))
        .and(path(GUPSHUP_PATH))
        .respond_with(FreshIds::new("whatsapp"))
        .mount(&p.gupshup)
        .await;
}

/// Several calls and SMS refused by the one Exotel account raise one alarm, about the account
/// (`exotel`), not one per lane: the API lists one, `/readyz` stays 200 but says degraded (lane and
/// reason only, never Exotel's words), the metric counts one, the duty manager is alarmed through no
/// Exotel lane at all (WhatsApp), and the webhook gets one POST. Once Exotel accepts again the mark
/// is cleared.
async fn account_alarm_for(db: Db, status: u16, reason: &str) {
    let p = Providers::start().await;
    mount_refusing_exotel(&p, status, "Authentication failed for +919800000001").await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let app = spawn_alarm_app_on(
        db,
        &p,
        &[("SOS_ALARMS__WEBHOOK_URL", url)],
        &stakeholders_with_duty_on("[\"call\", \"sms\", \"whatsapp\"]"),
    )
    .await;
    for sid in ["account1", "account2"] {
        app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
            .await;
        app.settled(sid).await;
    }
    let failed_calls = app
        .deliveries_of("account2")
        .await
        .into_iter()
        .filter(|d| d.channel == "call" && d.status == "failed")
        .count();
    assert!(failed_calls >= 2, "the calls fail");
    let failed_sms = app
        .deliveries_of("account2")
        .await
        .into_iter()
        .filter(|d| d.channel == "sms" && d.status == "failed")
        .count();
    assert!(failed_sms >= 2, "the SMS fail");
    let listed = alarms_api(&app).await;
    assert_eq!(listed.len(), 1, "once for calls and SMS: {listed:?}");
    assert_eq!(listed[0]["kind"], "account");
    assert_eq!(listed[0]["lane"], "exotel");
    assert_eq!(listed[0]["reason"], reason);
    assert_eq!(listed[0]["dedup_key"], format!("account:exotel:{reason}"));
    let (code, body) = readyz(&app).await;
    assert_eq!(code, 200, "degraded is still ready: {body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["degraded"][0]["lane"], "exotel", "{body}");
    assert_eq!(body["degraded"][0]["reason"], reason, "{body}");
    assert!(
        body["degraded"][0].get("summary").is_none()
            && !body.to_string().contains("Authentication failed"),
        "no provider text in public: {body}"
    );
    let text = metrics(&app).await;
    let line = format!("sos_account_alarms_total{{lane=\"exotel\",reason=\"{reason}\"}} 1");
    assert!(text.contains(&line), "{line} in\n{text}");

    let alarmed = eventually(Duration::from_secs(10), || async {
        let Some(incident) = alarms_api(&app).await[0]["incident_id"]
            .as_str()
            .map(str::to_owned)
        else {
            return false;
        };
        let ds = alarm_deliveries(&app, &incident).await;
        !ds.is_empty()
            && ds
                .iter()
                .all(|d| d.status != "queued" && d.status != "sending")
    })
    .await;
    assert!(alarmed, "the duty manager is alarmed");
    let incident = alarms_api(&app).await[0]["incident_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ds = alarm_deliveries(&app, &incident).await;
    assert!(
        ds.iter()
            .all(|d| d.channel == "whatsapp" && d.phone == DUTY),
        "through no Exotel lane: {ds:?}"
    );
    let posted = eventually(Duration::from_secs(10), || async {
        hook_posts(&server).await.len() == 1
    })
    .await;
    assert!(posted);
    let posts = hook_posts(&server).await;
    assert_eq!(posts[0]["type"], "account");
    assert_eq!(posts[0]["lane"], "exotel");
    assert_eq!(posts[0]["reason"], reason);

    // The account works again: the next accepted call clears the mark.
    p.exotel.reset().await;
    mount_happy(&p).await;
    app.passthru("CallSid=account3&EmergencyType=Heart").await;
    app.settled("account3").await;
    let cleared = eventually(Duration::from_secs(5), || async {
        readyz(&app).await.1["status"] == "ok"
    })
    .await;
    assert!(cleared, "{}", readyz(&app).await.1);
    assert!(alarms_api(&app).await[0]["cleared_at"].is_string());
    app.stop().await;
}

async fn exotel_refusing_the_account_raises_one_alarm_and_degrades_readyz(db: Db) {
    account_alarm_for(db, 401, "auth").await;
}

async fn exotel_402_raises_the_payment_alarm(db: Db) {
    account_alarm_for(db, 402, "payment").await;
}

/// GupShup answering "insufficient credits" (123) for several messages raises one `credit` alarm on
/// its lane.
async fn a_gupshup_credit_error_raises_one_alarm(db: Db) {
    let p = Providers::start().await;
    Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(FreshIds::new("call"))
        .mount(&p.exotel)
        .await;
    Mock::given(method("POST"))
        .and(path(SMS_PATH))
        .respond_with(FreshIds::new("sms"))
        .mount(&p.exotel)
        .await;
    Mock::given(method("POST"))
        .and(path(GUPSHUP_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!(
            {"response": {"id": "123", "phone": "", "details": "Insufficient credits", "status": "error"}}
        )))
        .mount(&p.gupshup)
        .await;
    let app = spawn_alarm_app(db, &p, &[]).await;
    for sid in ["credit1", "credit2"] {
        app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
            .await;
        app.settled(sid).await;
    }
    let listed = alarms_api(&app).await;
    assert_eq!(listed.len(), 1, "once: {listed:?}");
    assert_eq!(listed[0]["lane"], "gupshup");
    assert_eq!(listed[0]["reason"], "credit");
    assert_eq!(
        listed[0]["status"], "recorded",
        "no webhook set: recorded, not sent"
    );
    let (code, body) = readyz(&app).await;
    assert_eq!(
        (code, &body["status"]),
        (200, &serde_json::json!("degraded")),
        "{body}"
    );
    let text = metrics(&app).await;
    assert!(
        text.contains("sos_account_alarms_total{lane=\"gupshup\",reason=\"credit\"} 1"),
        "{text}"
    );
    app.stop().await;
}

/// Five requests with a wrong token within a minute raise one `webhook_token` alarm; more raise no
/// other; a request with the right token clears it.
async fn a_burst_of_bad_webhook_tokens_raises_one_alarm(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn_alarm_app(db, &p, &[]).await;
    for i in 0..8 {
        let res = app
            .client
            .get(format!(
                "{}/exotel/passthru?token=old-token&CallSid={}&{TO_US}",
                app.base,
                exotel_sid(i)
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
    }
    let raised = eventually(Duration::from_secs(5), || async {
        !alarms_api(&app).await.is_empty()
    })
    .await;
    assert!(raised);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listed = alarms_api(&app).await;
    assert_eq!(listed.len(), 1, "once: {listed:?}");
    assert_eq!(listed[0]["reason"], "webhook_token");
    // Nothing stored from them (the only incident may be the one that carries the alarm to people).
    for i in 0..8 {
        let sid = exotel_sid(i);
        assert!(
            app.store
                .incident_by_call_sid(&sid)
                .await
                .unwrap()
                .is_none(),
            "nothing stored"
        );
    }
    let (code, body) = readyz(&app).await;
    assert_eq!(
        (code, &body["status"]),
        (200, &serde_json::json!("degraded")),
        "{body}"
    );
    assert!(metrics(&app)
        .await
        .contains("sos_account_alarms_total{lane=\"webhook\",reason=\"webhook_token\"} 1"));
    // Exotel has the new token: the mark clears.
    app.passthru("CallSid=goodtoken1&EmergencyType=Heart").await;
    let cleared = eventually(Duration::from_secs(5), || async {
        readyz(&app).await.1["status"] == "ok"
    })
    .await;
    assert!(cleared);
    app.stop().await;
}

/// Wrong tokens on requests that do not look like Exotel's Passthru for this account (a scanner: no
/// CallSid of Exotel's form, or no number of ours) page nobody: refused with `401`, counted under
/// `status="not_exotel"`, shown on `/readyz` and reported to the alarm webhook as not paged; no incident
/// is stored and no provider is asked to call, text or message anyone.
async fn wrong_tokens_from_scanners_page_nobody_and_are_reported(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let app = spawn_alarm_app(db, &p, &[("SOS_ALARMS__WEBHOOK_URL", url)]).await;
    let scanners = [
        "token=x&CallSid=CAevil1".to_owned(),
        "token=x&CallSid=CAevil2".to_owned(),
        // Our number, but a CallSid Exotel never sends.
        format!("token=x&CallSid=CAevil3&{TO_US}"),
        // Exotel's form of CallSid, but to a number that is not ours, or to none.
        format!("token=x&CallSid={}&CallTo=08040000001", exotel_sid(1)),
        format!("token=x&CallSid={}&To=%2B14155550100", exotel_sid(2)),
        format!("token=x&CallSid={}", exotel_sid(3)),
    ];
    for q in &scanners {
        let res = app
            .client
            .get(format!("{}/exotel/passthru?{q}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{q}");
    }
    // Where the token alarm once paged people, the webhook hears of the scanner instead.
    let reported = eventually(Duration::from_secs(10), || async {
        account_posts(&server)
            .await
            .iter()
            .any(|a| a["reason"] == "webhook_scanner")
    })
    .await;
    assert!(
        reported,
        "webhook: {:?}; alarms: {:?}",
        hook_posts(&server).await,
        account_alarms(&app).await
    );
    let posts = account_posts(&server).await;
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0]["paged"], false, "{posts:?}");
    // The alarm sender's round that carries account alarms to the [unreached] teams finds none.
    assert_eq!(
        exotel_sos::app::alarms::notify_account_alarms(&app.state)
            .await
            .unwrap(),
        0
    );
    let listed = account_alarms(&app).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["reason"], "webhook_scanner");
    assert!(listed[0]["incident_id"].is_null(), "{listed:?}");
    // Nothing stored, so nothing for the dispatcher to send; and nothing was sent.
    let listed: serde_json::Value = app
        .client
        .get(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["incidents"], serde_json::json!([]), "{listed}");
    for provider_path in [CALLS_PATH, SMS_PATH, GUPSHUP_PATH] {
        assert!(
            p.requests(provider_path).await.is_empty(),
            "{provider_path} reached"
        );
    }
    let (code, body) = readyz(&app).await;
    assert_eq!(
        (code, &body["status"]),
        (200, &serde_json::json!("ok")),
        "{body}"
    );
    assert_eq!(body["webhook_scanners"]["refused"], 6, "{body}");
    assert!(body["webhook_scanners"]["last_at"].is_i64(), "{body}");
    let text = metrics(&app).await;
    assert!(
        text.contains(
            "sos_webhook_requests_total{endpoint=\"/exotel/passthru\",status=\"not_exotel\"} 6"
        ),
        "{text}"
    );
    app.stop().await;
}

/// A wrong token on what looks like Exotel's own Passthru (a CallSid of its form, to one of
/// `exotel.inbound_numbers` or `exotel.caller_id`, written in any form) still pages: Exotel calling
/// with an old token means real emergencies are being refused.
async fn a_wrong_token_on_a_genuine_looking_passthru_still_pages(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn_alarm_app(
        db,
        &p,
        &[("SOS_EXOTEL__INBOUND_NUMBERS", "+91 80 4000 0001".into())],
    )
    .await;
    let to = [
        "CallTo=08040000001",
        "CallTo=%2B918069891522",
        "To=918040000001",
        "CallTo=0091%2080%204000%200001",
    ];
    for (i, to) in to.iter().enumerate() {
        let res = app
            .client
            .get(format!(
                "{}/exotel/passthru?token=old-token&CallSid={}&CallFrom=09800000001&{to}",
                app.base,
                exotel_sid(i)
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{to}");
    }
    // A call's status callback names our number as the call's ExoPhone.
    let res = app
        .client
        .post(format!("{}/exotel/call-status?token=old-token", app.base))
        .form(&[
            ("CallSid", exotel_sid(9).as_str()),
            ("Status", "completed"),
            ("From", "+919800000001"),
            ("To", "+919800000001"),
            ("PhoneNumberSid", "08069891522"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let paged = eventually(Duration::from_secs(20), || async {
        p.requests(CALLS_PATH)
            .await
            .iter()
            .any(|(f, _)| field(f, "From") == Some(DUTY))
    })
    .await;
    assert!(paged, "{:?}", account_alarms(&app).await);
    let listed = account_alarms(&app).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["reason"], "webhook_token");
    assert!(listed[0]["incident_id"].is_string(), "{listed:?}");
    app.stop().await;
}

/// Operators refusing the SMS template (DLT code 23082 in the status callback) raise one
/// `dlt_template` alarm on the SMS lane for several reports; a delivered SMS clears it.
async fn a_dlt_template_block_in_the_sms_report_raises_one_alarm(db: Db) {
    const SID: &str = "dlt1";
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn_alarm_app(db, &p, &[]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    let sms: Vec<String> = ds
        .iter()
        .filter(|d| d.channel == "sms")
        .filter_map(|d| d.provider_id.clone())
        .collect();
    assert!(sms.len() >= 2, "{ds:?}");
    for sid in &sms {
        let res = app
            .post_form(
                "/exotel/sms-status",
                &[
                    ("SmsSid", sid.as_str()),
                    ("Status", "failed"),
                    ("DetailedStatusCode", "23082"),
                    ("DetailedStatus", "TEMPLATE_BLOCKED_BY_DLT"),
                ],
            )
            .await;
        assert_eq!(res.status(), 200);
    }
    let raised = eventually(Duration::from_secs(5), || async {
        !alarms_api(&app).await.is_empty()
    })
    .await;
    assert!(raised);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listed = alarms_api(&app).await;
    assert_eq!(listed.len(), 1, "once: {listed:?}");
    assert_eq!(listed[0]["lane"], "exotel:sms");
    assert_eq!(listed[0]["reason"], "dlt_template");
    assert_eq!(readyz(&app).await.1["status"], "degraded");

    // The template is fixed: the next delivered SMS clears the mark.
    app.passthru("CallSid=dlt2&EmergencyType=Heart").await;
    let ds = app.settled("dlt2").await;
    let sid = ds
        .iter()
        .find(|d| d.channel == "sms")
        .and_then(|d| d.provider_id.clone())
        .unwrap();
    let res = app
        .post_form(
            "/exotel/sms-status",
            &[
                ("SmsSid", sid.as_str()),
                ("Status", "sent"),
                ("DetailedStatusCode", "20005"),
            ],
        )
        .await;
    assert_eq!(res.status(), 200);
    let cleared = eventually(Duration::from_secs(5), || async {
        readyz(&app).await.1["status"] == "ok"
    })
    .await;
    assert!(cleared, "{}", readyz(&app).await.1);
    app.stop().await;
}

/// A CallSid of Exotel's form: 32 lower-case letters and digits, ending in a non-hex letter as real
/// ones often do.
fn exotel_sid(n: usize) -> String {
    format!("{n:031x}k")
}

/// The Passthru's own numbers on a call to the ExoPhone of the test settings (`exotel.caller_id`).
const TO_US: &str = "CallFrom=09800000001&CallTo=08069891522";

/// `n` requests to the Passthru with `token` (none when `None`), looking like Exotel's own (a CallSid
/// of its form, to our number), each refused.
async fn refused_passthrus(app: &TestApp, token: Option<&str>, n: usize) {
    for i in 0..n {
        let token = token.map(|t| format!("token={t}&")).unwrap_or_default();
        let res = app
            .client
            .get(format!(
                "{}/exotel/passthru?{token}CallSid={}&{TO_US}",
                app.base,
                exotel_sid(i)
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
    }
}

/// The account alarms listed (the Passthrus with the good token raise incidents that go unreached as
/// the clock moves on).
async fn account_alarms(app: &TestApp) -> Vec<serde_json::Value> {
    let mut listed = alarms_api(app).await;
    listed.retain(|a| a["kind"] == "account");
    listed
}

async fn account_posts(server: &MockServer) -> Vec<serde_json::Value> {
    let mut posts = hook_posts(server).await;
    posts.retain(|a| a["type"] == "account");
    posts
}

async fn degraded(app: &TestApp) -> bool {
    readyz(app).await.1["status"] == "degraded"
}

/// Exotel's own Passthrus arriving with no token at all (a flow URL saved without `?token=`) refuse
/// every emergency just as an old token does: they raise the same alarm and page.
async fn a_flow_url_saved_without_its_token_raises_the_token_alarm(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let app = spawn_alarm_app(db, &p, &[("SOS_ALARMS__WEBHOOK_URL", url)]).await;
    refused_passthrus(&app, None, 3).await;
    refused_passthrus(&app, Some(""), 3).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            account_posts(&server).await.len() == 1
        })
        .await,
        "a missing token on Exotel's own requests raised no alarm"
    );
    let listed = account_alarms(&app).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["dedup_key"], "account:webhook:webhook_token");
    assert!(listed[0]["summary"]
        .as_str()
        .unwrap_or_default()
        .contains("missing"));
    app.stop().await;
}

/// Wrong tokens on GupShup's webhook never raise the token alarm; wrong ones on Exotel's do; a good token on GupShup's does not clear it, one on Exotel's does.
/// The same cause again within the hour is recorded (listed, degraded) but pages nobody: no webhook
/// POST, no people; an hour after the page it pages again.
async fn gupshup_requests_neither_raise_nor_clear_the_token_alarm_and_it_pages_once_an_hour(
    db: Db,
) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let app = spawn_alarm_app(db, &p, &[("SOS_ALARMS__WEBHOOK_URL", url)]).await;
    for _ in 0..8 {
        let res = app
            .client
            .post(format!("{}/gupshup/dlr?token=old-token", app.base))
            .json(&serde_json::json!([]))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        account_alarms(&app).await.is_empty(),
        "scanners raise nothing"
    );

    // Exotel calls with an old token: one alarm, paged.
    refused_passthrus(&app, Some("old-token"), 5).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            account_posts(&server).await.len() == 1
        })
        .await
    );
    let listed = account_alarms(&app).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["dedup_key"], "account:webhook:webhook_token");
    assert!(degraded(&app).await);

    // A good token on GupShup's webhook says nothing of Exotel's URLs.
    let res = app
        .client
        .post(format!("{}/gupshup/dlr?token={WEBHOOK_TOKEN}", app.base))
        .json(&serde_json::json!([{"externalId": "nobody", "eventType": "DELIVERED"}]))
        .send()
        .await
        .unwrap();
    assert_ne!(res.status(), 401);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(degraded(&app).await, "not cleared by GupShup");

    // Exotel has the new token: cleared. The old one again within the hour: a new alarm, recorded.
    app.passthru("CallSid=goodtoken1&EmergencyType=Heart").await;
    assert!(
        eventually(Duration::from_secs(5), || async { !degraded(&app).await }).await,
        "cleared by Exotel"
    );
    app.store.clock().advance(Duration::from_secs(30 * 60));
    refused_passthrus(&app, Some("old-token"), 5).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            account_alarms(&app).await.len() == 2
        })
        .await
    );
    assert!(degraded(&app).await, "recorded and degraded all the same");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listed = account_alarms(&app).await;
    assert_eq!(listed[0]["status"], "recorded", "{listed:?}");
    assert!(
        listed[0]["incident_id"].is_null(),
        "nobody alarmed: {listed:?}"
    );
    assert!(listed[1]["dedup_key"]
        .as_str()
        .unwrap()
        .starts_with("account:webhook:webhook_token:cleared:"));
    assert_eq!(account_posts(&server).await.len(), 1, "not paged again");
    let alarm_incidents = listed
        .iter()
        .filter(|a| a["incident_id"].is_string())
        .count();
    assert_eq!(alarm_incidents, 1, "the people were alarmed once");

    // An hour after the page, the same cause pages again.
    app.passthru("CallSid=goodtoken2&EmergencyType=Heart").await;
    assert!(eventually(Duration::from_secs(5), || async { !degraded(&app).await }).await);
    app.store.clock().advance(Duration::from_secs(31 * 60));
    refused_passthrus(&app, Some("old-token"), 5).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            account_posts(&server).await.len() == 2
        })
        .await,
        "{:?}",
        account_alarms(&app).await
    );
    assert_eq!(account_alarms(&app).await.len(), 3);
    app.stop().await;
}

/// SMS status reports of the alert (its DLT template) blocked raise the template alarm of that
/// template; an SMS of another kind, registered under another template, delivered does not clear it;
/// one of the blocked template delivered does.
async fn a_delivered_sms_of_another_template_does_not_clear_a_template_alarm(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn_alarm_app(
        db,
        &p,
        &[(
            "SOS_MESSAGES__KINDS__API_ALERT__DLT_TEMPLATE_ID",
            "1107000000000000003".into(),
        )],
    )
    .await;
    let sms_of = |ds: &[exotel_sos::store::DeliveryRow]| -> Vec<String> {
        ds.iter()
            .filter(|d| d.channel == "sms")
            .filter_map(|d| d.provider_id.clone())
            .collect()
    };
    app.passthru("CallSid=tpl1&EmergencyType=Heart").await;
    let blocked = sms_of(&app.settled("tpl1").await);
    assert!(!blocked.is_empty());
    for sid in &blocked {
        let res = app
            .post_form(
                "/exotel/sms-status",
                &[
                    ("SmsSid", sid.as_str()),
                    ("Status", "failed"),
                    ("DetailedStatusCode", "23082"),
                ],
            )
            .await;
        assert_eq!(res.status(), 200);
    }
    assert!(eventually(Duration::from_secs(5), || async { degraded(&app).await }).await);
    let listed = alarms_api(&app).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        listed[0]["dedup_key"],
        "account:exotel:sms:dlt_template:1107000000000000002"
    );

    // An API alert's SMS (template …003) delivered: the alert's template is still blocked.
    let res = app
        .client
        .post(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"emergency_type": "Heart", "message": "db1 is down"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let id = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let store = app.store.clone();
    assert!(
        eventually(Duration::from_secs(15), || async {
            store
                .deliveries(&id)
                .await
                .unwrap()
                .iter()
                .any(|d| d.channel == "sms" && d.status == "accepted" && d.provider_id.is_some())
        })
        .await
    );
    let api_sms = sms_of(&app.store.deliveries(&id).await.unwrap());
    for sid in &api_sms {
        let res = app
            .post_form(
                "/exotel/sms-status",
                &[("SmsSid", sid.as_str()), ("Status", "sent")],
            )
            .await;
        assert_eq!(res.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(degraded(&app).await, "another template says nothing");

    // One of the alert's own SMS delivered: cleared.
    app.passthru("CallSid=tpl2&EmergencyType=Heart").await;
    let fixed = sms_of(&app.settled("tpl2").await);
    let res = app
        .post_form(
            "/exotel/sms-status",
            &[("SmsSid", fixed[0].as_str()), ("Status", "sent")],
        )
        .await;
    assert_eq!(res.status(), 200);
    assert!(
        eventually(Duration::from_secs(5), || async { !degraded(&app).await }).await,
        "{}",
        readyz(&app).await.1
    );
    app.stop().await;
}

/// Exotel answering 200 for an SMS whose `DetailedStatusCode` already says the template is blocked:
/// the template alarm is raised all the same.
async fn an_sms_accepted_with_a_dlt_block_code_raises_the_template_alarm(db: Db) {
    let p = Providers::start().await;
    Mock::given(method("POST"))
        .and(path(SMS_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "SMSMessage": {"Sid": "blocked1", "Status": "failed",
                "DetailedStatusCode": 23082, "DetailedStatus": "TEMPLATE_BLOCKED_BY_DLT"}
        })))
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let app = spawn_alarm_app(db, &p, &[]).await;
    app.passthru("CallSid=dlt200&EmergencyType=Heart").await;
    app.settled("dlt200").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            !alarms_api(&app).await.is_empty()
        })
        .await
    );
    let listed = alarms_api(&app).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["lane"], "exotel:sms");
    assert_eq!(listed[0]["reason"], "dlt_template");
    assert_eq!(
        listed[0]["dedup_key"],
        "account:exotel:sms:dlt_template:1107000000000000002"
    );
    app.stop().await;
}

/// The duty manager's alarm SMS is refused for now (a retry is queued) while the alarm call goes
/// out; the first acknowledgement cancels the queued alarm SMS, which is never sent, and the duty
/// manager, already alarmed by the call, gets the acknowledgement notice.
async fn the_first_acknowledgement_cancels_alarm_messages_still_queued(db: Db) {
    const SID: &str = "unreached-ack";
    let p = Providers::start().await;
    Mock::given(method("POST"))
        .and(path(SMS_PATH))
        .and(wiremock::matchers::body_string_contains("NOT+ACKNOWLEDGED"))
        .respond_with(ResponseTemplate::new(503))
        .with_priority(1)
        .mount(&p.exotel)
        .await;
    mount_happy(&p).await;
    let app = spawn_alarm_app(
        db,
        &p,
        &[("SOS_DISPATCH__RETRY_SCHEDULE_SECS", "300".into())],
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    app.settled(SID).await;
    app.store
        .clock()
        .advance(Duration::from_secs(DEADLINE_MINUTES * 60 + 1));
    let inc = wait_unreached(&app, SID).await;
    let tried = eventually(Duration::from_secs(15), || async {
        let ds = alarm_deliveries(&app, &inc.id).await;
        ds.iter()
            .any(|d| d.channel == "sms" && d.status == "queued" && d.attempts == 1)
            && ds
                .iter()
                .any(|d| d.channel == "call" && d.status == "accepted")
    })
    .await;
    assert!(tried, "{:?}", alarm_deliveries(&app, &inc.id).await);
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/{}/ack", app.base, inc.id))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"by": "Dr. Asha Rao"}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    let sms = alarm_deliveries(&app, &inc.id)
        .await
        .into_iter()
        .find(|d| d.channel == "sms")
        .unwrap();
    assert_eq!(sms.status, "cancelled", "{sms:?}");
    app.store.clock().advance(Duration::from_secs(600));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let alarm_sms = p
        .requests(SMS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| {
            field(f, "To") == Some(DUTY)
                && field(f, "Body").is_some_and(|b| b.contains("NOT ACKNOWLEDGED"))
        })
        .count();
    assert_eq!(alarm_sms, 1, "the refused attempt only");
    let notices: Vec<_> = app
        .store
        .deliveries(&inc.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.purpose == "ack_notice" && d.phone == DUTY)
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    app.stop().await;
}

/// Incidents from the API and Alertmanager are stored with their unreached deadline like the
/// Passthru's; an incident stored without one (before the upgrade that brought alarms) is never
/// marked nor alarmed, however old.
async fn incidents_stored_without_a_deadline_are_never_marked_unreached(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn_alarm_app(db, &p, &[]).await;
    let res = app
        .client
        .post(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"emergency_type": "ServerDown", "message": "db1 is down"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let api_id = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let alert = serde_json::json!({
        "version": "4", "groupKey": "g", "truncatedAlerts": 0, "status": "firing",
        "receiver": "sos", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [{
            "status": "firing", "labels": {"alertname": "DbDown"}, "annotations": {},
            "startsAt": "2026-01-02T03:04:05.678Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090", "fingerprint": "cccc3333"
        }]
    });
    let res = app
        .client
        .post(format!("{}/api/v1/alertmanager", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&alert)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let am_id = res.json::<serde_json::Value>().await.unwrap()["created"][0]
        .as_str()
        .unwrap()
        .to_owned();
    app.passthru("CallSid=legacy1&EmergencyType=Heart").await;
    let legacy = incident_of(&app, "legacy1").await;
    let deadline = (DEADLINE_MINUTES * 60 * 1000) as i64;
    for id in [&api_id, &am_id, &legacy.id] {
        let i = app.store.incident(id).await.unwrap().unwrap();
        assert_eq!(
            i.unreached_due_at,
            Some(i.received_at + deadline),
            "{}",
            i.source
        );
    }
    // As stored before the upgrade.
    sqlx::query("UPDATE incidents SET unreached_due_at = NULL WHERE id = $1")
        .bind(&legacy.id)
        .execute(app.store.pool())
        .await
        .unwrap();
    app.store
        .clock()
        .advance(Duration::from_secs(DEADLINE_MINUTES * 60 * 4));
    let store = app.store.clone();
    let (a, b) = (api_id.clone(), am_id.clone());
    assert!(
        eventually(Duration::from_secs(10), || async {
            let marked = |id: String| {
                let store = store.clone();
                async move {
                    store
                        .incident(&id)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|i| i.unreached_at.is_some())
                }
            };
            marked(a.clone()).await && marked(b.clone()).await
        })
        .await,
        "the API's and Alertmanager's incidents are marked"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let legacy = app.store.incident(&legacy.id).await.unwrap().unwrap();
    assert_eq!(legacy.unreached_at, None, "never marked");
    assert!(alarm_deliveries(&app, &legacy.id).await.is_empty());
    let listed = alarms_api(&app).await;
    assert!(
        listed
            .iter()
            .all(|a| a["incident_id"] != legacy.id.as_str()),
        "{listed:?}"
    );
    app.stop().await;
}

/// The duty manager is alerted by the incident too (their call accepted, no report yet) and the
/// alarm comes while that call still rings: the alarm call waits instead of ringing the same phone a
/// second time at once, and goes once the first call no longer counts as ringing.
async fn an_alarm_call_waits_while_the_incidents_own_call_still_rings(db: Db) {
    const SID: &str = "alarm-ringing";
    let p = Providers::start().await;
    mount_happy(&p).await;
    let stakeholders = stakeholders_with_unreached().replace(
        "Heart = [\"cardiology\", \"emergency-desk\", \"lab\"]",
        "Heart = [\"cardiology\", \"emergency-desk\", \"lab\", \"duty-manager\"]",
    );
    let app = spawn_alarm_app_on(
        db,
        &p,
        &[
            ("SOS_ACK__DEADLINE", "30s".into()),
            ("SOS_DISPATCH__REPORT_WAIT_SECS", "86400".into()),
        ],
        &stakeholders,
    )
    .await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    assert!(
        ds.iter()
            .any(|d| d.phone == DUTY && d.channel == "call" && d.status == "accepted"),
        "{ds:?}"
    );
    let calls_to_duty = || async {
        p.requests(CALLS_PATH)
            .await
            .iter()
            .filter(|(f, _)| field(f, "From") == Some(DUTY))
            .count()
    };
    assert_eq!(calls_to_duty().await, 1);
    app.store.clock().advance(Duration::from_secs(31));
    let inc = wait_unreached(&app, SID).await;
    let held = eventually(Duration::from_secs(10), || async {
        let Some(call) = alarm_deliveries(&app, &inc.id)
            .await
            .into_iter()
            .find(|d| d.channel == "call")
        else {
            return false;
        };
        app.store
            .events(&call.id)
            .await
            .unwrap()
            .iter()
            .any(|e| e.detail.contains("still ringing"))
    })
    .await;
    assert!(held, "{:?}", alarm_deliveries(&app, &inc.id).await);
    assert_eq!(calls_to_duty().await, 1, "not rung twice at once");
    // A minute on, the incident's call no longer rings: the alarm call goes.
    app.store.clock().advance(Duration::from_secs(40));
    assert!(
        eventually(Duration::from_secs(15), || async {
            calls_to_duty().await == 2
        })
        .await,
        "{:?}",
        alarm_deliveries(&app, &inc.id).await
    );
    app.stop().await;
}

/// `check-config` warns when a channel is live and the stakeholder file has no `[unreached]` table,
/// and not when it has one; it prints who is alarmed.
#[test]
fn check_config_warns_when_live_without_unreached() {
    let run = |stakeholders: &str| {
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
            .env("SOS_EXOTEL__ACCOUNT_SID", "acme")
            .env("SOS_EXOTEL__API_KEY", "key123")
            .env("SOS_EXOTEL__API_TOKEN", "tok456")
            .env("SOS_EXOTEL__CALLER_ID", "08069891522")
            .env(
                "SOS_EXOTEL__FLOW_URL",
                "http://my.exotel.com/acme/exoml/start_voice/926",
            )
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = run(STAKEHOLDERS);
    assert!(ok, "a warning, not an error: {text}");
    assert!(
        text.contains("warning: the stakeholder file has no [unreached] table"),
        "{text}"
    );
    let (ok, text) = run(&stakeholders_with_unreached());
    assert!(ok, "{text}");
    assert!(!text.contains("no [unreached] table"), "{text}");
    assert!(
        text.contains("Unreached alarm (nobody acknowledged in time) -> duty-manager"),
        "{text}"
    );
    assert!(
        text.contains("Duty manager") && text.contains("+91******0009"),
        "{text}"
    );
}

/// Two replicas on one PostgreSQL sweep and send together: each incident is marked once, its duty
/// manager alarmed once per channel, and the webhook gets one POST per incident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_mark_each_incident_once_and_post_each_alarm_once() {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let extra = [("SOS_ALARMS__WEBHOOK_URL", url)];
    let a = spawn_alarm_app(Db::Postgres, &p, &extra).await;
    let mut env = p.env();
    env.push(("SOS_DISPATCH__MAX_REDIALS", "0".into()));
    env.push(("SOS_ACK__DEADLINE", format!("{DEADLINE_MINUTES}m")));
    env.extend(extra.iter().cloned());
    let settings = test_settings(&a.db, &a.stakeholders, &env);
    let b = start(TestDb::shared(&a.db.url), a.stakeholders.clone(), settings).await;
    let sids: Vec<String> = (0..5).map(|i| format!("replicas{i}")).collect();
    for (i, sid) in sids.iter().enumerate() {
        let app = if i % 2 == 0 { &a } else { &b };
        app.passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
            .await;
    }
    for sid in &sids {
        a.settled(sid).await;
    }
    let later = Duration::from_secs(DEADLINE_MINUTES * 60 + 1);
    a.store.clock().advance(later);
    b.store.clock().advance(later);
    for sid in &sids {
        wait_unreached(&a, sid).await;
    }
    let posted = eventually(Duration::from_secs(15), || async {
        hook_posts(&server).await.len() >= sids.len()
    })
    .await;
    assert!(posted);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for sid in &sids {
        let inc = incident_of(&a, sid).await;
        let events = a.store.incident_timeline(&inc.id).await.unwrap();
        assert_eq!(
            events.iter().filter(|e| e.kind == "unreached").count(),
            1,
            "{sid}: {events:?}"
        );
        assert_eq!(alarm_deliveries(&a, &inc.id).await.len(), 2, "{sid}");
    }
    let posts = hook_posts(&server).await;
    let mut ids: Vec<String> = posts
        .iter()
        .map(|b| b["incident_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (posts.len(), ids.len()),
        (sids.len(), sids.len()),
        "{posts:?}"
    );
    let duty_sms = p
        .requests(SMS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "To") == Some(DUTY))
        .count();
    assert_eq!(duty_sms, sids.len(), "one alarm SMS per incident");
    b.stop().await;
    a.stop().await;
}

/// Longer than the webhook's own time limit (ten seconds): a receiver that never answers.
const HANGS: Duration = Duration::from_secs(60);

/// The unreached alarms listed.
async fn unreached_alarms(app: &TestApp) -> Vec<serde_json::Value> {
    let mut listed = alarms_api(app).await;
    listed.retain(|a| a["kind"] == "unreached");
    listed
}

/// Incidents `sids` (Heart) stored and, with the clock moved past their deadline, marked unreached;
/// their ids, in order.
async fn unreached_incidents(app: &TestApp, sids: &[String], settle: bool) -> Vec<String> {
    let mut ids = Vec::new();
    for sid in sids {
        let res = app
            .passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
            .await;
        assert_eq!(res.status(), 200);
        if settle {
            app.settled(sid).await;
        }
        ids.push(incident_of(app, sid).await.id);
    }
    app.store
        .clock()
        .advance(Duration::from_secs(DEADLINE_MINUTES * 60 + 1));
    for sid in sids {
        wait_unreached(app, sid).await;
    }
    ids
}

/// The alarm webhook hangs (it would answer after a minute, past its ten-second limit) on the POSTs
/// of three unreached incidents; an account alarm raised meanwhile reaches the `[unreached]` contact
/// through the Exotel and GupShup stand-ins while every one of those POSTs is still held: paging
/// people never waits for the webhook.
async fn an_account_alarm_pages_its_people_while_the_alarm_webhook_hangs(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200).set_delay(HANGS))
        .mount(&server)
        .await;
    let app = spawn_alarm_app_on(
        db,
        &p,
        &[("SOS_ALARMS__WEBHOOK_URL", url)],
        &stakeholders_with_duty_on("[\"sms\", \"whatsapp\"]"),
    )
    .await;
    let sids: Vec<String> = (0..3).map(|i| format!("hanging{i}")).collect();
    unreached_incidents(&app, &sids, true).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            !hook_posts(&server).await.is_empty()
        })
        .await,
        "the webhook holds a POST"
    );

    // Exotel calls with an old token: an account alarm, for the duty manager.
    refused_passthrus(&app, Some("old-token"), 5).await;
    let paged = eventually(Duration::from_secs(60), || async {
        let Some(incident) = account_alarms(&app)
            .await
            .first()
            .and_then(|a| a["incident_id"].as_str().map(str::to_owned))
        else {
            return false;
        };
        let ds = alarm_deliveries(&app, &incident).await;
        ds.len() == 2
            && ds
                .iter()
                .all(|d| d.status != "queued" && d.status != "sending")
    })
    .await;
    assert!(paged, "{:?}", account_alarms(&app).await);
    let held = unreached_alarms(&app).await;
    assert_eq!(held.len(), sids.len(), "{held:?}");
    assert!(
        held.iter()
            .all(|a| a["status"] == "queued" && a["last_error"].is_null()),
        "the people were paged before any webhook POST came to an end: {held:?}"
    );
    let incident = account_alarms(&app).await[0]["incident_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ds = alarm_deliveries(&app, &incident).await;
    let mut channels: Vec<&str> = ds.iter().map(|d| d.channel.as_str()).collect();
    channels.sort();
    assert_eq!(channels, ["sms", "whatsapp"]);
    assert!(ds
        .iter()
        .all(|d| d.phone == DUTY && d.provider_id.is_some()));
    let duty_sms = p
        .requests(SMS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "To") == Some(DUTY))
        .count();
    assert!(
        duty_sms >= 1,
        "the Exotel stand-in took the duty manager's SMS"
    );
    app.stop().await;
}

/// Six alarms queued while the webhook hangs: as many POSTs as the bound are in flight at once (all
/// received before the first of them ended), and no more: the next goes only once one has ended.
async fn alarm_webhook_posts_run_side_by_side_up_to_a_bound(db: Db) {
    let bound = exotel_sos::app::alarms::WEBHOOK_CONCURRENCY;
    let p = Providers::start().await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200).set_delay(HANGS))
        .mount(&server)
        .await;
    let app = spawn_alarm_app(
        db,
        &p,
        &[("SOS_ALARMS__WEBHOOK_URL", url), without_dispatcher()],
    )
    .await;
    let sids: Vec<String> = (0..bound + 2).map(|i| format!("sidebyside{i}")).collect();
    unreached_incidents(&app, &sids, false).await;

    let all_in_flight = eventually(Duration::from_secs(60), || async {
        hook_posts(&server).await.len() >= bound
    })
    .await;
    assert!(all_in_flight);
    let listed = unreached_alarms(&app).await;
    assert!(
        listed.iter().all(|a| a["last_error"].is_null()),
        "{bound} POSTs were in flight before any of them ended: {listed:?}"
    );
    assert_eq!(
        hook_posts(&server).await.len(),
        bound,
        "no more than {bound}"
    );

    let next = eventually(Duration::from_secs(60), || async {
        hook_posts(&server).await.len() > bound
    })
    .await;
    assert!(next);
    let ended = unreached_alarms(&app)
        .await
        .into_iter()
        .filter(|a| a["last_error"] == "no answer in time")
        .count();
    assert!(
        ended >= 1,
        "a POST past the bound went only after one had ended"
    );
    app.stop().await;
}

/// The webhook hangs on the first POST it gets (past the ten-second limit) and takes every other at
/// once: the other alarms are sent while it still hangs; the one it held is tried again and sent.
async fn a_hanging_webhook_post_holds_no_other_and_is_retried_until_taken(db: Db) {
    let p = Providers::start().await;
    let (server, url) = hook().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200).set_delay(HANGS))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&server)
        .await;
    let app = spawn_alarm_app(
        db,
        &p,
        &[("SOS_ALARMS__WEBHOOK_URL", url), without_dispatcher()],
    )
    .await;
    let sids: Vec<String> = (0..3).map(|i| format!("heldone{i}")).collect();
    unreached_incidents(&app, &sids, false).await;

    let others_sent = eventually(Duration::from_secs(60), || async {
        unreached_alarms(&app)
            .await
            .iter()
            .filter(|a| a["status"] == "sent")
            .count()
            == sids.len() - 1
    })
    .await;
    assert!(others_sent, "{:?}", unreached_alarms(&app).await);
    let listed = unreached_alarms(&app).await;
    let held: Vec<&serde_json::Value> = listed.iter().filter(|a| a["status"] != "sent").collect();
    assert_eq!(held.len(), 1, "{listed:?}");
    let held_id = held[0]["id"].as_str().unwrap().to_owned();
    assert!(
        held[0]["last_error"].is_null() && held[0]["attempts"] == 1,
        "the others were taken while the first POST still hung: {listed:?}"
    );
    let first_post = &hook_posts(&server).await[0];
    assert_eq!(first_post["incident_id"], held[0]["incident_id"]);

    // Its POST runs out of time, is tried again and taken.
    let taken = eventually(Duration::from_secs(60), || async {
        unreached_alarms(&app)
            .await
            .iter()
            .any(|a| a["id"] == held_id && a["status"] == "sent")
    })
    .await;
    assert!(taken, "{:?}", unreached_alarms(&app).await);
    let listed = unreached_alarms(&app).await;
    let again = listed.iter().find(|a| a["id"] == held_id).unwrap();
    assert_eq!(again["attempts"], 2, "{again}");
    let posts = hook_posts(&server).await;
    assert_eq!(posts.len(), sids.len() + 1, "one POST again, no more");
    assert_eq!(
        posts
            .iter()
            .filter(|b| b["incident_id"] == again["incident_id"])
            .count(),
        2
    );
    app.stop().await;
}
