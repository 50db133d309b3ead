//! The reconciler of the store-first protocol (SPEC §7).
//!
//! A trigger commits its run here as `pending_enqueue`, then enqueues it in the queue backend
//! and marks it `in_queue`. A process that dies between the commit and the enqueue leaves the
//! row pending: the reconciler finds such rows (older than a grace period, so triggers still in
//! flight are left alone), hands them to an enqueue callback (idempotent by run id on the queue
//! side), and marks the ones the callback confirms. It runs once at start-up, then sleeps until
//! the oldest pending row passes its grace period. When none is pending it sleeps until an
//! insert of this process signals a new one, or at most [`ReconcileConfig::idle_check`]: a row
//! another process committed and then left behind (it died before its enqueue) is found by one
//! indexed `min()` query per period, with no trigger or restart needed here.
//!
//! Every pass also sweeps ([`sweep_once`]) the runs a process may have died in the middle of
//! handling, a grace period after the instant that matters: the runs marked `in_queue` whose
//! TTL deadline passed and that are still waiting here (the queue reports an expiry once, to
//! the process whose timer ticked, and removes the run; if that process died before recording
//! it, nothing else would: the run is enqueued again, its deadline past, and reported again, to
//! a live process), and the unfinished runs whose cancel was requested (the requesting process
//! removes the run from the queue, then writes it `canceled`: the callback applies the cancel
//! again).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::RunRecord;
use runlane_core::{RunId, StoreError, Timestamp};
use tokio::sync::Notify;

use crate::store::{PostgresStore, Sweep};

/// Settings of the reconciler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReconcileConfig {
    /// A pending row younger than this is still in its trigger's hands.
    pub grace: Duration,
    /// Rows handed to the callback at once.
    pub batch: u32,
    /// After a failed pass (store or callback), the next try waits this long.
    pub retry_after: Duration,
    /// With nothing pending, the store is asked again after this long: rows committed by
    /// another process that died before enqueuing them signal no insert here.
    pub idle_check: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            grace: Duration::from_secs(5),
            batch: 500,
            retry_after: Duration::from_secs(1),
            idle_check: Duration::from_secs(5),
        }
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Runs the callback confirmed in the queue (and that were marked `in_queue`).
    pub enqueued: u64,
    /// Runs handed to the callback that it did not confirm (they stay pending).
    pub failed: u64,
    /// The callback's error, when it failed a whole page.
    pub error: Option<String>,
}

/// Enqueues every `pending_enqueue` run committed at or before `cutoff`, `batch` at a time:
/// `enqueue` gets the records and answers the ids now in the queue (or an error for the whole
/// page); those are marked `in_queue`. Stops at the first page without progress.
pub async fn reconcile_once<F, Fut>(
    store: &PostgresStore,
    cutoff: Timestamp,
    batch: u32,
    enqueue: &F,
) -> Result<Reconciled, StoreError>
where
    F: Fn(Vec<RunRecord>) -> Fut,
    Fut: Future<Output = Result<Vec<RunId>, String>>,
{
    let mut done = Reconciled::default();
    let batch = batch.max(1);
    loop {
        let page = store.pending_enqueue_before(cutoff, batch).await?;
        let n = page.len() as u64;
        if n == 0 {
            return Ok(done);
        }
        match enqueue(page).await {
            Ok(ids) => {
                store.mark_in_queue(&ids).await?;
                let confirmed = (ids.len() as u64).min(n);
                done.enqueued += confirmed;
                done.failed += n - confirmed;
                if confirmed < n {
                    // What stays pending would come back in the next page: try it later.
                    return Ok(done);
                }
            }
            Err(e) => {
                done.failed += n;
                done.error = Some(e);
                return Ok(done);
            }
        }
        if n < u64::from(batch) {
            return Ok(done);
        }
    }
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Runs handed to the callback and confirmed by it.
    pub handed: u64,
    /// The callback's error, when it failed a whole page (the sweep stopped there).
    pub error: Option<String>,
}

/// Hands every run [`PostgresStore::swept`] finds for `sweep` up to `cutoff` to `enqueue`,
/// `batch` at a time (keyset pages by the sweep's instant and id). The callback puts each
/// run back in the queue as the store says it should be: a run the queue still holds is
/// answered as it is; one past its TTL that the queue lost is placed again, its deadline
/// past, and reported again; one whose cancel was requested has the cancel applied again. A
/// run the callback does not confirm (a refusal, which the callback logs, or Redis going
/// away mid-page) is left for the next sweep, which starts from the beginning again: such a
/// run stays unfinished here only until some live process ends it.
pub async fn sweep_once<F, Fut>(
    store: &PostgresStore,
    sweep: Sweep,
    cutoff: Timestamp,
    batch: u32,
    enqueue: &F,
) -> Result<Swept, StoreError>
where
    F: Fn(Vec<RunRecord>) -> Fut,
    Fut: Future<Output = Result<Vec<RunId>, String>>,
{
    let mut done = Swept::default();
    let batch = batch.max(1);
    let mut after = (Timestamp::ZERO, RunId(0));
    let instant = |r: &RunRecord| match sweep {
        Sweep::TtlPassed => r.ttl_deadline,
        Sweep::CancelRequested => r.cancel_requested_at,
    };
    loop {
        let page = store.swept(sweep, after, cutoff, batch).await?;
        let n = page.len();
        let Some(last) = page.last() else {
            return Ok(done);
        };
        after = (instant(last).unwrap_or(cutoff), last.id);
        // A start this process noted but has not written yet: the run is executing, and its
        // TTL no longer applies.
        let page: Vec<RunRecord> = page
            .into_iter()
            .filter(|r| sweep != Sweep::TtlPassed || r.started_at.is_none())
            .collect();
        if page.is_empty() {
            if n < batch as usize {
                return Ok(done);
            }
            continue;
        }
        match enqueue(page).await {
            Ok(ids) => done.handed += ids.len() as u64,
            Err(e) => {
                done.error = Some(e);
                return Ok(done);
            }
        }
        if n < batch as usize {
            return Ok(done);
        }
    }
}

/// Runs the reconciler until `shutdown` is notified: one pass at once (start-up), then one
/// whenever the oldest pending row passes `grace`, and with nothing pending at least every
/// `idle_check`; each pass also sweeps the waiting runs past their TTL and the runs whose
/// cancel was requested ([`sweep_once`]).
/// `now` is the engine's clock.
pub fn spawn_reconciler<F, Fut>(
    store: Arc<PostgresStore>,
    config: ReconcileConfig,
    now: impl Fn() -> Timestamp + Send + Sync + 'static,
    enqueue: F,
    shutdown: Arc<Notify>,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Vec<RunRecord>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<RunId>, String>> + Send,
{
    let pending = store.pending_signal();
    tokio::spawn(async move {
        loop {
            let cutoff = now().saturating_sub(config.grace);
            let pass = reconcile_once(&store, cutoff, config.batch, &enqueue).await;
            let mut swept_all = true;
            for sweep in [Sweep::TtlPassed, Sweep::CancelRequested] {
                let swept = sweep_once(&store, sweep, cutoff, config.batch, &enqueue).await;
                swept_all &= matches!(swept, Ok(Swept { error: None, .. }));
            }
            let wait = match pass {
                Ok(r) if r.failed == 0 && swept_all => match store.oldest_pending_at().await {
                    // Armed by the oldest pending row.
                    Ok(Some(oldest)) => Some(oldest.saturating_add(config.grace).since(now())),
                    // Nothing pending: sleep until an insert here makes something pending,
                    // or until the next look for rows another process left behind.
                    Ok(None) => None,
                    Err(_) => Some(config.retry_after),
                },
                _ => Some(config.retry_after),
            };
            match wait {
                Some(wait) => tokio::select! {
                    _ = shutdown.notified() => return,
                    _ = tokio::time::sleep(wait) => {}
                },
                None => tokio::select! {
                    _ = shutdown.notified() => return,
                    _ = pending.notified() => {}
                    _ = tokio::time::sleep(config.idle_check) => {}
                },
            }
        }
    })
}
