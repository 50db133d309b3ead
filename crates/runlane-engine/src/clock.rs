//! Time for the engine: the real clock, and a manual clock for tests that counts wake-ups.

use std::future::Future;
use std::pin::Pin;

use runlane_core::Timestamp;

/// A source of `now` and of sleeps until an instant.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Timestamp;
    /// Completes once `now() >= at`.
    fn sleep_until(&self, at: Timestamp) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The system clock (tokio timers).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

/// A clock that moves only when told; sleepers wake when `advance`/`set` passes their instant.
#[derive(Debug, Default)]
pub struct ManualClock {
    _private: (),
}

impl ManualClock {
    /// A manual clock at `start`.
    pub fn new(start: Timestamp) -> Self {
        let _ = start;
        todo!()
    }

    /// Moves time forward by `d`, waking every sleeper whose instant is reached.
    pub fn advance(&self, d: std::time::Duration) {
        let _ = d;
        todo!()
    }

    /// Moves time to `t` (never backwards), waking due sleepers.
    pub fn set(&self, t: Timestamp) {
        let _ = t;
        todo!()
    }

    /// How many sleepers are waiting (useful to wait until a task is parked).
    pub fn sleepers(&self) -> usize {
        todo!()
    }
}
