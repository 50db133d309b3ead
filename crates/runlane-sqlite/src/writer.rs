//! The one writer thread and its group commit.
//!
//! Every write call is queued on a **bounded** channel to one OS thread that owns the write
//! connection. The thread takes whatever is queued (up to `write_batch_max` calls), applies all
//! of it in one transaction, commits once (one fsync with `synchronous=FULL`), and only then
//! answers each caller on its own oneshot: a call returns only after its own write is durable.
//!
//! Calls are isolated without a savepoint each (a savepoint makes SQLite copy every page a call
//! touches into a sub-journal, which cost more than the call itself). Instead:
//! - a call that is *refused* (not found, already finished, unknown version) checks before it
//!   writes, so it leaves nothing to undo (asserted in debug builds);
//! - a call that *fails* mid-way (a SQLite error, a corrupt row) may have written: the whole
//!   transaction is rolled back and the batch is applied again without that call, which gets
//!   its own error. A second failure in the same batch means SQLite itself is failing (disk
//!   full, I/O error): the batch fails as a whole.
//!
//! A failed `BEGIN` or `COMMIT` fails every call of the batch with `Unavailable`: nothing that
//! was acknowledged is lost, and nothing is acknowledged that was not committed.
//!
//! A full queue makes the caller wait at most `enqueue_timeout`, then fail with `Unavailable`
//! (SPEC §7 backpressure) instead of piling up unbounded work.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use runlane_core::{RunId, StoreError, Timestamp};
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

/// How applying one call went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    /// It did what it was asked.
    Done,
    /// It refused before writing anything; its answer is the refusal.
    Refused,
    /// It failed, possibly after writing: the transaction must be rolled back.
    Failed,
}

/// One queued call, type-erased so that calls of every kind share the channel.
trait Call: Send {
    /// Applies the call inside the open transaction. May be called again after a rollback
    /// (the batch is then applied anew), and the last result is the one answered.
    fn apply(&mut self, conn: &Connection) -> Applied;
    /// Answers the caller: its own result when the batch committed, else the batch's error.
    fn answer(self: Box<Self>, batch: Result<(), StoreError>);
    /// Whether the call only wakes the writer (for start marks) and writes nothing itself.
    fn is_wake(&self) -> bool {
        false
    }
}

/// The call a start mark sends to wake an idle writer: it writes nothing, and a batch of only
/// these with no mark left to write (all withdrawn meanwhile) opens no transaction.
struct Wake;

impl Call for Wake {
    fn apply(&mut self, _: &Connection) -> Applied {
        Applied::Done
    }

    fn answer(self: Box<Self>, _: Result<(), StoreError>) {}

    fn is_wake(&self) -> bool {
        true
    }
}

struct Pending<T, F> {
    step: F,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Call for Pending<T, F>
where
    T: Send + 'static,
    F: Fn(&Connection) -> Result<T, DbError> + Send + 'static,
{
    fn apply(&mut self, conn: &Connection) -> Applied {
        let changes = conn.total_changes();
        let (applied, result) = match (self.step)(conn) {
            Ok(value) => (Applied::Done, Ok(value)),
            Err(DbError::Store(refusal)) => {
                debug_assert_eq!(
                    changes,
                    conn.total_changes(),
                    "a refused write must refuse before writing ({refusal})"
                );
                (Applied::Refused, Err(refusal))
            }
            Err(failure) => (Applied::Failed, Err(failure.into())),
        };
        self.result = Some(result);
        applied
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

/// Start marks waiting for the writer's next batch (see [`Writer::note_start`]).
#[derive(Default)]
struct StartBuffer {
    /// The marks, in the order they were noted.
    marks: Vec<(RunId, u32, Timestamp)>,
    /// A wake-up was sent and the writer has not taken the buffer since: marks noted now ride
    /// with it (marks withdrawn and noted again do not wake the writer once per mark).
    woken: bool,
}

type Starts = Arc<Mutex<StartBuffer>>;

/// The handle to the writer thread. Dropping it lets the thread finish what is queued, then
/// joins it, so the write connection is closed when the store is gone.
pub(crate) struct Writer {
    queue: Option<mpsc::Sender<Box<dyn Call>>>,
    thread: Option<JoinHandle<()>>,
    enqueue_timeout: Duration,
    counters: Arc<Counters>,
    starts: Starts,
    starts_max: usize,
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
        let starts: Starts = Arc::default();
        let thread_starts = starts.clone();
        let thread = std::thread::Builder::new()
            .name("runlane-sqlite-writer".into())
            .spawn(move || run(conn, rx, batch_max, &thread_counters, &thread_starts))
            .map_err(|source| SqliteError::Io { path, source })?;
        Ok(Writer {
            queue: Some(tx),
            thread: Some(thread),
            enqueue_timeout,
            counters,
            starts,
            starts_max: queue_len.max(1024),
        })
    }

    /// Runs `step` in the next batch; returns once that batch committed (or failed). `step`
    /// may run more than once (a batch is applied anew after another call failed in it); only
    /// its last run is committed.
    pub(crate) async fn call<T, F>(&self, step: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let queue = self
            .queue
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("sqlite writer stopped".into()))?;
        let (reply, answer) = oneshot::channel();
        let call: Box<dyn Call> = Box::new(Pending {
            step,
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

impl Writer {
    /// Queues a start mark for the next batch without waiting and without a call of its own:
    /// marks pile up in one buffer that the writer applies first in its next transaction (so a
    /// mark always lands before the end of the attempt it marks, which is sent later). Only
    /// the first mark since the writer last took the buffer wakes it. A full buffer drops the
    /// mark, as a full queue would drop any other advisory write.
    pub(crate) fn note_start(&self, run: RunId, attempt: u32, at: Timestamp) {
        let Some(queue) = self.queue.as_ref() else {
            return;
        };
        let first = {
            let mut starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
            if starts.marks.len() >= self.starts_max {
                self.counters.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                return;
            }
            starts.marks.push((run, attempt, at));
            !std::mem::replace(&mut starts.woken, true)
        };
        if first {
            // Any call wakes the writer, which then takes the buffer; a full queue means it
            // is busy and will take it at its next batch anyway.
            let _ = queue.try_send(Box::new(Wake));
        }
    }
}

impl Writer {
    /// Drops the start mark of `attempt` of `run` if it is still waiting in the buffer: its
    /// handler returned, so its end follows (see [`Writer::forget_starts`]).
    pub(crate) fn forget_start(&self, run: RunId, attempt: u32) {
        let mut starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
        // The mark was noted shortly before: search from the end.
        if let Some(i) = starts
            .marks
            .iter()
            .rposition(|&(r, a, _)| r == run && a == attempt)
        {
            starts.marks.remove(i);
        }
    }
}

impl Writer {
    /// Drops the start marks of `runs` that are still waiting in the buffer: their terminal
    /// write is about to be queued, so the mark would only be overwritten by it (and finishing
    /// makes a mark moot: recovery never looks at a finished run). A mark is advisory either
    /// way; a crash before the end commits costs what a lost mark always costs, one uncounted
    /// re-run.
    pub(crate) fn forget_starts(&self, runs: &[RunId]) {
        let mut starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
        if starts.marks.is_empty() || runs.is_empty() {
            return;
        }
        let ending: std::collections::HashSet<RunId> = runs.iter().copied().collect();
        starts.marks.retain(|(run, _, _)| !ending.contains(run));
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
    starts: &Starts,
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
        // Taken after the calls: every mark noted before one of these calls was sent is in.
        let marks = {
            let mut starts = starts.lock().unwrap_or_else(|e| e.into_inner());
            starts.woken = false;
            std::mem::take(&mut starts.marks)
        };
        if marks.is_empty() && batch.iter().all(|call| call.is_wake()) {
            // Woken for marks that were all withdrawn: nothing to write.
            batch.clear();
            continue;
        }
        if !marks.is_empty() {
            let (reply, _answer) = oneshot::channel();
            let step = move |conn: &Connection| crate::write::note_starts(conn, &marks);
            batch.insert(
                0,
                Box::new(Pending {
                    step,
                    result: None,
                    reply,
                }),
            );
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
    rollback(conn);
    Err(error)
}

fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        // If even the rollback fails, SQLite rolls back when the connection next begins or
        // closes; the batch is reported failed either way.
        let _ = exec(conn, "ROLLBACK");
    }
}

/// Applies every call of the batch in one transaction and commits it.
fn apply_batch(
    conn: &Connection,
    batch: &mut [Box<dyn Call>],
    counters: &Counters,
) -> Result<(), StoreError> {
    // The call whose failure made the batch start over; it keeps its error and is left out.
    let mut culprit: Option<usize> = None;
    'batch: loop {
        // IMMEDIATE takes the write lock up front, so a busy database fails here, before any
        // call ran, rather than half-way through the batch.
        exec(conn, "BEGIN IMMEDIATE").map_err(|e| unavailable("begin", e))?;
        for (i, call) in batch.iter_mut().enumerate() {
            if culprit == Some(i) {
                continue;
            }
            if call.apply(conn) != Applied::Failed {
                continue;
            }
            // The call may have written part of itself: nothing of this transaction can be
            // kept. (SQLite may already have rolled it back on its own, after a full disk or
            // an I/O error.)
            rollback(conn);
            if culprit.is_some() {
                return Err(StoreError::Unavailable(
                    "sqlite failed twice in one batch; the batch was rolled back".into(),
                ));
            }
            culprit = Some(i);
            continue 'batch;
        }
        break;
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

#[cfg(test)]
mod tests {
    use super::*;
    use runlane_core::RunId;
    use std::sync::atomic::AtomicUsize;

    fn database() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("runs.db");
        let mut conn = Connection::open(&path).expect("open");
        crate::schema::migrate(&mut conn, &path).expect("migrate");
        (dir, conn)
    }

    fn env_names(conn: &Connection) -> Vec<String> {
        conn.prepare("SELECT name FROM envs ORDER BY name")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    type Answer = oneshot::Receiver<Result<(), StoreError>>;

    /// A call that stores env `name`, then ends with `end` (counting its runs in `runs`).
    fn put(
        name: &'static str,
        end: fn() -> Result<(), DbError>,
        runs: &Arc<AtomicUsize>,
    ) -> (Box<dyn Call>, Answer) {
        let (reply, answer) = oneshot::channel();
        let runs = runs.clone();
        let step = move |conn: &Connection| -> Result<(), DbError> {
            runs.fetch_add(1, Ordering::SeqCst);
            conn.execute(
                "INSERT INTO envs (name, settings) VALUES (?1, '{}')",
                [name],
            )?;
            end()
        };
        let call: Box<dyn Call> = Box::new(Pending {
            step,
            result: None,
            reply,
        });
        (call, answer)
    }

    fn refuse(runs: &Arc<AtomicUsize>) -> (Box<dyn Call>, Answer) {
        let (reply, answer) = oneshot::channel();
        let runs = runs.clone();
        let step = move |_: &Connection| -> Result<(), DbError> {
            runs.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::NotFound(RunId(7)).into())
        };
        (
            Box::new(Pending {
                step,
                result: None,
                reply,
            }),
            answer,
        )
    }

    fn run_batch(
        conn: &Connection,
        calls: Vec<(Box<dyn Call>, Answer)>,
    ) -> Vec<Result<(), StoreError>> {
        let (mut batch, mut answers): (Vec<_>, Vec<_>) = calls.into_iter().unzip();
        let counters = Counters::default();
        let outcome = apply_batch(conn, &mut batch, &counters);
        for call in batch {
            call.answer(outcome.clone());
        }
        answers
            .iter_mut()
            .map(|a| a.try_recv().expect("answered"))
            .collect()
    }

    fn ok() -> Result<(), DbError> {
        Ok(())
    }

    fn fail() -> Result<(), DbError> {
        Err(DbError::Corrupt("boom".into()))
    }

    /// Runs `test` while the writer thread is held inside a call; `test` releases it by
    /// sending on the channel it gets.
    fn with_held_writer(test: impl FnOnce(&Writer, std::sync::mpsc::Sender<()>)) {
        let (_dir, conn) = database();
        let writer = Writer::spawn(
            conn,
            _dir.path().join("runs.db"),
            16,
            16,
            Duration::from_secs(5),
            Arc::default(),
        )
        .expect("writer");
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(held);
        let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
        let entered_tx = Mutex::new(entered_tx);
        std::thread::scope(|scope| {
            let writer = &writer;
            scope.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("runtime");
                rt.block_on(writer.call(move |_: &Connection| {
                    let _ = entered_tx.lock().map(|tx| tx.send(()));
                    let _ = held.lock().map(|rx| rx.recv());
                    Ok::<(), DbError>(())
                }))
            });
            entered.recv().expect("the writer entered the holding call");
            test(writer, release);
        });
    }

    /// Waits until the writer answered one more call: every batch before it is done.
    fn flush(writer: &Writer) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(writer.call(|_: &Connection| Ok::<(), DbError>(())))
            .expect("flush");
    }

    #[test]
    fn a_withdrawn_start_mark_is_not_written_and_its_wake_up_opens_no_transaction() {
        with_held_writer(|writer, release| {
            writer.note_start(RunId(1), 1, Timestamp(5));
            writer.forget_start(RunId(1), 2); // another attempt: the mark stays
            assert_eq!(writer.starts.lock().expect("lock").marks.len(), 1);
            writer.forget_start(RunId(1), 1);
            assert!(writer.starts.lock().expect("lock").marks.is_empty());
            let before = writer.counters.commits.load(Ordering::SeqCst);
            release.send(()).expect("release");
            flush(writer);
            // The holding call's batch and the flush committed; the lone wake-up did not.
            let after = writer.counters.commits.load(Ordering::SeqCst);
            assert_eq!(after - before, 2, "no transaction for the wake-up alone");
        });
    }

    #[test]
    fn a_kept_start_mark_rides_with_the_next_batch() {
        with_held_writer(|writer, release| {
            writer.note_start(RunId(1), 1, Timestamp(5));
            writer.note_start(RunId(2), 1, Timestamp(6));
            {
                let starts = writer.starts.lock().expect("lock");
                assert_eq!(starts.marks.len(), 2);
                assert!(starts.woken, "one wake-up for both marks");
            }
            release.send(()).expect("release");
            flush(writer);
            let starts = writer.starts.lock().expect("lock");
            assert!(starts.marks.is_empty(), "the marks were taken");
            assert!(!starts.woken, "the next mark wakes the writer again");
            drop(starts);
            assert_eq!(writer.counters.failed_batches.load(Ordering::SeqCst), 0);
        });
    }

    #[test]
    fn a_failing_call_is_rolled_back_and_the_rest_of_its_batch_commits() {
        let (_dir, conn) = database();
        let (a_runs, b_runs, c_runs) = Default::default();
        let answers = run_batch(
            &conn,
            vec![
                put("a", ok, &a_runs),
                put("b", fail, &b_runs),
                put("c", ok, &c_runs),
            ],
        );
        assert_eq!(answers[0], Ok(()));
        assert!(
            matches!(&answers[1], Err(StoreError::Unavailable(m)) if m.contains("boom")),
            "{:?}",
            answers[1]
        );
        assert_eq!(answers[2], Ok(()));
        assert_eq!(
            env_names(&conn),
            ["a", "c"],
            "b's own write was rolled back"
        );
        // `a` ran before the failure and again in the batch applied anew; `b` only once.
        let runs = |r: &Arc<AtomicUsize>| r.load(Ordering::SeqCst);
        assert_eq!((runs(&a_runs), runs(&b_runs), runs(&c_runs)), (2, 1, 1));
        assert!(conn.is_autocommit(), "the transaction ended");
    }

    #[test]
    fn a_refusal_needs_no_rollback() {
        let (_dir, conn) = database();
        let (a_runs, r_runs) = Default::default();
        let answers = run_batch(&conn, vec![put("a", ok, &a_runs), refuse(&r_runs)]);
        assert_eq!(answers[0], Ok(()));
        assert_eq!(answers[1], Err(StoreError::NotFound(RunId(7))));
        assert_eq!(a_runs.load(Ordering::SeqCst), 1, "applied once: no redo");
        assert_eq!(env_names(&conn), ["a"]);
    }

    #[test]
    fn two_failures_in_one_batch_fail_it_whole() {
        let (_dir, conn) = database();
        let (a_runs, b_runs, c_runs) = Default::default();
        let answers = run_batch(
            &conn,
            vec![
                put("a", ok, &a_runs),
                put("b", fail, &b_runs),
                put("c", fail, &c_runs),
            ],
        );
        for answer in &answers {
            assert!(
                matches!(answer, Err(StoreError::Unavailable(m)) if m.contains("twice")),
                "{answer:?}"
            );
        }
        assert!(env_names(&conn).is_empty(), "nothing of the batch was kept");
        assert!(conn.is_autocommit());
    }
}
