//! Payload hand-over: what a worker of this process needs to run a run it claimed (task,
//! payload, retry policy), kept from the trigger until the run's first claim, so the worker
//! does not read the run back from the store.
//!
//! Only used when the queue backend takes every lease in this process
//! ([`QueueBackend::claims_in_process`](runlane_core::backend::QueueBackend::claims_in_process)),
//! or asks for it although other processes claim too
//! ([`QueueBackend::hands_over`](runlane_core::backend::QueueBackend::hands_over)): there an
//! entry of a run another process claimed is never taken, so a full hand-over drops every
//! entry and starts again (those runs are read from the store). Bounded by
//! entry count and payload bytes; a run that does not fit is simply read from the store at its
//! claim, as every retry and every run recovered at open is. Runs that end without being
//! claimed (cancelled, expired) drop their entry when their terminal state is published.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use runlane_core::{RetryPolicy, RunId, TaskName};

use runlane_core::idhash::IdBuild;

/// At most this many runs are held.
const ENTRIES_MAX: usize = 1 << 18;
/// At most this many payload bytes are held.
const BYTES_MAX: usize = 64 << 20;

/// What a worker needs of a run besides its dispatch facts.
#[derive(Clone, Debug)]
pub(crate) struct Handed {
    /// The task.
    pub(crate) task: TaskName,
    /// The payload (JSON text).
    pub(crate) payload: Arc<str>,
    /// The retry policy.
    pub(crate) retry: RetryPolicy,
}

#[derive(Default)]
struct State {
    runs: HashMap<RunId, Handed, IdBuild>,
    bytes: usize,
}

/// The runs triggered here and not claimed yet.
pub(crate) struct Handover {
    enabled: bool,
    /// Other processes claim too: a full hand-over is emptied instead of refusing entries.
    shared: bool,
    state: Mutex<State>,
    /// Entries held, readable without the lock (forgetting skips the lock when zero).
    len: AtomicUsize,
}

impl Handover {
    pub(crate) fn new(enabled: bool, shared: bool) -> Self {
        Handover {
            enabled,
            shared,
            state: Mutex::new(State::default()),
            len: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a run for its first claim (before it is enqueued, so a claim cannot miss it);
    /// does nothing when disabled or full.
    pub(crate) fn keep(&self, run: RunId, handed: Handed) {
        if !self.enabled {
            return;
        }
        let mut st = self.lock();
        let size = handed.payload.len();
        if st.runs.len() >= ENTRIES_MAX || st.bytes.saturating_add(size) > BYTES_MAX {
            if !self.shared {
                return;
            }
            // Mostly entries of runs other processes claimed: start again.
            st.runs.clear();
            st.bytes = 0;
        }
        if st.runs.insert(run, handed).is_none() {
            st.bytes += size;
            self.len.store(st.runs.len(), Ordering::Relaxed);
        }
    }

    /// Takes a run's entry (at its claim).
    pub(crate) fn take(&self, run: RunId) -> Option<Handed> {
        if !self.enabled || self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut st = self.lock();
        let handed = st.runs.remove(&run)?;
        st.bytes = st.bytes.saturating_sub(handed.payload.len());
        self.len.store(st.runs.len(), Ordering::Relaxed);
        Some(handed)
    }

    /// Drops a run's entry if it has one (it ended without a claim, or was taken back).
    pub(crate) fn forget(&self, run: RunId) {
        drop(self.take(run));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handed(payload: &str) -> Handed {
        Handed {
            task: TaskName::new("t").expect("task"),
            payload: Arc::from(payload),
            retry: RetryPolicy::default(),
        }
    }

    #[test]
    fn an_entry_is_taken_once() {
        let h = Handover::new(true, false);
        h.keep(RunId(1), handed("{}"));
        assert_eq!(h.take(RunId(1)).map(|x| x.payload), Some(Arc::from("{}")));
        assert!(h.take(RunId(1)).is_none(), "taken once");
        h.keep(RunId(2), handed("[]"));
        h.forget(RunId(2));
        assert!(h.take(RunId(2)).is_none(), "forgotten");
        assert_eq!(h.lock().bytes, 0, "bytes are given back");
    }

    #[test]
    fn a_full_shared_handover_starts_again_and_a_full_private_one_refuses() {
        let big = "x".repeat(BYTES_MAX / 2 + 1);
        let private = Handover::new(true, false);
        private.keep(RunId(1), handed(&big));
        private.keep(RunId(2), handed(&big));
        assert!(private.take(RunId(2)).is_none(), "refused when full");
        assert!(private.take(RunId(1)).is_some(), "the first entry is kept");
        let shared = Handover::new(true, true);
        shared.keep(RunId(1), handed(&big));
        shared.keep(RunId(2), handed(&big));
        assert!(
            shared.take(RunId(1)).is_none(),
            "dropped when the hand-over filled"
        );
        assert!(shared.take(RunId(2)).is_some(), "the new entry is kept");
        assert_eq!(shared.lock().bytes, 0);
    }

    #[test]
    fn a_disabled_handover_keeps_nothing() {
        let h = Handover::new(false, false);
        h.keep(RunId(1), handed("{}"));
        assert!(h.take(RunId(1)).is_none());
    }
}
