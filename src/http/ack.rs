//! Acknowledgement through a message's link (`/a/{reference}`: a confirm page, and its form). The
//! call's keypress is Exotel's (`http::exotel::ack`).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::edge::{public_read, PublicDb};
use super::AppState;
use crate::app::ack::{self, event};
use crate::app::durable::{self, Written};
use crate::domain::IncidentState;
use crate::store::{Acknowledged, DeliveryRow};

/// The look-up of a link waits this long for a share of the database.
const LOOKUP_WAIT: Duration = Duration::from_secs(2);

/// The message whose link this is, looked up within the unauthenticated share of the database.
async fn linked(
    state: &AppState,
    limits: &PublicDb,
    reference: &str,
) -> Result<DeliveryRow, Response> {
    // References are generated ids: a long one or one with control characters names nothing.
    if reference.len() > 128 || reference.chars().any(char::is_control) {
        return Err(page(StatusCode::NOT_FOUND, "No such alert", NO_SUCH, None));
    }
    let store = state.store.clone();
    let wanted = reference.to_owned();
    let found = public_read(limits, LOOKUP_WAIT, async move {
        store.delivery_by_ack_ref(&wanted).await
    })
    .await;
    match found {
        Some(Ok(Some(d))) => Ok(d),
        Some(Ok(None)) => Err(page(StatusCode::NOT_FOUND, "No such alert", NO_SUCH, None)),
        Some(Err(e)) => {
            tracing::error!(error = format!("{e:#}"), "acknowledge link look-up failed");
            Err(busy())
        }
        None => Err(busy()),
    }
}

const NO_SUCH: &str = "This link names no alert. Call the emergency desk.";

fn busy() -> Response {
    let mut res = page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Busy",
        "The server is busy. Try again in a moment, or call the emergency desk.",
        None,
    );
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    res
}

/// `GET /a/{reference}`: the confirm page. It changes nothing: phones and chat apps fetch links to
/// show previews, and a preview must never acknowledge.
pub async fn link_page(
    State(state): State<AppState>,
    limits: PublicDb,
    Path(reference): Path<String>,
) -> Response {
    let d = match linked(&state, &limits, &reference).await {
        Ok(d) => d,
        Err(res) => return res,
    };
    let incident = match state.store.incident(&d.incident_id).await {
        Ok(Some(i)) => i,
        Ok(None) => return page(StatusCode::NOT_FOUND, "No such alert", NO_SUCH, None),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "acknowledge page look-up failed");
            return busy();
        }
    };
    let what = format!("{} emergency", incident.emergency_type);
    let text = match (&incident.acknowledged_by, incident.status) {
        (_, crate::domain::IncidentState::Resolved) => {
            format!("The {what} is resolved. You can still confirm that you saw it.")
        }
        (Some(by), _) => format!("{by} has acknowledged the {what}. You can acknowledge it too."),
        (None, _) => format!("Acknowledge the {what}: everyone else is told that you have it."),
    };
    page(
        StatusCode::OK,
        "Acknowledge the alert",
        &text,
        Some(&reference),
    )
}

/// `POST /a/{reference}`: the confirm page's form. The reference in the path is the credential.
pub async fn link_confirm(
    State(state): State<AppState>,
    limits: PublicDb,
    Path(reference): Path<String>,
) -> Response {
    let d = match linked(&state, &limits, &reference).await {
        Ok(d) => d,
        Err(res) => return res,
    };
    let write = {
        let (state, d) = (state.clone(), d.clone());
        async move {
            ack::acknowledge(
                &state,
                &d.incident_id,
                Some(&d),
                &d.contact_name,
                d.channel.as_str(),
            )
            .await
        }
    };
    let why = match durable::write(ack::STORE_BUDGET, write, |_, _| {}).await {
        Written::Ended(Ok(Some(done))) => {
            let (title, text) = confirmed(&state, &done);
            return page(StatusCode::OK, title, &text, None);
        }
        Written::Ended(Ok(None)) => {
            return page(StatusCode::NOT_FOUND, "No such alert", NO_SUCH, None)
        }
        Written::Ended(Err(e)) => e.to_string(),
        Written::Pending => "no answer from the database in time".to_owned(),
    };
    tracing::error!(error = %why, "ACKNOWLEDGEMENT NOT STORED through a link");
    ack::record_not_acknowledged(&state, &d.id, event::NOT_STORED, &why).await;
    busy()
}

/// What the confirm form's page says happened: a thank-you only for the acknowledgement that told the
/// others; a later one, or one after the resolve, is recorded and told to nobody, and the page says who
/// had it first, and when.
fn confirmed(state: &AppState, done: &Acknowledged) -> (&'static str, String) {
    let offset = state.settings.messages.utc_offset_minutes;
    let when = |ms: Option<i64>| {
        ms.map(|ms| format!(" at {}", crate::messages::format_time(ms, offset)))
            .unwrap_or_default()
    };
    let first = match &done.by {
        Some(by) => format!("{by} had already acknowledged it{}", when(done.at)),
        None => "Nobody had acknowledged it".to_owned(),
    };
    if done.first {
        (
            "Thank you",
            "Thank you: your acknowledgement is recorded, and the others are told that you have it."
                .to_owned(),
        )
    } else if done.status == IncidentState::Resolved {
        (
            "Already resolved",
            format!(
                "This emergency was already resolved{}. {first}. Your acknowledgement is recorded; \
                 nobody is told of it.",
                when(done.resolved_at)
            ),
        )
    } else {
        (
            "Already acknowledged",
            format!(
                "{first}, and everyone alerted was told then. Your acknowledgement is recorded as \
                 well; nobody is told of it again."
            ),
        )
    }
}

/// A small self-contained page (no scripts, nothing fetched), with the acknowledge form when
/// `form_ref` is given.
fn page(status: StatusCode, title: &str, text: &str, form_ref: Option<&str>) -> Response {
    let form = form_ref
        .map(|r| {
            format!(
                "<form method=\"post\" action=\"/a/{}\"><button type=\"submit\">Acknowledge</button></form>",
                escape(r)
            )
        })
        .unwrap_or_default();
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;max-width:30em;margin:2em auto;padding:0 1em}}\
         button{{font-size:1.4em;padding:.6em 1.4em}}</style></head>\
         <body><h1>{t}</h1><p>{x}</p>{form}</body></html>",
        t = escape(title),
        x = escape(text),
    );
    let mut res = (status, body).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// HTML-escapes text (names and types come from the stakeholder file and the caller).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
