//! `/metrics`: parsed with a Prometheus text parser, and checked by `promtool` when it is installed.

use serde_json::json;

use crate::both_engines;
use crate::helpers::*;
use crate::op::*;

both_engines!(metrics_count_incidents_requests_and_the_queue);

/// GET /metrics, with this Accept header if any.
async fn scrape(app: &TestApp, accept: Option<&str>) -> (String, String) {
    let mut req = app.client.get(format!("{}/metrics", app.base));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    let ctype = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (ctype, res.text().await.unwrap())
}

fn parse(text: &str) -> prometheus_parse::Scrape {
    // prometheus-parse's sample pattern ends the label set at the first `}`, so the braces of route
    // patterns such as `/api/v1/incidents/{id}` are spelled `:id` for it; promtool checks the raw text.
    let text = text.replace("{id}", ":id");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses")
}

fn value(v: &prometheus_parse::Value) -> f64 {
    use prometheus_parse::Value::*;
    match v {
        Counter(x) | Gauge(x) | Untyped(x) => *x,
        Histogram(_) | Summary(_) => f64::NAN,
    }
}

/// The value of the sample `name` whose labels include all of `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| value(&s.value))
}

async fn metrics_count_incidents_requests_and_the_queue(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    assert_eq!(post_incident(&app, &heart("one")).await.0, 201);
    assert_eq!(
        post_incident(&app, &json!({"emergency_type": "Made-up", "message": "x"}))
            .await
            .0,
        201
    );
    assert_eq!(
        app.passthru("CallSid=metricsid01&EmergencyType=Heart")
            .await
            .status(),
        200
    );
    // Two distinct ids, one route pattern.
    for id in ["a1", "b2"] {
        assert_eq!(get(&app, &format!("/api/v1/incidents/{id}")).await.0, 404);
    }
    // What the dispatcher will report.
    app.state.metrics.provider_request("call", "accepted", 0.12);
    app.state.metrics.delivery_finished("sms", "delivered");

    let (ctype, text) = scrape(&app, None).await;
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let s = parse(&text);
    let incidents = "sos_incidents_total";
    assert_eq!(
        sample(
            &s,
            incidents,
            &[("source", "api"), ("emergency_type", "Heart")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &s,
            incidents,
            &[("source", "api"), ("emergency_type", "default")]
        ),
        Some(1.0),
        "unrouted types share one label value"
    );
    assert_eq!(
        sample(
            &s,
            incidents,
            &[("source", "exotel"), ("emergency_type", "Heart")]
        ),
        Some(1.0)
    );
    let requests = "sos_webhook_requests_total";
    assert_eq!(
        sample(
            &s,
            requests,
            &[("endpoint", "/api/v1/incidents/:id"), ("status", "404")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &s,
            requests,
            &[("endpoint", "/api/v1/incidents"), ("status", "201")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &s,
            requests,
            &[("endpoint", "/exotel/passthru"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert!(
        !text.contains("token=") && !text.contains("a1"),
        "no raw URIs in labels"
    );
    assert_eq!(
        sample(&s, "sos_queue_depth", &[]),
        Some((2 * HEART_DELIVERIES + DEFAULT_DELIVERIES) as f64)
    );
    assert!(sample(&s, "sos_queue_oldest_due_age_seconds", &[]).is_some_and(|a| a >= 0.0));
    assert_eq!(sample(&s, "sos_queue_scheduled", &[]), Some(0.0));
    // A delivery queued for later (a tier to come, a redial) is scheduled, not part of the depth.
    sqlx::query(
        "UPDATE deliveries SET due_at = $1 \
         WHERE id = (SELECT MIN(id) FROM deliveries WHERE status = 'queued')",
    )
    .bind(app.store.now_ms() + 3_600_000)
    .execute(app.store.pool())
    .await
    .unwrap();
    let (_, later) = scrape(&app, None).await;
    let later = parse(&later);
    assert_eq!(
        sample(&later, "sos_queue_depth", &[]),
        Some((2 * HEART_DELIVERIES + DEFAULT_DELIVERIES - 1) as f64)
    );
    assert_eq!(sample(&later, "sos_queue_scheduled", &[]), Some(1.0));
    assert_eq!(
        sample(
            &s,
            "sos_deliveries_total",
            &[("channel", "sms"), ("state", "delivered")]
        ),
        Some(1.0)
    );
    assert!(s.samples.iter().any(|x| x
        .metric
        .starts_with("sos_provider_request_duration_seconds")
        && x.labels.get("channel") == Some("call")));

    // The queue gauges follow the store: resolving cancels the queued deliveries.
    let (_, list) = get(&app, "/api/v1/incidents").await;
    for inc in list["incidents"].as_array().unwrap() {
        post_raw(
            &app,
            &format!("/api/v1/incidents/{}/resolve", id_of(inc)),
            String::new(),
        )
        .await;
    }
    let (_, text) = scrape(&app, None).await;
    let s = parse(&text);
    assert_eq!(sample(&s, "sos_queue_depth", &[]), Some(0.0));
    assert_eq!(sample(&s, "sos_queue_scheduled", &[]), Some(0.0));
    assert_eq!(
        sample(&s, "sos_queue_oldest_due_age_seconds", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &s,
            "sos_deliveries_total",
            &[("channel", "call"), ("state", "cancelled")]
        ),
        Some(6.0),
        "two calls (Asha and the desk) in each of the three incidents"
    );
    // Prometheus asks for OpenMetrics, and gets it.
    let (ctype, text) = scrape(
        &app,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE sos_incidents counter"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_exposition() {
    let promtool_present = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !promtool_present {
        // .ci/run installs it: in CI a missing promtool is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but promtool is not installed"
        );
        println!("SKIPPED promtool_accepts_the_exposition: promtool is not installed");
        return;
    }
    let app = spawn_app(Db::Sqlite).await;
    assert_eq!(post_incident(&app, &heart("one")).await.0, 201);
    app.state.metrics.provider_request("sms", "accepted", 0.3);
    app.state.metrics.delivery_finished("sms", "delivered");
    let (_, text) = scrape(&app, None).await;
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.stop().await;
}
