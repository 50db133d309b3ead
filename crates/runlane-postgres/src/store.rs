//! [`PostgresStore`]: the PostgreSQL run store. Opening connects (naming the address when it
//! cannot), migrates under an advisory lock, then starts the group-commit writers and the
//! attempt-start flusher. Hot-path writes go through the writers; reads, rare writes and
//! retention go straight to the pool.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use runlane_core::backend::{
    AttemptEnd, AttemptRecord, IdempotencyClaim, Inserted, RunFilter, RunRecord, RunStore,
    ScheduleCursor, VersionInfo,
};
use runlane_core::{
    EnvName, EnvSettings, InvalidInput, QueueName, QueueSettings, RunId, RunStatus, StoreError,
    TaskName, Timestamp, VersionDef,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Row};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::{Durability, PostgresConfig, Retention};
use crate::error::{is_connection_error, unavailable, DbError, PostgresError};
use crate::record::{
    attempt_to_sql, decode_run, id_to_sql, status_from_sql, ts_from_sql, ts_to_sql, u32_from_sql,
    RUN_COLUMNS, UNFINISHED,
};
use crate::schema;
use crate::start::StartNotes;
use crate::writer::{self, Counters, Op, Queued, WriterShared};

/// The default page size of a listing, and its cap (as in the memory store).
const LIST_LIMIT_DEFAULT: u32 = 100;
const LIST_LIMIT_MAX: u32 = 1000;

/// Relaxed runs remembered for their terminal write's durability, at most.
const RELAXED_RUNS_MAX: usize = 1_000_000;

/// Counters of the writers since open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostgresStats {
    /// Batches the writers took from the queue (committed or not yet).
    pub batches_taken: u64,
    /// Write transactions committed.
    pub commits: u64,
    /// Write calls answered from committed transactions.
    pub calls_committed: u64,
    /// The most calls committed by one transaction.
    pub largest_batch: u64,
    /// Transactions that failed (their calls got `Unavailable`).
    pub failed_batches: u64,
    /// Calls refused because the write queue stayed full (backpressure).
    pub queue_full: u64,
    /// Run rows inserted.
    pub rows_inserted: u64,
    /// Terminal writes applied.
    pub rows_finished: u64,
    /// Attempt starts written because their run was still unfinished after
    /// `start_flush_after`.
    pub starts_flushed: u64,
    /// Attempt starts kept in memory right now.
    pub starts_kept: u64,
    /// Writes waiting in the queue right now.
    pub queued: u64,
    /// Transactions tried again after losing a race (deadlock).
    pub retried_batches: u64,
    /// Batches applied again one call per transaction after a statement failed.
    pub split_batches: u64,
    /// Inserts of new runs made again with `ON CONFLICT` checks because a row's id or key was
    /// stored already (rare: generated ids are new).
    pub insert_conflicts: u64,
    /// Runs stored anew under the id of a stored run, which they replaced.
    pub rows_replaced: u64,
    /// The time the writers spent on their batches' transactions (from taking a connection
    /// to the commit's answer, retries included), summed over writers, in µs.
    pub commit_micros: u64,
}

/// Where a run is in the store-first protocol (SPEC §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DispatchState {
    /// Committed here; the queue may not have it yet (the reconciler enqueues it).
    PendingEnqueue,
    /// The queue has it (or it finished).
    InQueue,
}

impl DispatchState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DispatchState::PendingEnqueue => "pending_enqueue",
            DispatchState::InQueue => "in_queue",
        }
    }
}

/// What a reconciler sweep looks for among the unfinished runs (SPEC §7), each a run a process
/// may have died in the middle of handling, found through a partial index only such runs enter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sweep {
    /// Runs marked `in_queue` that never started (first attempt, no start written: a TTL only
    /// bounds the wait before the first start) whose TTL deadline passed (`runs_ttl_waiting`):
    /// the queue reports an expiry once, to the process whose timer ticked, and forgets the run.
    TtlPassed,
    /// Runs whose cancel was requested (`runs_cancel_requested`): the requesting process
    /// removes the run from the queue, then writes it `canceled`, and may die in between.
    CancelRequested,
}

/// The PostgreSQL run store (implements [`RunStore`]); also answers the reconciler of the
/// store-first protocol ([`PostgresStore::pending_enqueue`], [`PostgresStore::mark_in_queue`]).
///
/// Dropping the store lets the writers commit what is queued; the pool closes once they end.
pub struct PostgresStore {
    queue: mpsc::Sender<Queued>,
    pool: PgPool,
    counters: Arc<Counters>,
    starts: Arc<StartNotes>,
    start_notify: Arc<Notify>,
    shutdown: Arc<Notify>,
    pending: Arc<Notify>,
    durability: RwLock<(Durability, HashMap<String, Durability>)>,
    relaxed_runs: Mutex<HashSet<RunId>>,
    relaxed_pool: PgPool,
    config: PostgresConfig,
    address: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("address", &self.address)
            .field("schema", &self.config.schema)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The flusher holds a sender: it must end for the writers to see the queue close.
        self.shutdown.notify_one();
    }
}

/// `host:port` of the options, for messages.
fn address_of(options: &PgConnectOptions) -> String {
    let host = options.get_host();
    if host.starts_with('/') {
        format!("{host}/.s.PGSQL.{}", options.get_port())
    } else {
        format!("{host}:{}", options.get_port())
    }
}

/// A pooled connection idle this long is pinged before it is handed out: one that died while
/// it waited (the server restarted, the network was cut) is replaced instead of failing the
/// first call after an outage. A busy pool reuses its connections sooner and pays nothing.
const PING_IF_IDLE: Duration = Duration::from_millis(100);

/// The options of both pools: `size` connections, opened lazily, checked after idling.
fn pool_options(size: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

impl PostgresStore {
    /// Connects to the server, creates or migrates the schema, and starts the writers. Must be
    /// called inside a tokio runtime.
    ///
    /// Refuses: an unreachable server ([`PostgresError::Unreachable`], naming `host:port`), a
    /// schema written by a newer runlane ([`PostgresError::SchemaTooNew`]), bad settings.
    pub async fn open(config: PostgresConfig) -> Result<PostgresStore, PostgresError> {
        // Boxed as a `Send` future: sqlx's executor bounds otherwise defeat the compiler's
        // `Send` proof in callers that are themselves `Send` futures (async-trait methods).
        let opening: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<PostgresStore, PostgresError>> + Send>,
        > = Box::pin(Self::open_inner(config));
        opening.await
    }

    async fn open_inner(config: PostgresConfig) -> Result<PostgresStore, PostgresError> {
        config.validate()?;
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|e| InvalidInput::new("url", format!("{e}")))?
            .options([("search_path", config.schema.as_str())])
            .application_name("runlane")
            .disable_statement_logging();
        let address = address_of(&options);
        let unreachable = |e: sqlx::Error| PostgresError::Unreachable {
            address: address.clone(),
            reason: e.to_string(),
        };
        let mut conn = match tokio::time::timeout(config.acquire_timeout, options.connect()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) if is_connection_error(&e) => return Err(unreachable(e)),
            Ok(Err(e)) => {
                return Err(PostgresError::Postgres {
                    address,
                    schema: config.schema.clone(),
                    source: e,
                })
            }
            Err(_) => {
                return Err(PostgresError::Unreachable {
                    address,
                    reason: format!("no answer within {:?}", config.acquire_timeout),
                })
            }
        };
        schema::migrate(&mut conn, &config.schema, &address).await?;
        // Closing is a courtesy to the server; the migration already committed.
        let _ = sqlx::Connection::close(conn).await;

        let pool = pool_options(config.pool_size, config.acquire_timeout)
            .connect_lazy_with(options.clone());
        // Connections of relaxed envs' writes: opened on first use only.
        let relaxed_pool = pool_options(config.writers as u32, config.acquire_timeout)
            .connect_lazy_with(options.options([("synchronous_commit", "off")]));
        let counters = Arc::new(Counters::default());
        let (queue, rx) = mpsc::channel(config.queue_bound);
        writer::spawn(
            config.writers,
            rx,
            Arc::new(WriterShared {
                pool: pool.clone(),
                relaxed_pool: relaxed_pool.clone(),
                counters: counters.clone(),
                batch_max: config.batch_max,
                commit_timeout: config.commit_timeout,
            }),
        );
        let starts = Arc::new(StartNotes::default());
        let start_notify = Arc::new(Notify::new());
        let shutdown = Arc::new(Notify::new());
        spawn_flusher(
            starts.clone(),
            start_notify.clone(),
            shutdown.clone(),
            queue.clone(),
            config.start_flush_after,
        );
        let durability = (
            config.durability,
            config
                .env_durability
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        );
        Ok(PostgresStore {
            queue,
            pool,
            counters,
            starts,
            start_notify,
            shutdown,
            pending: Arc::new(Notify::new()),
            durability: RwLock::new(durability),
            relaxed_runs: Mutex::new(HashSet::new()),
            relaxed_pool,
            config,
            address,
        })
    }

    /// The server address (`host:port`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.config.schema
    }

    /// The writers' counters since open.
    pub fn stats(&self) -> PostgresStats {
        let c = &self.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        PostgresStats {
            batches_taken: get(&c.batches_taken),
            commits: get(&c.commits),
            calls_committed: get(&c.calls_committed),
            largest_batch: get(&c.largest_batch),
            failed_batches: get(&c.failed_batches),
            queue_full: get(&c.queue_full),
            rows_inserted: get(&c.rows_inserted),
            rows_finished: get(&c.rows_finished),
            starts_flushed: get(&c.starts_flushed),
            starts_kept: self.starts.len() as u64,
            queued: (self.queue.max_capacity() - self.queue.capacity()) as u64,
            retried_batches: get(&c.retried_batches),
            split_batches: get(&c.split_batches),
            insert_conflicts: get(&c.insert_conflicts),
            rows_replaced: get(&c.rows_replaced),
            commit_micros: get(&c.commit_micros),
        }
    }

    /// Sets the durability of an env's future writes.
    pub fn set_durability(&self, env: &EnvName, durability: Durability) {
        let mut d = self.durability.write().unwrap_or_else(|e| e.into_inner());
        d.1.insert(env.to_string(), durability);
    }

    /// The durability of an env's writes.
    pub fn durability(&self, env: &EnvName) -> Durability {
        let d = self.durability.read().unwrap_or_else(|e| e.into_inner());
        d.1.get(env.as_str()).copied().unwrap_or(d.0)
    }

    fn relaxed_runs(&self) -> MutexGuard<'_, HashSet<RunId>> {
        self.relaxed_runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `synchronous_commit` setting the writers of `durability` commit with, as the
    /// server reports it (`on` or `off`).
    pub async fn synchronous_commit(&self, durability: Durability) -> Result<String, StoreError> {
        self.setting("synchronous_commit", durability).await
    }

    /// The value of a server setting as this store's connections for `durability` see it
    /// (`current_setting`); an unknown name is an error.
    pub async fn setting(&self, name: &str, durability: Durability) -> Result<String, StoreError> {
        let pool = match durability {
            Durability::Strict => &self.pool,
            Durability::Relaxed => &self.relaxed_pool,
        };
        sqlx::query_scalar("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(pool)
            .await
            .map_err(|e| unavailable("read", &e))
    }

    /// Writes every kept attempt start now and waits for the commit; returns how many rows
    /// changed. Call it before a planned stop so that a restart counts the attempts that were
    /// running (the store also hands them to its writers when dropped, without waiting).
    pub async fn flush_starts(&self) -> Result<u64, StoreError> {
        let starts = self.starts.take_all();
        if starts.is_empty() {
            return Ok(0);
        }
        let mut id = Vec::with_capacity(starts.len());
        let mut attempt = Vec::with_capacity(starts.len());
        let mut at = Vec::with_capacity(starts.len());
        for (run, n, t) in starts {
            id.push(id_to_sql(run));
            attempt.push(i64::from(n));
            at.push(ts_to_sql(t));
        }
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| unavailable("write", &e))?;
        let n = writer::write_starts(&mut conn, id, attempt, at).await?;
        self.counters.starts_flushed.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Keeps again a start taken for a terminal write that was refused as stale: it belongs to
    /// an attempt that is still running.
    fn keep_start(&self, run: RunId, start: Option<(u32, Timestamp)>) {
        if let Some((attempt, at)) = start {
            self.note_start(run, attempt, at);
        }
    }

    /// Checks the server answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| unavailable("ping", &e))
    }

    /// Queues a hot-path write and waits for its commit.
    async fn submit<T>(
        &self,
        durability: Durability,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            durability,
            op: make(reply),
        };
        let sent = if self.config.enqueue_timeout.is_zero() {
            self.queue.try_send(queued).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => true,
                mpsc::error::TrySendError::Closed(_) => false,
            })
        } else {
            self.queue
                .send_timeout(queued, self.config.enqueue_timeout)
                .await
                .map_err(|e| matches!(e, mpsc::error::SendTimeoutError::Timeout(_)))
        };
        match sent {
            Ok(()) => {}
            Err(true) => {
                self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Unavailable(format!(
                    "postgresql write queue is full ({} writes waiting for {:?})",
                    self.config.queue_bound, self.config.enqueue_timeout
                )));
            }
            Err(false) => return Err(writer::writer_gone()),
        }
        answer.await.map_err(|_| writer::writer_gone())?
    }

    async fn read_runs(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| unavailable("read", &e))?;
        let mut out = rows
            .iter()
            .map(decode_run)
            .collect::<Result<Vec<_>, DbError>>()?;
        self.starts.overlay(&mut out);
        Ok(out)
    }

    /// Unfinished runs whose enqueue may have been missed (`pending_enqueue`), oldest first:
    /// what the reconciler enqueues.
    pub async fn pending_enqueue(&self, limit: u32) -> Result<Vec<RunRecord>, StoreError> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE dispatch_state = 'pending_enqueue' \
             AND {UNFINISHED} ORDER BY dispatch_since, id LIMIT $1"
        );
        self.read_runs(sqlx::query(&sql).bind(i64::from(limit)))
            .await
    }

    /// Unfinished `pending_enqueue` runs committed at or before `cutoff`, oldest first.
    pub async fn pending_enqueue_before(
        &self,
        cutoff: Timestamp,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE dispatch_state = 'pending_enqueue' \
             AND dispatch_since <= $1 AND {UNFINISHED} ORDER BY dispatch_since, id LIMIT $2"
        );
        self.read_runs(
            sqlx::query(&sql)
                .bind(ts_to_sql(cutoff))
                .bind(i64::from(limit)),
        )
        .await
    }

    /// The unfinished runs a reconciler sweep hands over whose instant (the TTL deadline, the
    /// cancel request) is in `(after, cutoff]`, by that instant then id, `after` excluded as
    /// an `(instant, id)` pair (keyset pages); see [`Sweep`].
    pub async fn swept(
        &self,
        sweep: Sweep,
        after: (Timestamp, RunId),
        cutoff: Timestamp,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let (at, only) = match sweep {
            Sweep::TtlPassed => (
                "ttl_deadline",
                "dispatch_state = 'in_queue' AND started_at IS NULL AND attempt = 1",
            ),
            Sweep::CancelRequested => ("cancel_requested_at", "TRUE"),
        };
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE {at} IS NOT NULL AND {UNFINISHED} \
             AND ({at}, id) > ($1, $2) AND {at} <= $3 AND {only} \
             ORDER BY {at}, id LIMIT $4"
        );
        self.read_runs(
            sqlx::query(&sql)
                .bind(ts_to_sql(after.0))
                .bind(id_to_sql(after.1))
                .bind(ts_to_sql(cutoff))
                .bind(i64::from(limit)),
        )
        .await
    }

    /// Notified after every insert: an idle reconciler waits on it.
    pub fn pending_signal(&self) -> Arc<Notify> {
        self.pending.clone()
    }

    /// When the oldest `pending_enqueue` row was committed (arms the reconciler).
    pub async fn oldest_pending_at(&self) -> Result<Option<Timestamp>, StoreError> {
        let v: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT min(dispatch_since) FROM runs \
             WHERE dispatch_state = 'pending_enqueue' AND {UNFINISHED}"
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| unavailable("read", &e))?;
        Ok(v.map(ts_from_sql).transpose()?)
    }

    /// Marks runs the queue now holds; returns how many rows changed. Only unfinished
    /// `pending_enqueue` rows are written: a run that finished first (its terminal write sets
    /// `in_queue` itself) costs no third row write.
    ///
    /// Several runs are marked without waiting for any row lock: a row another transaction
    /// holds (in practice a terminal write, which sets `in_queue` itself) is skipped and stays
    /// as it is (`pending_enqueue` if that transaction does not commit, for the reconciler, as
    /// after a crash before the mark). Waiting instead deadlocked with terminal writes locking
    /// the same rows in another order (PostgreSQL breaks a deadlock after `deadlock_timeout`,
    /// 1 s: `concurrent` stalled in bursts). One run holds no other lock while it waits.
    pub async fn mark_in_queue(&self, runs: &[RunId]) -> Result<u64, StoreError> {
        if runs.is_empty() {
            return Ok(0);
        }
        let set = "UPDATE runs SET dispatch_state = 'in_queue'";
        let rest = format!("dispatch_state = 'pending_enqueue' AND {UNFINISHED}");
        let (one, many) = (
            format!("{set} WHERE id = $1 AND {rest}"),
            format!(
                "{set} WHERE id IN \
                 (SELECT id FROM runs WHERE id = ANY($1) AND {rest} FOR UPDATE SKIP LOCKED)"
            ),
        );
        let query = match runs {
            // One run (a lone trigger): a prepared statement, its plan a primary-key lookup.
            [run] => sqlx::query(&one).bind(id_to_sql(*run)),
            _ => {
                let ids: Vec<Vec<u8>> = runs.iter().map(|r| id_to_sql(*r)).collect();
                sqlx::query(&many).persistent(false).bind(ids)
            }
        };
        query
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| unavailable("write", &e))
    }

    /// The stored status of each known run among `runs`, in one query: lease recovery and
    /// queue rebuild read PostgreSQL first (SPEC §7), and a run terminal here is cleaned out
    /// of the queue, never retried. Unknown ids are absent from the answer.
    pub async fn statuses(&self, runs: &[RunId]) -> Result<HashMap<RunId, RunStatus>, StoreError> {
        if runs.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<Vec<u8>> = runs.iter().map(|r| id_to_sql(*r)).collect();
        let rows = sqlx::query("SELECT id, status FROM runs WHERE id = ANY($1)")
            .persistent(false)
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| unavailable("read", &e))?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let id: Vec<u8> = row.try_get(0).map_err(DbError::from)?;
            let status: String = row.try_get(1).map_err(DbError::from)?;
            out.insert(crate::record::id_from_sql(&id)?, status_from_sql(&status)?);
        }
        Ok(out)
    }

    /// A run's dispatch state (`None` for an unknown run).
    pub async fn dispatch_state(&self, run: RunId) -> Result<Option<DispatchState>, StoreError> {
        let v: Option<String> = sqlx::query_scalar("SELECT dispatch_state FROM runs WHERE id = $1")
            .bind(id_to_sql(run))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| unavailable("read", &e))?;
        Ok(v.map(|s| {
            if s == DispatchState::PendingEnqueue.as_str() {
                DispatchState::PendingEnqueue
            } else {
                DispatchState::InQueue
            }
        }))
    }

    /// Deletes finished runs kept longer than `retention` allows at `now` (their idempotency
    /// keys go with them), `purge_batch` at a time; returns how many.
    pub async fn purge_finished(
        &self,
        retention: &Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let mut total = 0u64;
        for status in RunStatus::ALL {
            let Some(keep) = retention.keep(status) else {
                continue;
            };
            let before = ts_to_sql(now.saturating_sub(keep));
            loop {
                let deleted = sqlx::query(
                    "DELETE FROM runs WHERE id IN (SELECT id FROM runs \
                     WHERE status = $1 AND finished_at IS NOT NULL AND finished_at <= $2 \
                     LIMIT $3)",
                )
                .bind(status.as_str())
                .bind(before)
                .bind(i64::from(self.config.purge_batch))
                .execute(&self.pool)
                .await
                .map_err(|e| unavailable("purge", &e))?
                .rows_affected();
                total += deleted;
                if deleted < u64::from(self.config.purge_batch) {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// When the next finished run passes its retention (`None` when nothing will be purged).
    pub async fn next_purge_at(
        &self,
        retention: &Retention,
    ) -> Result<Option<Timestamp>, StoreError> {
        let mut next: Option<Timestamp> = None;
        for status in RunStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            let Some(keep) = retention.keep(status) else {
                continue;
            };
            let min: Option<i64> = sqlx::query_scalar(
                "SELECT min(finished_at) FROM runs WHERE status = $1 AND finished_at IS NOT NULL",
            )
            .bind(status.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(|e| unavailable("read", &e))?;
            if let Some(min) = min {
                let due = ts_from_sql(min)?.saturating_add(keep);
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        Ok(next)
    }

    /// Runs one statement outside the writers (rare writes), mapping failures.
    async fn execute(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<u64, StoreError> {
        query
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| unavailable("write", &e))
    }

    /// `NotFound` or `AlreadyFinished` for a run an update did not change.
    async fn refusal(&self, run: RunId) -> StoreError {
        let status: Result<Option<String>, sqlx::Error> =
            sqlx::query_scalar("SELECT status FROM runs WHERE id = $1")
                .bind(id_to_sql(run))
                .fetch_optional(&self.pool)
                .await;
        match status {
            Ok(None) => StoreError::NotFound(run),
            Ok(Some(s)) => match status_from_sql(&s) {
                Ok(status) => StoreError::AlreadyFinished { run, status },
                Err(e) => e.into(),
            },
            Err(e) => unavailable("read", &e),
        }
    }

    /// Why a write fenced by `attempt` changed nothing: the run is unknown, already finished,
    /// or at another attempt (`StaleAttempt`).
    async fn fenced_refusal(&self, run: RunId, attempt: u32) -> StoreError {
        let row: Result<Option<(String, i64)>, sqlx::Error> =
            sqlx::query_as("SELECT status, attempt FROM runs WHERE id = $1")
                .bind(id_to_sql(run))
                .fetch_optional(&self.pool)
                .await;
        match row {
            Ok(None) => StoreError::NotFound(run),
            Ok(Some((status, current))) => {
                let status = match status_from_sql(&status) {
                    Ok(status) => status,
                    Err(e) => return e.into(),
                };
                if status.is_terminal() {
                    return StoreError::AlreadyFinished { run, status };
                }
                match u32_from_sql(current) {
                    Ok(current) if current != attempt => StoreError::StaleAttempt {
                        run,
                        attempt,
                        current,
                    },
                    // Unfinished and at this attempt, yet not updated: it changed meanwhile.
                    Ok(_) => StoreError::Unavailable(format!(
                        "run {run} changed while its retry was recorded"
                    )),
                    Err(e) => e.into(),
                }
            }
            Err(e) => unavailable("read", &e),
        }
    }
}

/// Writes kept attempt starts once they are `after` old, woken by the first note (no polling:
/// it sleeps until the oldest note is due, or until a note arrives when none is kept).
fn spawn_flusher(
    starts: Arc<StartNotes>,
    notify: Arc<Notify>,
    shutdown: Arc<Notify>,
    queue: mpsc::Sender<Queued>,
    after: std::time::Duration,
) {
    tokio::spawn(async move {
        loop {
            let stopping = match starts.oldest() {
                None => tokio::select! {
                    _ = shutdown.notified() => true,
                    _ = notify.notified() => continue,
                },
                Some(oldest) => {
                    let due = tokio::time::Instant::from_std(oldest + after);
                    tokio::select! {
                        _ = shutdown.notified() => true,
                        _ = tokio::time::sleep_until(due) => false,
                    }
                }
            };
            if stopping {
                // The store is gone: hand what is kept to the writers (they commit what is
                // queued before they end), so a planned stop loses no start.
                let rest = starts.take_all();
                if !rest.is_empty() {
                    let _ = queue.try_send(Queued {
                        durability: Durability::Strict,
                        op: Op::Starts(rest),
                    });
                }
                return;
            }
            let due = starts.take_due(Instant::now().checked_sub(after).unwrap_or(Instant::now()));
            if due.is_empty() {
                continue;
            }
            let queued = Queued {
                durability: Durability::Relaxed,
                op: Op::Starts(due),
            };
            // Bounded wait: a full queue delays the advisory starts, never the callers.
            if queue.send(queued).await.is_err() {
                return;
            }
        }
    });
}

#[async_trait]
impl RunStore for PostgresStore {
    async fn insert(
        &self,
        runs: Vec<(RunRecord, Option<IdempotencyClaim>)>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError> {
        // A call's transaction is strict if any of its envs is.
        let relaxed = !runs.is_empty()
            && runs
                .iter()
                .all(|(r, _)| self.durability(&r.env) == Durability::Relaxed);
        let durability = if relaxed {
            Durability::Relaxed
        } else {
            Durability::Strict
        };
        if relaxed {
            let mut set = self.relaxed_runs();
            if set.len() + runs.len() <= RELAXED_RUNS_MAX {
                set.extend(runs.iter().map(|(r, _)| r.id));
            }
        }
        let (mut answers, replaced) = self
            .submit(durability, |reply| Op::Insert { runs, now, reply })
            .await?;
        // A run stored anew under a stored id: a start kept in memory for that id was the
        // replaced run's.
        if !replaced.is_empty() {
            self.starts.forget(replaced);
        }
        // New rows are `pending_enqueue`: an idle reconciler arms on them.
        self.pending.notify_one();
        for answer in &mut answers {
            if let Inserted::Existing(record) = answer {
                self.starts.overlay(std::slice::from_mut(&mut **record));
            }
        }
        Ok(answers)
    }

    async fn remove(&self, run: RunId) -> Result<(), StoreError> {
        self.starts.take(run);
        self.relaxed_runs().remove(&run);
        self.execute(sqlx::query("DELETE FROM runs WHERE id = $1").bind(id_to_sql(run)))
            .await
            .map(|_| ())
    }

    async fn remove_refused(&self, run: RunId) -> Result<bool, StoreError> {
        // One statement: the delete applies only while no trigger was handed the run; the
        // existence check reads the snapshot from before it.
        let row = sqlx::query(
            "WITH gone AS (DELETE FROM runs WHERE id = $1 AND key_hits = 0 RETURNING 1) \
             SELECT (SELECT count(*) FROM gone) AS gone, \
                    EXISTS (SELECT 1 FROM runs WHERE id = $1) AS stored",
        )
        .bind(id_to_sql(run))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| unavailable("write", &e))?;
        let gone: i64 = row.try_get("gone").map_err(|e| unavailable("read", &e))?;
        let stored: bool = row.try_get("stored").map_err(|e| unavailable("read", &e))?;
        if gone == 0 && stored {
            return Ok(false);
        }
        self.starts.take(run);
        self.relaxed_runs().remove(&run);
        Ok(true)
    }

    async fn get(&self, run: RunId) -> Result<Option<RunRecord>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
        Ok(self
            .read_runs(sqlx::query(&sql).bind(id_to_sql(run)))
            .await?
            .pop())
    }

    async fn get_many(&self, runs: &[RunId]) -> Result<Vec<Option<RunRecord>>, StoreError> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        if let [run] = runs {
            // One run (a claim of one): the prepared primary-key lookup of `get`.
            return Ok(vec![self.get(*run).await?]);
        }
        let ids: Vec<Vec<u8>> = runs.iter().map(|&r| id_to_sql(r)).collect();
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ANY($1)");
        let mut found: HashMap<RunId, RunRecord> = self
            .read_runs(sqlx::query(&sql).persistent(false).bind(ids))
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        Ok(runs.iter().map(|r| found.remove(r)).collect())
    }

    async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        enum Arg {
            Text(String),
            Int(i64),
            Bytes(Vec<u8>),
        }
        let mut sql = String::from("true");
        let mut args: Vec<Arg> = Vec::new();
        let mut clause = |column: &str, op: &str, value: Arg| {
            args.push(value);
            sql.push_str(&format!(" AND {column} {op} ${}", args.len()));
        };
        if let Some(env) = &filter.env {
            clause("env", "=", Arg::Text(env.to_string()));
        }
        if let Some(status) = filter.status {
            clause("status", "=", Arg::Text(status.as_str().into()));
        }
        if let Some(task) = &filter.task {
            clause("task", "=", Arg::Text(task.to_string()));
        }
        if let Some(queue) = &filter.queue {
            clause("queue", "=", Arg::Text(queue.to_string()));
        }
        if let Some(lane) = &filter.lane {
            clause("lane", "=", Arg::Text(lane.to_string()));
        }
        if let Some(source) = filter.source {
            clause("source", "=", Arg::Text(source.as_str().into()));
        }
        if let Some(version) = filter.version {
            clause("version", "=", Arg::Int(version.into()));
        }
        if let Some(from) = filter.created_from {
            clause("created_at", ">=", Arg::Int(ts_to_sql(from)));
        }
        if let Some(to) = filter.created_to {
            clause("created_at", "<", Arg::Int(ts_to_sql(to)));
        }
        if let Some(after) = filter.after {
            clause("id", ">", Arg::Bytes(id_to_sql(after)));
        }
        let limit = filter
            .limit
            .unwrap_or(LIST_LIMIT_DEFAULT)
            .min(LIST_LIMIT_MAX);
        args.push(Arg::Int(limit.into()));
        let limit = args.len();
        let sql = match (&filter.env, filter.status) {
            // One env, any status: the env's first runs of each status in id order (an index
            // scan of `(env, status, id)` per status, each bounded by the limit), merged. No
            // index of its own keeps an env's runs in id order: each run row written would pay
            // one more index entry (tests/plans.rs).
            (Some(_), None) => {
                let branches: Vec<String> = RunStatus::ALL
                    .iter()
                    .map(|status| {
                        format!(
                            "(SELECT {RUN_COLUMNS} FROM runs WHERE {sql} AND status = '{}' \
                             ORDER BY id LIMIT ${limit})",
                            status.as_str()
                        )
                    })
                    .collect();
                format!(
                    "SELECT * FROM ({}) r ORDER BY id LIMIT ${limit}",
                    branches.join(" UNION ALL ")
                )
            }
            _ => format!("SELECT {RUN_COLUMNS} FROM runs WHERE {sql} ORDER BY id LIMIT ${limit}"),
        };
        let mut query = sqlx::query(&sql);
        for arg in args {
            query = match arg {
                Arg::Text(v) => query.bind(v),
                Arg::Int(v) => query.bind(v),
                Arg::Bytes(v) => query.bind(v),
            };
        }
        self.read_runs(query).await
    }

    async fn record_retry(
        &self,
        run: RunId,
        attempt: AttemptRecord,
        next_run_after: Timestamp,
    ) -> Result<(), StoreError> {
        let start = self.starts.take(run);
        let status = if next_run_after > attempt.ended_at {
            RunStatus::Delayed
        } else {
            RunStatus::Queued
        };
        let changed = self
            .execute(
                sqlx::query(&format!(
                    "UPDATE runs SET status = $2, error = $3, attempt = $4, run_after = $5, \
                     started_at = NULL, attempts = attempts || jsonb_build_array($6::jsonb) \
                     WHERE id = $1 AND attempt = $7 AND {UNFINISHED}"
                ))
                .bind(id_to_sql(run))
                .bind(status.as_str())
                .bind(attempt.error.as_deref())
                .bind(i64::from(attempt.number.saturating_add(1)))
                .bind(ts_to_sql(next_run_after))
                .bind(attempt_to_sql(&attempt)?)
                .bind(i64::from(attempt.number)),
            )
            .await?;
        if changed == 0 {
            let refused = self.fenced_refusal(run, attempt.number).await;
            if let StoreError::StaleAttempt { .. } = refused {
                self.keep_start(run, start);
            }
            return Err(refused);
        }
        Ok(())
    }

    async fn request_cancel(&self, run: RunId, at: Timestamp) -> Result<Timestamp, StoreError> {
        // A rare write: straight to the (strict) pool, one statement. `coalesce` keeps the
        // first request's instant.
        let kept: Option<i64> = sqlx::query_scalar(&format!(
            "UPDATE runs SET cancel_requested_at = coalesce(cancel_requested_at, $2) \
             WHERE id = $1 AND {UNFINISHED} RETURNING cancel_requested_at"
        ))
        .bind(id_to_sql(run))
        .bind(ts_to_sql(at))
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| unavailable("write", &e))?;
        match kept {
            Some(kept) => Ok(ts_from_sql(kept).map_err(DbError::from)?),
            None => Err(self.refusal(run).await),
        }
    }

    fn note_start(&self, run: RunId, attempt: u32, at: Timestamp) {
        if self.starts.note(run, attempt, at, Instant::now()) {
            self.start_notify.notify_one();
        }
    }

    async fn finish(
        &self,
        run: RunId,
        status: RunStatus,
        output: Option<std::sync::Arc<str>>,
        attempt: Option<AttemptRecord>,
        now: Timestamp,
    ) -> Result<RunRecord, StoreError> {
        debug_assert!(status.is_terminal(), "finish needs a terminal status");
        let start = self.starts.take(run);
        let durability = if self.relaxed_runs().remove(&run) {
            Durability::Relaxed
        } else {
            Durability::Strict
        };
        let written = self
            .submit(durability, |reply| Op::Finish {
                run,
                status,
                output,
                attempt,
                start,
                now,
                reply,
            })
            .await;
        if let Err(StoreError::StaleAttempt { .. }) = &written {
            self.keep_start(run, start);
        }
        written
    }

    fn group_commits(&self) -> bool {
        true
    }

    async fn finish_many(
        &self,
        ends: Vec<AttemptEnd>,
        now: Timestamp,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        // Split by durability (a run is relaxed only if this process inserted it in a relaxed
        // env); each part is one queued write, both in flight at once.
        let n = ends.len();
        let mut parts: [(Vec<usize>, Vec<(AttemptEnd, Option<(u32, Timestamp)>)>); 2] =
            Default::default();
        {
            let mut relaxed = self.relaxed_runs();
            for (i, end) in ends.into_iter().enumerate() {
                debug_assert!(end.status.is_terminal(), "finish needs a terminal status");
                let start = self.starts.take(end.run);
                let part = usize::from(relaxed.remove(&end.run));
                parts[part].0.push(i);
                parts[part].1.push((end, start));
            }
        }
        let [(strict_at, strict), (relaxed_at, relaxed)] = parts;
        let starts: HashMap<RunId, (u32, Timestamp)> = strict
            .iter()
            .chain(&relaxed)
            .filter_map(|(end, start)| start.map(|s| (end.run, s)))
            .collect();
        let submit = |durability, ends: Vec<_>| async move {
            if ends.is_empty() {
                return Ok(Vec::new());
            }
            self.submit(durability, |reply| Op::FinishMany { ends, now, reply })
                .await
        };
        let (strict_done, relaxed_done) = tokio::join!(
            submit(Durability::Strict, strict),
            submit(Durability::Relaxed, relaxed)
        );
        for answer in strict_done.iter().chain(&relaxed_done).flatten() {
            if let Err(StoreError::StaleAttempt { run, .. }) = answer {
                self.keep_start(*run, starts.get(run).copied());
            }
        }
        let mut answers: Vec<Option<Result<(), StoreError>>> = (0..n).map(|_| None).collect();
        let mut failed = None;
        for (at, done) in [(strict_at, strict_done), (relaxed_at, relaxed_done)] {
            match done {
                Ok(done) if done.len() == at.len() => {
                    for (i, answer) in at.into_iter().zip(done) {
                        answers[i] = Some(answer);
                    }
                }
                Ok(_) => {
                    let e = StoreError::Unavailable("writer answered a different count".into());
                    for i in at {
                        answers[i] = Some(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for &i in &at {
                        answers[i] = Some(Err(e.clone()));
                    }
                    failed = Some(e);
                }
            }
        }
        // Nothing written at all: the whole call failed.
        if let Some(e) = failed {
            if answers.iter().all(|a| matches!(a, Some(Err(x)) if *x == e)) {
                return Err(e);
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(writer::writer_gone())))
            .collect())
    }

    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
    ) -> Result<(), StoreError> {
        let changed = self
            .execute(
                sqlx::query(&format!(
                    "UPDATE runs SET run_after = $2, ttl_deadline = $3 WHERE id = $1 AND {UNFINISHED}"
                ))
                .bind(id_to_sql(run))
                .bind(ts_to_sql(run_after))
                .bind(ttl_deadline.map(ts_to_sql)),
            )
            .await?;
        if changed == 0 {
            return Err(self.refusal(run).await);
        }
        Ok(())
    }

    async fn unfinished(&self) -> Result<Vec<RunRecord>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE {UNFINISHED} ORDER BY id");
        self.read_runs(sqlx::query(&sql)).await
    }

    async fn purge_finished(
        &self,
        retention: &Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        PostgresStore::purge_finished(self, retention, now).await
    }

    async fn next_purge_at(&self, retention: &Retention) -> Result<Option<Timestamp>, StoreError> {
        PostgresStore::next_purge_at(self, retention).await
    }

    async fn put_env(&self, env: &EnvName, settings: EnvSettings) -> Result<(), StoreError> {
        let json = serde_json::to_string(&settings)
            .map_err(|e| StoreError::Unavailable(format!("env settings do not encode: {e}")))?;
        self.execute(
            sqlx::query(
                "INSERT INTO envs (name, settings) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET settings = EXCLUDED.settings",
            )
            .bind(env.as_str())
            .bind(json),
        )
        .await
        .map(|_| ())
    }

    async fn create_env(&self, env: &EnvName, settings: EnvSettings) -> Result<bool, StoreError> {
        let json = serde_json::to_string(&settings)
            .map_err(|e| StoreError::Unavailable(format!("env settings do not encode: {e}")))?;
        let inserted = self
            .execute(
                sqlx::query(
                    "INSERT INTO envs (name, settings) VALUES ($1, $2) \
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(env.as_str())
                .bind(json),
            )
            .await?;
        Ok(inserted == 1)
    }

    async fn envs(&self) -> Result<Vec<(EnvName, EnvSettings)>, StoreError> {
        let rows: Vec<PgRow> = sqlx::query("SELECT name, settings FROM envs ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| unavailable("read", &e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.try_get(0).map_err(DbError::from)?;
            let settings: String = row.try_get(1).map_err(DbError::from)?;
            let name = EnvName::new(&name)
                .map_err(|e| StoreError::from(DbError::Corrupt(e.to_string())))?;
            let settings = serde_json::from_str(&settings).map_err(|e| {
                StoreError::from(DbError::Corrupt(format!("settings of env {name}: {e}")))
            })?;
            out.push((name, settings));
        }
        // Names sort like the memory store's BTreeMap: byte order, not the server's collation.
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Ok(out)
    }

    async fn put_queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: &QueueSettings,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(settings)
            .map_err(|e| StoreError::Unavailable(format!("queue settings do not encode: {e}")))?;
        self.execute(
            sqlx::query(
                "INSERT INTO queue_settings (env, queue, settings) VALUES ($1, $2, $3) \
                 ON CONFLICT (env, queue) DO UPDATE SET settings = EXCLUDED.settings",
            )
            .bind(env.as_str())
            .bind(queue.as_str())
            .bind(json),
        )
        .await
        .map(|_| ())
    }

    async fn queue_settings_all(
        &self,
    ) -> Result<Vec<(EnvName, QueueName, QueueSettings)>, StoreError> {
        let rows: Vec<PgRow> = sqlx::query("SELECT env, queue, settings FROM queue_settings")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| unavailable("read", &e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let env: String = row.try_get(0).map_err(DbError::from)?;
            let queue: String = row.try_get(1).map_err(DbError::from)?;
            let settings: String = row.try_get(2).map_err(DbError::from)?;
            let corrupt = |e: String| StoreError::from(DbError::Corrupt(e));
            let env = EnvName::new(&env).map_err(|e| corrupt(e.to_string()))?;
            let queue = QueueName::new(&queue).map_err(|e| corrupt(e.to_string()))?;
            let settings = serde_json::from_str(&settings)
                .map_err(|e| corrupt(format!("settings of queue {env}/{queue}: {e}")))?;
            out.push((env, queue, settings));
        }
        // Byte order like the memory store's BTreeMap, not the server's collation.
        out.sort_by(|a, b| (a.0.as_str(), a.1.as_str()).cmp(&(b.0.as_str(), b.1.as_str())));
        Ok(out)
    }

    async fn add_version(
        &self,
        env: &EnvName,
        def: VersionDef,
        now: Timestamp,
    ) -> Result<u32, StoreError> {
        let json = serde_json::to_string(&def).map_err(|e| {
            StoreError::Unavailable(format!("version definition does not encode: {e}"))
        })?;
        let number: i64 = sqlx::query_scalar(
            "WITH n AS (INSERT INTO version_counters (env, last) VALUES ($1, 1) \
                ON CONFLICT (env) DO UPDATE SET last = version_counters.last + 1 \
                RETURNING last) \
             INSERT INTO versions (env, number, definition, created_at) \
                SELECT $1, n.last, $2, $3 FROM n RETURNING number",
        )
        .bind(env.as_str())
        .bind(json)
        .bind(ts_to_sql(now))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| unavailable("write", &e))?;
        Ok(u32_from_sql(number)?)
    }

    async fn version(&self, env: &EnvName, version: u32) -> Result<Option<VersionDef>, StoreError> {
        if version == 0 {
            return Ok(Some(VersionDef::default()));
        }
        let json: Option<String> =
            sqlx::query_scalar("SELECT definition FROM versions WHERE env = $1 AND number = $2")
                .bind(env.as_str())
                .bind(i64::from(version))
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| unavailable("read", &e))?;
        json.map(|json| {
            serde_json::from_str(&json).map_err(|e| {
                StoreError::from(DbError::Corrupt(format!(
                    "version {version} of env {env}: {e}"
                )))
            })
        })
        .transpose()
    }

    async fn promote(&self, env: &EnvName, version: u32) -> Result<(), StoreError> {
        let changed = self
            .execute(
                sqlx::query(
                    "INSERT INTO current_versions (env, version) \
                     SELECT $1, $2 WHERE $2 = 0 OR EXISTS \
                        (SELECT 1 FROM versions WHERE env = $1 AND number = $2) \
                     ON CONFLICT (env) DO UPDATE SET version = EXCLUDED.version",
                )
                .bind(env.as_str())
                .bind(i64::from(version)),
            )
            .await?;
        if changed == 0 {
            return Err(StoreError::UnknownVersion {
                env: env.to_string(),
                version,
            });
        }
        Ok(())
    }

    async fn current_version(&self, env: &EnvName) -> Result<u32, StoreError> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT version FROM current_versions WHERE env = $1")
                .bind(env.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| unavailable("read", &e))?;
        Ok(v.map_or(Ok(0), u32_from_sql)?)
    }

    /// One query, by number.
    async fn versions(&self, env: &EnvName) -> Result<Vec<VersionInfo>, StoreError> {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT number, definition, created_at FROM versions WHERE env = $1 ORDER BY number",
        )
        .bind(env.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| unavailable("read", &e))?;
        rows.into_iter()
            .map(|(number, json, created_at)| {
                let number = u32_from_sql(number)?;
                let def = serde_json::from_str(&json).map_err(|e| {
                    StoreError::from(DbError::Corrupt(format!(
                        "version {number} of env {env}: {e}"
                    )))
                })?;
                Ok(VersionInfo {
                    number,
                    created_at: Some(ts_from_sql(created_at)?),
                    def,
                })
            })
            .collect()
    }

    /// One query: the current version joined with its definition.
    async fn current_definition(&self, env: &EnvName) -> Result<(u32, VersionDef), StoreError> {
        let row: Option<(i64, Option<String>)> = sqlx::query_as(
            "SELECT c.version, v.definition FROM current_versions c \
             LEFT JOIN versions v ON v.env = c.env AND v.number = c.version \
             WHERE c.env = $1",
        )
        .bind(env.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| unavailable("read", &e))?;
        let Some((number, json)) = row else {
            return Ok((0, VersionDef::default()));
        };
        let number = u32_from_sql(number)?;
        let def = match json {
            Some(json) => serde_json::from_str(&json).map_err(|e| {
                StoreError::from(DbError::Corrupt(format!(
                    "version {number} of env {env}: {e}"
                )))
            })?,
            None => VersionDef::default(),
        };
        Ok((number, def))
    }

    async fn schedule_cursors(&self, env: &EnvName) -> Result<Vec<ScheduleCursor>, StoreError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT task, schedule_index, last_tick FROM schedule_cursors WHERE env = $1",
        )
        .bind(env.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| unavailable("read", &e))?;
        let mut out = Vec::with_capacity(rows.len());
        for (task, index, last_tick) in rows {
            out.push(ScheduleCursor {
                task: TaskName::new(&task)
                    .map_err(|e| StoreError::from(DbError::Corrupt(e.to_string())))?,
                index: u32_from_sql(index)?,
                last_tick: ts_from_sql(last_tick)?,
            });
        }
        Ok(out)
    }

    async fn advance_schedule_cursor(
        &self,
        env: &EnvName,
        task: &TaskName,
        index: u32,
        from: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError> {
        // One statement either way: the insert's conflict and the update's row lock make the
        // compare-and-set atomic against another process doing the same.
        let query = match from {
            None => sqlx::query(
                "INSERT INTO schedule_cursors (env, task, schedule_index, last_tick) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            ),
            Some(_) => sqlx::query(
                "UPDATE schedule_cursors SET last_tick = $4 \
                 WHERE env = $1 AND task = $2 AND schedule_index = $3 AND last_tick = $5",
            ),
        };
        let query = query
            .bind(env.as_str())
            .bind(task.as_str())
            .bind(i64::from(index))
            .bind(ts_to_sql(to));
        let query = match from {
            Some(from) => query.bind(ts_to_sql(from)),
            None => query,
        };
        let changed = self.execute(query).await?;
        Ok(changed == 1)
    }
}
