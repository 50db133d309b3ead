//! The JSON body extractor: content type (415), size limit (413), malformed JSON and unknown
//! fields (400, naming the field), each in the API's error shape.

use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// A request body read as JSON of type `T` (which should refuse unknown fields).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().eq_ignore_ascii_case("application/json"))
            .unwrap_or(false);
        if !json_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be application/json",
            ));
        }
        let limit = state.config().max_body_bytes;
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| payload_too_large(limit))?;
        parse(&bytes).map(ApiJson)
    }
}

/// 413 `payload_too_large`.
pub fn payload_too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body is over the limit of {limit} bytes"),
    )
}

/// Parses a body; errors in the API's shape.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| classify(e.to_string()))
}

/// Reads a JSON value as `T`; errors in the API's shape.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|e| classify(e.to_string()))
}

/// Parses a query string; unknown parameters and bad values are 400 naming the parameter.
pub fn query<T: DeserializeOwned>(raw: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| {
        let text = e.to_string();
        match unknown_field(&text) {
            Some(field) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_field",
                format!("unknown query parameter {field:?}"),
            )
            .field(field),
            None => ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", text),
        }
    })
}

fn classify(text: String) -> ApiError {
    if let Some(field) = unknown_field(&text) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_field",
            format!("unknown field {field:?}"),
        )
        .field(field);
    }
    let mut err = ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", text.clone());
    if let Some(field) = missing_field(&text) {
        err = err.field(field);
    }
    err
}

/// The name in serde's "unknown field `x`, expected ...".
fn unknown_field(text: &str) -> Option<String> {
    between(text, "unknown field `")
}

/// The name in serde's "missing field `x`".
fn missing_field(text: &str) -> Option<String> {
    between(text, "missing field `")
}

fn between(text: &str, start: &str) -> Option<String> {
    let rest = &text[text.find(start)? + start.len()..];
    Some(rest[..rest.find('`')?].to_string())
}
