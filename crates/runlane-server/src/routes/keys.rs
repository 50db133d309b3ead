//! `/v1/keys`: create, list, rotate and revoke API keys (admin).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::json::ApiJson;
use crate::keys::{generate_id, generate_key, hash_key, KeyRecord, Role};
use crate::state::AppState;

/// `POST /v1/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// `admin`, `env` or `worker`.
    pub role: Role,
    /// The envs an env or worker key names (none for admin).
    #[serde(default)]
    pub envs: Vec<String>,
    /// A free label.
    pub label: Option<String>,
}

/// A key as listed (never its secret).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyInfo {
    /// The key's id.
    pub id: String,
    /// Its role.
    pub role: Role,
    /// The envs it names.
    pub envs: Vec<String>,
    /// Its label.
    pub label: Option<String>,
    /// When it was created.
    pub created_at_ms: u64,
    /// When it was revoked, or null.
    pub revoked_at_ms: Option<u64>,
}

impl From<KeyRecord> for KeyInfo {
    fn from(k: KeyRecord) -> Self {
        KeyInfo {
            id: k.id,
            role: k.role,
            envs: k.envs,
            label: k.label,
            created_at_ms: k.created_at_ms,
            revoked_at_ms: k.revoked_at_ms,
        }
    }
}

/// A new key with its secret, shown only here.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NewKey {
    /// The key's id.
    pub id: String,
    /// The secret: `Authorization: Bearer <key>`.
    pub key: String,
    /// Its role.
    pub role: Role,
    /// The envs it names.
    pub envs: Vec<String>,
    /// Its label.
    pub label: Option<String>,
    /// When it was created.
    pub created_at_ms: u64,
}

/// `GET /v1/keys`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    /// Every key, oldest first.
    pub keys: Vec<KeyInfo>,
}

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_key, list_keys))
        .routes(routes!(rotate_key))
        .routes(routes!(revoke_key))
}

async fn insert(
    state: &AppState,
    role: Role,
    envs: Vec<String>,
    label: Option<String>,
) -> Result<NewKey, ApiError> {
    let key = generate_key();
    let record = KeyRecord {
        id: generate_id(),
        hash: hash_key(&key),
        role,
        envs,
        label,
        created_at_ms: state.now_ms(),
        revoked_at_ms: None,
    };
    state.keys().insert(&record).await?;
    Ok(NewKey {
        id: record.id,
        key,
        role: record.role,
        envs: record.envs,
        label: record.label,
        created_at_ms: record.created_at_ms,
    })
}

/// Creates a key (admin).
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKey,
    responses((status = 201, body = NewKey), (status = "4XX", body = ErrorBody)))]
async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    caller.require_admin()?;
    match body.role {
        Role::Admin if !body.envs.is_empty() => {
            return Err(ApiError::invalid("envs", "an admin key names no envs"))
        }
        Role::Env | Role::Worker if body.envs.is_empty() => {
            return Err(ApiError::invalid("envs", "must name at least one env"))
        }
        _ => {}
    }
    let mut envs = body.envs;
    envs.sort();
    envs.dedup();
    for env in &envs {
        match state.engine().env_settings(env).await {
            Ok(_) => {}
            Err(runlane::EngineError::EnvNotFound(_)) => {
                return Err(ApiError::invalid("envs", format!("unknown env {env:?}")))
            }
            Err(runlane::EngineError::Invalid(i)) => {
                return Err(ApiError::invalid("envs", i.reason))
            }
            Err(e) => return Err(e.into()),
        }
    }
    if body.label.as_ref().is_some_and(|l| l.len() > 200) {
        return Err(ApiError::invalid("label", "must be at most 200 bytes"));
    }
    let created = insert(&state, body.role, envs, body.label).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Lists keys (admin).
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, body = KeyList), (status = "4XX", body = ErrorBody)))]
async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<KeyList>, ApiError> {
    caller.require_admin()?;
    let keys = state.keys().list().await?;
    Ok(Json(KeyList {
        keys: keys.into_iter().map(KeyInfo::from).collect(),
    }))
}

/// Revokes `id` and evicts it from the cache; 404 for an unknown key.
async fn revoke(state: &AppState, id: &str) -> Result<KeyRecord, ApiError> {
    let revoked = state
        .keys()
        .revoke(id, state.now_ms())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("key {id} not found")))?;
    state.key_cache().evict(&revoked.hash);
    Ok(revoked)
}

/// A new key with the same role and envs; the old one is revoked (admin).
#[utoipa::path(post, path = "/v1/keys/{id}/rotate", tag = "keys",
    params(("id" = String, Path, description = "The key's id")),
    responses((status = 201, body = NewKey), (status = "4XX", body = ErrorBody)))]
async fn rotate_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    caller.require_admin()?;
    let old = state
        .keys()
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("key {id} not found")))?;
    if old.revoked_at_ms.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "wrong_state",
            format!("key {id} is revoked"),
        ));
    }
    let created = insert(&state, old.role, old.envs, old.label).await?;
    revoke(&state, &id).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Revokes a key at once (admin).
#[utoipa::path(post, path = "/v1/keys/{id}/revoke", tag = "keys",
    params(("id" = String, Path, description = "The key's id")),
    responses((status = 200, body = KeyInfo), (status = "4XX", body = ErrorBody)))]
async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    caller.require_admin()?;
    Ok(Json(revoke(&state, &id).await?.into()))
}
