//! Column encodings shared by the SQL run stores (SQLite and PostgreSQL): how instants,
//! durations, run ids, statuses, trigger sources and names are written to integer, byte and text
//! columns, and read back with a [`CorruptValue`] error when a stored value does not decode.

use std::time::Duration;

use crate::{InvalidInput, RunId, RunStatus, Timestamp, TriggerSource};

/// A stored value that does not decode (a hand-edited or damaged row); the text says which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CorruptValue(pub String);

impl From<CorruptValue> for crate::StoreError {
    /// The run store has no variant for a damaged row; `Unavailable` is the one callers already
    /// treat as "this store cannot answer", and the text names the cause.
    fn from(e: CorruptValue) -> Self {
        crate::StoreError::Unavailable(format!("corrupt run store row: {}", e.0))
    }
}

/// An instant as stored: milliseconds, saturating at `i64::MAX` (which reads back as never).
pub fn ts_to_sql(t: Timestamp) -> i64 {
    u64_to_sql(t.0)
}

/// A stored instant.
pub fn ts_from_sql(v: i64) -> Result<Timestamp, CorruptValue> {
    u64_from_sql(v).map(Timestamp)
}

/// A duration as stored: whole milliseconds, saturating like instants.
pub fn dur_to_sql(d: Duration) -> i64 {
    u64_to_sql(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A stored duration.
pub fn dur_from_sql(v: i64) -> Result<Duration, CorruptValue> {
    u64_from_sql(v).map(Duration::from_millis)
}

/// An unsigned integer as stored, saturating at `i64::MAX`.
pub fn u64_to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored unsigned integer; `i64::MAX` reads back as `u64::MAX` (never).
pub fn u64_from_sql(v: i64) -> Result<u64, CorruptValue> {
    if v == i64::MAX {
        return Ok(u64::MAX);
    }
    u64::try_from(v).map_err(|_| CorruptValue(format!("negative instant or duration {v}")))
}

/// A stored run id (16 big-endian bytes).
pub fn id_from_sql(bytes: &[u8]) -> Result<RunId, CorruptValue> {
    let bytes: [u8; 16] = bytes
        .try_into()
        .map_err(|_| CorruptValue(format!("run id of {} bytes", bytes.len())))?;
    Ok(RunId::from_bytes(bytes))
}

/// A stored `u32` (versions, attempt numbers).
pub fn u32_from_sql(v: i64) -> Result<u32, CorruptValue> {
    u32::try_from(v).map_err(|_| CorruptValue(format!("{v} is out of range")))
}

/// A stored status.
pub fn status_from_sql(text: &str) -> Result<RunStatus, CorruptValue> {
    text.parse()
        .map_err(|_| CorruptValue(format!("unknown status {text:?}")))
}

/// A stored trigger source.
pub fn source_from_sql(text: &str) -> Result<TriggerSource, CorruptValue> {
    [
        TriggerSource::Standard,
        TriggerSource::Scheduled,
        TriggerSource::Manual,
        TriggerSource::Sync,
    ]
    .into_iter()
    .find(|s| s.as_str() == text)
    .ok_or_else(|| CorruptValue(format!("unknown trigger source {text:?}")))
}

/// A stored name (env, queue, task, lane), checked by its own parser.
pub fn name_from_sql<T>(
    text: &str,
    parse: fn(&str) -> Result<T, InvalidInput>,
) -> Result<T, CorruptValue> {
    parse(text).map_err(|e| CorruptValue(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_and_saturate() {
        for v in [0u64, 1, 1_700_000_000_000, i64::MAX as u64 - 1] {
            assert_eq!(ts_from_sql(ts_to_sql(Timestamp(v))), Ok(Timestamp(v)));
        }
        assert_eq!(ts_to_sql(Timestamp(u64::MAX)), i64::MAX);
        assert_eq!(ts_from_sql(i64::MAX), Ok(Timestamp(u64::MAX)));
        assert!(ts_from_sql(-1).is_err());
        assert_eq!(dur_to_sql(Duration::from_millis(1500)), 1500);
        assert_eq!(dur_to_sql(Duration::MAX), i64::MAX);
        assert_eq!(dur_from_sql(1500), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(
            id_from_sql(&[1, 2]),
            Err(CorruptValue("run id of 2 bytes".into()))
        );
        assert!(u32_from_sql(i64::from(u32::MAX) + 1).is_err());
        assert_eq!(
            status_from_sql("nope"),
            Err(CorruptValue("unknown status \"nope\"".into()))
        );
        assert!(source_from_sql("x").is_err());
        assert_eq!(source_from_sql("manual"), Ok(TriggerSource::Manual));
    }

    #[test]
    fn every_source_and_status_decodes() {
        for s in [
            TriggerSource::Standard,
            TriggerSource::Scheduled,
            TriggerSource::Manual,
            TriggerSource::Sync,
        ] {
            assert_eq!(source_from_sql(s.as_str()).ok(), Some(s));
        }
        for s in RunStatus::ALL {
            assert_eq!(status_from_sql(s.as_str()).ok(), Some(s));
        }
        assert!(source_from_sql("bogus").is_err());
        assert!(status_from_sql("bogus").is_err());
    }
}
