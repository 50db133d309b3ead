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

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::RunRecord;
use runlane_core::{RunId, StoreError, Timestamp};
use tokio::sync::Notify;

use crate::store::PostgresStore;

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

/// Runs the reconciler until `shutdown` is notified: one pass at once (start-up), then one
/// whenever the oldest pending row passes `grace`. `now` is the engine's clock.
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
            let wait = match pass {
                Ok(r) if r.failed == 0 => match store.oldest_pending_at().await {
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
