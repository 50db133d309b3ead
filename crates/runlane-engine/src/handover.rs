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
//!
//! Runs another process made ready can be read ahead ([`Handover::expect`], then
//! [`Handover::fill`]): while the read is on the way they are *pending*, and a claim that
//! leased one waits for the read ([`Handover::take_awaited`], bounded) instead of reading the
//! run again. Forgetting a pending run cancels its entry: the read's answer is dropped. An
//! entry read ahead never outlives the run's first claim here ([`Handover::drop_read_ahead`]
//! when a claimed run starts), so a later attempt reads its run from the store.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use runlane_core::{RetryPolicy, RunId, TaskName};

use runlane_core::idhash::IdBuild;

/// At most this many runs are held.
const ENTRIES_MAX: usize = 1 << 18;
/// At most this many payload bytes are held.
const BYTES_MAX: usize = 64 << 20;
/// At most this many runs are being read ahead at once (more are not read ahead).
const PENDING_MAX: usize = 64;

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

/// At most this many payload bytes go with a lease made for another process's parked offer
/// (a larger payload is read from the store by the claiming worker).
const SENT_MAX: usize = 16 << 10;

impl Handed {
    /// What goes with a lease made for another process's parked offer, `None` when the payload
    /// is too large to send: the task, the retry policy (JSON) and the payload, one line each
    /// (neither a task name nor compact JSON holds a line break; the payload comes last).
    pub(crate) fn encode(&self) -> Option<Vec<u8>> {
        if self.payload.len() > SENT_MAX {
            return None;
        }
        let retry = serde_json::to_string(&self.retry).ok()?;
        let mut out =
            Vec::with_capacity(self.task.as_str().len() + retry.len() + self.payload.len() + 2);
        out.extend_from_slice(self.task.as_str().as_bytes());
        out.push(b'\n');
        out.extend_from_slice(retry.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(self.payload.as_bytes());
        Some(out)
    }

    /// Reads what [`Handed::encode`] wrote; `None` for anything else.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Handed> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (task, rest) = text.split_once('\n')?;
        let (retry, payload) = rest.split_once('\n')?;
        Some(Handed {
            task: TaskName::new(task).ok()?,
            payload: Arc::from(payload),
            retry: serde_json::from_str(retry).ok()?,
        })
    }
}

#[derive(Default)]
struct State {
    /// Each entry, and whether it came from a read ahead.
    runs: HashMap<RunId, (Handed, bool), IdBuild>,
    bytes: usize,
    /// Entries that came from a read ahead.
    ahead: usize,
    /// Runs being read ahead (their entry comes with the read's answer).
    pending: HashSet<RunId, IdBuild>,
}

/// The runs triggered here and not claimed yet.
pub(crate) struct Handover {
    enabled: bool,
    /// Other processes claim too: a full hand-over is emptied instead of refusing entries.
    shared: bool,
    state: Mutex<State>,
    /// Entries held, readable without the lock (forgetting skips the lock when zero).
    len: AtomicUsize,
    /// Runs pending, readable without the lock.
    pending: AtomicUsize,
    /// Entries read ahead, readable without the lock.
    ahead: AtomicUsize,
    /// Told whenever a read ahead answered.
    filled: tokio::sync::Notify,
    /// Entries of reads ahead taken by claims.
    ahead_taken: AtomicU64,
}

impl Handover {
    pub(crate) fn new(enabled: bool, shared: bool) -> Self {
        Handover {
            enabled,
            shared,
            state: Mutex::new(State::default()),
            len: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            ahead: AtomicUsize::new(0),
            filled: tokio::sync::Notify::new(),
            ahead_taken: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a run for its first claim (before it is enqueued, so a claim cannot miss it);
    /// does nothing when disabled or full.
    pub(crate) fn keep(&self, run: RunId, handed: Handed) {
        self.keep_as(run, handed, false);
    }

    /// Keeps what came with a lease another process's enqueue made for a workloop here, as a
    /// read ahead (dropped when the run starts: a later attempt reads its run).
    pub(crate) fn keep_delivered(&self, run: RunId, handed: Handed) {
        self.keep_as(run, handed, true);
    }

    fn keep_as(&self, run: RunId, handed: Handed, ahead: bool) {
        if !self.enabled {
            return;
        }
        let mut st = self.lock();
        self.insert(&mut st, run, handed, ahead);
    }

    fn insert(&self, st: &mut State, run: RunId, handed: Handed, ahead: bool) {
        let size = handed.payload.len();
        if st.runs.len() >= ENTRIES_MAX || st.bytes.saturating_add(size) > BYTES_MAX {
            if !self.shared {
                return;
            }
            // Mostly entries of runs other processes claimed: start again.
            st.runs.clear();
            st.bytes = 0;
            st.ahead = 0;
        }
        if let Some((old, was_ahead)) = st.runs.insert(run, (handed, ahead)) {
            st.bytes = st.bytes.saturating_sub(old.payload.len());
            st.ahead -= usize::from(was_ahead);
        }
        st.bytes += size;
        st.ahead += usize::from(ahead);
        self.counts(st);
    }

    /// Publishes the counts read without the lock.
    fn counts(&self, st: &State) {
        self.len.store(st.runs.len(), Ordering::Release);
        self.pending.store(st.pending.len(), Ordering::Release);
        self.ahead.store(st.ahead, Ordering::Release);
    }

    /// Marks runs about to be read ahead as pending; answers those to read (not held, not
    /// pending already, within [`PENDING_MAX`]).
    pub(crate) fn expect(&self, runs: &[RunId]) -> Vec<RunId> {
        if !self.enabled {
            return Vec::new();
        }
        let mut st = self.lock();
        let mut out = Vec::new();
        for run in runs {
            if st.pending.len() >= PENDING_MAX {
                break;
            }
            if !st.runs.contains_key(run) && st.pending.insert(*run) {
                out.push(*run);
            }
        }
        self.counts(&st);
        out
    }

    /// A read ahead answered: each run still pending gets its entry (`None`: the read found
    /// nothing to hand over; the claim reads the run itself). Wakes the claims waiting.
    pub(crate) fn fill(&self, read: Vec<(RunId, Option<Handed>)>) {
        {
            let mut st = self.lock();
            for (run, handed) in read {
                if st.pending.remove(&run) {
                    if let Some(handed) = handed {
                        self.insert(&mut st, run, handed, true);
                    }
                }
            }
            self.counts(&st);
        }
        self.filled.notify_waiters();
    }

    /// Takes a run's entry, waiting until `deadline` for it when it is being read ahead.
    pub(crate) async fn take_awaited(
        &self,
        run: RunId,
        deadline: tokio::time::Instant,
    ) -> Option<Handed> {
        if !self.enabled {
            return None;
        }
        loop {
            // Armed before the look, so an answer in between is not missed.
            let filled = self.filled.notified();
            tokio::pin!(filled);
            filled.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some(handed) = self.remove(&mut st, run, true) {
                    return Some(handed);
                }
                if !st.pending.contains(&run) {
                    return None;
                }
            }
            if tokio::time::timeout_at(deadline, filled).await.is_err() {
                // Late: an answer that came meanwhile is taken; else the claim reads the run
                // itself and the late answer is dropped.
                let mut st = self.lock();
                if let Some(handed) = self.remove(&mut st, run, true) {
                    return Some(handed);
                }
                st.pending.remove(&run);
                self.counts(&st);
                return None;
            }
        }
    }

    /// Whether some run is being read ahead.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// A claimed run starts here: an entry read ahead for it goes (one for another attempt
    /// would skip that attempt's look at the store), as does a read still on the way.
    pub(crate) fn drop_read_ahead(&self, run: RunId) {
        if self.ahead.load(Ordering::Acquire) == 0 && self.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut st = self.lock();
        if st.runs.get(&run).is_some_and(|(_, ahead)| *ahead) {
            drop(self.remove(&mut st, run, false));
        }
        if st.pending.remove(&run) {
            self.counts(&st);
        }
    }

    /// Entries of reads ahead that claims took (since open).
    pub(crate) fn read_ahead_taken(&self) -> u64 {
        self.ahead_taken.load(Ordering::Relaxed)
    }

    /// Removes a run's entry; `claimed`: a claim takes it (counted when read ahead).
    fn remove(&self, st: &mut State, run: RunId, claimed: bool) -> Option<Handed> {
        let (handed, ahead) = st.runs.remove(&run)?;
        st.bytes = st.bytes.saturating_sub(handed.payload.len());
        st.ahead -= usize::from(ahead);
        self.counts(st);
        if ahead && claimed {
            self.ahead_taken.fetch_add(1, Ordering::Relaxed);
        }
        Some(handed)
    }

    /// Takes a run's entry (at its claim).
    pub(crate) fn take(&self, run: RunId) -> Option<Handed> {
        if !self.enabled || self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut st = self.lock();
        self.remove(&mut st, run, true)
    }

    /// Drops a run's entry if it has one (it ended without a claim, or was taken back), and
    /// the answer of its read ahead if one is on the way.
    pub(crate) fn forget(&self, run: RunId) {
        if self.pending.load(Ordering::Acquire) > 0 {
            let mut st = self.lock();
            let was_pending = st.pending.remove(&run);
            if was_pending {
                self.counts(&st);
            }
            drop(self.remove(&mut st, run, false));
            drop(st);
            if was_pending {
                // A claim waiting for that read reads the run itself now.
                self.filled.notify_waiters();
            }
            return;
        }
        if self.len.load(Ordering::Acquire) > 0 {
            drop(self.remove(&mut self.lock(), run, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `d` from now.
    fn within(d: Duration) -> tokio::time::Instant {
        tokio::time::Instant::now() + d
    }

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

    #[tokio::test]
    async fn a_claim_waits_for_the_read_ahead_of_its_run() {
        let h = Arc::new(Handover::new(true, true));
        assert_eq!(h.expect(&[RunId(1), RunId(2)]), vec![RunId(1), RunId(2)]);
        assert!(h.expect(&[RunId(1)]).is_empty(), "pending already");
        assert!(h.has_pending());
        let filler = {
            let h = h.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                h.fill(vec![(RunId(1), Some(handed("{}"))), (RunId(2), None)]);
            })
        };
        let got = h
            .take_awaited(RunId(1), within(Duration::from_secs(30)))
            .await;
        assert_eq!(got.map(|x| x.payload), Some(Arc::from("{}")));
        filler.await.expect("filler");
        assert!(!h.has_pending());
        assert!(
            h.take_awaited(RunId(2), within(Duration::from_secs(30)))
                .await
                .is_none(),
            "a read that found nothing to hand over"
        );
        assert_eq!(h.read_ahead_taken(), 1);
        // A run never read ahead is not waited for.
        assert!(h
            .take_awaited(RunId(3), within(Duration::from_secs(30)))
            .await
            .is_none());
    }

    #[tokio::test]
    async fn a_forgotten_or_late_read_ahead_is_dropped() {
        let h = Handover::new(true, true);
        h.expect(&[RunId(1), RunId(2)]);
        // Ended (or cancelled) while its read was on the way: the answer is not kept.
        h.forget(RunId(1));
        h.fill(vec![(RunId(1), Some(handed("{}")))]);
        assert!(h.take(RunId(1)).is_none());
        // Not answered in time: the claim reads the run itself, the late answer is dropped.
        assert!(h
            .take_awaited(RunId(2), within(Duration::from_millis(1)))
            .await
            .is_none());
        assert!(!h.has_pending());
        h.fill(vec![(RunId(2), Some(handed("{}")))]);
        assert!(h.take(RunId(2)).is_none());
        // An entry read ahead and forgotten (its run ended elsewhere) is not counted as taken.
        h.expect(&[RunId(3)]);
        h.fill(vec![(RunId(3), Some(handed("{}")))]);
        h.forget(RunId(3));
        assert!(h.take(RunId(3)).is_none());
        assert_eq!(h.read_ahead_taken(), 0);
    }

    #[tokio::test]
    async fn a_forget_wakes_the_claim_waiting_for_that_read() {
        let h = Arc::new(Handover::new(true, true));
        h.expect(&[RunId(1)]);
        let waiter = {
            let h = h.clone();
            tokio::spawn(async move {
                h.take_awaited(RunId(1), within(Duration::from_secs(3600)))
                    .await
            })
        };
        tokio::task::yield_now().await;
        h.forget(RunId(1));
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by the forget, not by its hour-long deadline")
            .expect("waiter");
        assert!(got.is_none());
    }

    #[test]
    fn an_entry_read_ahead_goes_when_its_run_starts_here() {
        let h = Handover::new(true, true);
        // Read ahead after a local claim already started the run: a later attempt must not
        // find the entry.
        h.expect(&[RunId(1), RunId(2)]);
        h.fill(vec![(RunId(1), Some(handed("{}")))]);
        h.drop_read_ahead(RunId(1));
        h.drop_read_ahead(RunId(2));
        assert!(h.take(RunId(1)).is_none());
        assert!(!h.has_pending(), "the read on the way is dropped too");
        h.fill(vec![(RunId(2), Some(handed("{}")))]);
        assert!(h.take(RunId(2)).is_none());
        // A trigger's entry stays for its claim.
        h.keep(RunId(3), handed("[]"));
        h.drop_read_ahead(RunId(3));
        assert!(h.take(RunId(3)).is_some());
        let st = h.lock();
        assert_eq!((st.ahead, st.bytes), (0, 0));
    }

    #[test]
    fn reads_ahead_are_bounded_and_skip_held_runs() {
        let h = Handover::new(true, true);
        h.keep(RunId(0), handed("{}"));
        let many: Vec<RunId> = (0..200).map(RunId).collect();
        let wanted = h.expect(&many);
        assert_eq!(wanted.len(), PENDING_MAX);
        assert_eq!(wanted[0], RunId(1), "a held run is not read");
        assert!(Handover::new(false, true).expect(&many).is_empty());
    }

    #[test]
    fn a_disabled_handover_keeps_nothing() {
        let h = Handover::new(false, false);
        h.keep(RunId(1), handed("{}"));
        assert!(h.take(RunId(1)).is_none());
    }
}
