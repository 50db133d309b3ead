//! Small serde helpers.

use serde::{Deserialize, Deserializer};

/// A field that may be absent (`None`), `null` (`Some(None)`) or a value (`Some(Some(v))`);
/// use with `#[serde(default, deserialize_with = "double_option")]`.
pub fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Any JSON value kept as its text, exactly as sent (key order, number precision): payloads,
/// outputs and progress pass through the server without being re-encoded.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct JsonText(Box<serde_json::value::RawValue>);

impl JsonText {
    /// Wraps stored JSON text; text that is not JSON becomes a JSON string of it.
    pub fn from_text(text: &str) -> Self {
        match serde_json::value::RawValue::from_string(text.to_owned()) {
            Ok(raw) => JsonText(raw),
            Err(_) => JsonText(
                serde_json::value::to_raw_value(text)
                    .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned()),
            ),
        }
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl utoipa::PartialSchema for JsonText {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::Object::builder()
            .schema_type(utoipa::openapi::schema::SchemaType::AnyValue)
            .description(Some("Any JSON value"))
            .into()
    }
}

impl utoipa::ToSchema for JsonText {}
