//! Hooks for shapes that drive the queue backend from outside the engine: the distributed
//! shape's reconciler enqueues runs whose trigger could not, and the engine must act on those
//! calls' effects (ring doorbells, re-arm its timer) as on its own. A [`WeakEngine`] lets such a
//! background task reach the engine without keeping it open.

use std::sync::{Arc, Weak};

use runlane_core::backend::{Effects, Leased, ParkedOffer, RunRecord};
use runlane_core::{EnvName, LaneName, RunId, RunStatus, Timestamp};

use crate::engine::{Engine, Inner};
use crate::error::EngineError;
use crate::event::StatusTap;
use crate::handover::Handed;

/// How long a read ahead may take, and a claim wait for it (then the claim reads the run
/// itself: a read that slow is the store's state, not the read ahead's).
pub(crate) const READ_AHEAD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The runs of a read ahead, answered `None` (read by their claims) unless `fill`ed: a read
/// that failed, timed out or whose task was dropped leaves nothing pending.
struct Unanswered {
    inner: Weak<Inner>,
    runs: Vec<RunId>,
}

impl Unanswered {
    fn fill(mut self, read: Vec<(RunId, Option<Handed>)>) {
        self.runs.clear();
        if let Some(inner) = self.inner.upgrade() {
            inner.handover.fill(read);
        }
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.runs.is_empty() {
            return;
        }
        if let Some(inner) = self.inner.upgrade() {
            inner
                .handover
                .fill(self.runs.iter().map(|run| (*run, None)).collect());
        }
    }
}

/// A handle on an engine that does not keep it open ([`Engine::downgrade`]).
#[derive(Clone)]
pub struct WeakEngine {
    inner: Weak<Inner>,
}

impl WeakEngine {
    /// The engine, while some [`Engine`] handle still holds it.
    pub fn upgrade(&self) -> Option<Engine> {
        self.inner.upgrade().map(|inner| Engine { inner })
    }
}

impl Engine {
    /// A handle that does not keep the engine open (for background tasks a shape owns).
    pub fn downgrade(&self) -> WeakEngine {
        WeakEngine {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Acts on the effects of a queue-backend call made outside the engine: rings the
    /// doorbells of lanes that received ready runs, publishes the moves and re-arms the timer.
    pub async fn apply_effects(&self, effects: Effects) {
        self.inner.apply(effects, None).await
    }

    /// Leases another process's enqueue made for the offer a workloop here parked in the
    /// queue (`parked`), as the doorbells deliver them, each with what its trigger handed when
    /// sent: they start on that workloop as its own claim's would, without a claim call (nor a
    /// read of a run whose trigger sent what the worker needs). Does nothing when the workloop
    /// no longer waits on that offer: its next claim withdraws the offer and answers them.
    pub fn offer_delivered(&self, parked: ParkedOffer, runs: Vec<(Leased, Option<Vec<u8>>)>) {
        let inner = &self.inner;
        let Some(offer) = inner.offers.delivered(parked) else {
            return;
        };
        let mut leases = Vec::with_capacity(runs.len());
        for (lease, handed) in runs {
            if let Some(handed) = handed.as_deref().and_then(Handed::decode) {
                inner.handover.keep_delivered(lease.dispatch.run_id, handed);
            }
            leases.push(lease);
        }
        inner.claimed(&leases);
        inner.counters.claimed_delivered(leases.len());
        offer.fulfil_delivered(leases);
    }

    /// Reads ahead runs another process just made ready on `lanes` (its doorbell named them),
    /// while a workloop of this engine that claims on one of those lanes waits idle: the read
    /// goes out now, beside the claim the doorbell causes, and that claim takes a run it leases
    /// from the read (waiting for its answer, as long as the read may take: 1 s) instead of
    /// reading it after the claim. A run read here and leased elsewhere leaves with its
    /// terminal status (as a trigger's hand-over does); a run the read finds ended or with a
    /// cancel requested is not kept (its claim reads it again); what was read for a run goes
    /// when the run starts here, so only its first claim here uses it. Does nothing while no
    /// such workloop waits (under load each claim reads what it leased).
    pub fn read_ahead(&self, lanes: &[LaneName], runs: &[RunId]) {
        let inner = &self.inner;
        if runs.is_empty() || !inner.offers.covers_any_lane(lanes) {
            return;
        }
        // A run already executing here needs no read (and one kept would serve its next
        // attempt); checked after marking, so a run registered meanwhile drops the mark.
        let (executing, wanted): (Vec<RunId>, Vec<RunId>) = inner
            .handover
            .expect(runs)
            .into_iter()
            .partition(|run| inner.local.contains(*run));
        if !executing.is_empty() {
            inner
                .handover
                .fill(executing.into_iter().map(|run| (run, None)).collect());
        }
        if wanted.is_empty() {
            return;
        }
        inner.counters.read_ahead(wanted.len());
        let store = inner.store.clone();
        let answer = Unanswered {
            inner: Arc::downgrade(&self.inner),
            runs: wanted,
        };
        tokio::spawn(async move {
            let wanted = answer.runs.clone();
            let read = tokio::time::timeout(READ_AHEAD_WAIT, store.get_many(&wanted)).await;
            let filled = match read {
                Ok(Ok(records)) if records.len() == wanted.len() => wanted
                    .iter()
                    .zip(records)
                    .map(|(run, record)| {
                        let handed = record
                            .filter(|r| !r.status.is_terminal() && r.cancel_requested_at.is_none())
                            .map(|r| Handed {
                                task: r.task,
                                payload: r.payload,
                                retry: r.retry,
                            });
                        (*run, handed)
                    })
                    .collect(),
                // Failed or late: the claims read the runs themselves.
                _ => wanted.iter().map(|run| (*run, None)).collect(),
            };
            answer.fill(filled);
        });
    }

    /// Applies a cancel kept in the store again, as the engine's open does: the distributed
    /// reconciler calls it for an unfinished run whose cancel was requested a grace period ago
    /// (the requesting process removes the run from the queue, then writes it `canceled`, and
    /// may die in between). A run the queue holds executing keeps its grace period (a second
    /// request keeps the first deadline), one it holds waiting is removed and ends `canceled`,
    /// one it does not hold ends `canceled` at once; a run another process ended meanwhile is
    /// left as it ended.
    pub async fn recover_requested_cancel(&self, record: &RunRecord) -> Result<(), EngineError> {
        let inner = &self.inner;
        let effects = inner.recover_cancel(record, self.now()).await?;
        inner.apply(effects, Some(record.id)).await;
        Ok(())
    }

    /// Installs a tap told of every status change this engine publishes itself (a shape
    /// forwards them to other processes). One tap per engine: false when one is installed.
    /// The tap runs on the publishing path: it must only note the event and return.
    pub fn tap_statuses(&self, tap: StatusTap) -> bool {
        self.inner.events.set_tap(tap)
    }

    /// After a gap in what this engine hears from other processes (a shape's cross-process
    /// subscription was re-established): ends and wake-ups sent during the gap are lost, so
    /// every wait and run subscription reads its run from the store once, and every idle
    /// workloop claims once.
    pub fn resync_after_gap(&self) {
        self.inner.events.announce_gap();
        self.inner.bells.ring_all();
    }

    /// Publishes, on this engine's event bus, a status change another process's engine made
    /// (so `wait` and subscriptions here see runs finished elsewhere). The tap is not told.
    ///
    /// A run that ended elsewhere also leaves this process's hand-over: a worker here must
    /// never start it from what its trigger handed over (a stale re-enqueue of the finished
    /// run, by a process recovering at open from an older read, would otherwise run it again
    /// without a look at the store), and the entry would only take room until the hand-over
    /// fills.
    pub fn publish_status_from_elsewhere(
        &self,
        run: RunId,
        env: &EnvName,
        status: RunStatus,
        attempt: u32,
        at: Timestamp,
    ) {
        if status.is_terminal() {
            self.inner.handover.forget(run);
        }
        self.inner
            .events
            .status_from(run, env, at, status, attempt, false);
    }
}
