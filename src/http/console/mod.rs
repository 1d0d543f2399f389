//! The ops console at `/console`: a live incident board and incident pages, server-rendered from
//! compiled templates (`templates/console/`), with one small inline script that listens to
//! `/console/events` (Server-Sent Events) and fetches the fresh fragment when something changed.
//!
//! Sign-in takes the admin token or `server.console_token`; sessions live in the database, so any
//! replica serves any browser. Every state-changing form carries the session's CSRF token.

mod session;
mod views;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use askama::Template;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use futures_util::StreamExt;
use serde::Deserialize;

use self::session::{csrf_ok, current, forbidden, secured, to_sign_in};
use self::views::{BoardFragment, BoardPage, IncidentFragment, IncidentPage, LoginPage};
use super::recording::client_address;
use super::AppState;
use crate::app::console::{self as use_case, Session};
use crate::domain::random_token;
use crate::error::AppError;

pub use session::COOKIE;

/// Longest acting name kept: it is shown on every page and written into each action's record.
const MAX_NAME_CHARS: usize = 64;
/// How long a browser waits before reconnecting a lost event stream.
const RETRY: Duration = Duration::from_secs(2);
/// Comment lines on an idle event stream, so proxies and phones do not drop it as dead.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(board_page))
        .route("/console/", get(|| async { Redirect::to("/console") }))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/board", get(board_fragment))
        .route("/console/events", get(events))
        .route("/console/incidents/{id}", get(incident_page))
        .route("/console/incidents/{id}/live", get(incident_fragment))
        .route("/console/incidents/{id}/resolve", post(resolve))
        .route("/console/incidents/{id}/ack", post(acknowledge))
}

/// A rendered template as a secured HTML answer.
fn page(status: StatusCode, t: &impl Template, nonce: Option<&str>) -> Result<Response, AppError> {
    let html = t
        .render()
        .map_err(|e| AppError::Internal(anyhow::anyhow!("rendering a console page: {e}")))?;
    Ok(secured((status, Html(html)).into_response(), nonce))
}

#[derive(Debug, Default, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    name: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: Option<String>,
}

async fn login_page(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    if current(&state, &headers).await?.is_some() {
        return Ok(secured(Redirect::to("/console").into_response(), None));
    }
    let nonce = random_token(16);
    page(
        StatusCode::OK,
        &LoginPage {
            nonce: nonce.clone(),
            error: String::new(),
            name: String::new(),
        },
        Some(&nonce),
    )
}

/// `POST /console/login`: the token signs in with its role, the name is who acts. The token is
/// checked first (in constant time), and the right one always signs in: behind a proxy that is not
/// trusted every client shares one address, and wrong guesses there must not lock the desk out. Wrong
/// tokens are counted per client address; past the limit a wrong one is answered 429 with
/// `Retry-After`. Neither token is ever echoed or logged.
async fn login(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, AppError> {
    let client = match peer {
        Some(Extension(ConnectInfo(addr))) => {
            let trusted = state.settings.server.trusted_proxies().unwrap_or_default();
            client_address(addr.ip(), &headers, &trusted)
        }
        None => std::net::IpAddr::from([0, 0, 0, 0]),
    };
    let role = use_case::role_of(&state, form.token.trim());
    if role.is_none() {
        if let Some(wait) = state.console.sign_in.blocked(client) {
            tracing::warn!("console sign-in refused: too many wrong tokens from this address");
            let secs = wait.as_secs().max(1).to_string();
            let mut res = secured(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many wrong tokens; wait a minute and try again",
                )
                    .into_response(),
                None,
            );
            if let Ok(v) = HeaderValue::from_str(&secs) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return Ok(res);
        }
    }
    let name = crate::domain::truncate(
        crate::http::params::strip_all_controls(form.name.trim().to_owned()).trim(),
        MAX_NAME_CHARS,
    );
    let nonce = random_token(16);
    let refuse = |error: &str, status: StatusCode, name: String| {
        page(
            status,
            &LoginPage {
                nonce: nonce.clone(),
                error: error.to_owned(),
                name,
            },
            Some(&nonce),
        )
    };
    let Some(role) = role else {
        state.console.sign_in.failed(client);
        tracing::warn!("console sign-in with a wrong token");
        return refuse("That token is not valid.", StatusCode::UNAUTHORIZED, name);
    };
    if name.is_empty() {
        return refuse(
            "Give your name: it is recorded on each action.",
            StatusCode::UNPROCESSABLE_ENTITY,
            name,
        );
    }
    let (id, _) = use_case::sign_in(&state, &name, role).await?;
    let mut res = secured(Redirect::to("/console").into_response(), None);
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&state, &id)) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(res)
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let Some((id, s)) = current(&state, &headers).await? else {
        return Ok(to_sign_in());
    };
    if !csrf_ok(&s, form.csrf.as_deref()) {
        return Ok(forbidden());
    }
    use_case::sign_out(&state, &id).await?;
    let mut res = to_sign_in();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie(&state)) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(res)
}

async fn board_page(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Some((_, s)) = current(&state, &headers).await? else {
        return Ok(to_sign_in());
    };
    let nonce = random_token(16);
    let board = views::board(&state).await?;
    page(
        StatusCode::OK,
        &BoardPage {
            nonce: nonce.clone(),
            viewer_name: s.name,
            viewer_role: s.role.as_str(),
            csrf: s.csrf,
            board,
        },
        Some(&nonce),
    )
}

/// The board's live part, fetched by the page's script on each change; 401 without a session.
async fn board_fragment(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    if current(&state, &headers).await?.is_none() {
        return Err(AppError::Unauthorized);
    }
    page(
        StatusCode::OK,
        &BoardFragment {
            board: views::board(&state).await?,
        },
        None,
    )
}

/// Incident ids are UUIDs: anything else names no incident and never reaches the database.
fn known_id(id: &str) -> Result<(), AppError> {
    if id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Ok(())
    } else {
        Err(AppError::NotFound("no such incident".to_owned()))
    }
}

async fn incident_page(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Some((_, s)) = current(&state, &headers).await? else {
        return Ok(to_sign_in());
    };
    known_id(&id)?;
    let view = views::incident(&state, &id)
        .await?
        .ok_or_else(|| AppError::NotFound("no such incident".to_owned()))?;
    let nonce = random_token(16);
    page(
        StatusCode::OK,
        &IncidentPage {
            nonce: nonce.clone(),
            viewer_name: s.name,
            viewer_role: s.role.as_str(),
            csrf: s.csrf,
            page: view,
        },
        Some(&nonce),
    )
}

async fn incident_fragment(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Some((_, s)) = current(&state, &headers).await? else {
        return Err(AppError::Unauthorized);
    };
    known_id(&id)?;
    let view = views::incident(&state, &id)
        .await?
        .ok_or_else(|| AppError::NotFound("no such incident".to_owned()))?;
    page(
        StatusCode::OK,
        &IncidentFragment {
            csrf: s.csrf,
            page: view,
        },
        None,
    )
}

/// The session a state-changing form acts in: `Err` with the answer when there is none (to the sign-in
/// page) or the form lacks the session's CSRF token (403).
async fn acting(
    state: &AppState,
    headers: &HeaderMap,
    form: &CsrfForm,
) -> Result<Result<Session, Response>, AppError> {
    let Some((_, s)) = current(state, headers).await? else {
        return Ok(Err(to_sign_in()));
    };
    if !csrf_ok(&s, form.csrf.as_deref()) {
        tracing::warn!("console form without a valid CSRF token refused");
        return Ok(Err(forbidden()));
    }
    Ok(Ok(s))
}

/// `POST /console/incidents/{id}/resolve`: resolves through the application layer, recording who from
/// the session; back to the incident page.
async fn resolve(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let s = match acting(&state, &headers, &form).await? {
        Ok(s) => s,
        Err(refused) => return Ok(refused),
    };
    known_id(&id)?;
    let reason = resolved_by(&s);
    crate::app::incidents::resolve(&state, &id, &reason)
        .await?
        .ok_or_else(|| AppError::NotFound("no such incident".to_owned()))?;
    state.console.poke();
    Ok(secured(
        Redirect::to(&format!("/console/incidents/{id}")).into_response(),
        None,
    ))
}

/// `POST /console/incidents/{id}/ack`: acknowledges through the application layer in the name of the
/// signed-in person (the console token may acknowledge); back to the incident page.
async fn acknowledge(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let s = match acting(&state, &headers, &form).await? {
        Ok(s) => s,
        Err(refused) => return Ok(refused),
    };
    known_id(&id)?;
    crate::app::ack::acknowledge(&state, &id, None, &s.name, "console")
        .await?
        .ok_or_else(|| AppError::NotFound("no such incident".to_owned()))?;
    state.console.poke();
    Ok(secured(
        Redirect::to(&format!("/console/incidents/{id}")).into_response(),
        None,
    ))
}

/// The reason recorded with a console resolve: who, and with which sign-in.
fn resolved_by(s: &Session) -> String {
    format!(
        "resolved in the console by {} ({})",
        s.name,
        s.role.as_str()
    )
}

/// `GET /console/events`: Server-Sent Events, one `change` event whenever the stored data changed
/// (and one at once, so a reconnected page catches up). 401 without a session; 503 when the cap on
/// open streams is reached (the page's script tries again). Each open stream holds one of the
/// non-Exotel request slots, so the cap keeps streams from taking them all.
async fn events(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, AppError> {
    if current(&state, &headers).await?.is_none() {
        return Err(AppError::Unauthorized);
    }
    let Ok(permit) = state.console.streams.clone().try_acquire_owned() else {
        tracing::warn!("console event stream refused: the cap on open streams is reached");
        let mut res = (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many open event streams",
        )
            .into_response();
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return Ok(res);
    };
    let changes = versions(state.console.subscribe());
    let first = futures_util::stream::once(async {
        Ok::<_, Infallible>(Event::default().event("change").data("hello").retry(RETRY))
    });
    let stream = first.chain(changes.map(move |version| {
        let _held = &permit;
        Ok::<_, Infallible>(Event::default().event("change").data(version.to_string()))
    }));
    let mut res = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx buffers proxied answers by default, which would hold events back: this turns it off.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

/// The versions of the change signal as a stream, ending when the server stops.
fn versions(
    rx: tokio::sync::watch::Receiver<use_case::Change>,
) -> impl futures_util::Stream<Item = u64> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let c = *rx.borrow_and_update();
        (!c.stopping).then_some((c.version, rx))
    })
}
