//! `GET /api/v1/openapi.json`: the OpenAPI 3 document, generated from the handlers' annotations.

use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::OpenApi;

use super::alarms;
use super::alertmanager::{self, AlertmanagerAlert};
use super::incidents;

/// The OpenAPI 3 document of `/api/v1`, generated from the handlers' annotations in `incidents` and
/// `alertmanager`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "exotel-sos operator API",
        description = "Trigger, inspect and resolve emergency incidents."
    ),
    paths(
        incidents::create_incident,
        incidents::list_incidents,
        incidents::get_incident,
        incidents::resolve_incident,
        incidents::acknowledge_incident,
        alertmanager::alertmanager,
        alarms::list_alarms,
        openapi_json
    ),
    components(schemas(AlertmanagerAlert)),
    modifiers(&BearerAuth),
    tags((name = "incidents", description = "Emergencies and who was reached"))
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme that the handlers' `security(("bearer" = []))` refer to.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "incidents",
    responses((status = 200, description = "The OpenAPI 3 document of /api/v1", content_type = "application/json"))
)]
pub async fn openapi_json() -> Response {
    Json(ApiDoc::openapi()).into_response()
}
