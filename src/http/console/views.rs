//! What the console's pages show, shaped from store rows: numbers masked, provider text scrubbed of
//! numbers and secrets, times and ages for people, each delivery state as a label and a colour class.

use std::collections::BTreeMap;

use askama::Template;

use crate::app::AppState;
use crate::domain::{
    human_duration_ms, mask, mask_numbers, now_ms, Channel, DeliveryState, Purpose,
};
use crate::settings::non_empty;
use crate::store::{DeliveryRow, EventRow, IncidentEventRow, IncidentRow};

/// Most open incidents the board shows: the newest, so one page stays cheap to build and read.
pub const BOARD_LIMIT: i64 = 50;

#[derive(Template)]
#[template(path = "console/login.html")]
pub struct LoginPage {
    pub nonce: String,
    pub error: String,
    pub name: String,
}

#[derive(Template)]
#[template(path = "console/board.html")]
pub struct BoardPage {
    pub nonce: String,
    pub viewer_name: String,
    pub viewer_role: &'static str,
    pub csrf: String,
    pub board: Board,
}

#[derive(Template)]
#[template(path = "console/board_fragment.html")]
pub struct BoardFragment {
    pub board: Board,
}

#[derive(Template)]
#[template(path = "console/incident.html")]
pub struct IncidentPage {
    pub nonce: String,
    pub viewer_name: String,
    pub viewer_role: &'static str,
    pub csrf: String,
    pub page: IncidentView,
}

#[derive(Template)]
#[template(path = "console/incident_fragment.html")]
pub struct IncidentFragment {
    pub csrf: String,
    pub page: IncidentView,
}

pub struct Board {
    pub incidents: Vec<BoardIncident>,
    /// More open incidents exist than are shown.
    pub more: bool,
}

/// One incident's line on the board, and the head of its own page.
pub struct BoardIncident {
    pub id: String,
    pub emergency_type: String,
    pub source: String,
    pub status: String,
    pub unreached: bool,
    /// Who acknowledged it; empty until acknowledgement is recorded with a name.
    pub acknowledged_by: String,
    pub received: String,
    pub age: String,
    pub channels: Vec<&'static str>,
    pub contacts: Vec<ContactRow>,
}

/// One contact's deliveries, one cell per channel.
pub struct ContactRow {
    pub name: String,
    pub phone: String,
    pub cells: Vec<Cell>,
}

pub struct Cell {
    /// The delivery state in words (colour is never the only sign), or `-` for no delivery.
    pub label: String,
    pub class: &'static str,
}

pub struct IncidentView {
    pub head: BoardIncident,
    pub caller: String,
    pub route: String,
    pub message: String,
    pub resolved_at: String,
    /// The recording player's source (`{public_url}/r/<link_ref>`), or empty.
    pub recording_src: String,
    pub deliveries: Vec<DeliveryView>,
    pub timeline: Vec<TimelineEntry>,
}

pub struct DeliveryView {
    pub contact: String,
    pub phone: String,
    pub channel: &'static str,
    pub state: &'static str,
    pub class: &'static str,
    pub attempts: i64,
    pub redials: i64,
    pub provider: String,
    pub provider_id: String,
    pub provider_status: String,
    pub last_error: String,
    pub simulated: bool,
    /// In dry-run, the request that would have been sent (pretty JSON), secrets redacted.
    pub request: String,
    pub events: Vec<EventLine>,
}

pub struct EventLine {
    pub at: String,
    pub kind: String,
    pub provider_id: String,
    pub detail: String,
}

pub struct TimelineEntry {
    pub at_ms: i64,
    pub at: String,
    /// `incident`, or the contact and channel of a delivery.
    pub subject: String,
    pub kind: String,
    pub detail: String,
}

/// The colour class of a delivery state: reached, under way, failed, dry-run, or stopped.
pub fn state_class(state: DeliveryState) -> &'static str {
    use DeliveryState::*;
    match state {
        Answered | Acknowledged | Delivered | Read => "ok",
        Queued | Held | Sending | Accepted => "wait",
        Failed | Unconfirmed => "bad",
        Simulated => "dry",
        Cancelled => "off",
    }
}

/// A time for people: UTC, to the second.
pub fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// Text from a provider or the store as it may be shown: every spelling of the delivery's number
/// masked, any other number-like run masked, and no token or credential of this server.
pub fn shown(state: &AppState, text: &str, phone: Option<&str>) -> String {
    let mut out = match phone {
        Some(p) => scrub(text, p),
        None => text.to_owned(),
    };
    let s = &state.settings;
    let secrets = [
        Some(secrecy::ExposeSecret::expose_secret(&*state.webhook_token)),
        Some(secrecy::ExposeSecret::expose_secret(&*state.admin_token)),
        non_empty(&s.server.console_token),
        non_empty(&s.exotel.api_key),
        non_empty(&s.exotel.api_token),
        non_empty(&s.gupshup.password),
    ];
    for secret in secrets.into_iter().flatten() {
        // A very short secret would blank out ordinary words; settings refuse such tokens anyway.
        if secret.len() >= 6 {
            out = out.replace(secret, "[redacted]");
        }
    }
    crate::domain::phone::mask_numbers(&out)
}

/// Masks every spelling of `phone` in free text (provider errors may quote the number).
fn scrub(text: &str, phone: &str) -> String {
    let masked = mask(phone);
    let digits = phone.trim_start_matches('+');
    let mut out = text.replace(phone, &masked).replace(digits, &masked);
    if digits.len() > 10 {
        out = out.replace(&digits[digits.len() - 10..], &masked);
    }
    out
}

/// The head of an incident and its contact × channel grid.
pub fn board_incident(
    incident: &IncidentRow,
    deliveries: &[&DeliveryRow],
    now: i64,
) -> BoardIncident {
    // Contacts in the order their first delivery was created; a follow-up call shows in the same
    // cell as the first call once it is newer.
    let mut order: Vec<(String, String)> = Vec::new();
    let mut latest: BTreeMap<(String, String, Channel), &DeliveryRow> = BTreeMap::new();
    for d in deliveries {
        // An acknowledgement notice says nothing of whether this contact was reached.
        if d.purpose == Purpose::AckNotice {
            continue;
        }
        let who = (d.contact_name.clone(), d.phone.clone());
        if !order.contains(&who) {
            order.push(who.clone());
        }
        let cell = latest.entry((who.0, who.1, d.channel)).or_insert(d);
        // The newest delivery of a cell wins, whatever order the rows came in.
        if d.created_at > cell.created_at {
            *cell = d;
        }
    }
    let contacts = order
        .into_iter()
        .map(|(name, phone)| ContactRow {
            cells: Channel::ALL
                .iter()
                .map(|c| match latest.get(&(name.clone(), phone.clone(), *c)) {
                    Some(d) => Cell {
                        label: d.status.as_str().to_owned(),
                        class: state_class(d.status),
                    },
                    None => Cell {
                        label: "-".to_owned(),
                        class: "none",
                    },
                })
                .collect(),
            phone: mask(&phone),
            name,
        })
        .collect();
    BoardIncident {
        id: incident.id.clone(),
        emergency_type: incident.emergency_type.clone(),
        source: incident.source.as_str().to_owned(),
        status: incident.status.to_string(),
        unreached: incident.unreached_at.is_some(),
        acknowledged_by: incident.acknowledged_by.clone().unwrap_or_default(),
        received: when(incident.received_at),
        age: human_duration_ms(now - incident.received_at),
        channels: Channel::ALL.iter().map(|c| c.as_str()).collect(),
        contacts,
    }
}

/// The board: the newest open incidents with their grids, from two queries.
pub async fn board(state: &AppState) -> anyhow::Result<Board> {
    let incidents = state.store.open_incidents(BOARD_LIMIT + 1).await?;
    let deliveries = state.store.open_incident_deliveries(BOARD_LIMIT).await?;
    let more = incidents.len() as i64 > BOARD_LIMIT;
    let now = now_ms();
    let mut by_incident: BTreeMap<&str, Vec<&DeliveryRow>> = BTreeMap::new();
    for d in &deliveries {
        by_incident
            .entry(d.incident_id.as_str())
            .or_default()
            .push(d);
    }
    Ok(Board {
        incidents: incidents
            .iter()
            .take(BOARD_LIMIT as usize)
            .map(|i| {
                let ds = by_incident.get(i.id.as_str()).cloned().unwrap_or_default();
                board_incident(i, &ds, now)
            })
            .collect(),
        more,
    })
}

/// One incident's page; `None` when there is no such incident.
pub async fn incident(state: &AppState, id: &str) -> anyhow::Result<Option<IncidentView>> {
    let Some(incident) = state.store.incident(id).await? else {
        return Ok(None);
    };
    let deliveries = state.store.deliveries(id).await?;
    let mut events = state.store.incident_events(id).await?;
    let incident_events: Vec<IncidentEventRow> = state.store.incident_timeline(id).await?;
    let now = now_ms();
    let refs: Vec<&DeliveryRow> = deliveries.iter().collect();
    let head = board_incident(&incident, &refs, now);
    let recording_src = match (
        &incident.recording_url,
        deliveries.iter().find_map(|d| d.link_ref.as_deref()),
    ) {
        (Some(_), Some(link)) => format!("{}/r/{link}", state.settings.public_base()),
        _ => String::new(),
    };
    let mut timeline: Vec<TimelineEntry> = incident_events
        .into_iter()
        .map(|e| TimelineEntry {
            at_ms: e.at,
            at: when(e.at),
            subject: "incident".to_owned(),
            kind: e.kind,
            detail: shown(state, &e.detail, incident.caller.as_deref()),
        })
        .collect();
    let mut views = Vec::with_capacity(deliveries.len());
    for d in &deliveries {
        let evs: Vec<EventRow> = events.remove(&d.id).unwrap_or_default();
        let subject = format!("{} · {}", d.contact_name, d.channel);
        for e in &evs {
            timeline.push(TimelineEntry {
                at_ms: e.at,
                at: when(e.at),
                subject: subject.clone(),
                kind: e.kind.clone(),
                detail: shown(state, &e.detail, Some(&d.phone)),
            });
        }
        views.push(delivery_view(state, d, evs));
    }
    timeline.sort_by_key(|e| e.at_ms);
    Ok(Some(IncidentView {
        head,
        caller: incident.caller.as_deref().map(mask).unwrap_or_default(),
        route: incident.route.clone(),
        message: mask_numbers(incident.message.as_deref().unwrap_or_default()),
        resolved_at: incident.resolved_at.map(when).unwrap_or_default(),
        recording_src,
        deliveries: views,
        timeline,
    }))
}

fn delivery_view(state: &AppState, d: &DeliveryRow, events: Vec<EventRow>) -> DeliveryView {
    let phone = d.phone.as_str();
    let simulated = d.status == DeliveryState::Simulated;
    let request = match (&d.last_request, simulated) {
        (Some(raw), true) => shown(state, &request_text(raw), Some(phone)),
        _ => String::new(),
    };
    DeliveryView {
        contact: d.contact_name.clone(),
        phone: mask(phone),
        channel: d.channel.as_str(),
        state: d.status.as_str(),
        class: state_class(d.status),
        attempts: d.attempts,
        redials: d.redials,
        provider: d.provider.clone(),
        provider_id: d.provider_id.clone().unwrap_or_default(),
        provider_status: mask_numbers(d.provider_status.as_deref().unwrap_or_default()),
        last_error: d
            .last_error
            .as_deref()
            .map(|e| shown(state, e, Some(phone)))
            .unwrap_or_default(),
        simulated,
        request,
        events: events
            .into_iter()
            .map(|e| EventLine {
                at: when(e.at),
                kind: e.kind,
                provider_id: e.provider_id.unwrap_or_default(),
                detail: shown(state, &e.detail, Some(phone)),
            })
            .collect(),
    }
}

/// A stored dry-run request (`{method, url, basic_auth_user, form: [[name, value], …]}`) as an operator
/// reads it: the request line, the basic-auth user, then one form field per line. Anything else is
/// shown as it was stored.
pub fn request_text(raw: &str) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(raw) else {
        return raw.to_owned();
    };
    let text = |k: &str| map.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let mut out = format!("{} {}\n", text("method"), text("url"));
    if let Some(user) = map.get("basic_auth_user").and_then(|v| v.as_str()) {
        out.push_str(&format!("basic auth user: {user}\n"));
    }
    for pair in map
        .get("form")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        if let Some([k, v]) = pair.as_array().map(Vec::as_slice) {
            out.push_str(&format!(
                "{} = {}\n",
                k.as_str().unwrap_or(""),
                v.as_str().unwrap_or("")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_request_reads_as_lines() {
        let raw = r#"{"method":"POST","url":"https://api.exotel.com/v1/Accounts/x/Calls/connect","basic_auth_user":"ab****","form":[["From","+91******0001"],["StatusCallback","https://h/exotel/call-status?token=[REDACTED]"]]}"#;
        assert_eq!(
            request_text(raw),
            "POST https://api.exotel.com/v1/Accounts/x/Calls/connect\nbasic auth user: ab****\n\
             From = +91******0001\nStatusCallback = https://h/exotel/call-status?token=[REDACTED]\n"
        );
        assert_eq!(request_text("not json"), "not json");
    }

    #[test]
    fn states_have_a_colour_class_and_a_word() {
        for s in DeliveryState::ALL {
            assert!(!state_class(s).is_empty());
            assert!(!s.as_str().is_empty());
        }
    }
}
