//! The one writer thread and its group commit.
//!
//! Every write call is queued on a **bounded** channel to one OS thread that owns the write
//! connection. The thread takes whatever is queued (up to `write_batch_max` calls), applies all
//! of it in one transaction, commits once (one fsync with `synchronous=FULL`), and only then
//! answers each caller on its own oneshot: a call returns only after its own write is durable.
//!
//! Each call runs under its own savepoint, so a call that is refused (not found, already
//! finished) or that fails on its own leaves no trace while the rest of the batch commits. A
//! failed `BEGIN` or `COMMIT`, or an error after which SQLite rolled the whole transaction back
//! (disk full, I/O error), fails every call of the batch with `Unavailable`: nothing that was
//! acknowledged is lost, and nothing is acknowledged that was not committed.
//!
//! A full queue makes the caller wait at most `enqueue_timeout`, then fail with `Unavailable`
//! (SPEC §7 backpressure) instead of piling up unbounded work.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use runlane_core::StoreError;
use rusqlite::Connection;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::{mpsc, oneshot};

use crate::error::{DbError, SqliteError};

/// Counters of the writer, shared with the store for [`crate::SqliteStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Transactions committed.
    pub(crate) commits: AtomicU64,
    /// Batches that failed as a whole (begin, commit or a rolled-back transaction).
    pub(crate) failed_batches: AtomicU64,
    /// Calls answered from a committed batch (successfully or with their own refusal).
    pub(crate) calls_committed: AtomicU64,
    /// Calls refused because the queue stayed full for `enqueue_timeout`.
    pub(crate) queue_timeouts: AtomicU64,
    /// The largest batch committed in one transaction.
    pub(crate) largest_batch: AtomicU64,
    /// Test hook: fail the next commit as a full disk would.
    #[cfg(test)]
    pub(crate) fail_next_commit: std::sync::atomic::AtomicBool,
}

/// One queued call, type-erased so that calls of every kind share the channel.
trait Call: Send {
    /// Applies the call inside the open transaction; `true` when it succeeded.
    fn apply(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: its own result when the batch committed, else the batch's error.
    fn answer(self: Box<Self>, batch: Result<(), StoreError>);
}

struct Pending<T, F> {
    step: Option<F>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Call for Pending<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
{
    fn apply(&mut self, conn: &Connection) -> bool {
        let Some(step) = self.step.take() else {
            return false;
        };
        let result = step(conn).map_err(StoreError::from);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, batch: Result<(), StoreError>) {
        let Pending { result, reply, .. } = *self;
        let outcome = batch.and_then(|()| {
            result.unwrap_or_else(|| {
                Err(StoreError::Unavailable(
                    "write was not applied before its batch ended".into(),
                ))
            })
        });
        // The caller may have stopped waiting (its future was dropped); the write stands.
        let _ = reply.send(outcome);
    }
}

/// The handle to the writer thread. Dropping it lets the thread finish what is queued, then
/// joins it, so the write connection is closed when the store is gone.
pub(crate) struct Writer {
    queue: Option<mpsc::Sender<Box<dyn Call>>>,
    thread: Option<JoinHandle<()>>,
    enqueue_timeout: Duration,
    counters: Arc<Counters>,
}

impl Writer {
    /// Starts the writer thread on `conn`.
    pub(crate) fn spawn(
        conn: Connection,
        path: PathBuf,
        queue_len: usize,
        batch_max: usize,
        enqueue_timeout: Duration,
        counters: Arc<Counters>,
    ) -> Result<Writer, SqliteError> {
        let (tx, rx) = mpsc::channel(queue_len);
        let thread_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name("runlane-sqlite-writer".into())
            .spawn(move || run(conn, rx, batch_max, &thread_counters))
            .map_err(|source| SqliteError::Io { path, source })?;
        Ok(Writer {
            queue: Some(tx),
            thread: Some(thread),
            enqueue_timeout,
            counters,
        })
    }

    /// Runs `step` in the next batch; returns once that batch committed (or failed).
    pub(crate) async fn call<T, F>(&self, step: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let queue = self
            .queue
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("sqlite writer stopped".into()))?;
        let (reply, answer) = oneshot::channel();
        let call: Box<dyn Call> = Box::new(Pending {
            step: Some(step),
            result: None,
            reply,
        });
        match queue.send_timeout(call, self.enqueue_timeout).await {
            Ok(()) => {}
            Err(SendTimeoutError::Timeout(_)) => {
                self.counters.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Unavailable(format!(
                    "sqlite write queue stayed full for {} ms",
                    self.enqueue_timeout.as_millis()
                )));
            }
            Err(SendTimeoutError::Closed(_)) => {
                return Err(StoreError::Unavailable("sqlite writer stopped".into()));
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "sqlite writer stopped before answering".into(),
            ))
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once the queue is drained.
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            // A panic on the writer thread was already reported by the panic hook; there is
            // nothing more to do with it while dropping.
            let _ = thread.join();
        }
    }
}

/// The writer thread's loop: wait for one call, take whatever else is queued, commit.
fn run(
    conn: Connection,
    mut queue: mpsc::Receiver<Box<dyn Call>>,
    batch_max: usize,
    counters: &Counters,
) {
    let mut batch: Vec<Box<dyn Call>> = Vec::with_capacity(batch_max.min(1024));
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < batch_max {
            match queue.try_recv() {
                Ok(call) => batch.push(call),
                Err(_) => break,
            }
        }
        let outcome = apply_batch(&conn, &mut batch, counters);
        match &outcome {
            Ok(()) => {
                counters.commits.fetch_add(1, Ordering::Relaxed);
                counters
                    .calls_committed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                counters
                    .largest_batch
                    .fetch_max(batch.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            }
        }
        for call in batch.drain(..) {
            call.answer(outcome.clone());
        }
    }
}

fn exec(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn unavailable(what: &str, e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite {what} failed: {e}"))
}

/// Ends a failed batch: rolls back what is still open.
fn abort(conn: &Connection, error: StoreError) -> Result<(), StoreError> {
    if !conn.is_autocommit() {
        // If even the rollback fails, SQLite rolls back when the connection next begins or
        // closes; the batch is reported failed either way.
        let _ = exec(conn, "ROLLBACK");
    }
    Err(error)
}

/// Applies every call of the batch in one transaction and commits it.
fn apply_batch(
    conn: &Connection,
    batch: &mut [Box<dyn Call>],
    counters: &Counters,
) -> Result<(), StoreError> {
    // IMMEDIATE takes the write lock up front, so a busy database fails here, before any call
    // ran, rather than half-way through the batch.
    exec(conn, "BEGIN IMMEDIATE").map_err(|e| unavailable("begin", e))?;
    for call in batch.iter_mut() {
        if let Err(e) = exec(conn, "SAVEPOINT call") {
            return abort(conn, unavailable("savepoint", e));
        }
        if call.apply(conn) {
            if let Err(e) = exec(conn, "RELEASE call") {
                return abort(conn, unavailable("release", e));
            }
            continue;
        }
        if conn.is_autocommit() {
            // SQLite rolled back the whole transaction on its own (disk full, I/O error):
            // the calls applied before this one are gone too.
            return Err(StoreError::Unavailable(
                "sqlite rolled the batch back after an error".into(),
            ));
        }
        let undone = exec(conn, "ROLLBACK TO call").and_then(|()| exec(conn, "RELEASE call"));
        if let Err(e) = undone {
            return abort(conn, unavailable("rollback to savepoint", e));
        }
    }
    if commit_fault(counters) {
        return abort(
            conn,
            StoreError::Unavailable("sqlite commit failed: injected fault".into()),
        );
    }
    match exec(conn, "COMMIT") {
        Ok(()) => Ok(()),
        Err(e) => abort(conn, unavailable("commit", e)),
    }
}

/// Test hook: whether the next commit must fail as a full disk would.
#[cfg(test)]
fn commit_fault(counters: &Counters) -> bool {
    counters.fail_next_commit.swap(false, Ordering::SeqCst)
}

#[cfg(not(test))]
fn commit_fault(_: &Counters) -> bool {
    false
}
