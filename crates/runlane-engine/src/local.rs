//! The in-process registry of executing runs: per run, its lease token, its handler's
//! cancellation token, an abort latch, and the settle lock that decides who ends the attempt.
//!
//! Two parties may want to end the same attempt in one process: the worker (its handler
//! returned) and the timer service (the attempt timed out, its lease lapsed, its cancel grace
//! ended). Both take the run's settle lock first; whoever finds it unsettled does the store and
//! queue writes and marks it settled, the other backs off. The queue backend's fencing tokens
//! and the store's first-terminal-write-wins cover the same races across processes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use runlane_core::{CancelReason, FencingToken, RunId};
use tokio::sync::Notify;

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

/// Every executing run of this process, by run id.
#[derive(Debug, Default)]
pub(crate) struct LocalRegistry {
    runs: Mutex<HashMap<RunId, Arc<LocalRun>>>,
}

impl LocalRegistry {
    fn map(&self) -> MutexGuard<'_, HashMap<RunId, Arc<LocalRun>>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn insert(&self, run: Arc<LocalRun>) {
        self.map().insert(run.run, run);
    }

    /// Removes the entry if it is still this lease's.
    pub(crate) fn remove(&self, run: RunId, token: FencingToken) {
        let mut map = self.map();
        if map.get(&run).is_some_and(|r| r.token == token) {
            map.remove(&run);
        }
    }

    /// The run's entry when it executes here under `token`.
    pub(crate) fn get(&self, run: RunId, token: FencingToken) -> Option<Arc<LocalRun>> {
        self.map().get(&run).filter(|r| r.token == token).cloned()
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
}
