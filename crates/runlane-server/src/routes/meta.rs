//! `/health` (no key) and the OpenAPI document.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::state::{AppState, Backend};

/// A lane's consumers, for readiness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LaneHealth {
    /// The lane.
    pub name: String,
    /// Consumers whose chain covers it.
    pub consumers: u32,
    /// Ready runs waiting in it.
    pub ready: u64,
    /// Since when it holds ready runs with no consumer, if it does.
    pub orphan_since_at_ms: Option<u64>,
    /// When a run of it was last claimed through this server (null: never since start).
    pub last_claim_at_ms: Option<u64>,
}

/// `GET /health`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` or `degraded`.
    pub status: String,
    /// The engine shape.
    pub shape: String,
    /// Each backend's status (`ok` or the error).
    pub backends: serde_json::Map<String, serde_json::Value>,
    /// Lanes with their consumers.
    pub lanes: Vec<LaneHealth>,
}

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics))
}

/// Liveness and readiness: each backend's status and each lane's consumers (no key).
#[utoipa::path(get, path = "/health", tag = "meta",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let mut backends = serde_json::Map::new();
    let mut ok = true;
    match state.backend() {
        Backend::Distributed(d) => {
            let h = d.health().await;
            ok &= h.ok();
            let redis = h.redis_error.unwrap_or_else(|| "ok".to_string());
            let pg = h.postgres_error.unwrap_or_else(|| "ok".to_string());
            backends.insert("redis".into(), redis.into());
            backends.insert("postgres".into(), pg.into());
        }
        other => {
            backends.insert(other.name().into(), "ok".into());
        }
    }
    let last_claims = state.engine().last_claims();
    let lanes = match state.engine().lanes().await {
        Ok(lanes) => lanes
            .into_iter()
            .map(|l| LaneHealth {
                last_claim_at_ms: last_claims.get(&l.name).map(|t| t.as_millis()),
                name: l.name.to_string(),
                consumers: l.consumers,
                ready: l.ready,
                orphan_since_at_ms: l.orphan_since.map(|t| t.as_millis()),
            })
            .collect(),
        Err(e) => {
            ok = false;
            backends.insert("queue".into(), e.to_string().into());
            Vec::new()
        }
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if ok { "ok" } else { "degraded" }.to_string(),
            shape: state.backend().name().to_string(),
            backends,
            lanes,
        }),
    )
}

/// Prometheus text: counters of this process and gauges read now (no key).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, content_type = "text/plain; version=0.0.4", body = String)))]
async fn metrics(
    State(state): State<AppState>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), crate::error::ApiError> {
    let text = crate::metrics::render(&state).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    ))
}
