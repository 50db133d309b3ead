//! Rows ↔ records: how a [`RunRecord`] is written to and read from `runs`, and the column
//! encodings shared by every query.

use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{AttemptRecord, RunRecord};
use runlane_core::{EnvName, LaneName, QueueName, RunId, TaskName, Timestamp};
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::error::DbError;

/// The columns of `runs` a record is read from, in the order [`decode_run`] reads them.
pub(crate) const RUN_COLUMNS: &str = "id, env, task, version, locked, payload, queue, \
     concurrency_key, lane, priority_ms, run_after, ttl_ms, ttl_deadline, idempotency_key, \
     retry, max_duration_ms, attempt, status, output, error, attempts::text, created_at, \
     finished_at, started_at, source, retry_of, cancel_requested_at";

/// The same columns qualified by the alias `r` (for `UPDATE ... FROM ... RETURNING`).
pub(crate) const RUN_COLUMNS_R: &str = "r.id, r.env, r.task, r.version, r.locked, r.payload, \
     r.queue, r.concurrency_key, r.lane, r.priority_ms, r.run_after, r.ttl_ms, r.ttl_deadline, \
     r.idempotency_key, r.retry, r.max_duration_ms, r.attempt, r.status, r.output, r.error, \
     r.attempts::text, r.created_at, r.finished_at, r.started_at, r.source, r.retry_of, \
     r.cancel_requested_at";

/// Waiting and executing statuses, as SQL (the `runs_unfinished` index's predicate).
pub(crate) const UNFINISHED: &str = "status IN ('delayed', 'queued', 'ready', 'executing')";

use runlane_core::columns::{dur_from_sql, name_from_sql as name, source_from_sql};
pub(crate) use runlane_core::columns::{
    dur_to_sql, id_from_sql, status_from_sql, ts_from_sql, ts_to_sql, u32_from_sql,
};

/// A run id as stored: 16 big-endian bytes.
pub(crate) fn id_to_sql(id: RunId) -> Vec<u8> {
    id.to_bytes().to_vec()
}

/// An attempt list as stored (a JSON array).
pub(crate) fn attempts_to_sql(attempts: &[AttemptRecord]) -> Result<String, DbError> {
    serde_json::to_string(attempts).map_err(|e| DbError::Corrupt(format!("attempts: {e}")))
}

/// One attempt as stored inside the array.
pub(crate) fn attempt_to_sql(attempt: &AttemptRecord) -> Result<String, DbError> {
    serde_json::to_string(attempt).map_err(|e| DbError::Corrupt(format!("attempt: {e}")))
}

/// Reads one row selected with [`RUN_COLUMNS`] (or [`RUN_COLUMNS_R`]).
pub(crate) fn decode_run(row: &PgRow) -> Result<RunRecord, DbError> {
    let id: Vec<u8> = row.try_get(0)?;
    let env: String = row.try_get(1)?;
    let task: String = row.try_get(2)?;
    let payload: String = row.try_get(5)?;
    let queue: String = row.try_get(6)?;
    let key: String = row.try_get(7)?;
    let lane: String = row.try_get(8)?;
    let retry: String = row.try_get(14)?;
    let status: String = row.try_get(17)?;
    let output: Option<String> = row.try_get(18)?;
    let attempts: String = row.try_get(20)?;
    let source: String = row.try_get(24)?;
    let retry_of: Option<Vec<u8>> = row.try_get(25)?;
    let opt_dur = |i: usize| -> Result<Option<Duration>, DbError> {
        row.try_get::<Option<i64>, _>(i)?
            .map(dur_from_sql)
            .transpose()
            .map_err(DbError::from)
    };
    let opt_ts = |i: usize| -> Result<Option<Timestamp>, DbError> {
        row.try_get::<Option<i64>, _>(i)?
            .map(ts_from_sql)
            .transpose()
            .map_err(DbError::from)
    };
    Ok(RunRecord {
        id: id_from_sql(&id)?,
        env: name(&env, EnvName::new)?,
        task: name(&task, TaskName::new)?,
        version: u32_from_sql(row.try_get(3)?)?,
        locked: row.try_get(4)?,
        payload: Arc::from(payload),
        queue: name(&queue, QueueName::new)?,
        key: Arc::from(key),
        lane: name(&lane, LaneName::new)?,
        priority: dur_from_sql(row.try_get(9)?)?,
        run_after: ts_from_sql(row.try_get(10)?)?,
        ttl: opt_dur(11)?,
        ttl_deadline: opt_ts(12)?,
        idempotency_key: row.try_get(13)?,
        retry: serde_json::from_str(&retry)
            .map_err(|e| DbError::Corrupt(format!("retry policy: {e}")))?,
        max_duration: opt_dur(15)?,
        attempt: u32_from_sql(row.try_get(16)?)?,
        status: status_from_sql(&status)?,
        output: output.map(Arc::from),
        error: row.try_get(19)?,
        attempts: serde_json::from_str(&attempts)
            .map_err(|e| DbError::Corrupt(format!("attempts: {e}")))?,
        created_at: ts_from_sql(row.try_get(21)?)?,
        finished_at: opt_ts(22)?,
        started_at: opt_ts(23)?,
        source: source_from_sql(&source)?,
        retry_of: retry_of.as_deref().map(id_from_sql).transpose()?,
        cancel_requested_at: opt_ts(26)?,
    })
}

/// What an insert statement does with a row whose id or idempotency key is stored already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Skips it ([`INSERT_RUNS`]).
    Skipped,
    /// Fails the statement ([`INSERT_NEW_RUNS`]).
    Fails,
}

/// Column arrays of new rows, for one multi-row `INSERT ... SELECT FROM UNNEST(...)`.
#[derive(Default)]
pub(crate) struct RunColumns {
    id: Vec<Vec<u8>>,
    env: Vec<String>,
    task: Vec<String>,
    version: Vec<i64>,
    locked: Vec<bool>,
    payload: Vec<String>,
    queue: Vec<String>,
    key: Vec<String>,
    lane: Vec<String>,
    priority: Vec<i64>,
    run_after: Vec<i64>,
    ttl: Vec<Option<i64>>,
    ttl_deadline: Vec<Option<i64>>,
    idempotency_key: Vec<Option<String>>,
    retry: Vec<String>,
    max_duration: Vec<Option<i64>>,
    attempt: Vec<i64>,
    status: Vec<String>,
    output: Vec<Option<String>>,
    error: Vec<Option<String>>,
    attempts: Vec<String>,
    created_at: Vec<i64>,
    finished_at: Vec<Option<i64>>,
    started_at: Vec<Option<i64>>,
    source: Vec<String>,
    retry_of: Vec<Option<Vec<u8>>>,
    claim_key: Vec<Option<String>>,
    claim_expires_at: Vec<Option<i64>>,
    dispatch_since: Vec<i64>,
}

/// A run insert statement with its rows' source and its tail: with `ON CONFLICT DO NOTHING`
/// a row whose id or idempotency key is stored is skipped, and the ids of the stored ones are
/// returned; without it such a row fails the statement.
macro_rules! insert_runs {
    ($rows:tt, $tail:literal) => {
        concat!(
            "INSERT INTO runs (id, env, task, version, locked, payload, queue, concurrency_key, \
             lane, priority_ms, run_after, ttl_ms, ttl_deadline, idempotency_key, retry, \
             max_duration_ms, attempt, status, output, error, attempts, created_at, finished_at, \
             started_at, source, retry_of, claim_key, claim_expires_at, dispatch_state, \
             dispatch_since) ",
            $rows!(),
            $tail
        )
    };
}

/// The rows of [`RunColumns`]: one per element of the arrays.
macro_rules! unnest_rows {
    () => {
        "SELECT u.id, u.env, u.task, u.version, u.locked, u.payload, u.queue, u.concurrency_key, \
     u.lane, u.priority_ms, u.run_after, u.ttl_ms, u.ttl_deadline, u.idempotency_key, u.retry, \
     u.max_duration_ms, u.attempt, u.status, u.output, u.error, u.attempts::jsonb, u.created_at, \
     u.finished_at, u.started_at, u.source, u.retry_of, u.claim_key, u.claim_expires_at, \
     'pending_enqueue', u.dispatch_since \
     FROM UNNEST($1::bytea[], $2::text[], $3::text[], $4::int8[], $5::bool[], $6::text[], \
     $7::text[], $8::text[], $9::text[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], \
     $14::text[], $15::text[], $16::int8[], $17::int8[], $18::text[], $19::text[], $20::text[], \
     $21::text[], $22::int8[], $23::int8[], $24::int8[], $25::text[], $26::bytea[], $27::text[], \
     $28::int8[], $29::int8[]) \
     AS u(id, env, task, version, locked, payload, queue, concurrency_key, lane, priority_ms, \
     run_after, ttl_ms, ttl_deadline, idempotency_key, retry, max_duration_ms, attempt, status, \
     output, error, attempts, created_at, finished_at, started_at, source, retry_of, claim_key, \
     claim_expires_at, dispatch_since)"
    };
}

/// The row of a [`RunColumns`] holding one: the same arrays, read at position 1 in a `VALUES`
/// row. PostgreSQL runs it ~50 µs faster than the `UNNEST` form for one row (no function scan
/// over 29 arrays).
macro_rules! one_row {
    () => {
        "VALUES (($1::bytea[])[1], ($2::text[])[1], ($3::text[])[1], ($4::int8[])[1], \
     ($5::bool[])[1], ($6::text[])[1], ($7::text[])[1], ($8::text[])[1], ($9::text[])[1], \
     ($10::int8[])[1], ($11::int8[])[1], ($12::int8[])[1], ($13::int8[])[1], ($14::text[])[1], \
     ($15::text[])[1], ($16::int8[])[1], ($17::int8[])[1], ($18::text[])[1], ($19::text[])[1], \
     ($20::text[])[1], ($21::text[])[1]::jsonb, ($22::int8[])[1], ($23::int8[])[1], \
     ($24::int8[])[1], ($25::text[])[1], ($26::bytea[])[1], ($27::text[])[1], ($28::int8[])[1], \
     'pending_enqueue', ($29::int8[])[1])"
    };
}

/// Inserts the rows; one whose id (or idempotency key) is stored already is skipped, not
/// returned: the caller looks at those.
pub(crate) const INSERT_RUNS: &str =
    insert_runs!(unnest_rows, " ON CONFLICT DO NOTHING RETURNING id");
/// [`INSERT_RUNS`] for one row (the single trigger's, on the latency path).
pub(crate) const INSERT_ONE_RUN: &str =
    insert_runs!(one_row, " ON CONFLICT DO NOTHING RETURNING id");
/// Inserts rows expected to be new: no `ON CONFLICT` arbiter checks (PostgreSQL's speculative
/// insertion: 31–37 µs per lone row against 24.5–28 µs without, in a loop of 50,000 inserts
/// into this schema's table), and a row whose id or key is stored already fails the statement
/// (`unique_violation`), which then has to be made again as [`INSERT_RUNS`]. Only for a
/// statement that is its own transaction.
pub(crate) const INSERT_NEW_RUNS: &str = insert_runs!(unnest_rows, " RETURNING id");
/// [`INSERT_NEW_RUNS`] for one row.
pub(crate) const INSERT_ONE_NEW_RUN: &str = insert_runs!(one_row, " RETURNING id");

impl RunColumns {
    /// Adds a row; `claim` is the idempotency key it holds and until when.
    pub(crate) fn push(
        &mut self,
        r: &RunRecord,
        claim: Option<(&str, Timestamp)>,
        now: Timestamp,
    ) -> Result<(), DbError> {
        self.id.push(id_to_sql(r.id));
        self.env.push(r.env.to_string());
        self.task.push(r.task.to_string());
        self.version.push(i64::from(r.version));
        self.locked.push(r.locked);
        self.payload.push(r.payload.to_string());
        self.queue.push(r.queue.to_string());
        self.key.push(r.key.to_string());
        self.lane.push(r.lane.to_string());
        self.priority.push(dur_to_sql(r.priority));
        self.run_after.push(ts_to_sql(r.run_after));
        self.ttl.push(r.ttl.map(dur_to_sql));
        self.ttl_deadline.push(r.ttl_deadline.map(ts_to_sql));
        self.idempotency_key.push(r.idempotency_key.clone());
        self.retry.push(
            serde_json::to_string(&r.retry)
                .map_err(|e| DbError::Corrupt(format!("retry policy: {e}")))?,
        );
        self.max_duration.push(r.max_duration.map(dur_to_sql));
        self.attempt.push(i64::from(r.attempt));
        self.status.push(r.status.as_str().to_string());
        self.output.push(r.output.as_deref().map(str::to_string));
        self.error.push(r.error.clone());
        self.attempts.push(attempts_to_sql(&r.attempts)?);
        self.created_at.push(ts_to_sql(r.created_at));
        self.finished_at.push(r.finished_at.map(ts_to_sql));
        self.started_at.push(r.started_at.map(ts_to_sql));
        self.source.push(r.source.as_str().to_string());
        self.retry_of.push(r.retry_of.map(id_to_sql));
        self.claim_key.push(claim.map(|(k, _)| k.to_string()));
        self.claim_expires_at
            .push(claim.map(|(_, at)| ts_to_sql(at)));
        self.dispatch_since.push(ts_to_sql(now));
        Ok(())
    }

    /// Binds the arrays to the insert statement for one row or many, `stored` saying what a row
    /// whose id or key is stored already does.
    pub(crate) fn bind(
        self,
        stored: Stored,
    ) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let statement = match (self.id.len() == 1, stored) {
            (true, Stored::Skipped) => INSERT_ONE_RUN,
            (false, Stored::Skipped) => INSERT_RUNS,
            (true, Stored::Fails) => INSERT_ONE_NEW_RUN,
            (false, Stored::Fails) => INSERT_NEW_RUNS,
        };
        sqlx::query(statement)
            .bind(self.id)
            .bind(self.env)
            .bind(self.task)
            .bind(self.version)
            .bind(self.locked)
            .bind(self.payload)
            .bind(self.queue)
            .bind(self.key)
            .bind(self.lane)
            .bind(self.priority)
            .bind(self.run_after)
            .bind(self.ttl)
            .bind(self.ttl_deadline)
            .bind(self.idempotency_key)
            .bind(self.retry)
            .bind(self.max_duration)
            .bind(self.attempt)
            .bind(self.status)
            .bind(self.output)
            .bind(self.error)
            .bind(self.attempts)
            .bind(self.created_at)
            .bind(self.finished_at)
            .bind(self.started_at)
            .bind(self.source)
            .bind(self.retry_of)
            .bind(self.claim_key)
            .bind(self.claim_expires_at)
            .bind(self.dispatch_since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_and_saturate_to_never() {
        for v in [0u64, 1, 1_700_000_000_000, i64::MAX as u64 - 1] {
            assert_eq!(
                ts_from_sql(ts_to_sql(Timestamp(v))).ok(),
                Some(Timestamp(v))
            );
        }
        assert_eq!(ts_to_sql(Timestamp::MAX), i64::MAX);
        assert_eq!(ts_from_sql(i64::MAX).ok(), Some(Timestamp::MAX));
        assert!(ts_from_sql(-1).is_err());
        assert_eq!(dur_to_sql(Duration::MAX), i64::MAX);
    }

    #[test]
    fn ids_are_sixteen_bytes_in_time_order() {
        let a = RunId(1 << 80);
        let b = RunId((2 << 80) | 1);
        assert!(id_to_sql(a) < id_to_sql(b), "byte order is id order");
        assert_eq!(id_from_sql(&id_to_sql(b)).ok(), Some(b));
        assert!(id_from_sql(&[1, 2, 3]).is_err());
    }
}
