//! Run events: status changes and progress, per run and per env. Progress is kept in memory
//! (the latest value per run, for late subscribers) and never written to the store mid-run.
//!
//! One `tokio::sync::broadcast` channel carries every event of the engine; subscriptions filter
//! it. A subscriber that falls behind the channel's capacity loses events: a run subscription
//! then re-reads the run store so that it never misses its run's end, an env subscription skips
//! ahead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use runlane_core::backend::RunStore;
use runlane_core::{EnvName, RunId, RunStatus, Timestamp};
use tokio::sync::{broadcast, watch};

use runlane_core::idhash::IdBuild;

/// Events buffered per subscriber before it starts losing them.
const CHANNEL_CAPACITY: usize = 4096;

/// One event about a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEvent {
    /// Increasing per engine; SSE uses it as the event id.
    pub seq: u64,
    /// The run.
    pub run: RunId,
    /// Its env.
    pub env: EnvName,
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    pub kind: RunEventKind,
}

impl RunEvent {
    /// The status this event moved the run to, if it is a status event.
    pub fn status(&self) -> Option<RunStatus> {
        match self.kind {
            RunEventKind::Status { status, .. } => Some(status),
            RunEventKind::Progress(_) => None,
        }
    }

    /// Whether this event ends the run's stream (a terminal status).
    pub fn is_terminal(&self) -> bool {
        self.status().is_some_and(RunStatus::is_terminal)
    }
}

/// What happened to a run.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEventKind {
    /// It moved to a new status (attempt is the attempt in force).
    Status {
        /// The new status.
        status: RunStatus,
        /// The attempt.
        attempt: u32,
    },
    /// Its handler reported progress (JSON text).
    Progress(Arc<str>),
}

/// A function told of every status change this engine publishes itself (not of those
/// delivered from elsewhere); see [`crate::Engine::tap_statuses`].
pub type StatusTap = Arc<dyn Fn(&RunEvent) + Send + Sync>;

/// The engine's event hub: the channel, the sequence and the latest progress per run.
///
/// Publishing costs nothing but two atomic loads while nobody listens: `listeners` counts the
/// live receivers (each [`Rx`] holds one), and `any_progress` says whether the progress map
/// may hold anything a terminal status must forget. A receiver is counted before the state it
/// reads after subscribing, so an event skipped for want of listeners was written before that
/// read and is seen there (a run's end in the store, its latest progress in the map).
pub(crate) struct EventHub {
    tx: Mutex<Option<broadcast::Sender<RunEvent>>>,
    seq: AtomicU64,
    progress: Mutex<HashMap<RunId, RunEvent, IdBuild>>,
    /// Told of every status change published here (set once, by a shape).
    tap: std::sync::OnceLock<StatusTap>,
    listeners: Arc<AtomicUsize>,
    any_progress: AtomicBool,
    /// Bumped when events from elsewhere may have been lost ([`EventHub::announce_gap`]).
    gaps: watch::Sender<u64>,
}

/// A receiver of the hub's channel, counted as a listener while it lives.
pub(crate) struct Rx {
    rx: broadcast::Receiver<RunEvent>,
    listeners: Arc<AtomicUsize>,
    /// Gaps announced since this receiver was made (`None` once the hub is gone).
    gaps: Option<watch::Receiver<u64>>,
}

impl Rx {
    /// The next event, or `Ok(None)` when a gap was announced meanwhile: events published
    /// elsewhere may have been lost, and the caller reads what it follows from the store.
    pub(crate) async fn recv_or_gap(
        &mut self,
    ) -> Result<Option<RunEvent>, broadcast::error::RecvError> {
        let Some(gaps) = self.gaps.as_mut() else {
            return self.rx.recv().await.map(Some);
        };
        tokio::select! {
            biased;
            event = self.rx.recv() => event.map(Some),
            changed = gaps.changed() => {
                if changed.is_err() {
                    self.gaps = None; // The hub is gone: only the channel is left.
                }
                Ok(None)
            }
        }
    }
}

impl Drop for Rx {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::ops::Deref for Rx {
    type Target = broadcast::Receiver<RunEvent>;
    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl std::ops::DerefMut for Rx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rx
    }
}

impl EventHub {
    pub(crate) fn new() -> Self {
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        EventHub {
            tx: Mutex::new(Some(tx)),
            seq: AtomicU64::new(0),
            progress: Mutex::new(HashMap::default()),
            tap: std::sync::OnceLock::new(),
            listeners: Arc::new(AtomicUsize::new(0)),
            any_progress: AtomicBool::new(false),
            gaps: watch::Sender::new(0),
        }
    }

    /// Events published elsewhere may have been lost (a shape's cross-process subscription
    /// was re-established): every run subscription reads its run from the store once.
    pub(crate) fn announce_gap(&self) {
        self.gaps.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Installs the status tap; false when one is installed already.
    pub(crate) fn set_tap(&self, tap: StatusTap) -> bool {
        self.tap.set(tap).is_ok()
    }

    fn sender(&self) -> Option<broadcast::Sender<RunEvent>> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn progress_map(&self) -> MutexGuard<'_, HashMap<RunId, RunEvent, IdBuild>> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether anybody listens (status lookups are skipped when nobody does): a receiver in
    /// this process, or the status tap (listeners in other processes).
    pub(crate) fn has_subscribers(&self) -> bool {
        self.listeners.load(Ordering::SeqCst) > 0 || self.tap.get().is_some()
    }

    /// A terminal status with nobody listening: only the run's progress is forgotten.
    pub(crate) fn forget_progress(&self, run: RunId) {
        if self.any_progress.load(Ordering::SeqCst) {
            let mut map = self.progress_map();
            map.remove(&run);
            if map.is_empty() {
                self.any_progress.store(false, Ordering::SeqCst);
            }
        }
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Publishes a status change. A terminal status forgets the run's progress.
    pub(crate) fn status(
        &self,
        run: RunId,
        env: &EnvName,
        at: Timestamp,
        status: RunStatus,
        attempt: u32,
    ) {
        self.status_from(run, env, at, status, attempt, true);
    }

    /// Publishes a status change; `tapped`: also tell the status tap (false for a change
    /// delivered from another process, which its own engine told already).
    pub(crate) fn status_from(
        &self,
        run: RunId,
        env: &EnvName,
        at: Timestamp,
        status: RunStatus,
        attempt: u32,
        tapped: bool,
    ) {
        if status.is_terminal() {
            self.forget_progress(run);
        }
        if !self.has_subscribers() {
            return;
        }
        let event = RunEvent {
            seq: self.next_seq(),
            run,
            env: env.clone(),
            at,
            kind: RunEventKind::Status { status, attempt },
        };
        if tapped {
            if let Some(tap) = self.tap.get() {
                tap(&event);
            }
        }
        let Some(tx) = self.sender() else { return };
        // No receiver is not an error: events are fire-and-forget.
        let _ = tx.send(event);
    }

    /// Publishes progress and keeps it as the run's latest.
    pub(crate) fn progress(&self, run: RunId, env: &EnvName, at: Timestamp, value: Arc<str>) {
        let event = RunEvent {
            seq: self.next_seq(),
            run,
            env: env.clone(),
            at,
            kind: RunEventKind::Progress(value),
        };
        {
            let mut map = self.progress_map();
            self.any_progress.store(true, Ordering::SeqCst);
            map.insert(run, event.clone());
        }
        if !self.has_subscribers() {
            return;
        }
        if let Some(tx) = self.sender() {
            let _ = tx.send(event);
        }
    }

    /// The latest progress of a run.
    pub(crate) fn latest_progress(&self, run: RunId) -> Option<RunEvent> {
        self.progress_map().get(&run).cloned()
    }

    /// A raw receiver (subscribe before reading state, so nothing is lost in between).
    pub(crate) fn receiver(&self) -> Option<Rx> {
        // Counted first: a publisher that sees no listener published before this point.
        self.listeners.fetch_add(1, Ordering::SeqCst);
        let Some(tx) = self.sender() else {
            self.listeners.fetch_sub(1, Ordering::SeqCst);
            return None;
        };
        Some(Rx {
            rx: tx.subscribe(),
            listeners: self.listeners.clone(),
            gaps: Some(self.gaps.subscribe()),
        })
    }

    /// Closes the channel: env subscriptions end.
    pub(crate) fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.progress_map().clear();
        self.any_progress.store(false, Ordering::SeqCst);
    }

    /// A sequence number for a synthesized event (a run already finished, or a lag resync).
    pub(crate) fn synthesized_seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }
}

/// A subscription to one run's events. A new subscriber first gets the latest progress.
pub struct RunEvents {
    run: RunId,
    rx: Option<Rx>,
    /// Events to hand out before reading the channel (latest progress, a known end).
    pending: std::collections::VecDeque<RunEvent>,
    store: Arc<dyn RunStore>,
    done: bool,
}

impl RunEvents {
    pub(crate) fn new(
        run: RunId,
        rx: Option<Rx>,
        first: Vec<RunEvent>,
        store: Arc<dyn RunStore>,
    ) -> Self {
        RunEvents {
            run,
            rx,
            pending: first.into(),
            store,
            done: false,
        }
    }

    /// The run this subscription follows.
    pub fn run(&self) -> RunId {
        self.run
    }

    /// The next event; `None` once the run is terminal and every event was delivered.
    pub async fn next(&mut self) -> Option<RunEvent> {
        if self.done {
            return None;
        }
        if let Some(event) = self.pending.pop_front() {
            self.done = event.is_terminal();
            return Some(event);
        }
        loop {
            let rx = self.rx.as_mut()?;
            match rx.recv_or_gap().await {
                Ok(Some(event)) if event.run == self.run => {
                    self.done = event.is_terminal();
                    return Some(event);
                }
                Ok(Some(_)) => continue,
                // Events were lost (a lag here, a gap elsewhere): the store tells whether the
                // run's end was among them.
                Ok(None) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Some(end) = self.resync().await {
                        self.done = true;
                        return Some(end);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.done = true;
                    return None;
                }
            }
        }
    }

    async fn resync(&self) -> Option<RunEvent> {
        let record = self.store.get(self.run).await.ok().flatten()?;
        record.status.is_terminal().then(|| RunEvent {
            seq: 0,
            run: record.id,
            env: record.env.clone(),
            at: record.finished_at.unwrap_or(record.created_at),
            kind: RunEventKind::Status {
                status: record.status,
                attempt: record.attempt,
            },
        })
    }
}

/// A subscription to every run event of one env.
pub struct EnvEvents {
    env: EnvName,
    rx: Option<Rx>,
}

impl EnvEvents {
    pub(crate) fn new(env: EnvName, rx: Option<Rx>) -> Self {
        EnvEvents { env, rx }
    }

    /// The next event; `None` when the engine shuts down.
    pub async fn next(&mut self) -> Option<RunEvent> {
        loop {
            let rx = self.rx.as_mut()?;
            match rx.recv().await {
                Ok(event) if event.env == self.env => return Some(event),
                Ok(_) => continue,
                // A slow subscriber skips what it lost; SSE clients resume by Last-Event-ID.
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(env = %self.env, lost = n, "env event subscriber lagged");
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.rx = None;
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> EnvName {
        EnvName::new(name).expect("valid")
    }

    #[tokio::test]
    async fn run_events_filter_by_run_and_end_after_the_terminal_status() {
        let hub = EventHub::new();
        let (a, b) = (RunId(1), RunId(2));
        let e = env("default");
        hub.progress(a, &e, Timestamp(1), Arc::from("{\"pct\":10}"));
        let first = hub.latest_progress(a).into_iter().collect();
        let mut sub = RunEvents::new(
            a,
            hub.receiver(),
            first,
            Arc::new(runlane_memory::MemoryStore::new()),
        );
        hub.status(b, &e, Timestamp(2), RunStatus::Executing, 1);
        hub.status(a, &e, Timestamp(3), RunStatus::Executing, 1);
        hub.status(a, &e, Timestamp(4), RunStatus::Completed, 1);
        hub.status(a, &e, Timestamp(5), RunStatus::Completed, 1);

        let progress = sub.next().await.expect("latest progress first");
        assert_eq!(
            progress.kind,
            RunEventKind::Progress(Arc::from("{\"pct\":10}"))
        );
        let executing = sub.next().await.expect("status");
        assert_eq!(executing.status(), Some(RunStatus::Executing));
        assert!(executing.seq > progress.seq, "seq increases");
        assert_eq!(
            sub.next().await.and_then(|e| e.status()),
            Some(RunStatus::Completed)
        );
        assert_eq!(sub.next().await, None, "ends after the terminal status");
        assert!(
            hub.latest_progress(a).is_none(),
            "progress dropped at the end"
        );
    }

    #[tokio::test]
    async fn listeners_are_counted_and_progress_is_forgotten_without_them() {
        let hub = EventHub::new();
        let e = env("default");
        let run = RunId(7);
        assert!(!hub.has_subscribers());
        hub.progress(run, &e, Timestamp(1), Arc::from("{\"pct\":50}"));
        assert!(
            hub.latest_progress(run).is_some(),
            "kept with nobody listening"
        );
        hub.status(run, &e, Timestamp(2), RunStatus::Completed, 1);
        assert!(
            hub.latest_progress(run).is_none(),
            "a terminal status forgets progress with nobody listening"
        );

        let mut rx = hub.receiver().expect("open hub");
        assert!(hub.has_subscribers());
        hub.status(run, &e, Timestamp(3), RunStatus::Executing, 2);
        let got = rx.recv().await.expect("delivered to a listener");
        assert_eq!(got.status(), Some(RunStatus::Executing));
        drop(rx);
        assert!(!hub.has_subscribers(), "a dropped receiver stops counting");
        hub.close();
        assert!(hub.receiver().is_none());
        assert!(!hub.has_subscribers(), "a refused receiver is not counted");
    }

    #[tokio::test]
    async fn env_events_filter_by_env_and_end_on_close() {
        let hub = EventHub::new();
        let mut sub = EnvEvents::new(env("acme"), hub.receiver());
        hub.status(
            RunId(1),
            &env("default"),
            Timestamp(1),
            RunStatus::Queued,
            1,
        );
        hub.status(RunId(2), &env("acme"), Timestamp(2), RunStatus::Queued, 1);
        hub.close();
        let got = sub.next().await.expect("acme event");
        assert_eq!((got.run, got.env.as_str()), (RunId(2), "acme"));
        assert_eq!(sub.next().await, None);
    }
}
