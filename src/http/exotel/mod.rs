//! Exotel's webhooks (`/exotel/*`): the Passthru that stores an emergency, the greeting an outbound call
//! plays, the keypress that acknowledges, and the status callbacks of calls and SMS. Each is checked
//! against the webhook token; see `token` for who a refused request looks like.

pub mod ack;
pub mod callbacks;
pub mod greeting;
pub mod passthru;
pub mod token;

use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::params::Params;
use super::AppState;
use crate::error::AppError;
use token::Refused;

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

/// One of Exotel's webhooks, as [`ExotelParams`] reads it: where its fields are, and how it answers a
/// request with a missing or wrong token.
pub trait Webhook: Send + 'static {
    /// Whether the body holds fields too (a form, JSON or multipart), beside the query string. The
    /// greeting and the Passthru's probe read the query string alone, as Exotel sends them.
    const BODY: bool;
    /// What Exotel's own refused request is logged as (a stranger's is reported by the token watch).
    const REFUSED: &'static str;

    /// The answer to a refused request: 401, unless the webhook must say something else.
    fn refused(_state: &AppState, refused: Refused) -> Response {
        refused.answer(Self::REFUSED)
    }
}

/// The fields of a request to Exotel's webhook `W` that carried the right token: the query string,
/// and the body when `W` reads it. A body that cannot be read is 400 before the token is looked at; a
/// missing or wrong token counts toward the token alarm (see [`token::check`]) and is answered as `W`
/// says ([`Webhook::refused`]).
pub struct ExotelParams<W>(pub Params, PhantomData<W>);

impl<W: Webhook> FromRequest<AppState> for ExotelParams<W> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Response> {
        let mut params = Params::from_query(req.uri().query());
        if W::BODY {
            let headers = req.headers().clone();
            // Through `Bytes`, so the body limit answers as it does for every route.
            let body = Bytes::from_request(req, state)
                .await
                .map_err(IntoResponse::into_response)?;
            params
                .extend_body(&headers, body)
                .await
                .map_err(|e| AppError::BadRequest(e).into_response())?;
        }
        token::check(state, &params).map_err(|refused| W::refused(state, refused))?;
        Ok(ExotelParams(params, PhantomData))
    }
}
