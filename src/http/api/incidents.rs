//! Incidents: `POST /api/v1/incidents` (create), `GET /api/v1/incidents` (list),
//! `GET /api/v1/incidents/{id}` (one) and `POST /api/v1/incidents/{id}/resolve`, with their views and
//! the parsing of their bodies and query strings. [`store_trigger`] stores a trigger for both doors,
//! this one and the Alertmanager webhook.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::{
    clean_json, iso, known_id, scrub, unprocessable, ErrorBody, MAX_DEDUP_KEY_CHARS,
    MAX_MESSAGE_CHARS, MAX_TYPE_CHARS,
};
use crate::app::durable::{self, WriteError, Written};
use crate::app::incidents::{self, Emergency, PlanError, Planned};
use crate::domain::{mask, Channel, DeliveryState, IncidentState, Purpose, Source, SOURCE_HEADER};
use crate::error::AppError;
use crate::http::edge::Deadline;
use crate::http::params::{http_url, strip_all_controls};
use crate::http::AppState;
use crate::store::{Created, DeliveryRow, EventRow, IncidentFilter, IncidentRow, NewIncident};

/// How long a trigger waits for the database before answering 503 (so the caller retries).
const STORE_BUDGET: Duration = Duration::from_secs(5);
/// How long a stored trigger's answer waits to read the incident back; after that the answer carries
/// what was stored, without the deliveries' detail. The incident is stored: it is never answered as a
/// failure.
const DETAIL_BUDGET: Duration = Duration::from_secs(2);
/// Longest audio URL accepted: it is stored with the incident and handed to every call.
const MAX_URL_CHARS: usize = 2048;
/// Page size when the list query names none.
const DEFAULT_PAGE: i64 = 50;
/// Largest page: each incident is a row to read and serialize, so one request stays cheap.
const MAX_PAGE: i64 = 200;

/// `POST /api/v1/incidents` body. Unknown fields are refused, so a typo cannot drop information.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewIncidentRequest {
    /// Emergency type, matched case-insensitively against the routes; unknown types use the default route.
    #[schema(min_length = 1, max_length = 64, example = "ServerDown")]
    pub emergency_type: String,
    /// What happened; texted, sent on WhatsApp and spoken in calls.
    #[schema(min_length = 1, max_length = 1000, example = "db1 is down")]
    pub message: String,
    /// An http(s) audio file played in calls instead of the spoken message.
    #[schema(example = "https://example.com/alert.mp3")]
    pub audio_url: Option<String>,
    /// While an incident with this key is open, the same key returns it instead of alerting again.
    #[schema(max_length = 256)]
    pub dedup_key: Option<String>,
    /// A fire drill: only this contact (by name, as in the stakeholder file) is alerted, on every
    /// channel they have, whatever the route; the incident's source is `drill`.
    #[schema(max_length = 128, example = "Dr. Asha Rao (cardiology)")]
    pub drill_contact: Option<String>,
}

/// An incident as operators see it. Times are RFC 3339, UTC.
#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentView {
    pub id: String,
    /// `exotel`, `api`, `alertmanager` or `cli`.
    pub source: String,
    pub emergency_type: String,
    /// The route used (`default` when the type is unknown).
    pub route: String,
    pub call_sid: Option<String>,
    pub dedup_key: Option<String>,
    /// The caller's number, masked.
    pub caller: Option<String>,
    pub recording_url: Option<String>,
    pub message: Option<String>,
    /// `open`, `acknowledged` or `resolved`.
    pub status: String,
    pub occurred_at: Option<String>,
    pub received_at: String,
    pub resolved_at: Option<String>,
    /// Who acknowledged it first: a contact's name, or the operator named.
    pub acknowledged_by: Option<String>,
    pub acknowledged_at: Option<String>,
    /// How: `call` (keypress), `sms` or `whatsapp` (the message's link), `api`, `cli` or `console`.
    pub acknowledged_via: Option<String>,
    /// The escalation policy it follows, as fixed when it was stored; absent for a one-tier route
    /// (everyone at once) and for drills.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalation: Option<EscalationView>,
}

/// An incident's escalation policy: tiers of teams alerted one after another until someone
/// acknowledges.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EscalationView {
    /// The emergency type the policy was written for (`default` for the default route).
    #[serde(rename = "type")]
    pub emergency_type: String,
    /// Teams per tier, in order.
    pub tiers: Vec<Vec<String>>,
    /// Time to acknowledge before the next tier is alerted, seconds.
    pub wait_secs: u64,
    /// Passes through the whole policy after the first.
    pub repeat: u32,
}

/// An incident with every delivery and each delivery's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentDetail {
    #[serde(flatten)]
    pub incident: IncidentView,
    /// The caller's recording as this server fetched it (proxy mode); absent when it is not fetched.
    pub recording: Option<RecordingView>,
    /// What happened to the incident as a whole (its recording fetched, unavailable, deleted, a
    /// follow-up call queued), oldest first.
    pub events: Vec<IncidentEventView>,
    /// Per contact: whether they acknowledged, were answered, or were never reached, and the state of
    /// each channel's delivery.
    pub contacts: Vec<ContactSummary>,
    pub deliveries: Vec<DeliveryView>,
}

/// The fetched recording.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecordingView {
    /// `pending` (being fetched), `stored`, `unavailable` or `deleted`.
    pub status: String,
    pub attempts: i64,
    pub content_type: Option<String>,
    pub bytes: Option<i64>,
    pub last_error: Option<String>,
    /// Tries stop at this time.
    pub deadline_at: String,
    pub stored_at: Option<String>,
}

/// One entry of an incident's own audit trail.
#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentEventView {
    pub at: String,
    pub kind: String,
    pub detail: String,
}

/// One contact on one channel.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    pub id: String,
    pub contact_name: String,
    /// Masked, e.g. `+91******0001`.
    pub phone: String,
    /// `call`, `sms` or `whatsapp`.
    pub channel: String,
    /// `queued`, `held` (a call waiting for the carrier-safe cap), `sending`, `accepted`, `answered`,
    /// `acknowledged`, `delivered`, `read`, `unconfirmed`, `failed`, `simulated` or `cancelled`.
    pub status: String,
    pub attempts: i64,
    pub redials: i64,
    pub provider_id: Option<String>,
    pub provider_status: Option<String>,
    pub last_error: Option<String>,
    pub due_at: String,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    pub played_at: Option<String>,
    /// The escalation tier it alerts (0: the first, at once).
    pub tier: i64,
    /// The pass through the escalation policy (0: the first).
    pub run: i64,
    pub events: Vec<EventView>,
}

/// One entry of a delivery's audit trail.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub at: String,
    pub kind: String,
    pub provider_id: Option<String>,
    pub detail: String,
}

/// A page of incidents, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentList {
    pub incidents: Vec<IncidentSummary>,
    /// Pass as `before` for the next page; absent on the last page.
    pub next_before: Option<String>,
}

/// An incident in the list: the incident and, per contact, the state of each channel's delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentSummary {
    #[serde(flatten)]
    pub incident: IncidentView,
    /// One entry per contact, in the order their deliveries were created.
    pub contacts: Vec<ContactSummary>,
}

/// One contact's deliveries of an incident, by channel.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContactSummary {
    pub contact_name: String,
    /// Masked, e.g. `+91******0001`.
    pub phone: String,
    /// Channel (`call`, `sms`, `whatsapp`) → the state of its delivery (the latest, when a follow-up
    /// call was added).
    #[schema(example = json!({"call": "answered", "sms": "delivered", "whatsapp": "read"}))]
    pub channels: std::collections::BTreeMap<String, String>,
    /// `acknowledged` (they pressed the key, followed the link, or a delivery of theirs was
    /// acknowledged), `answered` (a call was picked up, and nobody pressed the key; with
    /// acknowledgement by keypress off, a call answered is reached and shows here too) or
    /// `not_reached`. Messages delivered or read are in `channels`; they do not make a contact reached.
    #[schema(example = "answered")]
    pub reached: String,
}

/// A contact's standing from their deliveries' states.
fn reached(states: &[DeliveryState], channels: &[Channel]) -> &'static str {
    if states.contains(&DeliveryState::Acknowledged) {
        "acknowledged"
    } else if states.iter().zip(channels).any(|(s, c)| {
        *c == Channel::Call && matches!(s, DeliveryState::Answered | DeliveryState::Delivered)
    }) {
        "answered"
    } else {
        "not_reached"
    }
}

/// Per contact, the state of each channel's delivery.
fn contact_summaries(deliveries: Vec<DeliveryRow>) -> Vec<ContactSummary> {
    let mut out: Vec<(String, ContactSummary)> = Vec::new();
    let mut seen: Vec<(Vec<DeliveryState>, Vec<Channel>)> = Vec::new();
    let mut ranks: HashMap<(usize, Channel), (bool, i64)> = HashMap::new();
    for d in deliveries {
        let i = match out
            .iter()
            .position(|(phone, c)| *phone == d.phone && c.contact_name == d.contact_name)
        {
            Some(i) => i,
            None => {
                out.push((
                    d.phone.clone(),
                    ContactSummary {
                        contact_name: d.contact_name.clone(),
                        phone: mask(&d.phone),
                        channels: Default::default(),
                        reached: String::new(),
                    },
                ));
                seen.push(Default::default());
                out.len() - 1
            }
        };
        seen[i].0.push(d.status);
        seen[i].1.push(d.channel);
        // A notice says someone else has it: it is not this contact's alert. With escalation a
        // contact has a call per tier and pass: the channel shows the one that went out last, and a
        // later tier's call still waiting (or cancelled before it was placed) only when none did.
        if d.purpose != Purpose::AckNotice {
            let went_out = d.attempts > 0
                || !matches!(
                    d.status,
                    DeliveryState::Queued | DeliveryState::Held | DeliveryState::Cancelled
                );
            let rank = (went_out, d.updated_at);
            let key = (i, d.channel);
            if ranks.get(&key).is_none_or(|best| rank >= *best) {
                ranks.insert(key, rank);
                out[i]
                    .1
                    .channels
                    .insert(d.channel.to_string(), d.status.to_string());
            }
        }
    }
    out.into_iter()
        .zip(seen)
        .map(|((_, mut c), (states, channels))| {
            c.reached = reached(&states, &channels).to_owned();
            c
        })
        .collect()
}

/// Filters and paging of `GET /api/v1/incidents`. Use `before` (keyset, stable while incidents
/// arrive) or `page` (1-based), not both.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size, 1..=200 (default 50).
    pub limit: Option<i64>,
    /// Only incidents older than the incident with this id.
    pub before: Option<String>,
    /// 1-based page number.
    pub page: Option<i64>,
    /// `open` or `resolved`.
    pub status: Option<String>,
    /// Emergency type, case-insensitive.
    pub emergency_type: Option<String>,
}

/// What `POST /api/v1/incidents/{id}/resolve` did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResolveOutcome {
    /// True when the incident was already resolved (nothing changed).
    pub already_resolved: bool,
    /// Deliveries that had not gone out and were cancelled.
    pub cancelled: usize,
    pub incident: IncidentDetail,
}

impl From<IncidentRow> for IncidentView {
    fn from(r: IncidentRow) -> Self {
        IncidentView {
            id: r.id,
            source: r.source.as_str().to_owned(),
            emergency_type: r.emergency_type,
            route: r.route,
            call_sid: r.call_sid,
            dedup_key: r.dedup_key,
            caller: r.caller.as_deref().map(mask),
            recording_url: r.recording_url,
            message: r.message,
            status: r.status.to_string(),
            occurred_at: r.occurred_at.map(iso),
            received_at: iso(r.received_at),
            resolved_at: r.resolved_at.map(iso),
            acknowledged_by: r.acknowledged_by,
            acknowledged_at: r.acknowledged_at.map(iso),
            acknowledged_via: r.acknowledged_via,
            // Written by this server; an unreadable one is left out rather than failing the view.
            escalation: r
                .escalation
                .as_deref()
                .and_then(|json| serde_json::from_str(json).ok()),
        }
    }
}

/// A delivery as operators see it: its phone masked, and masked again wherever the provider's free
/// text (errors, events) quotes it.
fn delivery_view(d: DeliveryRow, events: Vec<EventRow>) -> DeliveryView {
    let phone = d.phone;
    DeliveryView {
        events: events
            .into_iter()
            .map(|e| EventView {
                at: iso(e.at),
                kind: e.kind,
                provider_id: e.provider_id,
                detail: scrub(&e.detail, &phone),
            })
            .collect(),
        id: d.id,
        contact_name: d.contact_name,
        channel: d.channel.to_string(),
        status: d.status.to_string(),
        attempts: d.attempts,
        redials: d.redials,
        provider_id: d.provider_id,
        provider_status: d.provider_status,
        last_error: d.last_error.map(|e| scrub(&e, &phone)),
        due_at: iso(d.due_at),
        created_at: iso(d.created_at),
        updated_at: iso(d.updated_at),
        finished_at: d.finished_at.map(iso),
        played_at: d.played_at.map(iso),
        tier: d.tier,
        run: d.run,
        phone: mask(&phone),
    }
}

/// The incident `id` with its deliveries, each with its events; 404 when there is no such incident.
async fn incident_detail(state: &AppState, id: &str) -> Result<IncidentDetail, AppError> {
    let incident = state
        .store
        .incident(id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no incident {id}")))?;
    let deliveries = state.store.deliveries(id).await?;
    let mut events = state.store.incident_events(id).await?;
    let recording = state.store.recording(id).await?.map(|r| RecordingView {
        status: r.status,
        attempts: r.attempts,
        content_type: r.content_type,
        bytes: r.bytes,
        last_error: r.last_error,
        deadline_at: iso(r.deadline_at),
        stored_at: r.stored_at.map(iso),
    });
    let timeline = state
        .store
        .incident_timeline(id)
        .await?
        .into_iter()
        .map(|e| IncidentEventView {
            at: iso(e.at),
            kind: e.kind,
            detail: e.detail,
        })
        .collect();
    let contacts = contact_summaries(deliveries.clone());
    Ok(IncidentDetail {
        incident: incident.into(),
        recording,
        events: timeline,
        contacts,
        deliveries: deliveries
            .into_iter()
            .map(|d| {
                let ev = events.remove(&d.id).unwrap_or_default();
                delivery_view(d, ev)
            })
            .collect(),
    })
}

/// Like [`optional_str`], but absent or null is an error too.
fn required_str(
    map: &serde_json::Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<String, AppError> {
    match map.get(field) {
        None | Some(Value::Null) => Err(unprocessable(field, "is required")),
        Some(v) => optional_str(map, field, max)?
            .ok_or_else(|| unprocessable(field, format!("must be a string, not {}", kind(v)))),
    }
}

/// The trimmed string, `None` when absent or null; an error for another JSON type, an empty or an
/// overlong value.
fn optional_str(
    map: &serde_json::Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<String>, AppError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let s = s.trim();
            if s.is_empty() {
                Err(unprocessable(field, "must not be empty"))
            } else if s.chars().count() > max {
                Err(unprocessable(
                    field,
                    format!("is longer than {max} characters"),
                ))
            } else {
                Ok(Some(s.to_owned()))
            }
        }
        Some(other) => Err(unprocessable(
            field,
            format!("must be a string, not {}", kind(other)),
        )),
    }
}

/// A JSON value's type, as error messages name it.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The body as a JSON object, control characters removed; the fields are checked one by one after,
/// so an error can name the field that is wrong.
fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, AppError> {
    match clean_json(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(unprocessable(
            "body",
            format!("must be a JSON object, not {}", kind(&other)),
        )),
        Err(e) => Err(unprocessable("body", format!("is not valid JSON: {e}"))),
    }
}

/// Parses and validates a `POST /api/v1/incidents` body, naming the first wrong field.
pub fn parse_new_incident(body: &[u8]) -> Result<NewIncidentRequest, AppError> {
    let map = json_object(body)?;
    const KNOWN: [&str; 5] = [
        "emergency_type",
        "message",
        "audio_url",
        "dedup_key",
        "drill_contact",
    ];
    if let Some(unknown) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(unprocessable(
            unknown,
            format!("unknown field; expected {}", KNOWN.join(", ")),
        ));
    }
    let emergency_type = required_str(&map, "emergency_type", MAX_TYPE_CHARS)?;
    let message = required_str(&map, "message", MAX_MESSAGE_CHARS)?;
    let audio_url = optional_str(&map, "audio_url", MAX_URL_CHARS)?
        .map(|raw| {
            http_url(&raw).ok_or_else(|| unprocessable("audio_url", "must be an http(s) URL"))
        })
        .transpose()?;
    let dedup_key = optional_str(&map, "dedup_key", MAX_DEDUP_KEY_CHARS)?;
    let drill_contact = optional_str(&map, "drill_contact", MAX_CONTACT_CHARS)?;
    Ok(NewIncidentRequest {
        emergency_type,
        message,
        audio_url,
        dedup_key,
        drill_contact,
    })
}

/// Creates an incident and alerts its contacts.
#[utoipa::path(
    post,
    path = "/api/v1/incidents",
    tag = "incidents",
    request_body = NewIncidentRequest,
    params(("X-Sos-Source" = Option<String>, Header, description = "`cli` marks incidents from the trigger command")),
    responses(
        (status = 201, description = "Stored; contacts are being alerted", body = IncidentDetail),
        (status = 200, description = "An open incident with the same dedup_key exists; nothing new is sent", body = IncidentDetail),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 422, description = "Invalid body; `field` names the culprit", body = ErrorBody),
        (status = 503, description = "The database did not answer in time; try again with the same dedup_key", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(incident_id))]
pub async fn create_incident(
    State(state): State<AppState>,
    _admin: Admin,
    deadline: Deadline,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let req = parse_new_incident(&body)?;
    let raw_params = serde_json::to_string(&req).unwrap_or_default();
    let stored = store_trigger(
        &state,
        &deadline,
        Trigger {
            source: source_of(&headers),
            emergency_type: Some(req.emergency_type),
            message: req.message,
            recording_url: req.audio_url,
            dedup_key: req.dedup_key,
            raw_params,
            occurred_at: None,
            drill_contact: req.drill_contact,
        },
        true,
    )
    .await?;
    // Stored: from here on the answer is a success, whatever the read-back does.
    let detail = read_back(&state, &deadline, &stored).await;
    Ok(stored_answer(stored.is_new, detail))
}

/// `cli` when the `trigger` command sent the request (it says so in [`SOURCE_HEADER`]), `api` otherwise.
fn source_of(headers: &HeaderMap) -> Source {
    match headers.get(SOURCE_HEADER).and_then(|v| v.to_str().ok()) {
        Some(s) if s.eq_ignore_ascii_case("cli") => Source::Cli,
        _ => Source::Api,
    }
}

/// The stored incident with its deliveries, read back within [`DETAIL_BUDGET`]; what was stored when
/// the read fails or is slow, since the incident is stored either way and must not be answered as a
/// failure.
async fn read_back(state: &AppState, deadline: &Deadline, stored: &Stored) -> IncidentDetail {
    let budget = deadline.budget(DETAIL_BUDGET);
    match tokio::time::timeout(budget, incident_detail(state, &stored.id)).await {
        Ok(Ok(detail)) => detail,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "stored, but could not read the incident back; answering what was stored");
            stored_detail(&stored.incident, &stored.id)
        }
        Err(_) => {
            tracing::warn!(
                "stored, but reading the incident back is slow; answering what was stored"
            );
            stored_detail(&stored.incident, &stored.id)
        }
    }
}

/// Parses the query string of `GET /api/v1/incidents` into a filter, naming the first wrong
/// parameter.
fn parse_list_query(raw: Option<&str>) -> Result<IncidentFilter, AppError> {
    let pairs = query_pairs(raw)?;
    let limit = whole_number(&pairs, "limit")?.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(unprocessable("limit", format!("must be 1..={MAX_PAGE}")));
    }
    let page = whole_number(&pairs, "page")?;
    if page.is_some_and(|p| !(1..=1_000_000).contains(&p)) {
        return Err(unprocessable("page", "must be at least 1"));
    }
    let before = non_empty(&pairs, "before");
    if page.is_some() && before.is_some() {
        return Err(unprocessable("page", "use either page or before, not both"));
    }
    let status = non_empty(&pairs, "status")
        .map(|s| {
            s.parse::<IncidentState>()
                .map_err(|_| unprocessable("status", "must be open, acknowledged or resolved"))
        })
        .transpose()?;
    Ok(IncidentFilter {
        status,
        emergency_type: non_empty(&pairs, "emergency_type"),
        before,
        offset: page.map(|p| (p - 1) * limit).unwrap_or(0),
        limit,
    })
}

/// The query string's parameters, control characters removed; an error for a malformed query string
/// or an unknown parameter (a typo must not silently widen the list).
fn query_pairs(raw: Option<&str>) -> Result<HashMap<String, String>, AppError> {
    let pairs: HashMap<String, String> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| unprocessable("query", format!("is not a valid query string: {e}")))?;
    // Filters reach the database as text: no control characters (PostgreSQL refuses NUL).
    let pairs: HashMap<String, String> = pairs
        .into_iter()
        .map(|(k, v)| (strip_all_controls(k), strip_all_controls(v)))
        .collect();
    let known = ["limit", "before", "page", "status", "emergency_type"];
    if let Some(unknown) = pairs.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(unprocessable(unknown, "unknown query parameter"));
    }
    Ok(pairs)
}

/// The parameter `name` as a whole number; `None` when absent.
fn whole_number(pairs: &HashMap<String, String>, name: &str) -> Result<Option<i64>, AppError> {
    pairs
        .get(name)
        .map(|v| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| unprocessable(name, "must be a whole number"))
        })
        .transpose()
}

/// The parameter `name`; `None` when absent or empty (`?status=` filters nothing).
fn non_empty(pairs: &HashMap<String, String>, name: &str) -> Option<String> {
    pairs.get(name).filter(|s| !s.is_empty()).cloned()
}

/// Lists incidents, newest first, each with its per-contact, per-channel delivery states.
#[utoipa::path(
    get,
    path = "/api/v1/incidents",
    tag = "incidents",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of incidents", body = IncidentList),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 422, description = "Invalid query parameter", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_incidents(
    State(state): State<AppState>,
    _admin: Admin,
    RawQuery(query): RawQuery,
) -> Result<Json<IncidentList>, AppError> {
    let filter = parse_list_query(query.as_deref())?;
    let rows = state
        .store
        .list_incidents(&filter)
        .await?
        .ok_or_else(|| unprocessable("before", "names no incident"))?;
    let next_before = (rows.len() as i64 == filter.limit)
        .then(|| rows.last().map(|r| r.id.clone()))
        .flatten();
    let mut incidents = Vec::with_capacity(rows.len());
    for row in rows {
        // One small indexed read per incident: a page holds at most MAX_PAGE of them.
        let contacts = contact_summaries(state.store.deliveries(&row.id).await?);
        incidents.push(IncidentSummary {
            incident: row.into(),
            contacts,
        });
    }
    Ok(Json(IncidentList {
        incidents,
        next_before,
    }))
}

/// One incident with every delivery and its history.
#[utoipa::path(
    get,
    path = "/api/v1/incidents/{id}",
    tag = "incidents",
    params(("id" = String, Path, description = "Incident id")),
    responses(
        (status = 200, description = "The incident", body = IncidentDetail),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such incident", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(incident_id = %id))]
pub async fn get_incident(
    State(state): State<AppState>,
    Path(id): Path<String>,
    _admin: Admin,
) -> Result<Json<IncidentDetail>, AppError> {
    known_id(&id)?;
    Ok(Json(incident_detail(&state, &id).await?))
}

/// Resolves an incident: deliveries that have not gone out are cancelled.
#[utoipa::path(
    post,
    path = "/api/v1/incidents/{id}/resolve",
    tag = "incidents",
    params(
        ("id" = String, Path, description = "Incident id"),
        ("X-Sos-Source" = Option<String>, Header, description = "`cli` marks a resolve by the resolve command"),
    ),
    responses(
        (status = 200, description = "Resolved (or already resolved)", body = ResolveOutcome),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such incident", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(incident_id = %id))]
pub async fn resolve_incident(
    State(state): State<AppState>,
    Path(id): Path<String>,
    _admin: Admin,
    headers: HeaderMap,
) -> Result<Json<ResolveOutcome>, AppError> {
    known_id(&id)?;
    let reason = match source_of(&headers) {
        Source::Cli => "resolved with the resolve command",
        _ => "resolved through the API",
    };
    let resolved = incidents::resolve(&state, &id, reason)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no incident {id}")))?;
    Ok(Json(ResolveOutcome {
        already_resolved: !resolved.changed,
        cancelled: resolved.cancelled.len(),
        incident: incident_detail(&state, &id).await?,
    }))
}

/// `POST /api/v1/incidents/{id}/ack` body.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckIncidentRequest {
    /// Who acknowledges (default `operator`).
    #[schema(max_length = 128, example = "Dr. Asha Rao")]
    pub by: Option<String>,
}

/// What `POST /api/v1/incidents/{id}/ack` did.
#[derive(Debug, Serialize, ToSchema)]
pub struct AckOutcome {
    /// True when someone had acknowledged it before (or it was resolved): this one is recorded, not
    /// broadcast.
    pub already_acknowledged: bool,
    /// Calls not yet placed, cancelled.
    pub cancelled: usize,
    /// Acknowledgement notices queued to those already alerted.
    pub notices: usize,
    pub incident: IncidentDetail,
}

/// Longest name an acknowledgement may give.
const MAX_BY_CHARS: usize = 128;

/// Acknowledges an incident: the calls not yet placed are cancelled, redials stop, and everyone
/// already alerted is told by SMS and WhatsApp who has it. Later acknowledgements are recorded only.
#[utoipa::path(
    post,
    path = "/api/v1/incidents/{id}/ack",
    tag = "incidents",
    params(
        ("id" = String, Path, description = "Incident id"),
        ("X-Sos-Source" = Option<String>, Header, description = "`cli` marks an acknowledgement by the ack command"),
    ),
    request_body = AckIncidentRequest,
    responses(
        (status = 200, description = "Acknowledged (or recorded again)", body = AckOutcome),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such incident", body = ErrorBody),
        (status = 422, description = "Invalid body", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
#[tracing::instrument(skip_all, fields(incident_id = %id))]
pub async fn acknowledge_incident(
    State(state): State<AppState>,
    Path(id): Path<String>,
    _admin: Admin,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<AckOutcome>, AppError> {
    known_id(&id)?;
    let request: AckIncidentRequest = if body.iter().all(u8::is_ascii_whitespace) {
        AckIncidentRequest::default()
    } else {
        let value = clean_json(&body).map_err(|e| unprocessable("body", e.to_string()))?;
        serde_json::from_value(value).map_err(|e| unprocessable("by", e.to_string()))?
    };
    let by = request
        .by
        .as_deref()
        .map(|b| strip_all_controls(b.trim().to_owned()))
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "operator".to_owned());
    if by.chars().count() > MAX_BY_CHARS {
        return Err(unprocessable(
            "by",
            format!("at most {MAX_BY_CHARS} characters"),
        ));
    }
    let via = match source_of(&headers) {
        Source::Cli => "cli",
        _ => "api",
    };
    let write = {
        let (state, id) = (state.clone(), id.clone());
        async move { crate::app::ack::acknowledge(&state, &id, None, &by, via).await }
    };
    let done = match durable::write(crate::app::ack::STORE_BUDGET, write, |_, _| {}).await {
        Written::Ended(Ok(done)) => done,
        // A 500 that logs the failed write's cause, or the task's failure.
        Written::Ended(Err(e)) => return Err(AppError::Internal(e.into())),
        Written::Pending => {
            return Err(AppError::Unavailable(
                "the database did not answer in time".to_owned(),
            ))
        }
    }
    .ok_or_else(|| AppError::NotFound(format!("no incident {id}")))?;
    Ok(Json(AckOutcome {
        already_acknowledged: !done.first,
        cancelled: done.cancelled.len(),
        notices: done.notices,
        incident: incident_detail(&state, &id).await?,
    }))
}

// ---------------------------------------------------------------------------------------------------
// Storing a trigger. `store_trigger` is the one way a trigger, from either door, becomes an incident;
// the items below serve it and the answers built from what it stored.
// ---------------------------------------------------------------------------------------------------

/// Longest contact name a drill may name.
const MAX_CONTACT_CHARS: usize = 128;

/// One trigger, whichever door it came through.
pub(super) struct Trigger {
    pub(super) source: Source,
    pub(super) emergency_type: Option<String>,
    pub(super) message: String,
    pub(super) recording_url: Option<String>,
    pub(super) dedup_key: Option<String>,
    pub(super) raw_params: String,
    pub(super) occurred_at: Option<i64>,
    /// A fire drill's one contact.
    pub(super) drill_contact: Option<String>,
}

impl Trigger {
    /// The emergency the application layer routes and raises.
    fn into_emergency(self) -> Emergency {
        Emergency {
            source: self.source,
            call_sid: None,
            dedup_key: self.dedup_key,
            requested_type: self.emergency_type,
            caller: None,
            recording_url: self.recording_url,
            recording_available_by: None,
            message: Some(self.message),
            raw_params: self.raw_params,
            occurred_at: self.occurred_at,
        }
    }
}

/// A stored trigger.
pub(super) struct Stored {
    pub(super) id: String,
    pub(super) is_new: bool,
    incident: NewIncident,
}

/// What a stored trigger answers when its incident cannot be read back in time: what was stored,
/// without the deliveries (they are queued; `GET /api/v1/incidents/{id}` shows them).
fn stored_detail(incident: &NewIncident, id: &str) -> IncidentDetail {
    IncidentDetail {
        incident: IncidentView {
            id: id.to_owned(),
            source: incident.source.as_str().to_owned(),
            emergency_type: incident.emergency_type.clone(),
            route: incident.route.clone(),
            call_sid: incident.call_sid.clone(),
            dedup_key: incident.dedup_key.clone(),
            caller: incident.caller.as_deref().map(mask),
            recording_url: incident.recording_url.clone(),
            message: incident.message.clone(),
            status: crate::domain::IncidentState::Open.to_string(),
            occurred_at: incident.occurred_at.map(iso),
            received_at: iso(crate::domain::now_ms()),
            resolved_at: None,
            acknowledged_by: None,
            acknowledged_at: None,
            acknowledged_via: None,
            escalation: incident
                .escalation
                .as_deref()
                .and_then(|json| serde_json::from_str(json).ok()),
        },
        recording: None,
        events: Vec::new(),
        contacts: Vec::new(),
        deliveries: Vec::new(),
    }
}

/// A stored trigger's answer: 201 for a new incident, 200 for the open one with the same dedup key.
fn stored_answer(is_new: bool, detail: IncidentDetail) -> Response {
    let status = if is_new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(detail)).into_response()
}

/// Stores the incident and its deliveries (or finds the open one with the same dedup key), wakes the
/// dispatcher for a new one. The write runs in a task of its own, so neither the request time limit nor
/// a client hanging up cuts it off half-way; with `answer_on_commit`, its success answer is left with
/// the deadline as soon as it commits. An unreachable or slow database is 503: try again, with the same
/// dedup key to be safe.
pub(super) async fn store_trigger(
    state: &AppState,
    deadline: &Deadline,
    t: Trigger,
    answer_on_commit: bool,
) -> Result<Stored, AppError> {
    let drill_contact = t.drill_contact.clone();
    let emergency = t.into_emergency();
    let planned = match drill_contact {
        Some(contact) => {
            incidents::plan_drill(state, emergency, &contact).map_err(|e| match e {
                PlanError::UnknownContact(name) => unprocessable(
                    "drill_contact",
                    format!("no contact named {name:?} in the stakeholder file"),
                ),
            })?
        }
        None => incidents::plan(state, emergency),
    };
    let incident = planned.incident.clone();
    let budget = deadline.budget(STORE_BUDGET);
    let write = write_incident(state.clone(), deadline.clone(), planned, answer_on_commit);
    let created = written(durable::write(budget, write, |_, _| {}).await, budget)?;
    tracing::Span::current().record("incident_id", created.incident_id.as_str());
    Ok(Stored {
        id: created.incident_id,
        is_new: created.is_new,
        incident,
    })
}

/// The write of [`store_trigger`]; the success answer is left with the deadline the moment it
/// commits, when asked to.
async fn write_incident(
    state: AppState,
    deadline: Deadline,
    planned: Planned,
    answer_on_commit: bool,
) -> anyhow::Result<Created> {
    let created = incidents::raise(&state, &planned).await?;
    if answer_on_commit {
        deadline.commit(stored_answer(
            created.is_new,
            stored_detail(&planned.incident, &created.incident_id),
        ));
    }
    Ok(created)
}

/// What the write task came to within `budget`. A failed, panicked or slow write is 503 (`Unavailable`)
/// so the caller tries again; a slow one goes on, and its alerts go out if it commits.
fn written(outcome: Written<Created>, budget: Duration) -> Result<Created, AppError> {
    match outcome {
        Written::Ended(Ok(created)) => Ok(created),
        Written::Ended(Err(WriteError::Failed(e))) => {
            tracing::error!(error = format!("{e:#}"), "could not store the incident");
            Err(AppError::Unavailable(
                "the incident could not be stored; try again".to_owned(),
            ))
        }
        Written::Ended(Err(e)) => {
            // A lost write in the task's own words (`task 7 panicked …`).
            let error = match &e {
                WriteError::Lost(panicked) => panicked.to_string(),
                other => other.to_string(),
            };
            tracing::error!(%error, "the incident write failed");
            Err(AppError::Unavailable(
                "the incident could not be stored; try again".to_owned(),
            ))
        }
        Written::Pending => {
            tracing::error!(
                "no answer from the database within {budget:?}; the write goes on and alerts go out if it commits"
            );
            Err(AppError::Unavailable(format!(
                "no answer from the database within {budget:?}; try again with the same dedup_key"
            )))
        }
    }
}
