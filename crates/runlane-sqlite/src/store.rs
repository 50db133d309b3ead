//! [`SqliteStore`]: the embedded run store. Opening checks the file is ours, takes the data-path
//! lock, migrates, then starts the writer thread and the read pool. Writes go through the
//! writer's group commit; reads through the read pool.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use runlane_core::backend::{
    AttemptEnd, AttemptRecord, IdempotencyClaim, Inserted, RunFilter, RunRecord, RunStore,
    ScheduleCursor, VersionInfo,
};
use runlane_core::{
    EnvName, EnvSettings, QueueName, QueueSettings, RunId, RunStatus, StoreError, TaskName,
    Timestamp, VersionDef,
};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::config::{Retention, SqliteConfig};
use crate::error::SqliteError;
use crate::lock::DataLock;
use crate::read::{self, ReadPool};
use crate::record::load_run;
use crate::schema::{self, Found};
use crate::write;
use crate::writer::{Counters, Writer};

/// Counters of the writer since open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SqliteStats {
    /// Transactions committed (one fsync each with `synchronous=FULL`).
    pub commits: u64,
    /// Write calls answered from committed transactions.
    pub calls_committed: u64,
    /// Batches that failed as a whole (every call in them got `Unavailable`).
    pub failed_batches: u64,
    /// Calls refused because the write queue stayed full for `enqueue_timeout`.
    pub queue_timeouts: u64,
    /// The most calls committed by one transaction.
    pub largest_batch: u64,
}

/// The size of the database and how many runs it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreSize {
    /// `page_count × page_size`: the database as committed (checkpointed or in the WAL).
    pub bytes: u64,
    /// Of which free pages (reused before the file grows).
    pub free_bytes: u64,
    /// Runs stored.
    pub runs: u64,
    /// Of which finished.
    pub finished_runs: u64,
}

impl StoreSize {
    /// Bytes per stored run (`None` when there is none): the footprint bench's "SQLite bytes
    /// per run".
    pub fn bytes_per_run(&self) -> Option<f64> {
        (self.runs > 0)
            .then(|| self.bytes.saturating_sub(self.free_bytes) as f64 / self.runs as f64)
    }
}

/// The embedded run store: one SQLite file in WAL mode (implements [`RunStore`]).
///
/// Dropping the store lets the writer commit what is queued, closes the connections and
/// releases the data-path lock, so the same path can be opened again at once.
pub struct SqliteStore {
    // Field order is drop order: the writer thread is joined first, the lock released last.
    writer: Writer,
    reads: ReadPool,
    counters: Arc<Counters>,
    path: PathBuf,
    purge_batch: u32,
    _lock: DataLock,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Settings every connection gets.
fn configure(conn: &Connection, config: &SqliteConfig) -> rusqlite::Result<()> {
    conn.busy_timeout(config.busy_timeout)?;
    conn.set_prepared_statement_cache_capacity(64);
    // Query-planner stability: without it SQLite re-prepares a cached statement whenever a new
    // value is bound to a parameter its plan looked at (e.g. `run_id = ?1 ORDER BY seq`),
    // which made every attempt lookup ten times slower. Our plans never depend on values.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.pragma_update(None, "synchronous", config.synchronous.as_str())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// Refuses, without changing the file: a file that is not a SQLite database, a SQLite
    /// database of another application, a runlane database of a newer schema, and a path
    /// another store holds (`<path>.lock`). Blocks while it migrates; call it from a blocking
    /// context in async code.
    pub fn open(path: impl AsRef<Path>, config: SqliteConfig) -> Result<SqliteStore, SqliteError> {
        config.validate()?;
        let path = path.as_ref().to_path_buf();
        let sqlite = |source| SqliteError::Sqlite {
            path: path.clone(),
            source,
        };
        // The lock first: a second store must not even read a file the first is migrating.
        let lock = DataLock::acquire(&path)?;
        schema::check_header(&path)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(&path, flags).map_err(sqlite)?;
        conn.busy_timeout(config.busy_timeout).map_err(sqlite)?;
        let found = schema::probe(&conn, &path)?;
        // From here on the file is ours (or empty): it may be written.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sqlite)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(SqliteError::Corrupt {
                path,
                reason: format!("cannot switch to WAL mode (journal_mode is {mode})"),
            });
        }
        configure(&conn, &config).map_err(sqlite)?;
        if found != Found::Ours(schema::schema_version()) {
            schema::migrate(&mut conn, &path)?;
        }
        let reads = ReadPool::open(&path, config.read_connections, |c| configure(c, &config))?;
        let counters = Arc::new(Counters::default());
        let writer = Writer::spawn(
            conn,
            path.clone(),
            config.write_queue,
            config.write_batch_max,
            config.enqueue_timeout,
            counters.clone(),
        )?;
        Ok(SqliteStore {
            writer,
            reads,
            counters,
            path,
            purge_batch: config.purge_batch,
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer's counters since open.
    pub fn stats(&self) -> SqliteStats {
        let c = &self.counters;
        SqliteStats {
            commits: c.commits.load(Ordering::Relaxed),
            calls_committed: c.calls_committed.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            queue_timeouts: c.queue_timeouts.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
        }
    }

    /// The database's size and run counts (counting is a scan: for benchmarks and tooling,
    /// not for hot paths).
    pub async fn size(&self) -> Result<StoreSize, StoreError> {
        self.reads.run(read::size).await
    }

    /// Deletes finished runs kept longer than `retention` allows at `now`, with their attempts
    /// and idempotency keys, in transactions of at most `purge_batch` runs so other writes
    /// interleave. Returns how many runs were deleted.
    pub async fn purge_finished(
        &self,
        retention: &Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let mut total = 0u64;
        loop {
            let retention = *retention;
            let limit = self.purge_batch;
            let deleted = self
                .writer
                .call(move |conn| write::purge(conn, &retention, now, limit))
                .await?;
            total += u64::from(deleted);
            if deleted < limit {
                return Ok(total);
            }
        }
    }

    /// The earliest finish time of any finished run (`None` when there is none).
    pub async fn earliest_finished_at(&self) -> Result<Option<Timestamp>, StoreError> {
        let per_status = self.reads.run(read::earliest_finished).await?;
        Ok(per_status.into_iter().map(|(_, at)| at).min())
    }

    /// When the next finished run passes its retention: the instant to arm the retention
    /// timer at (`None` when nothing will ever be purged).
    pub async fn next_purge_at(
        &self,
        retention: &Retention,
    ) -> Result<Option<Timestamp>, StoreError> {
        let per_status = self.reads.run(read::earliest_finished).await?;
        Ok(per_status
            .into_iter()
            .filter_map(|(status, at)| retention.keep(status).map(|k| at.saturating_add(k)))
            .min())
    }

    /// Test hook: the next batch fails at commit as on a full disk.
    #[cfg(test)]
    pub(crate) fn fail_next_commit(&self) {
        self.counters
            .fail_next_commit
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait]
impl RunStore for SqliteStore {
    async fn insert(
        &self,
        runs: Vec<(RunRecord, Option<IdempotencyClaim>)>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError> {
        self.writer
            .call(move |conn| write::insert(conn, &runs, now))
            .await
    }

    async fn remove(&self, run: RunId) -> Result<(), StoreError> {
        self.writer.call(move |conn| write::remove(conn, run)).await
    }

    async fn request_cancel(&self, run: RunId, at: Timestamp) -> Result<Timestamp, StoreError> {
        self.writer
            .call(move |conn| write::request_cancel(conn, run, at))
            .await
    }

    fn note_start(&self, run: RunId, attempt: u32, at: Timestamp) {
        self.writer.note_start(run, attempt, at);
    }

    fn forget_start(&self, run: RunId, attempt: u32) {
        self.writer.forget_start(run, attempt);
    }

    async fn clear_start(&self, run: RunId, attempt: u32) -> Result<(), StoreError> {
        // A mark not written yet is withdrawn; one written is cleared after it (one writer,
        // in order).
        self.writer.forget_start(run, attempt);
        self.writer
            .call(move |conn| write::clear_start(conn, run, attempt))
            .await
    }

    async fn purge_finished(
        &self,
        retention: &Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        SqliteStore::purge_finished(self, retention, now).await
    }

    async fn next_purge_at(&self, retention: &Retention) -> Result<Option<Timestamp>, StoreError> {
        SqliteStore::next_purge_at(self, retention).await
    }

    async fn get(&self, run: RunId) -> Result<Option<RunRecord>, StoreError> {
        self.reads.run(move |conn| load_run(conn, run)).await
    }

    async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        let filter = filter.clone();
        self.reads.run(move |conn| read::list(conn, &filter)).await
    }

    async fn record_retry(
        &self,
        run: RunId,
        attempt: AttemptRecord,
        next_run_after: Timestamp,
    ) -> Result<(), StoreError> {
        self.writer
            .call(move |conn| write::record_retry(conn, run, &attempt, next_run_after))
            .await
    }

    async fn finish(
        &self,
        run: RunId,
        status: RunStatus,
        output: Option<Arc<str>>,
        attempt: Option<AttemptRecord>,
        now: Timestamp,
    ) -> Result<RunRecord, StoreError> {
        self.writer
            .call(move |conn| {
                write::finish(conn, run, status, output.as_ref(), attempt.as_ref(), now)
            })
            .await
    }

    fn group_commits(&self) -> bool {
        true
    }

    async fn finish_many(
        &self,
        ends: Vec<AttemptEnd>,
        now: Timestamp,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let runs: Vec<RunId> = ends.iter().map(|end| end.run).collect();
        self.writer.forget_starts(&runs);
        self.writer
            .call(move |conn| write::finish_many(conn, &ends, now))
            .await
    }

    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
    ) -> Result<(), StoreError> {
        self.writer
            .call(move |conn| write::reschedule(conn, run, run_after, ttl_deadline))
            .await
    }

    async fn unfinished(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.reads.run(read::unfinished).await
    }

    async fn put_env(&self, env: &EnvName, settings: EnvSettings) -> Result<(), StoreError> {
        let env = env.clone();
        self.writer
            .call(move |conn| write::put_env(conn, &env, &settings))
            .await
    }

    async fn create_env(&self, env: &EnvName, settings: EnvSettings) -> Result<bool, StoreError> {
        let env = env.clone();
        self.writer
            .call(move |conn| write::create_env(conn, &env, &settings))
            .await
    }

    async fn envs(&self) -> Result<Vec<(EnvName, EnvSettings)>, StoreError> {
        self.reads.run(read::envs).await
    }

    async fn put_queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: &QueueSettings,
    ) -> Result<(), StoreError> {
        let (env, queue, settings) = (env.clone(), queue.clone(), *settings);
        self.writer
            .call(move |conn| write::put_queue_settings(conn, &env, &queue, &settings))
            .await
    }

    async fn queue_settings_all(
        &self,
    ) -> Result<Vec<(EnvName, QueueName, QueueSettings)>, StoreError> {
        self.reads.run(read::queue_settings_all).await
    }

    async fn add_version(
        &self,
        env: &EnvName,
        def: VersionDef,
        now: Timestamp,
    ) -> Result<u32, StoreError> {
        let env = env.clone();
        self.writer
            .call(move |conn| write::add_version(conn, &env, &def, now))
            .await
    }

    async fn version(&self, env: &EnvName, version: u32) -> Result<Option<VersionDef>, StoreError> {
        let env = env.clone();
        self.reads
            .run(move |conn| read::version(conn, &env, version))
            .await
    }

    async fn promote(&self, env: &EnvName, version: u32) -> Result<(), StoreError> {
        let env = env.clone();
        self.writer
            .call(move |conn| write::promote(conn, &env, version))
            .await
    }

    async fn current_version(&self, env: &EnvName) -> Result<u32, StoreError> {
        let env = env.clone();
        self.reads
            .run(move |conn| read::current_version(conn, &env))
            .await
    }

    async fn versions(&self, env: &EnvName) -> Result<Vec<VersionInfo>, StoreError> {
        let env = env.clone();
        self.reads.run(move |conn| read::versions(conn, &env)).await
    }

    async fn schedule_cursors(&self, env: &EnvName) -> Result<Vec<ScheduleCursor>, StoreError> {
        let env = env.clone();
        self.reads
            .run(move |conn| read::schedule_cursors(conn, &env))
            .await
    }

    async fn advance_schedule_cursor(
        &self,
        env: &EnvName,
        task: &TaskName,
        index: u32,
        from: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError> {
        let (env, task) = (env.clone(), task.clone());
        self.writer
            .call(move |conn| write::advance_schedule_cursor(conn, &env, &task, index, from, to))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runlane_core::TaskName;

    fn record(n: u128) -> RunRecord {
        RunRecord::queued(
            RunId((1_000u128 << 80) | n),
            EnvName::new("prod").expect("env"),
            TaskName::new("email").expect("task"),
            "{}",
            Timestamp(1_000),
        )
    }

    #[tokio::test]
    async fn a_failed_commit_fails_the_call_and_keeps_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            SqliteStore::open(dir.path().join("runs.db"), SqliteConfig::default()).expect("open");
        let (a, b, c) = (record(1), record(2), record(3));
        assert!(store
            .insert(vec![(a.clone(), None)], Timestamp(1))
            .await
            .is_ok());

        store.fail_next_commit();
        let failed = store.insert(vec![(b.clone(), None)], Timestamp(1)).await;
        assert!(
            matches!(&failed, Err(StoreError::Unavailable(m)) if m.contains("commit")),
            "{failed:?}"
        );
        assert_eq!(
            store.get(b.id).await,
            Ok(None),
            "nothing of the batch was kept"
        );
        assert_eq!(store.get(a.id).await, Ok(Some(a)), "earlier commits stand");
        let stats = store.stats();
        assert_eq!((stats.commits, stats.failed_batches), (1, 1));

        // The writer goes on after a failed batch.
        assert!(store
            .insert(vec![(c.clone(), None)], Timestamp(1))
            .await
            .is_ok());
        assert_eq!(store.get(c.id).await, Ok(Some(c)));
    }

    #[tokio::test]
    async fn a_refused_call_leaves_no_trace_and_its_batch_commits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            SqliteStore::open(dir.path().join("runs.db"), SqliteConfig::default()).expect("open");
        let a = record(1);
        store
            .insert(vec![(a.clone(), None)], Timestamp(1))
            .await
            .expect("insert");
        let (first, second) = tokio::join!(
            store.finish(a.id, RunStatus::Completed, None, None, Timestamp(5)),
            store.finish(a.id, RunStatus::Failed, None, None, Timestamp(6)),
        );
        // Whichever ran first won; the other was refused and changed nothing.
        let (won, lost) = match (first, second) {
            (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
            other => panic!("exactly one finish must win: {other:?}"),
        };
        assert_eq!(
            lost,
            StoreError::AlreadyFinished {
                run: a.id,
                status: won.status
            }
        );
        assert_eq!(store.get(a.id).await, Ok(Some(won)));
    }

    #[tokio::test]
    async fn a_stale_attempt_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            SqliteStore::open(dir.path().join("runs.db"), SqliteConfig::default()).expect("open");
        let run = record(1);
        store
            .insert(vec![(run.clone(), None)], Timestamp(1))
            .await
            .expect("insert");
        let attempt = |number: u32| AttemptRecord {
            number,
            outcome: "failed".to_owned(),
            error: Some("boom".to_owned()),
            ended_at: Timestamp(5),
        };
        // Attempt 1 fails and is retried: the run now waits for attempt 2.
        store
            .record_retry(run.id, attempt(1), Timestamp(6))
            .await
            .expect("retry of attempt 1");
        let stale = StoreError::StaleAttempt {
            run: run.id,
            attempt: 1,
            current: 2,
        };
        // A zombie of attempt 1: its retry, its end and its batched end are all refused.
        assert_eq!(
            store.record_retry(run.id, attempt(1), Timestamp(7)).await,
            Err(stale.clone())
        );
        let end = store
            .finish(
                run.id,
                RunStatus::Completed,
                None,
                Some(attempt(1)),
                Timestamp(8),
            )
            .await;
        assert_eq!(end.err(), Some(stale.clone()));
        let answers = store
            .finish_many(
                vec![AttemptEnd {
                    run: run.id,
                    status: RunStatus::Completed,
                    output: None,
                    attempt: attempt(1),
                }],
                Timestamp(9),
            )
            .await
            .expect("one commit");
        assert_eq!(answers, vec![Err(stale)]);
        let after = store.get(run.id).await.expect("get").expect("run");
        assert_eq!(
            (after.status, after.attempt, after.attempts.len()),
            (RunStatus::Delayed, 2, 1),
            "nothing of the stale writes stuck (delayed by the first retry)"
        );
        // The current attempt still ends the run.
        let answers = store
            .finish_many(
                vec![AttemptEnd {
                    run: run.id,
                    status: RunStatus::Completed,
                    output: None,
                    attempt: AttemptRecord {
                        outcome: "completed".to_owned(),
                        error: None,
                        ..attempt(2)
                    },
                }],
                Timestamp(10),
            )
            .await
            .expect("one commit");
        assert_eq!(answers, vec![Ok(())]);
    }

    #[tokio::test]
    async fn finish_many_writes_each_end_once_and_names_each_refusal() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            SqliteStore::open(dir.path().join("runs.db"), SqliteConfig::default()).expect("open");
        let (a, b) = (record(1), record(2));
        let missing = record(3).id;
        store
            .insert(vec![(a.clone(), None), (b.clone(), None)], Timestamp(1))
            .await
            .expect("insert");
        let end = |run: RunId, status: RunStatus, outcome: &str| AttemptEnd {
            run,
            status,
            output: (status == RunStatus::Completed).then(|| Arc::from("42")),
            attempt: AttemptRecord {
                number: 1,
                outcome: outcome.to_owned(),
                error: None,
                ended_at: Timestamp(9),
            },
        };
        let answers = store
            .finish_many(
                vec![
                    end(a.id, RunStatus::Completed, "completed"),
                    end(a.id, RunStatus::Failed, "failed"),
                    end(missing, RunStatus::Completed, "completed"),
                    end(b.id, RunStatus::Canceled, "canceled"),
                ],
                Timestamp(10),
            )
            .await
            .expect("one commit");
        assert_eq!(
            answers,
            vec![
                Ok(()),
                Err(StoreError::AlreadyFinished {
                    run: a.id,
                    status: RunStatus::Completed
                }),
                Err(StoreError::NotFound(missing)),
                Ok(()),
            ]
        );
        let a = store.get(a.id).await.expect("get").expect("a");
        assert_eq!(a.status, RunStatus::Completed);
        assert_eq!(a.output.as_deref(), Some("42"));
        assert_eq!(a.finished_at, Some(Timestamp(10)));
        assert_eq!(a.attempts.len(), 1, "the refused end wrote no attempt");
        let b = store.get(b.id).await.expect("get").expect("b");
        assert_eq!((b.status, b.attempts.len()), (RunStatus::Canceled, 1));
        assert_eq!(
            store.stats().commits,
            2,
            "insert, then every end in one commit"
        );
    }

    #[tokio::test]
    async fn listing_and_recovery_use_their_indexes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("runs.db");
        let config = SqliteConfig::default();
        let _store = SqliteStore::open(&path, config.clone()).expect("open");
        let conn = Connection::open(&path).expect("raw connection");
        configure(&conn, &config).expect("configure");
        let plan = |sql: &str| -> String {
            let mut stmt = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("explain");
            let nulls = vec![rusqlite::types::Value::Null; stmt.parameter_count()];
            let rows = stmt
                .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
                .expect("plan rows");
            rows.map(|r| r.expect("plan row"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        // Recovery: the next env is one seek, each (env, status) one range in id order.
        let next_env = plan("SELECT env FROM runs WHERE env > ?1 ORDER BY env LIMIT 1");
        assert!(next_env.contains("COVERING INDEX"), "{next_env}");
        assert!(!next_env.contains("TEMP B-TREE"), "no sort: {next_env}");
        let unfinished = plan("SELECT id FROM runs WHERE env = ?1 AND status = ?2 ORDER BY id");
        assert!(unfinished.contains("runs_by_env_status"), "{unfinished}");
        assert!(!unfinished.contains("TEMP B-TREE"), "no sort: {unfinished}");
        let by_status = plan(
            "SELECT id FROM runs WHERE 1 AND env = ? AND status = ? AND id > ? ORDER BY id LIMIT ?",
        );
        assert!(by_status.contains("runs_by_env_status"), "{by_status}");
        assert!(!by_status.contains("TEMP B-TREE"), "no sort: {by_status}");
        // One env across statuses: one range per status, merged (no index on env alone).
        let arm =
            |s: &str| format!("SELECT id FROM runs WHERE status = '{s}' AND env = ? AND id > ?");
        let by_env = plan(&format!(
            "{} UNION ALL {} UNION ALL {} ORDER BY id LIMIT ?",
            arm("queued"),
            arm("completed"),
            arm("failed")
        ));
        assert!(by_env.contains("MERGE (UNION ALL)"), "{by_env}");
        assert_eq!(by_env.matches("runs_by_env_status").count(), 3, "{by_env}");
        assert!(!by_env.contains("TEMP B-TREE"), "no sort: {by_env}");
        let purge = plan("SELECT id FROM runs WHERE status = ? AND finished_at < ? LIMIT ?");
        assert!(purge.contains("runs_finished"), "{purge}");
        let all = plan("SELECT id FROM runs WHERE 1 AND id > ? ORDER BY id LIMIT ?");
        assert!(
            !all.contains("TEMP B-TREE"),
            "id order is table order: {all}"
        );
    }

    #[tokio::test]
    async fn a_cancel_request_is_kept_durably_and_the_first_instant_stays() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("runs.db");
        let store = SqliteStore::open(&path, SqliteConfig::default()).expect("open");
        let (a, done) = (record(1), record(2));
        store
            .insert(vec![(a.clone(), None), (done.clone(), None)], Timestamp(1))
            .await
            .expect("insert");
        assert_eq!(
            store.request_cancel(a.id, Timestamp(5)).await,
            Ok(Timestamp(5))
        );
        assert_eq!(
            store.request_cancel(a.id, Timestamp(9)).await,
            Ok(Timestamp(5)),
            "a second request keeps the first instant"
        );
        store
            .finish(done.id, RunStatus::Completed, None, None, Timestamp(2))
            .await
            .expect("finish");
        assert_eq!(
            store.request_cancel(done.id, Timestamp(5)).await,
            Err(StoreError::AlreadyFinished {
                run: done.id,
                status: RunStatus::Completed
            })
        );
        let missing = record(3).id;
        assert_eq!(
            store.request_cancel(missing, Timestamp(5)).await,
            Err(StoreError::NotFound(missing))
        );
        drop(store);

        let store = SqliteStore::open(&path, SqliteConfig::default()).expect("reopen");
        let kept = store.get(a.id).await.expect("get").expect("run");
        assert_eq!(kept.cancel_requested_at, Some(Timestamp(5)));
        assert_eq!(kept.status, a.status, "only the request changed");
        let unfinished = store.unfinished().await.expect("unfinished");
        assert_eq!(unfinished, vec![kept]);
        let finished = store.get(done.id).await.expect("get").expect("run");
        assert_eq!(finished.cancel_requested_at, None);
    }

    #[tokio::test]
    async fn a_file_of_schema_one_is_migrated_and_its_runs_read_without_a_cancel_request() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("runs.db");
        // A file as the first release wrote it: migration 1 only, one run in it.
        {
            let conn = rusqlite::Connection::open(&path).expect("create");
            conn.execute_batch(schema::MIGRATIONS[0]).expect("schema 1");
            conn.execute_batch(&format!(
                "PRAGMA application_id = {}; PRAGMA user_version = 1;",
                schema::APPLICATION_ID as i32
            ))
            .expect("stamp");
            conn.execute(
                "INSERT INTO runs (id, env, task, version, locked, payload, queue, \
                 concurrency_key, lane, priority_ms, run_after, retry_attempts_max, \
                 retry_factor, retry_min_ms, retry_max_ms, retry_jitter, attempt, status, \
                 created_at, source) VALUES (?1, 'prod', 'email', 0, 0, '{}', 'email', '', \
                 'default', 0, 1000, 3, 2.0, 1000, 60000, 0.0, 1, 'queued', 1000, 'standard')",
                [crate::record::id_to_sql(record(1).id)],
            )
            .expect("a run of schema 1");
        }
        let store = SqliteStore::open(&path, SqliteConfig::default()).expect("open migrates");
        let run = store.get(record(1).id).await.expect("get").expect("run");
        assert_eq!(run.cancel_requested_at, None);
        assert_eq!(run.status, RunStatus::Queued);
        assert_eq!(
            store.request_cancel(run.id, Timestamp(7)).await,
            Ok(Timestamp(7))
        );
        drop(store);
        let conn = rusqlite::Connection::open(&path).expect("open");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("user_version");
        assert_eq!(version as u32, schema::schema_version());
    }

    fn attempt(number: u32, outcome: &str, error: Option<&str>, ended_at: u64) -> AttemptRecord {
        AttemptRecord {
            number,
            outcome: outcome.to_owned(),
            error: error.map(str::to_owned),
            ended_at: Timestamp(ended_at),
        }
    }

    fn attempt_rows(path: &Path) -> i64 {
        let conn = Connection::open(path).expect("raw connection");
        conn.query_row("SELECT count(*) FROM attempts", [], |r| r.get(0))
            .expect("count")
    }

    #[tokio::test]
    async fn a_terminal_write_keeps_its_attempt_in_the_row_after_the_retried_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("runs.db");
        let store = SqliteStore::open(&path, SqliteConfig::default()).expect("open");
        let (a, b, c) = (record(1), record(2), record(3));
        store
            .insert(
                vec![(a.clone(), None), (b.clone(), None), (c.clone(), None)],
                Timestamp(1),
            )
            .await
            .expect("insert");
        // a: a failed attempt, retried, then completed in a batch of ends.
        let failed = attempt(1, "failed", Some("boom"), 5);
        store
            .record_retry(a.id, failed.clone(), Timestamp(6))
            .await
            .expect("retry");
        let completed = attempt(2, "completed", None, 8);
        let end = AttemptEnd {
            run: a.id,
            status: RunStatus::Completed,
            output: Some(Arc::from("42")),
            attempt: completed.clone(),
        };
        assert_eq!(
            store.finish_many(vec![end], Timestamp(9)).await,
            Ok(vec![Ok(())])
        );
        // b: one attempt that timed out, ended by a single terminal write.
        let timed_out = attempt(1, "timed_out", Some("took too long"), 7);
        let written = store
            .finish(
                b.id,
                RunStatus::TimedOut,
                None,
                Some(timed_out.clone()),
                Timestamp(7),
            )
            .await
            .expect("finish b");
        // c: canceled before it ran, no attempt.
        store
            .finish(c.id, RunStatus::Canceled, None, None, Timestamp(3))
            .await
            .expect("finish c");

        let a = store.get(a.id).await.expect("get").expect("a");
        assert_eq!(a.attempts, vec![failed, completed], "retried one first");
        assert_eq!((a.attempt, a.error.as_deref()), (2, None));
        let b_read = store.get(b.id).await.expect("get").expect("b");
        assert_eq!(b_read, written, "what finish answered is what is read");
        assert_eq!(b_read.attempts, vec![timed_out]);
        assert_eq!(b_read.error.as_deref(), Some("took too long"));
        let c = store.get(c.id).await.expect("get").expect("c");
        assert!(c.attempts.is_empty());
        let listed = store
            .list(&RunFilter::default())
            .await
            .expect("list")
            .into_iter()
            .map(|r| r.attempts.len())
            .collect::<Vec<_>>();
        assert_eq!(listed, vec![2, 1, 0], "a listing reads the same attempts");
        drop(store);
        assert_eq!(attempt_rows(&path), 1, "only the retried attempt is a row");
    }

    #[tokio::test]
    async fn inserting_an_existing_id_replaces_the_run_and_its_attempts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("runs.db");
        let store = SqliteStore::open(&path, SqliteConfig::default()).expect("open");
        let first = record(1);
        store
            .insert(vec![(first.clone(), None)], Timestamp(1))
            .await
            .expect("insert");
        let mut second = record(1);
        second.payload = Arc::from("{\"second\":true}");
        second.attempts = vec![attempt(1, "crashed", None, 4)];
        second.attempt = 2;
        assert_eq!(
            store
                .insert(vec![(second.clone(), None)], Timestamp(2))
                .await,
            Ok(vec![Inserted::New])
        );
        assert_eq!(store.get(first.id).await, Ok(Some(second)));
        let stats = store.stats();
        assert_eq!((stats.commits, stats.failed_batches), (2, 0));
        drop(store);
        assert_eq!(attempt_rows(&path), 1);
    }

    #[tokio::test]
    async fn recovery_finds_the_unfinished_runs_of_every_env_in_id_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            SqliteStore::open(dir.path().join("runs.db"), SqliteConfig::default()).expect("open");
        let in_env = |n: u128, env: &str, status: RunStatus| {
            let mut r = record(n);
            r.env = EnvName::new(env).expect("env");
            r.status = status;
            r
        };
        let runs = [
            in_env(1, "zeta", RunStatus::Executing),
            in_env(2, "alpha", RunStatus::Queued),
            in_env(3, "prod", RunStatus::Delayed),
            in_env(4, "alpha", RunStatus::Ready),
            in_env(5, "zeta", RunStatus::Queued),
            in_env(6, "alpha", RunStatus::Queued),
            in_env(7, "prod", RunStatus::Queued),
        ];
        store
            .insert(
                runs.iter().map(|r| (r.clone(), None)).collect(),
                Timestamp(1),
            )
            .await
            .expect("insert");
        for done in [runs[5].id, runs[6].id] {
            store
                .finish(done, RunStatus::Completed, None, None, Timestamp(2))
                .await
                .expect("finish");
        }
        let ids: Vec<RunId> = store
            .unfinished()
            .await
            .expect("unfinished")
            .iter()
            .map(|r| r.id)
            .collect();
        let expected: Vec<RunId> = runs[..5].iter().map(|r| r.id).collect();
        assert_eq!(ids, expected);
    }

    #[tokio::test]
    async fn a_file_of_schema_three_keeps_the_attempts_of_its_finished_runs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("runs.db");
        // A file as schema 3 wrote it: a finished run whose last attempt is a row of
        // `attempts`, and a queued run.
        {
            let conn = rusqlite::Connection::open(&path).expect("create");
            for sql in &schema::MIGRATIONS[..3] {
                conn.execute_batch(sql).expect("schema 3");
            }
            conn.execute_batch(&format!(
                "PRAGMA application_id = {}; PRAGMA user_version = 3;",
                schema::APPLICATION_ID as i32
            ))
            .expect("stamp");
            for (n, status, finished_at) in [(1, "completed", Some(9)), (2, "queued", None)] {
                conn.execute(
                    "INSERT INTO runs (id, env, task, version, locked, payload, queue, \
                     concurrency_key, lane, priority_ms, run_after, retry_attempts_max, \
                     retry_factor, retry_min_ms, retry_max_ms, retry_jitter, attempt, status, \
                     created_at, source, output, finished_at) VALUES (?1, 'prod', 'email', 0, \
                     0, '{}', 'email', '', 'default', 0, 1000, 3, 2.0, 1000, 60000, 0.0, 1, ?2, \
                     1000, 'standard', NULL, ?3)",
                    rusqlite::params![crate::record::id_to_sql(record(n).id), status, finished_at],
                )
                .expect("a run of schema 3");
            }
            conn.execute(
                "INSERT INTO attempts (run_id, seq, number, outcome, error, ended_at) \
                 VALUES (?1, 0, 1, 'completed', NULL, 8)",
                [crate::record::id_to_sql(record(1).id)],
            )
            .expect("its attempt");
        }
        let store = SqliteStore::open(&path, SqliteConfig::default()).expect("open migrates");
        let done = store.get(record(1).id).await.expect("get").expect("run");
        assert_eq!(done.attempts, vec![attempt(1, "completed", None, 8)]);
        let unfinished = store.unfinished().await.expect("unfinished");
        assert_eq!(
            unfinished.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![record(2).id]
        );
        drop(store);
        let conn = rusqlite::Connection::open(&path).expect("open");
        let gone: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'runs_unfinished'",
                [],
                |r| r.get(0),
            )
            .expect("schema");
        assert_eq!(gone, 0, "migration 4 dropped the index");
    }
}
