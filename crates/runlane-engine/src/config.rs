//! Engine settings with the defaults SPEC gives.

use std::time::Duration;

use runlane_core::backend::Retention;

/// Engine-wide settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Lease granted at claim (default 30 s); workers heartbeat every `lease / 3`.
    pub lease: Duration,
    /// Grace period of a cancelled executing run (default 10 s).
    pub cancel_grace: Duration,
    /// How long a worker waits for in-flight runs on stop (default 30 s).
    pub stop_timeout: Duration,
    /// Default lifetime of an idempotency key (default 24 h).
    pub idempotency_ttl: Duration,
    /// Largest payload accepted, in bytes (default 1 MiB).
    pub payload_max_bytes: usize,
    /// Largest batch accepted (default 1,000).
    pub batch_max: usize,
    /// How long finished runs are kept, per status (default 7 days each); the timer service
    /// deletes them when due. Idempotency keys never outlive it.
    pub retention: Retention,
    /// Seed of the engine's rng (ids, jitter); `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            lease: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(30),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            payload_max_bytes: 1 << 20,
            batch_max: 1000,
            retention: Retention::default(),
            seed: None,
        }
    }
}
