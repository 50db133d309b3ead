//! runlane's HTTP server (`runlane serve`): the JSON API under `/v1` (docs/API.md) with the
//! worker protocol, API keys and roles, Server-Sent Events, `/health` and `/metrics`.
//!
//! The app is a merge of per-area routers over one [`AppState`] (engine, key store, config,
//! remote workers, SSE event log): [`api`] answers the areas with their OpenAPI
//! documentation, and [`router`] turns them into the served `Router` with
//! `/v1/openapi.json`. A new area adds its `OpenApiRouter` in [`api`] (and a row per route to
//! the auth matrix in `tests/matrix.rs`, which the OpenAPI test requires).

pub mod auth;
pub mod config;
pub mod error;
pub mod events;
pub mod json;
pub mod keys;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod state;
pub mod util;

use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use auth::Caller;
pub use config::{BackendConfig, ServerConfig};
pub use error::ApiError;
pub use keys::{KeyStore, MemoryKeyStore, PostgresKeyStore, Role, SqliteKeyStore};
pub use server::{serve, Server, ServerError};
pub use state::{AppState, Backend};
pub use util::JsonText;

/// The document's header.
#[derive(OpenApi)]
#[openapi(
    info(title = "runlane", description = "The runlane HTTP API (docs/API.md)."),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

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

/// Every documented route area, merged.
pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes::meta::router())
        .merge(routes::envs::router())
        .merge(routes::keys::router())
        .merge(routes::runs::router())
        .merge(routes::workers::router())
        .merge(routes::admin::router())
        .merge(routes::versions::router())
        .merge(routes::events::router())
        .merge(routes::schedules::router())
}

/// The OpenAPI document of [`api`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// The served app: [`api`] plus `/v1/openapi.json`, over `state`.
pub fn router(state: AppState) -> Router {
    let (router, doc) = api().split_for_parts();
    let doc = std::sync::Arc::new(doc);
    router
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(|| async { error::ApiError::not_found("no such route") })
        .with_state(state)
}
