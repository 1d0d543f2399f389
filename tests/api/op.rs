//! Helpers for the operator API tests: authenticated JSON calls against a running [`TestApp`].

use serde_json::Value;

use crate::helpers::{TestApp, ADMIN_TOKEN};

/// `POST /api/v1/incidents` with the admin token; returns status and JSON body.
pub async fn post_incident(app: &TestApp, body: &Value) -> (u16, Value) {
    post_raw(app, "/api/v1/incidents", body.to_string()).await
}

/// POST `body` as JSON with the admin token.
pub async fn post_raw(app: &TestApp, path: &str, body: String) -> (u16, Value) {
    let res = app
        .client
        .post(format!("{}{path}", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// GET with the admin token; returns status and JSON body.
pub async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let res = app
        .client
        .get(format!("{}{path}", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// `GET /api/v1/incidents/{id}` as text too, for "never exposed" checks on the raw bytes.
pub async fn detail_text(app: &TestApp, id: &str) -> String {
    app.client
        .get(format!("{}/api/v1/incidents/{id}", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body")
}

pub fn heart(message: &str) -> Value {
    serde_json::json!({"emergency_type": "Heart", "message": message})
}

pub fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id in the answer").to_owned()
}

/// The store's view of one delivery status count for an incident.
pub async fn statuses(app: &TestApp, incident: &str) -> Vec<String> {
    app.store
        .deliveries(incident)
        .await
        .expect("deliveries")
        .into_iter()
        .map(|d| d.status.to_string())
        .collect()
}
