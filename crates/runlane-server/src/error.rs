//! The one error shape of the API: `{ "error": { "code", "message", "field" } }` with the
//! statuses of docs/API.md, and the mapping of every engine error onto it.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use runlane::core::InvalidInput;
use runlane::EngineError;
use serde::Serialize;
use utoipa::ToSchema;

/// An error answer: a status, a stable code, a message and the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable machine-readable code (`invalid_input`, `not_found`, ...).
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// The request field at fault, when there is one.
    pub field: Option<String>,
    /// Seconds for a `Retry-After` header (429 `fast_lane_full`).
    pub retry_after: Option<u64>,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// The request field at fault, or null.
    pub field: Option<String>,
}

impl ApiError {
    /// An error with no field.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// Names the field at fault.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// 400 `invalid_input` naming `field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            format!("{field}: {message}"),
        )
        .field(field)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 503 `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// Prefixes the field (and message) with a batch position: `runs[3].ttl_ms`.
    pub fn in_batch(mut self, index: usize) -> Self {
        let prefix = format!("runs[{index}]");
        self.field = Some(match self.field.take() {
            Some(f) => format!("{prefix}.{f}"),
            None => prefix.clone(),
        });
        self.message = format!("{prefix}: {}", self.message);
        self
    }
}

/// The API name of an engine field (the API suffixes durations with `_ms`).
pub fn api_field(field: &str) -> &str {
    match field {
        "ttl" => "ttl_ms",
        "priority" => "priority_ms",
        "delay" => "delay_ms",
        "run_after" => "run_at_ms",
        "idempotency_ttl" => "idempotency_ttl_ms",
        "max_duration" => "max_duration_ms",
        "lock_to_version" => "version",
        "attempts_max" => "retry.max_attempts",
        "min" => "retry.min_delay_ms",
        "max" => "retry.max_delay_ms",
        "factor" => "retry.factor",
        "jitter" => "retry.jitter",
        other => other,
    }
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        let field = api_field(e.field);
        if e.field == "lane"
            && (e.reason.starts_with("unknown lane") || e.reason.ends_with("does not exist"))
        {
            return ApiError::new(StatusCode::BAD_REQUEST, "unknown_lane", e.reason).field(field);
        }
        if e.field == "env" && e.reason.starts_with("unknown env") {
            return ApiError::not_found(e.reason).field(field);
        }
        ApiError::invalid(field, e.reason)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::Invalid(i) => i.into(),
            EngineError::BatchItem { index, source } => ApiError::from(*source).in_batch(index),
            EngineError::RunNotFound(_) | EngineError::EnvNotFound(_) => {
                ApiError::not_found(message)
            }
            EngineError::EnvExists(_) => ApiError::conflict(message).field("name"),
            EngineError::UnknownTask { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "unknown_task", message).field("task")
            }
            EngineError::UnknownVersion { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "unknown_version", message).field("version")
            }
            EngineError::AlreadyFinished { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_finished", message)
            }
            EngineError::WrongState { .. } | EngineError::WaitDeadlock { .. } => {
                ApiError::new(StatusCode::CONFLICT, "wrong_state", message)
            }
            EngineError::StaleToken(_) => {
                ApiError::new(StatusCode::CONFLICT, "stale_token", message).field("token")
            }
            EngineError::QueueFull { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message)
            }
            EngineError::FastLaneFull { retry_after } => {
                let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "fast_lane_full", message);
                e.retry_after = Some(retry_after_secs(retry_after));
                e
            }
            EngineError::Unavailable(_) | EngineError::ShutDown => ApiError::unavailable(message),
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_millis().div_ceil(1000);
    u64::try_from(secs).unwrap_or(u64::MAX).max(1)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                field: self.field,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
