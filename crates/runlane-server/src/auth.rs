//! The `Caller` extractor: authenticates `Authorization: Bearer <key>` and answers what the
//! key may do.

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};

use crate::error::ApiError;
use crate::keys::{hash_key, KeyRecord, KeyStoreError, Role};
use crate::state::AppState;

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Its key.
    pub key: KeyRecord,
}

impl From<KeyStoreError> for ApiError {
    fn from(e: KeyStoreError) -> Self {
        ApiError::unavailable(e.to_string())
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <key>"))?;
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let secret = header
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization must be Bearer <key>"))?;
        authenticate(state, secret).await.map(|key| Caller { key })
    }
}

/// Looks a key up (cache first); 401 for an unknown or revoked key.
pub async fn authenticate(state: &AppState, secret: &str) -> Result<KeyRecord, ApiError> {
    let hash = hash_key(secret);
    let key = match state.key_cache().get(&hash) {
        Some(key) => key,
        None => {
            let key = state
                .keys()
                .by_hash(&hash)
                .await?
                .ok_or_else(|| ApiError::unauthorized("unknown key"))?;
            state.key_cache().put(key.clone());
            key
        }
    };
    if key.revoked_at_ms.is_some() {
        return Err(ApiError::unauthorized("the key was revoked"));
    }
    Ok(key)
}

impl Caller {
    /// Whether the key is an admin key.
    pub fn is_admin(&self) -> bool {
        self.key.role == Role::Admin
    }

    /// 403 unless an admin key.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("this needs an admin key"))
        }
    }

    /// 403 unless an admin key or an env key naming `env`.
    pub fn require_env(&self, env: &str) -> Result<(), ApiError> {
        match self.key.role {
            Role::Admin => Ok(()),
            Role::Env if self.key.names(env) => Ok(()),
            Role::Env => Err(ApiError::forbidden(format!(
                "this key does not name env {env:?}"
            ))),
            Role::Worker => Err(ApiError::forbidden(
                "a worker key may only use the worker protocol",
            )),
        }
    }

    /// For a run of `env`: 403 for a worker key, 404 for an env key not naming `env` (the
    /// run's existence is not revealed).
    pub fn require_run_env(&self, env: &str, run: &str) -> Result<(), ApiError> {
        match self.key.role {
            Role::Admin => Ok(()),
            Role::Env if self.key.names(env) => Ok(()),
            Role::Env => Err(ApiError::not_found(format!("run {run} not found"))),
            Role::Worker => Err(ApiError::forbidden(
                "a worker key may only use the worker protocol",
            )),
        }
    }

    /// 403 unless an admin key or a worker key naming `env`.
    pub fn require_worker(&self, env: &str) -> Result<(), ApiError> {
        match self.key.role {
            Role::Admin => Ok(()),
            Role::Worker if self.key.names(env) => Ok(()),
            Role::Worker => Err(ApiError::forbidden(format!(
                "this key does not name env {env:?}"
            ))),
            Role::Env => Err(ApiError::forbidden(
                "the worker protocol needs a worker key",
            )),
        }
    }

    /// 403 unless an admin key or an env or worker key naming `env` (reads of an env's
    /// versions: a worker reads what it serves).
    pub fn require_env_reader(&self, env: &str) -> Result<(), ApiError> {
        match self.key.role {
            Role::Admin => Ok(()),
            Role::Env | Role::Worker if self.key.names(env) => Ok(()),
            Role::Env | Role::Worker => Err(ApiError::forbidden(format!(
                "this key does not name env {env:?}"
            ))),
        }
    }

    /// 403 unless an admin key or a worker key naming `env` (registering a version: a
    /// deploy's workers declare what they run).
    pub fn require_version_writer(&self, env: &str) -> Result<(), ApiError> {
        match self.key.role {
            Role::Admin => Ok(()),
            Role::Worker if self.key.names(env) => Ok(()),
            Role::Worker => Err(ApiError::forbidden(format!(
                "this key does not name env {env:?}"
            ))),
            Role::Env => Err(ApiError::forbidden(
                "registering a version needs an admin key or a worker key of the env",
            )),
        }
    }

    /// 403 for a worker key (env and admin keys pass; env checks come after).
    pub fn require_not_worker(&self) -> Result<(), ApiError> {
        if self.key.role == Role::Worker {
            Err(ApiError::forbidden(
                "a worker key may only use the worker protocol",
            ))
        } else {
            Ok(())
        }
    }
}
