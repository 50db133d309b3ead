//! The compact queue message (SPEC §6): what a queue backend stores per pending run.
//!
//! Layout: a format version byte, the 16-byte run id, interned queue/key/lane ids and integer
//! fields as LEB128 varints. No payload, no JSON, no repeated key prefixes. Decoding dispatches
//! on the version byte; an unknown version is a clear error, never a misread.
//!
//! # Format 1
//!
//! | bytes | field | encoding |
//! | --- | --- | --- |
//! | 1 | format version | `1` |
//! | 16 | `run_id` | [`RunId::to_bytes`](crate::id::RunId::to_bytes), big-endian |
//! | 1–5 | `env_id` | varint (u32) |
//! | 1–5 | `queue_id` | varint (u32) |
//! | 1–5 | `key_id` | varint (u32) |
//! | 1–5 | `lane_id` | varint (u32) |
//! | 1–5 | `attempt` | varint (u32) |
//! | 1–5 | `priority_s` | varint (u32) |
//! | 1–10 | `available_at_ms` | varint (u64) |
//! | 1 | flags | bit 0: TTL present, bit 1: locked, bit 2: ever leased; other bits 0 |
//! | 0 or 1–10 | `ttl_deadline_ms` | varint (u64), when bit 0 is set |
//! | 0 or 1–5 | `locked_version` | varint (u32), when bit 1 is set |
//!
//! A varint is unsigned LEB128: 7 bits per byte, least significant group first, the high bit
//! set on every byte but the last. Decoding accepts only the shortest encoding of each value
//! (so every accepted message re-encodes to the same bytes) and refuses values that do not fit
//! the field. A typical message (small ids, a current-epoch `available_at_ms`, a TTL, unlocked)
//! is 36 bytes.

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

/// Flag bit: `ttl_deadline_ms` follows.
const FLAG_TTL: u8 = 1 << 0;
/// Flag bit: `locked_version` follows.
const FLAG_LOCKED: u8 = 1 << 1;
/// Flag bit: the run ever held a lease.
const FLAG_EVER_LEASED: u8 = 1 << 2;
/// Every flag bit format 1 defines.
const FLAGS_KNOWN: u8 = FLAG_TTL | FLAG_LOCKED | FLAG_EVER_LEASED;

/// The longest encoding of a `u64` varint, in bytes.
const MAX_VARINT_LEN: usize = 10;

/// The longest encoded message of format 1, in bytes.
pub const MAX_ENCODED_LEN: usize = 1 + 16 + 6 * 5 + MAX_VARINT_LEN + 1 + MAX_VARINT_LEN + 5;

/// Encodes a message in the current format (see the module docs for the layout).
pub fn encode(msg: &CompactMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&msg.run_id.to_bytes());
    for n in [
        msg.env_id,
        msg.queue_id,
        msg.key_id,
        msg.lane_id,
        msg.attempt,
        msg.priority_s,
    ] {
        put_varint(&mut out, u64::from(n));
    }
    put_varint(&mut out, msg.available_at_ms);
    let mut flags = 0;
    if msg.ttl_deadline_ms.is_some() {
        flags |= FLAG_TTL;
    }
    if msg.locked_version.is_some() {
        flags |= FLAG_LOCKED;
    }
    if msg.ever_leased {
        flags |= FLAG_EVER_LEASED;
    }
    out.push(flags);
    if let Some(ttl) = msg.ttl_deadline_ms {
        put_varint(&mut out, ttl);
    }
    if let Some(version) = msg.locked_version {
        put_varint(&mut out, u64::from(version));
    }
    out
}

/// Decodes a message of any known format.
///
/// Refuses empty input, unknown versions, truncated input, over-long or non-minimal varints,
/// values too large for their field, unknown flag bits and trailing bytes. Never panics.
pub fn decode(bytes: &[u8]) -> Result<CompactMessage, DecodeError> {
    let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    match version {
        1 => decode_v1(rest),
        v => Err(DecodeError::UnknownVersion(v)),
    }
}

/// Decodes the body of a format 1 message (everything after the version byte).
fn decode_v1(body: &[u8]) -> Result<CompactMessage, DecodeError> {
    let mut r = Reader(body);
    let run_id = crate::id::RunId::from_bytes(r.array::<16>("truncated run id")?);
    let env_id = r.varint_u32()?;
    let queue_id = r.varint_u32()?;
    let key_id = r.varint_u32()?;
    let lane_id = r.varint_u32()?;
    let attempt = r.varint_u32()?;
    let priority_s = r.varint_u32()?;
    let available_at_ms = r.varint()?;
    let [flags] = r.array::<1>("truncated flags")?;
    if flags & !FLAGS_KNOWN != 0 {
        return Err(DecodeError::Malformed("unknown flag bits"));
    }
    let ttl_deadline_ms = if flags & FLAG_TTL != 0 {
        Some(r.varint()?)
    } else {
        None
    };
    let locked_version = if flags & FLAG_LOCKED != 0 {
        Some(r.varint_u32()?)
    } else {
        None
    };
    if !r.0.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(CompactMessage {
        run_id,
        env_id,
        queue_id,
        key_id,
        lane_id,
        attempt,
        priority_s,
        available_at_ms,
        ttl_deadline_ms,
        locked_version,
        ever_leased: flags & FLAG_EVER_LEASED != 0,
    })
}

/// Appends `n` as an unsigned LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A cursor over the bytes not yet decoded.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    /// Takes the next `N` bytes, or fails with `what`.
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let (head, tail) = self
            .0
            .split_at_checked(N)
            .ok_or(DecodeError::Malformed(what))?;
        let mut out = [0; N];
        out.copy_from_slice(head);
        self.0 = tail;
        Ok(out)
    }

    /// Reads an unsigned LEB128 varint of at most 10 bytes, in its shortest encoding.
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut n: u64 = 0;
        for i in 0..MAX_VARINT_LEN {
            let [b] = self.array::<1>("truncated varint")?;
            let group = u64::from(b & 0x7f);
            let shift = 7 * i as u32;
            // The 10th byte holds bit 63 only.
            if i == MAX_VARINT_LEN - 1 && group > 1 {
                return Err(DecodeError::Malformed("varint overflows u64"));
            }
            n |= group << shift;
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(DecodeError::Malformed("non-minimal varint"));
                }
                return Ok(n);
            }
        }
        Err(DecodeError::Malformed("varint longer than 10 bytes"))
    }

    /// Reads a varint that must fit a `u32`.
    fn varint_u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.varint()?).map_err(|_| DecodeError::Malformed("varint overflows u32"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::RunId;
    use proptest::prelude::*;

    /// 2025-01-01T00:00:00Z in ms: a current-epoch instant, 41 bits (a 6-byte varint).
    const NOW_MS: u64 = 1_735_689_600_000;

    fn typical() -> CompactMessage {
        CompactMessage {
            run_id: RunId((u128::from(NOW_MS) << 80) | 0x1234_5678_9abc_def0_1234),
            env_id: 1,
            queue_id: 7,
            key_id: 0,
            lane_id: 2,
            attempt: 1,
            priority_s: 0,
            available_at_ms: NOW_MS,
            ttl_deadline_ms: Some(NOW_MS + 3_600_000),
            locked_version: None,
            ever_leased: false,
        }
    }

    fn varint_bytes(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, n);
        out
    }

    /// Encoded size of a typical message: 36 bytes (1 version + 16 id + 6 × 1 small ids +
    /// 6 available_at + 1 flags + 6 TTL), within the 40-byte target and SPEC §6's 53.
    #[test]
    fn typical_message_encodes_to_36_bytes_within_40() {
        let bytes = encode(&typical());
        assert_eq!(bytes.len(), 36);
        assert!(bytes.len() <= 40);
        assert_eq!(decode(&bytes), Ok(typical()));
    }

    #[test]
    fn layout_is_byte_exact() {
        let msg = CompactMessage {
            run_id: RunId(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10),
            env_id: 1,
            queue_id: 127,
            key_id: 128,
            lane_id: 0,
            attempt: 3,
            priority_s: 300,
            available_at_ms: 0,
            ttl_deadline_ms: Some(1),
            locked_version: Some(2),
            ever_leased: true,
        };
        let mut want = vec![1];
        want.extend(1..=16u8);
        want.extend([1, 127, 0x80, 0x01, 0, 3, 0xac, 0x02, 0, 0b111, 1, 2]);
        assert_eq!(encode(&msg), want);
        assert_eq!(decode(&want), Ok(msg));
    }

    #[test]
    fn varints_are_leb128() {
        let cases: [(u64, &[u8]); 7] = [
            (0, &[0]),
            (1, &[1]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (u64::from(u32::MAX), &[0xff, 0xff, 0xff, 0xff, 0x0f]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for (n, bytes) in cases {
            assert_eq!(varint_bytes(n), bytes, "{n}");
            let mut r = Reader(bytes);
            assert_eq!(r.varint(), Ok(n), "{n}");
            assert!(r.0.is_empty());
        }
    }

    #[test]
    fn extremes_round_trip_within_max_len() {
        let msg = CompactMessage {
            run_id: RunId(u128::MAX),
            env_id: u32::MAX,
            queue_id: u32::MAX,
            key_id: u32::MAX,
            lane_id: u32::MAX,
            attempt: u32::MAX,
            priority_s: u32::MAX,
            available_at_ms: u64::MAX,
            ttl_deadline_ms: Some(u64::MAX),
            locked_version: Some(u32::MAX),
            ever_leased: true,
        };
        let bytes = encode(&msg);
        assert_eq!(bytes.len(), MAX_ENCODED_LEN);
        assert_eq!(decode(&bytes), Ok(msg));
    }

    /// The first `head` bytes of `typical()` encoded, followed by `tail`.
    fn typical_with(head: usize, tail: &[u8]) -> Vec<u8> {
        let mut bytes = encode(&typical())[..head].to_vec();
        bytes.extend_from_slice(tail);
        bytes
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let good = encode(&typical());
        // Offsets into `typical()`: 0 version, 1..17 id, 17..23 small ids, 23..29
        // available_at, 29 flags, 30..36 TTL.
        let mut trailing = good.clone();
        trailing.push(0);
        let over_u32 = typical_with(17, &[0x80, 0x80, 0x80, 0x80, 0x10]);
        let over_u64 = typical_with(
            23,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
        );
        let eleven = typical_with(23, &[0x80; 10]);
        let non_minimal = typical_with(17, &[0x81, 0x00]);
        let cases: [(&[u8], DecodeError); 15] = [
            (&[], DecodeError::Empty),
            (&[0], DecodeError::UnknownVersion(0)),
            (&[2, 0, 0], DecodeError::UnknownVersion(2)),
            (&[0xff], DecodeError::UnknownVersion(0xff)),
            (&[1], DecodeError::Malformed("truncated run id")),
            (&good[..16], DecodeError::Malformed("truncated run id")),
            (&good[..17], DecodeError::Malformed("truncated varint")),
            (&good[..25], DecodeError::Malformed("truncated varint")),
            (&good[..29], DecodeError::Malformed("truncated flags")),
            (&good[..35], DecodeError::Malformed("truncated varint")),
            (&trailing, DecodeError::Malformed("trailing bytes")),
            (&over_u32, DecodeError::Malformed("varint overflows u32")),
            (&over_u64, DecodeError::Malformed("varint overflows u64")),
            (
                &eleven,
                DecodeError::Malformed("varint longer than 10 bytes"),
            ),
            (&non_minimal, DecodeError::Malformed("non-minimal varint")),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(bytes), Err(want.clone()), "{bytes:?}");
            assert!(!want.to_string().ends_with('.'));
        }
        for flag in [0b1000, 0b1000_0000, 0b1111_1000] {
            let mut bytes = typical_with(29, &[flag | FLAG_TTL]);
            bytes.extend_from_slice(&good[30..]);
            assert_eq!(
                decode(&bytes),
                Err(DecodeError::Malformed("unknown flag bits")),
                "{flag:#b}"
            );
        }
        // Flags that promise a field that is not there.
        let mut locked = good[..29].to_vec();
        locked.push(FLAG_LOCKED);
        assert_eq!(
            decode(&locked),
            Err(DecodeError::Malformed("truncated varint"))
        );
        assert_eq!(
            DecodeError::UnknownVersion(9).to_string(),
            "unknown message format version 9"
        );
    }

    fn message() -> impl Strategy<Value = CompactMessage> {
        let small_or_any = || prop_oneof![0..200u32, any::<u32>()];
        (
            any::<u128>(),
            (
                small_or_any(),
                small_or_any(),
                small_or_any(),
                small_or_any(),
            ),
            (1..10u32, 0..=2_592_000u32),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>()),
            any::<bool>(),
        )
            .prop_map(
                |(
                    id,
                    (env_id, queue_id, key_id, lane_id),
                    (attempt, priority_s),
                    available_at_ms,
                    ttl_deadline_ms,
                    locked_version,
                    ever_leased,
                )| {
                    CompactMessage {
                        run_id: RunId(id),
                        env_id,
                        queue_id,
                        key_id,
                        lane_id,
                        attempt,
                        priority_s,
                        available_at_ms,
                        ttl_deadline_ms,
                        locked_version,
                        ever_leased,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(msg in message()) {
            let bytes = encode(&msg);
            prop_assert!(bytes.len() <= MAX_ENCODED_LEN);
            prop_assert_eq!(bytes[0], FORMAT_VERSION);
            prop_assert_eq!(decode(&bytes), Ok(msg));
        }

        #[test]
        fn every_strict_prefix_is_refused(msg in message()) {
            let bytes = encode(&msg);
            for len in 0..bytes.len() {
                prop_assert!(decode(&bytes[..len]).is_err(), "prefix of {} bytes", len);
            }
        }

        #[test]
        fn varint_round_trips(n in any::<u64>()) {
            let bytes = varint_bytes(n);
            prop_assert!(bytes.len() <= MAX_VARINT_LEN);
            let mut r = Reader(&bytes);
            prop_assert_eq!(r.varint(), Ok(n));
        }

        #[test]
        fn decode_never_panics_and_accepts_only_canonical_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..64)
        ) {
            if let Ok(msg) = decode(&bytes) {
                prop_assert_eq!(encode(&msg), bytes);
            }
        }

        #[test]
        fn decode_never_panics_on_corrupted_messages(
            msg in message(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = encode(&msg);
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Ok(decoded) = decode(&bytes) {
                prop_assert_eq!(encode(&decoded), bytes);
            }
        }
    }
}
