//! The operator API's bearer-token check, as an extractor: a handler that takes [`Admin`] cannot run
//! without the admin token, so no route can forget the check.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};

use crate::error::AppError;
use crate::http::AppState;

/// Proof that the request carries `Authorization: Bearer <admin token>`.
///
/// It is a parts extractor: listed before the body extractor, it refuses a request before its body is
/// read.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = AppError;

    /// Compares the token in constant time (through [`AppState::admin_token_ok`]); the token is never
    /// logged, only that it was missing or wrong.
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if state.admin_token_ok(bearer_token(&parts.headers)) {
            Ok(Admin)
        } else {
            tracing::warn!("operator API request with a missing or wrong bearer token");
            Err(AppError::Unauthorized)
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, spaces trimmed);
/// `None` without one.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
}
