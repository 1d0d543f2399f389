//! The operator API's bearer-token check.

use axum::http::{header, HeaderMap};

use crate::error::AppError;
use crate::http::AppState;

/// Checks `Authorization: Bearer <admin token>` in constant time. The token is never logged.
pub(super) fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), AppError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    if state.admin_token_ok(given) {
        Ok(())
    } else {
        tracing::warn!("operator API request with a missing or wrong bearer token");
        Err(AppError::Unauthorized)
    }
}
