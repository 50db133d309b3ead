//! The compact queue message (SPEC §6): what a queue backend stores per pending run.
//!
//! Layout: a format version byte, the 16-byte run id, interned queue/key/lane ids and integer
//! fields as LEB128 varints. No payload, no JSON, no repeated key prefixes. Decoding dispatches
//! on the version byte; an unknown version is a clear error, never a misread.

/// The format written by this build.
pub const FORMAT_VERSION: u8 = 1;

/// The dispatch facts of one pending run, with names interned to small integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactMessage {
    /// The run's 16-byte id.
    pub run_id: crate::id::RunId,
    /// Interned env id.
    pub env_id: u32,
    /// Interned queue id (unique across envs).
    pub queue_id: u32,
    /// Interned concurrency key id (0 = the empty key).
    pub key_id: u32,
    /// Interned lane id.
    pub lane_id: u32,
    /// Attempt number, 1-based.
    pub attempt: u32,
    /// Priority in whole seconds (0..=2,592,000).
    pub priority_s: u32,
    /// `run_after` in ms since the epoch.
    pub available_at_ms: u64,
    /// TTL deadline in ms since the epoch, when set.
    pub ttl_deadline_ms: Option<u64>,
    /// The version the run is locked to, when locked.
    pub locked_version: Option<u32>,
    /// Whether the run ever held a lease (it can then never expire).
    pub ever_leased: bool,
}

/// Why bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are empty.
    #[error("empty message")]
    Empty,
    /// Written by a format this build does not know.
    #[error("unknown message format version {0}")]
    UnknownVersion(u8),
    /// The bytes end early or a field is malformed.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// Encodes a message in the current format.
pub fn encode(msg: &CompactMessage) -> Vec<u8> {
    let _ = msg;
    todo!("encode")
}

/// Decodes a message of any known format.
pub fn decode(bytes: &[u8]) -> Result<CompactMessage, DecodeError> {
    let _ = bytes;
    todo!("decode")
}
