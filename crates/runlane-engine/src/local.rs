//! The in-process registry of executing runs: per run, its lease token, its handler's
//! cancellation token, an abort latch, and the settle lock that decides who ends the attempt.
//!
//! Two parties may want to end the same attempt in one process: the worker (its handler
//! returned) and the timer service (the attempt timed out, its lease lapsed, its cancel grace
//! ended). Both take the run's settle lock first; whoever finds it unsettled does the store and
//! queue writes and marks it settled, the other backs off. The queue backend's fencing tokens
//! and the store's first-terminal-write-wins cover the same races across processes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use runlane_core::{CancelReason, FencingToken, RunId};
use tokio::sync::Notify;

use runlane_core::idhash::IdBuild;

/// A value set once; waiters wake when it is set.
#[derive(Debug)]
pub(crate) struct Latch<T: Copy> {
    value: Mutex<Option<T>>,
    notify: Notify,
}

impl<T: Copy> Latch<T> {
    pub(crate) fn new() -> Self {
        Latch {
            value: Mutex::new(None),
            notify: Notify::new(),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<T>> {
        self.value.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the value unless it is already set; returns whether this call set it.
    pub(crate) fn fire(&self, value: T) -> bool {
        let first = {
            let mut slot = self.slot();
            if slot.is_some() {
                false
            } else {
                *slot = Some(value);
                true
            }
        };
        if first {
            self.notify.notify_waiters();
        }
        first
    }

    /// The value, once set.
    pub(crate) fn get(&self) -> Option<T> {
        *self.slot()
    }

    /// Completes once set, with the value.
    pub(crate) async fn wait(&self) -> T {
        loop {
            // Created before the check: `notify_waiters` reaches every future created before
            // it, polled or not, so a fire between the check and the await is not lost.
            let notified = self.notify.notified();
            if let Some(v) = self.get() {
                return v;
            }
            notified.await;
        }
    }
}

/// Who aborts a handler, which decides what happens to its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AbortKind {
    /// The engine ends the attempt (timeout, lease lost, cancel grace elapsed): the worker
    /// does nothing more.
    Engine,
    /// The worker drains on stop: the run is released to its queue without counting an attempt.
    Drain,
}

/// One executing run of this process.
#[derive(Debug)]
pub(crate) struct LocalRun {
    pub(crate) run: RunId,
    pub(crate) token: FencingToken,
    /// The handler's cancellation token.
    pub(crate) cancel: Arc<Latch<CancelReason>>,
    /// Fired to drop the handler future.
    pub(crate) abort: Latch<AbortKind>,
    /// `true` once the attempt's outcome was written.
    pub(crate) settle: tokio::sync::Mutex<bool>,
}

impl LocalRun {
    pub(crate) fn new(run: RunId, token: FencingToken) -> Self {
        LocalRun {
            run,
            token,
            cancel: Arc::new(Latch::new()),
            abort: Latch::new(),
            settle: tokio::sync::Mutex::new(false),
        }
    }

    /// Fires the handler's token with `reason` and drops the handler.
    pub(crate) fn stop(&self, reason: CancelReason, kind: AbortKind) {
        self.cancel.fire(reason);
        self.abort.fire(kind);
    }
}

/// How many signals for runs not registered yet are remembered (see [`LocalRegistry::signal`]).
const EARLY_SIGNALS_MAX: usize = 1024;

/// A signal that arrived between a claim and the run's registration.
#[derive(Debug)]
struct EarlySignal {
    run: RunId,
    token: FencingToken,
    reason: CancelReason,
    abort: Option<AbortKind>,
}

#[derive(Debug, Default)]
struct RegistryState {
    runs: HashMap<RunId, Arc<LocalRun>, IdBuild>,
    early: VecDeque<EarlySignal>,
}

/// Every executing run of this process, by run id.
#[derive(Debug, Default)]
pub(crate) struct LocalRegistry {
    state: Mutex<RegistryState>,
}

impl LocalRegistry {
    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a run; a signal that arrived for its lease before it is applied now.
    pub(crate) fn insert(&self, local: Arc<LocalRun>) {
        let mut st = self.lock();
        if let Some(pos) = st
            .early
            .iter()
            .position(|e| e.run == local.run && e.token == local.token)
        {
            if let Some(early) = st.early.remove(pos) {
                local.cancel.fire(early.reason);
                if let Some(kind) = early.abort {
                    local.abort.fire(kind);
                }
            }
        }
        st.runs.insert(local.run, local);
    }

    /// Removes the entry if it is still this lease's.
    pub(crate) fn remove(&self, run: RunId, token: FencingToken) {
        let mut st = self.lock();
        if st.runs.get(&run).is_some_and(|r| r.token == token) {
            st.runs.remove(&run);
        }
    }

    /// Whether the run executes here (under any lease).
    pub(crate) fn contains(&self, run: RunId) -> bool {
        self.lock().runs.contains_key(&run)
    }

    /// The run's entry when it executes here under `token`.
    #[cfg(test)]
    fn get(&self, run: RunId, token: FencingToken) -> Option<Arc<LocalRun>> {
        self.lock()
            .runs
            .get(&run)
            .filter(|r| r.token == token)
            .cloned()
    }

    /// Fires the run's token with `reason` (and aborts its handler when `abort` is set) and
    /// returns its entry. A lease this process may have just claimed but not registered yet
    /// (the moment between `claim` and spawning the run) gets the signal on registration; the
    /// few remembered signals for leases held elsewhere are harmless and age out.
    pub(crate) fn signal(
        &self,
        run: RunId,
        token: FencingToken,
        reason: CancelReason,
        abort: Option<AbortKind>,
    ) -> Option<Arc<LocalRun>> {
        let mut st = self.lock();
        if let Some(local) = st.runs.get(&run).filter(|r| r.token == token) {
            local.cancel.fire(reason);
            if let Some(kind) = abort {
                local.abort.fire(kind);
            }
            return Some(local.clone());
        }
        st.early.push_back(EarlySignal {
            run,
            token,
            reason,
            abort,
        });
        if st.early.len() > EARLY_SIGNALS_MAX {
            st.early.pop_front();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn latch_fires_once_and_wakes_waiters() {
        let latch = Arc::new(Latch::new());
        let waiter = {
            let latch = latch.clone();
            tokio::spawn(async move { latch.wait().await })
        };
        tokio::task::yield_now().await;
        assert!(latch.fire(CancelReason::Cancel));
        assert!(
            !latch.fire(CancelReason::Shutdown),
            "second fire is ignored"
        );
        assert_eq!(waiter.await.expect("waiter"), CancelReason::Cancel);
        assert_eq!(
            latch.wait().await,
            CancelReason::Cancel,
            "late waiters return at once"
        );
    }

    #[test]
    fn registry_is_keyed_by_lease() {
        let reg = LocalRegistry::default();
        reg.insert(Arc::new(LocalRun::new(RunId(1), FencingToken(7))));
        assert!(reg.get(RunId(1), FencingToken(6)).is_none(), "other lease");
        assert!(reg.get(RunId(1), FencingToken(7)).is_some());
        reg.remove(RunId(1), FencingToken(6));
        assert!(
            reg.get(RunId(1), FencingToken(7)).is_some(),
            "stale remove ignored"
        );
        reg.remove(RunId(1), FencingToken(7));
        assert!(reg.get(RunId(1), FencingToken(7)).is_none());
    }

    #[test]
    fn a_signal_before_registration_is_applied_on_registration() {
        let reg = LocalRegistry::default();
        let early = reg.signal(RunId(2), FencingToken(3), CancelReason::Cancel, None);
        assert!(early.is_none());
        let local = Arc::new(LocalRun::new(RunId(2), FencingToken(3)));
        reg.insert(local.clone());
        assert_eq!(local.cancel.get(), Some(CancelReason::Cancel));
        assert_eq!(local.abort.get(), None);
        let other = Arc::new(LocalRun::new(RunId(4), FencingToken(5)));
        reg.signal(
            RunId(4),
            FencingToken(1),
            CancelReason::Timeout,
            Some(AbortKind::Engine),
        );
        reg.insert(other.clone());
        assert_eq!(
            other.cancel.get(),
            None,
            "another lease's signal does not apply"
        );
        let hit = reg.signal(
            RunId(4),
            FencingToken(5),
            CancelReason::Timeout,
            Some(AbortKind::Engine),
        );
        assert!(hit.is_some());
        assert_eq!(other.abort.get(), Some(AbortKind::Engine));
    }
}
