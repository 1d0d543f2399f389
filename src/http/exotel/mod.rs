//! Exotel's webhooks (`/exotel/*`): the Passthru that stores an emergency, the greeting an outbound call
//! plays, the keypress that acknowledges, and the status callbacks of calls and SMS. Each is checked
//! against the webhook token; see `token` for who a refused request looks like.

pub mod ack;
pub mod callbacks;
pub mod greeting;
pub mod passthru;
pub mod token;

use axum::routing::{get, post};
use axum::Router;

use super::AppState;

/// The `/exotel/*` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/exotel/passthru",
            // An explicit HEAD, or axum would run the GET handler for it and store an emergency.
            get(passthru::passthru)
                .post(passthru::passthru)
                .head(passthru::passthru_probe),
        )
        .route(
            "/exotel/greeting",
            get(greeting::greeting).head(greeting::greeting),
        )
        .route("/exotel/ack", get(ack::keypress).post(ack::keypress))
        .route("/exotel/call-status", post(callbacks::call_status))
        .route("/exotel/sms-status", post(callbacks::sms_status))
}
