//! Small serde helpers.

use serde::{Deserialize, Deserializer};

/// A field that may be absent (`None`), `null` (`Some(None)`) or a value (`Some(Some(v))`);
/// use with `#[serde(default, deserialize_with = "double_option")]`.
pub fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}
