//! The group-commit writers.
//!
//! Hot-path writes (inserts, terminal writes, flushed attempt starts) are queued on one
//! **bounded** channel. Each of `writers` tasks takes whatever is queued (up to `batch_max`
//! calls), applies all of it in one transaction with one multi-row statement per kind
//! (`INSERT ... SELECT FROM UNNEST(...)`, `UPDATE ... FROM UNNEST(...)`), commits once, and
//! only then answers each caller: a call returns only after its own write committed. While one
//! writer commits, the next collects, so the server always has a batch in flight.
//!
//! Calls in one batch are concurrent (a caller issues its next write only after the previous
//! one answered), so the batch may apply them in any order; refusals (not found, already
//! finished, an idempotency hit) are decided in the batch without SQL errors. A batch that
//! fails on a statement error is applied again one call per transaction, so one bad call never
//! fails the others; a lost connection or a timeout fails the batch's calls with
//! `Unavailable` (nothing acknowledged is lost, nothing is acknowledged that was not committed).
//!
//! Durability is per transaction: a batch is split into its strict and its relaxed calls,
//! committed side by side; the relaxed ones go through connections whose session has
//! `synchronous_commit = off`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{AttemptEnd, AttemptRecord, IdempotencyClaim, Inserted, RunRecord};
use runlane_core::{RunId, RunStatus, StoreError, Timestamp};
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection, Row};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::config::Durability;
use crate::error::{is_connection_error, is_retryable, is_unique_violation, unavailable, DbError};
use crate::record::{
    attempt_to_sql, decode_run, id_from_sql, id_to_sql, status_from_sql, ts_from_sql, ts_to_sql,
    u32_from_sql, RunColumns, Stored, RUN_COLUMNS, RUN_COLUMNS_R, UNFINISHED,
};

/// Counters of the writers, for [`crate::PostgresStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) batches_taken: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) calls_committed: AtomicU64,
    pub(crate) failed_batches: AtomicU64,
    pub(crate) queue_full: AtomicU64,
    pub(crate) largest_batch: AtomicU64,
    pub(crate) rows_inserted: AtomicU64,
    pub(crate) rows_finished: AtomicU64,
    pub(crate) starts_flushed: AtomicU64,
    pub(crate) retried_batches: AtomicU64,
    pub(crate) split_batches: AtomicU64,
    pub(crate) insert_conflicts: AtomicU64,
    pub(crate) rows_replaced: AtomicU64,
    pub(crate) commit_micros: AtomicU64,
}

/// An insert call's answers, and the ids whose stored run a new one replaced.
pub(crate) type InsertAnswer = (Vec<Inserted>, Vec<RunId>);

/// One queued write.
pub(crate) enum Op {
    /// `RunStore::insert`.
    Insert {
        runs: Vec<(RunRecord, Option<IdempotencyClaim>)>,
        now: Timestamp,
        reply: oneshot::Sender<Result<InsertAnswer, StoreError>>,
    },
    /// `RunStore::finish`, with the attempt start noted in memory, if any.
    Finish {
        run: RunId,
        status: RunStatus,
        output: Option<Arc<str>>,
        attempt: Option<AttemptRecord>,
        start: Option<(u32, Timestamp)>,
        now: Timestamp,
        reply: oneshot::Sender<Result<RunRecord, StoreError>>,
    },
    /// `RunStore::finish_many`: each end with the attempt start noted in memory, if any.
    FinishMany {
        ends: Vec<(AttemptEnd, Option<(u32, Timestamp)>)>,
        now: Timestamp,
        reply: oneshot::Sender<Result<Vec<Result<(), StoreError>>, StoreError>>,
    },
    /// Attempt starts still unfinished after `start_flush_after` (fire and forget).
    Starts(Vec<(RunId, u32, Timestamp)>),
}

/// A queued write and the durability its transaction needs.
pub(crate) struct Queued {
    pub(crate) durability: Durability,
    pub(crate) op: Op,
}

/// The answer computed for one call, sent once its transaction committed.
enum Answer {
    Inserted(Result<InsertAnswer, StoreError>),
    Finished(Result<Box<RunRecord>, StoreError>),
    FinishedMany(Vec<Result<(), StoreError>>),
    Nothing,
}

impl Queued {
    /// Sends the answer (or the batch's error) to the caller. A caller that stopped waiting
    /// is ignored: the write stands.
    fn answer(self, answer: Result<Answer, StoreError>) {
        match self.op {
            Op::Insert { reply, .. } => {
                let _ = reply.send(match answer {
                    Ok(Answer::Inserted(r)) => r,
                    Ok(_) => Err(StoreError::Unavailable(
                        "writer answered out of kind".into(),
                    )),
                    Err(e) => Err(e),
                });
            }
            Op::Finish { reply, .. } => {
                let _ = reply.send(match answer {
                    Ok(Answer::Finished(r)) => r.map(|r| *r),
                    Ok(_) => Err(StoreError::Unavailable(
                        "writer answered out of kind".into(),
                    )),
                    Err(e) => Err(e),
                });
            }
            Op::FinishMany { reply, .. } => {
                let _ = reply.send(match answer {
                    Ok(Answer::FinishedMany(r)) => Ok(r),
                    Ok(_) => Err(StoreError::Unavailable(
                        "writer answered out of kind".into(),
                    )),
                    Err(e) => Err(e),
                });
            }
            Op::Starts(_) => {}
        }
    }

    /// The calls this write answers (each end of a `finish_many` counts as one).
    fn calls(&self) -> u64 {
        match &self.op {
            Op::FinishMany { ends, .. } => ends.len() as u64,
            _ => 1,
        }
    }
}

/// What every writer task shares.
pub(crate) struct WriterShared {
    pub(crate) pool: PgPool,
    /// Connections that run `SET synchronous_commit = off` when they connect.
    pub(crate) relaxed_pool: PgPool,
    pub(crate) counters: Arc<Counters>,
    pub(crate) batch_max: usize,
    pub(crate) commit_timeout: Duration,
}

/// Spawns `n` writer tasks on the queue; they end once every sender is dropped and the queue
/// is drained.
pub(crate) fn spawn(
    n: usize,
    rx: mpsc::Receiver<Queued>,
    shared: Arc<WriterShared>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let rx = Arc::new(Mutex::new(rx));
    (0..n)
        .map(|_| {
            let rx = rx.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else {
                            return;
                        };
                        let mut batch = vec![first];
                        while batch.len() < shared.batch_max {
                            match rx.try_recv() {
                                Ok(q) => batch.push(q),
                                Err(_) => break,
                            }
                        }
                        shared
                            .counters
                            .batches_taken
                            .fetch_add(1, Ordering::Relaxed);
                        batch
                    };
                    run_batch(&shared, batch).await;
                }
            })
        })
        .collect()
}

/// Commits a batch (strict and relaxed calls in separate transactions) and answers its calls.
async fn run_batch(shared: &WriterShared, batch: Vec<Queued>) {
    let (strict, relaxed): (Vec<Queued>, Vec<Queued>) = batch
        .into_iter()
        .partition(|q| q.durability == Durability::Strict);
    // Side by side on two connections: relaxed calls never wait for a strict fsync.
    let commit = |group: Vec<Queued>, durability| async move {
        if !group.is_empty() {
            commit_group(shared, group, durability).await;
        }
    };
    tokio::join!(
        commit(strict, Durability::Strict),
        commit(relaxed, Durability::Relaxed)
    );
}

async fn commit_group(shared: &WriterShared, group: Vec<Queued>, durability: Durability) {
    let started = std::time::Instant::now();
    let committed = commit_with_retry(shared, &group, durability).await;
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    shared
        .counters
        .commit_micros
        .fetch_add(micros, Ordering::Relaxed);
    match committed {
        Ok(answers) => answer_all(shared, group, answers),
        Err(DbError::Sql(e)) if !is_connection_error(&e) && group.len() > 1 => {
            // A statement failed (a value the server refuses, a constraint): apply each call
            // in its own transaction so only the bad one fails.
            shared
                .counters
                .split_batches
                .fetch_add(1, Ordering::Relaxed);
            for q in group {
                let one = std::slice::from_ref(&q);
                match commit_with_retry(shared, one, durability).await {
                    Ok(mut answers) => {
                        shared.counters.commits.fetch_add(1, Ordering::Relaxed);
                        shared
                            .counters
                            .calls_committed
                            .fetch_add(1, Ordering::Relaxed);
                        q.answer(answers.pop().ok_or_else(|| {
                            StoreError::Unavailable("writer lost an answer".into())
                        }));
                    }
                    Err(e) => {
                        shared
                            .counters
                            .failed_batches
                            .fetch_add(1, Ordering::Relaxed);
                        q.answer(Err(e.into()));
                    }
                }
            }
        }
        Err(e) => {
            shared
                .counters
                .failed_batches
                .fetch_add(1, Ordering::Relaxed);
            let e: StoreError = e.into();
            for q in group {
                q.answer(Err(e.clone()));
            }
        }
    }
}

fn answer_all(shared: &WriterShared, group: Vec<Queued>, answers: Vec<Answer>) {
    let c = &shared.counters;
    let calls: u64 = group.iter().map(Queued::calls).sum();
    c.commits.fetch_add(1, Ordering::Relaxed);
    c.calls_committed.fetch_add(calls, Ordering::Relaxed);
    c.largest_batch.fetch_max(calls, Ordering::Relaxed);
    for (q, a) in group.into_iter().zip(answers) {
        q.answer(Ok(a));
    }
}

/// One transaction for `ops`, tried again (at most twice) when it lost a race (deadlock,
/// serialization failure), each try bounded by `commit_timeout`.
async fn commit_with_retry(
    shared: &WriterShared,
    ops: &[Queued],
    durability: Durability,
) -> Result<Vec<Answer>, DbError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = tokio::time::timeout(shared.commit_timeout, commit(shared, ops, durability));
        match attempt.await {
            Ok(Err(DbError::Sql(e))) if is_retryable(&e) && tries < 3 => {
                shared
                    .counters
                    .retried_batches
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(result) => return result,
            Err(_) => {
                return Err(DbError::Sql(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("commit took longer than {:?}", shared.commit_timeout),
                ))))
            }
        }
    }
}

async fn commit(
    shared: &WriterShared,
    ops: &[Queued],
    durability: Durability,
) -> Result<Vec<Answer>, DbError> {
    // Relaxed connections have `synchronous_commit = off` for their whole session, so no
    // statement is spent on it per transaction.
    let pool = match durability {
        Durability::Strict => &shared.pool,
        Durability::Relaxed => &shared.relaxed_pool,
    };
    let mut conn = pool.acquire().await?;
    if single_statement(ops) {
        // One statement is its own transaction: no BEGIN and COMMIT round trips.
        return apply(&mut conn, ops, &shared.counters, true).await;
    }
    let mut tx = conn.begin().await?;
    let answers = apply(&mut tx, ops, &shared.counters, false).await?;
    tx.commit().await?;
    Ok(answers)
}

/// Whether the batch is one statement (then it needs no explicit transaction): only inserts
/// that hold no idempotency key, only `finish` calls, only `finish_many` calls, or only
/// attempt starts. (An insert row
/// whose id was stored before is replaced in its own transaction; generated ids never clash.)
fn single_statement(ops: &[Queued]) -> bool {
    let inserts = ops.iter().all(|q| match &q.op {
        Op::Insert { runs, .. } => runs.iter().all(|(_, claim)| claim.is_none()),
        _ => false,
    });
    let finishes = ops.iter().all(|q| matches!(q.op, Op::Finish { .. }));
    let finish_many = ops.iter().all(|q| matches!(q.op, Op::FinishMany { .. }));
    let starts = ops.iter().all(|q| matches!(q.op, Op::Starts(_)));
    inserts || finishes || finish_many || starts
}

/// Applies every call of the batch on `conn`; answers in call order. `autocommit`: the batch
/// is one statement, its own transaction (no `BEGIN`), so a statement that fails undoes only
/// itself and may be made again in another form.
async fn apply(
    conn: &mut PgConnection,
    ops: &[Queued],
    counters: &Counters,
    autocommit: bool,
) -> Result<Vec<Answer>, DbError> {
    let mut answers: Vec<Option<Answer>> = (0..ops.len()).map(|_| None).collect();
    apply_inserts(conn, ops, &mut answers, counters, autocommit).await?;
    apply_finishes(conn, ops, &mut answers, counters).await?;
    apply_starts(conn, ops, &mut answers, counters).await?;
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or(Answer::Nothing))
        .collect())
}

/// Where one run of an insert call landed.
enum Slot {
    /// An idempotency hit on an earlier row of the batch: that row's outcome answers.
    SameAs(usize),
    /// A row of the multi-row insert.
    Row(usize),
}

/// A row to insert.
struct NewRow<'a> {
    record: &'a RunRecord,
    claim: Option<(&'a str, Timestamp)>,
    now: Timestamp,
    /// The call it came from.
    op: usize,
    /// Other calls of the batch its key answered (their `SameAs` slots).
    hits: i32,
}

type ClaimScope = (String, String, String);

async fn apply_inserts(
    conn: &mut PgConnection,
    ops: &[Queued],
    answers: &mut [Option<Answer>],
    counters: &Counters,
    autocommit: bool,
) -> Result<(), DbError> {
    let mut rows: Vec<NewRow<'_>> = Vec::new();
    let mut slots: Vec<(usize, Vec<Slot>)> = Vec::new();
    // Keys claimed by earlier rows of this batch: duplicates collapse onto the first.
    let mut claimed: HashMap<ClaimScope, usize> = HashMap::new();
    let mut ids: HashSet<RunId> = HashSet::new();
    let mut duplicate_ids: Vec<usize> = Vec::new();
    for (i, q) in ops.iter().enumerate() {
        let Op::Insert { runs, now, .. } = &q.op else {
            continue;
        };
        let mut call = Vec::with_capacity(runs.len());
        for (record, claim) in runs {
            if let Some(claim) = claim {
                let scope = (
                    record.env.to_string(),
                    record.task.to_string(),
                    claim.key.clone(),
                );
                if let Some(&earlier) = claimed.get(&scope) {
                    let held = rows[earlier].claim.is_some_and(|(_, until)| until > *now);
                    if held {
                        // Another call handed this row's run counts as a hit; the same call's
                        // duplicates stand or fall with it.
                        if rows[earlier].op != i {
                            rows[earlier].hits += 1;
                        }
                        call.push(Slot::SameAs(earlier));
                        continue;
                    }
                    // The earlier claim already expired at this call's `now`: this run takes
                    // the key over.
                    rows[earlier].claim = None;
                }
                claimed.insert(scope, rows.len());
            }
            if !ids.insert(record.id) {
                duplicate_ids.push(rows.len());
            }
            call.push(Slot::Row(rows.len()));
            rows.push(NewRow {
                record,
                claim: claim.as_ref().map(|c| (c.key.as_str(), c.expires_at)),
                now: *now,
                op: i,
                hits: 0,
            });
        }
        slots.push((i, call));
    }
    if rows.is_empty() && slots.is_empty() {
        return Ok(());
    }

    // One statement for every row; rows in claim-key order so that concurrent batches take
    // the unique index's locks in one order.
    let mut order: Vec<usize> = (0..rows.len())
        .filter(|i| !duplicate_ids.contains(i))
        .collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| {
            rows[i]
                .claim
                .map(|(k, _)| (rows[i].record.env.as_str(), rows[i].record.task.as_str(), k))
        };
        key(a).cmp(&key(b))
    });
    let mut stored: HashSet<Vec<u8>> = HashSet::new();
    if !order.is_empty() {
        let columns = || -> Result<RunColumns, DbError> {
            let mut cols = RunColumns::default();
            for &i in &order {
                cols.push(rows[i].record, rows[i].claim, rows[i].now)?;
            }
            Ok(cols)
        };
        // Generated ids are new: a statement of its own inserts them without `ON CONFLICT`'s
        // checks, and is made again with them in the rare case that one was stored before.
        let fresh = if autocommit {
            match columns()?.bind(Stored::Fails).fetch_all(&mut *conn).await {
                Ok(returned) => Some(returned),
                Err(e) if is_unique_violation(&e) => {
                    counters.insert_conflicts.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let returned = match fresh {
            Some(returned) => returned,
            None => {
                columns()?
                    .bind(Stored::Skipped)
                    .fetch_all(&mut *conn)
                    .await?
            }
        };
        for row in returned {
            stored.insert(row.try_get::<Vec<u8>, _>(0)?);
        }
    }
    // The rare rows that did not go in: an idempotency key held by a committed run, a key
    // that expired, or an id stored before (replaced, as every store does).
    let mut existing: HashMap<usize, RunRecord> = HashMap::new();
    let mut replaced: HashSet<usize> = HashSet::new();
    let slow: Vec<usize> = (0..rows.len())
        .filter(|&i| !stored.contains(&id_to_sql(rows[i].record.id)) || duplicate_ids.contains(&i))
        .collect();
    if !slow.is_empty() {
        // A transaction (a savepoint inside the batch's) keeps each look-up-then-write whole.
        let mut tx = conn.begin().await?;
        for i in slow {
            match insert_one(&mut tx, &rows[i]).await? {
                One::Held(holder) => {
                    existing.insert(i, *holder);
                }
                One::Stored { replaced: true } => {
                    replaced.insert(i);
                }
                One::Stored { replaced: false } => {}
            }
        }
        tx.commit().await?;
    }
    // Hits across calls of this batch on a run it stored (rare: two processes' triggers meet
    // in one batch only through `insert` calls of one process).
    for (i, row) in rows.iter().enumerate() {
        if row.hits > 0 && !existing.contains_key(&i) {
            sqlx::query("UPDATE runs SET key_hits = key_hits + $2 WHERE id = $1")
                .bind(id_to_sql(row.record.id))
                .bind(row.hits)
                .execute(&mut *conn)
                .await?;
        }
    }
    counters
        .rows_inserted
        .fetch_add((rows.len() - existing.len()) as u64, Ordering::Relaxed);
    counters
        .rows_replaced
        .fetch_add(replaced.len() as u64, Ordering::Relaxed);
    for (i, call) in slots {
        let out = call
            .into_iter()
            .map(|slot| match slot {
                // The earlier row answers: its holder if it hit, else the row itself.
                Slot::SameAs(row) => Inserted::Existing(Box::new(
                    existing
                        .get(&row)
                        .cloned()
                        .unwrap_or_else(|| rows[row].record.clone()),
                )),
                Slot::Row(row) => match existing.get(&row) {
                    Some(holder) => Inserted::Existing(Box::new(holder.clone())),
                    None => Inserted::New,
                },
            })
            .collect();
        let gone = replaced
            .iter()
            .filter(|&&row| rows[row].op == i)
            .map(|&row| rows[row].record.id)
            .collect();
        answers[i] = Some(Answer::Inserted(Ok((out, gone))));
    }
    Ok(())
}

/// What `insert_one` did with its row.
enum One {
    /// Stored; `replaced`: in place of a run stored under its id.
    Stored { replaced: bool },
    /// Not stored: this run holds its idempotency key and answers instead.
    Held(Box<RunRecord>),
}

/// Inserts one row the multi-row statement skipped, replacing a run stored under its id.
async fn insert_one(conn: &mut PgConnection, row: &NewRow<'_>) -> Result<One, DbError> {
    let id = id_to_sql(row.record.id);
    // The key the replaced row held (read by the first pass's delete: a later pass finds no
    // row to delete).
    let mut replaced: Option<(Option<String>, Option<i64>)> = None;
    for _ in 0..8 {
        if let Some((key, _)) = row.claim {
            // A live holder answers, and counts the hit: its own trigger, if refused, then
            // leaves it in place for this one (`remove_refused`).
            let holder = sqlx::query(&format!(
                "UPDATE runs SET key_hits = key_hits + 1 \
                 WHERE env = $1 AND task = $2 AND claim_key = $3 AND claim_expires_at > $4 \
                 RETURNING {RUN_COLUMNS}"
            ))
            .bind(row.record.env.as_str())
            .bind(row.record.task.as_str())
            .bind(key)
            .bind(ts_to_sql(row.now))
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(holder) = holder {
                return Ok(One::Held(Box::new(decode_run(&holder)?)));
            }
            // A holder whose claim expired: the key is free for this run.
            sqlx::query(
                "UPDATE runs SET claim_key = NULL, claim_expires_at = NULL \
                 WHERE env = $1 AND task = $2 AND claim_key = $3 \
                 AND (claim_expires_at IS NULL OR claim_expires_at <= $4)",
            )
            .bind(row.record.env.as_str())
            .bind(row.record.task.as_str())
            .bind(key)
            .bind(ts_to_sql(row.now))
            .execute(&mut *conn)
            .await?;
        }
        // A run stored before under this id is replaced, attempts included; the idempotency
        // key it holds stays with the id unless the new run brings one (as in the other
        // stores, which keep a key's run id apart from the run).
        let deleted: Option<(Option<String>, Option<i64>)> =
            sqlx::query_as("DELETE FROM runs WHERE id = $1 RETURNING claim_key, claim_expires_at")
                .bind(&id)
                .fetch_optional(&mut *conn)
                .await?;
        if deleted.is_some() {
            replaced = deleted;
        }
        let kept = match (row.claim, &replaced) {
            (None, Some((Some(key), Some(until)))) => Some((key.as_str(), ts_from_sql(*until)?)),
            (claim, _) => claim,
        };
        let mut cols = RunColumns::default();
        cols.push(row.record, kept, row.now)?;
        if !cols
            .bind(Stored::Skipped)
            .fetch_all(&mut *conn)
            .await?
            .is_empty()
        {
            return Ok(One::Stored {
                replaced: replaced.is_some(),
            });
        }
        // Another transaction took the key in between: look again.
    }
    Err(DbError::Corrupt(format!(
        "run {} could not be inserted: its idempotency key keeps changing hands",
        row.record.id
    )))
}

/// One terminal write of a batch: a `finish` call, or one end of a `finish_many` call.
struct EndRow<'a> {
    /// The call.
    op: usize,
    /// The end's place inside a `finish_many` call (`None` for a `finish` call).
    item: Option<usize>,
    run: RunId,
    status: RunStatus,
    output: Option<&'a str>,
    attempt: Option<&'a AttemptRecord>,
    start: Option<(u32, Timestamp)>,
    now: Timestamp,
}

/// The terminal writes of the batch's calls: those of `finish` calls in one statement that
/// returns their records, those of `finish_many` calls in one that returns only ids (their
/// callers need no record), each fenced by attempt. The first write of a run in the batch is
/// applied; later ones get its outcome's refusal.
async fn apply_finishes(
    conn: &mut PgConnection,
    ops: &[Queued],
    answers: &mut [Option<Answer>],
    counters: &Counters,
) -> Result<(), DbError> {
    let mut rows: Vec<EndRow<'_>> = Vec::new();
    for (i, q) in ops.iter().enumerate() {
        match &q.op {
            Op::Finish {
                run,
                status,
                output,
                attempt,
                start,
                now,
                ..
            } => rows.push(EndRow {
                op: i,
                item: None,
                run: *run,
                status: *status,
                output: output.as_deref(),
                attempt: attempt.as_ref(),
                start: *start,
                now: *now,
            }),
            Op::FinishMany { ends, now, .. } => {
                for (j, (end, start)) in ends.iter().enumerate() {
                    rows.push(EndRow {
                        op: i,
                        item: Some(j),
                        run: end.run,
                        status: end.status,
                        output: end.output.as_deref(),
                        attempt: Some(&end.attempt),
                        start: *start,
                        now: *now,
                    });
                }
            }
            _ => {}
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    // The first write of each run is applied; `winner[k]` is the row whose outcome answers k.
    let mut first: HashMap<RunId, usize> = HashMap::new();
    let winner: Vec<usize> = rows
        .iter()
        .enumerate()
        .map(|(k, row)| *first.entry(row.run).or_insert(k))
        .collect();
    let applied: Vec<usize> = (0..rows.len()).filter(|&k| winner[k] == k).collect();
    let (full, light): (Vec<usize>, Vec<usize>) =
        applied.iter().partition(|&&k| rows[k].item.is_none());
    let mut done: HashMap<RunId, Option<RunRecord>> = HashMap::with_capacity(applied.len());
    for (group, returns_record) in [(full, true), (light, false)] {
        if !group.is_empty() {
            let picked: Vec<&EndRow<'_>> = group.iter().map(|&k| &rows[k]).collect();
            update_ends(conn, &picked, returns_record, &mut done).await?;
        }
    }
    counters
        .rows_finished
        .fetch_add(done.len() as u64, Ordering::Relaxed);
    // Runs that were not updated: unknown, already finished, or at a later attempt.
    let fenced: HashMap<RunId, u32> = applied
        .iter()
        .filter_map(|&k| rows[k].attempt.map(|a| (rows[k].run, a.number)))
        .collect();
    let missing: Vec<Vec<u8>> = applied
        .iter()
        .filter(|&&k| !done.contains_key(&rows[k].run))
        .map(|&k| id_to_sql(rows[k].run))
        .collect();
    let refused = refusals(conn, missing, &fenced).await?;
    let outcome = |k: usize| -> Result<Option<RunRecord>, StoreError> {
        let w = &rows[winner[k]];
        let won = match done.get(&w.run) {
            Some(record) => Ok(record.clone()),
            None => Err(refused
                .get(&w.run)
                .cloned()
                .unwrap_or(StoreError::NotFound(w.run))),
        };
        if winner[k] == k {
            won
        } else {
            // A later write of a run in this batch: refused as after the winner's outcome.
            match won {
                Ok(_) => Err(StoreError::AlreadyFinished {
                    run: w.run,
                    status: w.status,
                }),
                Err(e) => Err(e),
            }
        }
    };
    let mut many: HashMap<usize, Vec<Result<(), StoreError>>> = HashMap::new();
    for (k, row) in rows.iter().enumerate() {
        let answer = outcome(k);
        match row.item {
            None => {
                answers[row.op] = Some(Answer::Finished(answer.and_then(|r| {
                    r.map(Box::new).ok_or_else(|| {
                        StoreError::Unavailable("writer lost a finished record".into())
                    })
                })));
            }
            Some(_) => many.entry(row.op).or_default().push(answer.map(|_| ())),
        }
    }
    for (op, ends) in many {
        answers[op] = Some(Answer::FinishedMany(ends));
    }
    Ok(())
}

/// One `UPDATE … FROM UNNEST(…)` for the given terminal writes, fenced by attempt (a write
/// with an attempt applies only while it is the run's current one); the updated runs go into
/// `done`, with their record when `returns_record`.
async fn update_ends(
    conn: &mut PgConnection,
    rows: &[&EndRow<'_>],
    returns_record: bool,
    done: &mut HashMap<RunId, Option<RunRecord>>,
) -> Result<(), DbError> {
    let n = rows.len();
    let mut id = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut output: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut has_attempt = Vec::with_capacity(n);
    let mut attempt_no: Vec<i64> = Vec::with_capacity(n);
    let mut error: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut attempt_json: Vec<Option<String>> = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    let mut start_attempt: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut start_at: Vec<Option<i64>> = Vec::with_capacity(n);
    for row in rows {
        id.push(id_to_sql(row.run));
        status.push(row.status.as_str());
        output.push(row.output);
        has_attempt.push(row.attempt.is_some());
        attempt_no.push(row.attempt.map_or(0, |a| i64::from(a.number)));
        error.push(row.attempt.and_then(|a| a.error.as_deref()));
        attempt_json.push(row.attempt.map(attempt_to_sql).transpose()?);
        at.push(ts_to_sql(row.now));
        start_attempt.push(row.start.map(|(n, _)| i64::from(n)));
        start_at.push(row.start.map(|(_, t)| ts_to_sql(t)));
    }
    let returning = if returns_record {
        RUN_COLUMNS_R
    } else {
        "r.id"
    };
    const TYPES: [&str; 10] = [
        "bytea", "text", "text", "bool", "int8", "text", "text", "int8", "int8", "int8",
    ];
    const NAMES: &str = "id, status, output, has_attempt, attempt_no, error, attempt_json, at, \
        start_attempt, start_at";
    let single = n == 1;
    let arrays: Vec<String> = TYPES
        .iter()
        .enumerate()
        .map(|(i, t)| format!("${}::{t}[]", i + 1))
        .collect();
    let from = if single {
        // One run (a lone completion): the first element of each array, so that the generic
        // plan of this prepared statement is a primary-key lookup whatever the table's size.
        let firsts: Vec<String> = arrays.iter().map(|a| format!("({a})[1]")).collect();
        format!("(SELECT {}) AS u({NAMES})", firsts.join(", "))
    } else {
        format!("UNNEST({}) AS u({NAMES})", arrays.join(", "))
    };
    let returned = sqlx::query(&format!(
        "UPDATE runs r SET status = u.status, output = u.output, finished_at = u.at, \
         error = CASE WHEN u.has_attempt THEN u.error ELSE r.error END, \
         attempt = CASE WHEN u.has_attempt THEN u.attempt_no ELSE r.attempt END, \
         attempts = CASE WHEN u.has_attempt \
            THEN r.attempts || jsonb_build_array(u.attempt_json::jsonb) ELSE r.attempts END, \
         started_at = CASE WHEN u.start_attempt = r.attempt THEN u.start_at ELSE r.started_at END, \
         dispatch_state = 'in_queue' \
         FROM {from} \
         WHERE r.id = u.id AND r.{UNFINISHED} \
            AND (NOT u.has_attempt OR r.attempt = u.attempt_no) \
         RETURNING {returning}"
    ))
    // Many runs: planned for their arguments each time (an unnamed statement): a generic plan
    // cached while `runs` was small joined the batch by a sequential scan of the whole table,
    // and kept doing so as it grew (tests/plans.rs). The same for every multi-row
    // `UNNEST`/`ANY` statement. One run: prepared once per connection (see above).
    .persistent(single)
    .bind(id)
    .bind(status)
    .bind(output)
    .bind(has_attempt)
    .bind(attempt_no)
    .bind(error)
    .bind(attempt_json)
    .bind(at)
    .bind(start_attempt)
    .bind(start_at)
    .fetch_all(&mut *conn)
    .await?;
    for row in &returned {
        if returns_record {
            let record = decode_run(row)?;
            done.insert(record.id, Some(record));
        } else {
            done.insert(id_from_sql(&row.try_get::<Vec<u8>, _>(0)?)?, None);
        }
    }
    Ok(())
}

/// Why the terminal writes of `missing` runs changed nothing: the run is unknown (absent from
/// the answer), already finished, or no longer at the attempt its write was fenced by.
async fn refusals(
    conn: &mut PgConnection,
    missing: Vec<Vec<u8>>,
    fenced: &HashMap<RunId, u32>,
) -> Result<HashMap<RunId, StoreError>, DbError> {
    let mut refused = HashMap::new();
    if missing.is_empty() {
        return Ok(refused);
    }
    let rows = sqlx::query("SELECT id, status, attempt FROM runs WHERE id = ANY($1)")
        .persistent(false)
        .bind(missing)
        .fetch_all(&mut *conn)
        .await?;
    for row in rows {
        let run = id_from_sql(&row.try_get::<Vec<u8>, _>(0)?)?;
        let status = status_from_sql(&row.try_get::<String, _>(1)?)?;
        let current = u32_from_sql(row.try_get::<i64, _>(2)?)?;
        let e = if status.is_terminal() {
            StoreError::AlreadyFinished { run, status }
        } else {
            match fenced.get(&run) {
                Some(&attempt) => StoreError::StaleAttempt {
                    run,
                    attempt,
                    current,
                },
                // Unfinished, unfenced and still not updated: it changed under the statement.
                None => StoreError::Unavailable(format!(
                    "run {run} changed while its terminal write was applied"
                )),
            }
        };
        refused.insert(run, e);
    }
    Ok(refused)
}

async fn apply_starts(
    conn: &mut PgConnection,
    ops: &[Queued],
    answers: &mut [Option<Answer>],
    counters: &Counters,
) -> Result<(), DbError> {
    let mut id = Vec::new();
    let mut attempt = Vec::new();
    let mut at = Vec::new();
    for (i, q) in ops.iter().enumerate() {
        let Op::Starts(starts) = &q.op else {
            continue;
        };
        for (run, n, t) in starts {
            id.push(id_to_sql(*run));
            attempt.push(i64::from(*n));
            at.push(ts_to_sql(*t));
        }
        answers[i] = Some(Answer::Nothing);
    }
    if id.is_empty() {
        return Ok(());
    }
    let n = write_starts(conn, id, attempt, at).await?;
    counters.starts_flushed.fetch_add(n, Ordering::Relaxed);
    Ok(())
}

/// Sets `started_at` of the runs whose current attempt is the noted one and that are still
/// unfinished (a run that moved on keeps its row as it is); returns how many rows changed.
///
/// Never waits for a row lock: a row another transaction holds is skipped. The holder is a
/// write that moves the run on (its terminal write carries the start along; a retry or cancel
/// supersedes it), and a start is advisory anyway (`start.rs`). Waiting instead let a batch of
/// starts and a batch of terminal writes lock the same rows in other orders: a deadlock, which
/// PostgreSQL breaks only after `deadlock_timeout` (1 s), stalling the writers meanwhile.
pub(crate) async fn write_starts(
    conn: &mut PgConnection,
    id: Vec<Vec<u8>>,
    attempt: Vec<i64>,
    at: Vec<i64>,
) -> Result<u64, DbError> {
    Ok(sqlx::query(&format!(
        "UPDATE runs r SET started_at = u.at \
         FROM UNNEST($1::bytea[], $2::int8[], $3::int8[]) AS u(id, attempt, at) \
         WHERE r.id = u.id AND r.attempt = u.attempt AND r.{UNFINISHED} AND r.id IN \
         (SELECT id FROM runs WHERE id = ANY($1) AND {UNFINISHED} FOR UPDATE SKIP LOCKED)"
    ))
    .persistent(false)
    .bind(id)
    .bind(attempt)
    .bind(at)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// The error of a call that could not be queued or answered.
pub(crate) fn writer_gone() -> StoreError {
    unavailable("writer", &sqlx::Error::PoolClosed)
}
