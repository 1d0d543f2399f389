//! The console's session cookie and the checks every console request goes through: who is signed in,
//! whether a form carries the session's CSRF token, and the headers that keep pages out of caches and
//! frames.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use subtle::ConstantTimeEq;

use crate::app::console::{self, Session, SESSION_TTL};
use crate::app::AppState;
use crate::error::AppError;

/// The session cookie's name.
pub const COOKIE: &str = "sos_console";

/// The raw session id from the request's cookies.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_owned())
        // Ids are hex: anything else names no session and never reaches the database.
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The signed-in session of this request, if any.
pub async fn current(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(String, Session)>, AppError> {
    let Some(id) = session_id(headers) else {
        return Ok(None);
    };
    Ok(console::session(state, &id).await?.map(|s| (id, s)))
}

/// The `Set-Cookie` value of a new session: HttpOnly, SameSite=Strict, limited to `/console`, expiring
/// with the session, and Secure when the server is reached over https.
pub fn set_cookie(state: &AppState, id: &str) -> String {
    format!(
        "{COOKIE}={id}; Path=/console; Max-Age={}; HttpOnly; SameSite=Strict{}",
        SESSION_TTL.as_secs(),
        secure(state)
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(state: &AppState) -> String {
    format!(
        "{COOKIE}=; Path=/console; Max-Age=0; HttpOnly; SameSite=Strict{}",
        secure(state)
    )
}

fn secure(state: &AppState) -> &'static str {
    if state
        .settings
        .server
        .public_url
        .to_ascii_lowercase()
        .starts_with("https:")
    {
        "; Secure"
    } else {
        ""
    }
}

/// Whether a form's `csrf` field is this session's token (constant time).
pub fn csrf_ok(session: &Session, given: Option<&str>) -> bool {
    match given {
        Some(g) if !g.is_empty() => g.as_bytes().ct_eq(session.csrf.as_bytes()).into(),
        _ => false,
    }
}

/// 403 for a state-changing form without this session's CSRF token.
pub fn forbidden() -> Response {
    secured(
        (
            StatusCode::FORBIDDEN,
            "this form is stale or was not sent by the console; reload the page and try again",
        )
            .into_response(),
        None,
    )
}

/// The answer to a page request without a session: to the sign-in page.
pub fn to_sign_in() -> Response {
    secured(Redirect::to("/console/login").into_response(), None)
}

/// Adds the headers every console answer carries: never cached (pages hold names and states), never
/// framed, no referrer, and a content policy that runs only this answer's own inline script and style.
pub fn secured(mut res: Response, nonce: Option<&str>) -> Response {
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let policy = match nonce {
        Some(n) => format!(
            "default-src 'self'; script-src 'nonce-{n}'; style-src 'nonce-{n}'; media-src *; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        ),
        None => "default-src 'none'; frame-ancestors 'none'".to_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&policy) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    res
}
