//! Alertmanager webhook: firing alerts become incidents, repeats change nothing, resolved alerts close them;
//! and once end to end with a real Alertmanager when its binary is installed.

use std::time::Duration;

use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::*;
use crate::op::*;

both_engines!(
    firing_alerts_become_incidents_and_resolved_ones_close_them,
    type_label_is_configurable,
    bad_payloads_are_422_and_need_the_token,
);

fn alert(status: &str, fingerprint: &str, labels: Value, annotations: Value) -> Value {
    json!({
        "status": status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": "2026-01-02T03:04:05.678Z",
        "endsAt": if status == "resolved" { "2026-01-02T04:00:00Z" } else { "0001-01-01T00:00:00Z" },
        "generatorURL": "http://prometheus:9090/graph?g0.expr=up",
        "fingerprint": fingerprint,
    })
}

fn payload(status: &str, alerts: Vec<Value>) -> String {
    json!({
        "version": "4",
        "groupKey": "{}:{alertname=\"DbDown\"}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "sos",
        "groupLabels": {"alertname": "DbDown"},
        "commonLabels": {"alertname": "DbDown"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": alerts,
    })
    .to_string()
}

async fn firing_alerts_become_incidents_and_resolved_ones_close_them(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let firing = payload(
        "firing",
        vec![
            alert(
                "firing",
                "aaaa1111",
                json!({"alertname": "DbDown", "emergency_type": "Heart", "instance": "db1"}),
                json!({"summary": "db1 is down"}),
            ),
            alert(
                "firing",
                "bbbb2222",
                json!({"alertname": "DbDown", "instance": "db2"}),
                json!({}),
            ),
        ],
    );
    let (status, outcome) = post_raw(&app, "/api/v1/alertmanager", firing.clone()).await;
    assert_eq!(status, 200, "{outcome}");
    let created: Vec<String> = serde_json::from_value(outcome["created"].clone()).unwrap();
    assert_eq!(created.len(), 2);

    let first = app.store.incident(&created[0]).await.unwrap().unwrap();
    assert_eq!(first.source, "alertmanager");
    assert_eq!(first.emergency_type, "Heart");
    assert_eq!(first.message.as_deref(), Some("db1 is down"));
    assert!(first.occurred_at.is_some(), "startsAt is kept");
    assert_eq!(
        app.store.deliveries(&first.id).await.unwrap().len(),
        HEART_DELIVERIES
    );
    let second = app.store.incident(&created[1]).await.unwrap().unwrap();
    assert_eq!(second.route, "default", "no type label: the default route");
    assert_eq!(
        second.message.as_deref(),
        Some("DbDown"),
        "no summary: the alert name"
    );

    // Alertmanager repeats a notification every repeat_interval: nothing new.
    let (status, again) = post_raw(&app, "/api/v1/alertmanager", firing).await;
    assert_eq!(status, 200);
    assert_eq!(again["created"].as_array().unwrap().len(), 0);
    assert_eq!(again["existing"].as_array().unwrap().len(), 2);
    assert_eq!(app.store.count_incidents().await.unwrap(), 2);

    // One alert resolves: its incident closes and its queued deliveries are cancelled; the other stays.
    let resolved = payload(
        "resolved",
        vec![alert(
            "resolved",
            "aaaa1111",
            json!({"alertname": "DbDown", "emergency_type": "Heart", "instance": "db1"}),
            json!({"summary": "db1 is down"}),
        )],
    );
    let (status, outcome) = post_raw(&app, "/api/v1/alertmanager", resolved.clone()).await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["resolved"], json!([first.id]));
    let first = app.store.incident(&first.id).await.unwrap().unwrap();
    assert_eq!(first.status, "resolved");
    assert!(statuses(&app, &first.id)
        .await
        .iter()
        .all(|s| s == "cancelled"));
    assert_eq!(
        app.store
            .incident(&second.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        "open"
    );
    // A resolved notification repeated finds nothing open.
    let (_, outcome) = post_raw(&app, "/api/v1/alertmanager", resolved).await;
    assert_eq!(outcome["unmatched"], 1);
    app.stop().await;
}

async fn type_label_is_configurable(db: Db) {
    let app = spawn_app_with(db, &[("SOS_ALERTMANAGER__TYPE_LABEL", "team".into())]).await;
    let body = payload(
        "firing",
        vec![alert(
            "firing",
            "cccc3333",
            json!({"alertname": "Stroke", "team": "brain", "emergency_type": "Heart"}),
            json!({"summary": "s"}),
        )],
    );
    let (status, outcome) = post_raw(&app, "/api/v1/alertmanager", body).await;
    assert_eq!(status, 200);
    let id = outcome["created"][0].as_str().unwrap();
    let incident = app.store.incident(id).await.unwrap().unwrap();
    assert_eq!(incident.emergency_type, "Brain");
    app.stop().await;
}

async fn bad_payloads_are_422_and_need_the_token(db: Db) {
    let app = spawn_app(db).await;
    for (body, field) in [
        ("nope".to_owned(), "body"),
        (json!({"version": "4"}).to_string(), "body"),
        (
            payload("firing", vec![]).replace("\"version\":\"4\"", "\"version\":\"3\""),
            "version",
        ),
    ] {
        let (status, answer) = post_raw(&app, "/api/v1/alertmanager", body.clone()).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(answer["field"], field, "{body}: {answer}");
    }
    let res = app
        .client
        .post(format!("{}/api/v1/alertmanager", app.base))
        .body(payload("firing", vec![]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(app.store.count_incidents().await.unwrap(), 0);
    app.stop().await;
}

/// The Alertmanager binary, when installed (Debian names it `prometheus-alertmanager`).
fn alertmanager_binary() -> Option<String> {
    ["prometheus-alertmanager", "alertmanager"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(str::to_owned)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Kills the child when the test ends, whether it passes or panics.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_with_a_real_alertmanager() {
    let Some(binary) = alertmanager_binary() else {
        // .ci/run installs it: in CI a missing binary is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but no alertmanager binary is installed"
        );
        println!("SKIPPED end_to_end_with_a_real_alertmanager: no alertmanager binary installed");
        return;
    };
    let app = spawn_app(Db::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
route:
  receiver: sos
  group_by: ['alertname']
  group_wait: 100ms
  group_interval: 500ms
  repeat_interval: 1h
receivers:
  - name: sos
    webhook_configs:
      - url: '{}/api/v1/alertmanager'
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials: '{ADMIN_TOKEN}'
"#,
        app.base
    );
    let config_path = dir.path().join("alertmanager.yml");
    std::fs::write(&config_path, config).unwrap();
    let port = free_port();
    let _am = Child(
        std::process::Command::new(&binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // An empty cluster address turns off HA gossip, whose settling would delay notifications.
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("alertmanager starts"),
    );
    let am = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let up = eventually(Duration::from_secs(15), || async {
        client
            .get(format!("{am}/-/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(up, "alertmanager became ready");

    let labels = json!({"alertname": "E2eDown", "emergency_type": "Brain", "instance": "db9"});
    let starts = chrono::Utc::now() - chrono::Duration::seconds(5);
    let post = |ends: Option<chrono::DateTime<chrono::Utc>>| {
        let mut a = json!({
            "labels": labels,
            "annotations": {"summary": "db9 is down"},
            "startsAt": starts.to_rfc3339(),
        });
        if let Some(e) = ends {
            a["endsAt"] = json!(e.to_rfc3339());
        }
        client
            .post(format!("{am}/api/v2/alerts"))
            .json(&json!([a]))
            .send()
    };
    let res = post(None).await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let incident_id = loop {
        let (_, list) = get(&app, "/api/v1/incidents?emergency_type=Brain").await;
        if let Some(id) = list["incidents"][0]["id"].as_str() {
            break Some(id.to_owned());
        }
        if tokio::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(incident_id.is_some(), "the alert became an incident");
    let id = incident_id.unwrap();
    let incident = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(incident.source, "alertmanager");
    assert_eq!(incident.message.as_deref(), Some("db9 is down"));

    let res = post(Some(chrono::Utc::now() - chrono::Duration::seconds(1)))
        .await
        .unwrap();
    assert!(res.status().is_success());
    let closed = eventually(Duration::from_secs(20), || async {
        app.store
            .incident(&id)
            .await
            .unwrap()
            .is_some_and(|i| i.status == "resolved")
    })
    .await;
    assert!(closed, "the resolved alert closed the incident");
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    app.stop().await;
}
