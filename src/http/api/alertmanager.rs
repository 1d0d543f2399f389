//! `POST /api/v1/alertmanager`: Alertmanager's webhook (payload version 4). Firing alerts become
//! incidents through [`store_trigger`], resolved alerts close them.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Admin;
use super::incidents::{store_trigger, Trigger};
use super::{clean_json, unprocessable, ErrorBody, MAX_MESSAGE_CHARS, MAX_TYPE_CHARS};
use crate::domain::Source;
use crate::error::AppError;
use crate::http::edge::Deadline;
use crate::http::AppState;

/// Alertmanager webhook payload, version 4.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerPayload {
    #[schema(example = "4")]
    pub version: String,
    pub group_key: String,
    #[serde(default)]
    pub truncated_alerts: u64,
    /// `firing` or `resolved` (of the group; each alert carries its own).
    pub status: String,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub group_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub common_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub common_annotations: BTreeMap<String, String>,
    #[serde(default, rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<AlertmanagerAlert>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerAlert {
    /// `firing` or `resolved`.
    pub status: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    pub starts_at: Option<String>,
    pub ends_at: Option<String>,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: Option<String>,
    #[serde(default)]
    pub fingerprint: String,
}

/// What an Alertmanager notification did, by incident id.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct AlertmanagerOutcome {
    /// New incidents (alerts fanned out).
    pub created: Vec<String>,
    /// Firing alerts whose incident was already open (repeats; nothing sent again).
    pub existing: Vec<String>,
    /// Incidents closed by resolved alerts.
    pub resolved: Vec<String>,
    /// Resolved alerts with no open incident (already resolved, or never seen).
    pub unmatched: usize,
}

/// Receives Alertmanager notifications (webhook payload version 4): firing alerts become incidents,
/// resolved alerts close them.
#[utoipa::path(
    post,
    path = "/api/v1/alertmanager",
    tag = "incidents",
    request_body = AlertmanagerPayload,
    responses(
        (status = 200, description = "Every alert handled", body = AlertmanagerOutcome),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 422, description = "Not an Alertmanager version 4 payload", body = ErrorBody),
        (status = 503, description = "The database did not answer in time; Alertmanager sends again, and alerts already stored are found by their key", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(group_key))]
pub async fn alertmanager(
    State(state): State<AppState>,
    _admin: Admin,
    deadline: Deadline,
    body: Bytes,
) -> Result<Json<AlertmanagerOutcome>, AppError> {
    let payload = parse_payload(&body)?;
    tracing::Span::current().record("group_key", payload.group_key.as_str());
    if payload.truncated_alerts > 0 {
        // Alertmanager's max_alerts cut the list: the missing alerts arrive with no notification here.
        tracing::warn!(
            truncated = payload.truncated_alerts,
            "Alertmanager truncated this notification; raise max_alerts on the webhook receiver"
        );
    }
    let mut outcome = AlertmanagerOutcome::default();
    for alert in &payload.alerts {
        let dedup_key = alert_dedup_key(&payload.group_key, alert);
        if alert.status == "resolved" {
            resolve_alert(&state, &dedup_key, &mut outcome).await?;
        } else {
            fire_alert(&state, &deadline, &payload, alert, dedup_key, &mut outcome).await?;
        }
    }
    tracing::info!(
        created = outcome.created.len(),
        existing = outcome.existing.len(),
        resolved = outcome.resolved.len(),
        unmatched = outcome.unmatched,
        "alertmanager notification handled"
    );
    Ok(Json(outcome))
}

/// The body as a version 4 payload; any other version is refused rather than half understood.
fn parse_payload(body: &[u8]) -> Result<AlertmanagerPayload, AppError> {
    let payload: AlertmanagerPayload = clean_json(body)
        .and_then(serde_json::from_value)
        .map_err(|e| unprocessable("body", format!("is not an Alertmanager payload: {e}")))?;
    if payload.version != "4" {
        return Err(unprocessable(
            "version",
            format!(
                "version {:?} is not supported; expected \"4\"",
                payload.version
            ),
        ));
    }
    Ok(payload)
}

/// The incident key of one alert of one route. groupKey + fingerprint names it, so a repeat
/// notification (repeat_interval) finds the open incident instead of alerting again.
fn alert_dedup_key(group_key: &str, alert: &AlertmanagerAlert) -> String {
    let identity = if alert.fingerprint.is_empty() {
        serde_json::to_string(&alert.labels).unwrap_or_default()
    } else {
        alert.fingerprint.clone()
    };
    // Hashed, not cut: group keys carry every grouped label and can be long, and a cut key would
    // merge different alerts into one incident (and page nobody for the second).
    format!(
        "alertmanager:{}",
        crate::domain::digest(&format!("{group_key}\n{identity}"))
    )
}

/// Closes the open incident of a resolved alert; one with none (already resolved, or never seen) is
/// counted as unmatched.
async fn resolve_alert(
    state: &AppState,
    dedup_key: &str,
    outcome: &mut AlertmanagerOutcome,
) -> Result<(), AppError> {
    match state.store.open_incident_by_dedup_key(dedup_key).await? {
        Some(incident) => {
            crate::app::incidents::resolve(state, &incident.id, "resolved by Alertmanager").await?;
            outcome.resolved.push(incident.id);
        }
        None => outcome.unmatched += 1,
    }
    Ok(())
}

/// Stores a firing alert's incident, or finds the open one an earlier notification stored.
async fn fire_alert(
    state: &AppState,
    deadline: &Deadline,
    payload: &AlertmanagerPayload,
    alert: &AlertmanagerAlert,
    dedup_key: String,
    outcome: &mut AlertmanagerOutcome,
) -> Result<(), AppError> {
    let type_label = &state.settings.alertmanager.type_label;
    // Each alert carries its own dedup key: when this notification is cut short, Alertmanager's
    // resend finds the alerts already stored instead of alerting again.
    let trigger = alert_trigger(payload, alert, type_label, dedup_key);
    let stored = store_trigger(state, deadline, trigger, false).await?;
    if stored.is_new {
        outcome.created.push(stored.id);
    } else {
        outcome.existing.push(stored.id);
    }
    Ok(())
}

/// The trigger of a firing alert: its type from the `type_label` label, its message from the
/// `summary` annotation (or the alert name), and the alert as the raw parameters.
fn alert_trigger(
    payload: &AlertmanagerPayload,
    alert: &AlertmanagerAlert,
    type_label: &str,
    dedup_key: String,
) -> Trigger {
    let alertname = alert.labels.get("alertname").map(String::as_str);
    let message = alert
        .annotations
        .get("summary")
        .map(String::as_str)
        .or(alertname)
        .filter(|s| !s.trim().is_empty())
        .unwrap_or("Alert from Alertmanager");
    let raw_params = serde_json::json!({
        "groupKey": payload.group_key,
        "receiver": payload.receiver,
        "externalURL": payload.external_url,
        "alert": alert,
    })
    .to_string();
    Trigger {
        source: Source::Alertmanager,
        emergency_type: alert
            .labels
            .get(type_label)
            .map(|t| crate::domain::truncate(t.trim(), MAX_TYPE_CHARS)),
        message: crate::domain::truncate(message.trim(), MAX_MESSAGE_CHARS),
        recording_url: None,
        dedup_key: Some(dedup_key),
        raw_params,
        occurred_at: rfc3339_ms(alert.starts_at.as_deref()),
        drill_contact: None,
    }
}

/// Parses Alertmanager's RFC 3339 times; its zero time (`0001-01-01T00:00:00Z`) means unknown.
fn rfc3339_ms(raw: Option<&str>) -> Option<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(raw?).ok()?;
    let ms = t.timestamp_millis();
    (ms > 0).then_some(ms)
}
