//! Rows ↔ records: how a [`RunRecord`] and its attempts are written to and read from the
//! `runs` and `attempts` tables, and the column encodings shared by every query.

use std::sync::Arc;

use runlane_core::backend::{AttemptRecord, RunRecord};
use runlane_core::{EnvName, LaneName, QueueName, RetryPolicy, RunId, TaskName};
use rusqlite::{params, Connection, Row, Statement};

use crate::error::DbError;

/// The columns of `runs`, in the order [`decode_run`] reads them.
pub(crate) const RUN_COLUMNS: &str = "id, env, task, version, locked, payload, queue, \
     concurrency_key, lane, priority_ms, run_after, ttl_ms, ttl_deadline, idempotency_key, \
     retry_attempts_max, retry_factor, retry_min_ms, retry_max_ms, retry_jitter, \
     max_duration_ms, attempt, status, output, error, created_at, finished_at, source, retry_of, started_at, \
     cancel_requested_at";

use runlane_core::columns::{dur_from_sql, name_from_sql as name, source_from_sql};
pub(crate) use runlane_core::columns::{
    dur_to_sql, id_from_sql, status_from_sql, ts_from_sql, ts_to_sql, u32_from_sql,
};

/// A run id as stored: 16 big-endian bytes.
pub(crate) fn id_to_sql(id: RunId) -> [u8; 16] {
    id.to_bytes()
}

/// Reads one `runs` row selected with [`RUN_COLUMNS`]; attempts are loaded separately.
pub(crate) fn decode_run(row: &Row<'_>) -> Result<RunRecord, DbError> {
    let id: Vec<u8> = row.get(0)?;
    let env: String = row.get(1)?;
    let task: String = row.get(2)?;
    let payload: String = row.get(5)?;
    let queue: String = row.get(6)?;
    let key: String = row.get(7)?;
    let lane: String = row.get(8)?;
    let status: String = row.get(21)?;
    let output: Option<String> = row.get(22)?;
    let source: String = row.get(26)?;
    let retry_of: Option<Vec<u8>> = row.get(27)?;
    Ok(RunRecord {
        id: id_from_sql(&id)?,
        env: name(&env, EnvName::new)?,
        task: name(&task, TaskName::new)?,
        version: u32_from_sql(row.get(3)?)?,
        locked: row.get(4)?,
        payload: Arc::from(payload),
        queue: name(&queue, QueueName::new)?,
        key: Arc::from(key),
        lane: name(&lane, LaneName::new)?,
        priority: dur_from_sql(row.get(9)?)?,
        run_after: ts_from_sql(row.get(10)?)?,
        ttl: row
            .get::<_, Option<i64>>(11)?
            .map(dur_from_sql)
            .transpose()?,
        ttl_deadline: row
            .get::<_, Option<i64>>(12)?
            .map(ts_from_sql)
            .transpose()?,
        idempotency_key: row.get(13)?,
        retry: RetryPolicy {
            attempts_max: u32_from_sql(row.get(14)?)?,
            factor: row.get(15)?,
            min: dur_from_sql(row.get(16)?)?,
            max: dur_from_sql(row.get(17)?)?,
            jitter: row.get(18)?,
        },
        max_duration: row
            .get::<_, Option<i64>>(19)?
            .map(dur_from_sql)
            .transpose()?,
        attempt: u32_from_sql(row.get(20)?)?,
        status: status_from_sql(&status)?,
        output: output.map(Arc::from),
        error: row.get(23)?,
        attempts: Vec::new(),
        created_at: ts_from_sql(row.get(24)?)?,
        finished_at: row
            .get::<_, Option<i64>>(25)?
            .map(ts_from_sql)
            .transpose()?,
        source: source_from_sql(&source)?,
        retry_of: retry_of.as_deref().map(id_from_sql).transpose()?,
        started_at: row
            .get::<_, Option<i64>>(28)?
            .map(ts_from_sql)
            .transpose()?,
        cancel_requested_at: row
            .get::<_, Option<i64>>(29)?
            .map(ts_from_sql)
            .transpose()?,
    })
}

/// The attempts of one run, in the order they were recorded.
pub(crate) fn load_attempts(conn: &Connection, run: RunId) -> Result<Vec<AttemptRecord>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT number, outcome, error, ended_at FROM attempts WHERE run_id = ?1 ORDER BY seq",
    )?;
    let mut rows = stmt.query([id_to_sql(run)])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(AttemptRecord {
            number: u32_from_sql(row.get(0)?)?,
            outcome: row.get(1)?,
            error: row.get(2)?,
            ended_at: ts_from_sql(row.get(3)?)?,
        });
    }
    Ok(out)
}

/// One run with its attempts.
pub(crate) fn load_run(conn: &Connection, run: RunId) -> Result<Option<RunRecord>, DbError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))?;
    let mut rows = stmt.query([id_to_sql(run)])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let mut record = decode_run(row)?;
    record.attempts = load_attempts(conn, run)?;
    Ok(Some(record))
}

/// Runs selected by `sql` (which selects [`RUN_COLUMNS`]), each with its attempts.
pub(crate) fn load_runs(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<RunRecord>, DbError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(decode_run(row)?);
    }
    for record in &mut out {
        record.attempts = load_attempts(conn, record.id)?;
    }
    Ok(out)
}

/// Writes a whole record (replacing a run with the same id, attempts included).
pub(crate) fn store_run(conn: &Connection, r: &RunRecord) -> Result<(), DbError> {
    let id = id_to_sql(r.id);
    // Replace by delete + insert rather than `INSERT OR REPLACE`, which would make SQLite open
    // a statement journal on every insert; an existing id is the rare case.
    if conn
        .prepare_cached("SELECT 1 FROM runs WHERE id = ?1")?
        .exists([id])?
    {
        conn.prepare_cached("DELETE FROM runs WHERE id = ?1")?
            .execute([id])?;
        conn.prepare_cached("DELETE FROM attempts WHERE run_id = ?1")?
            .execute([id])?;
    }
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO runs ({RUN_COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, \
          ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30)"
    ))?;
    stmt.execute(params![
        id,
        r.env.as_str(),
        r.task.as_str(),
        r.version,
        r.locked,
        &*r.payload,
        r.queue.as_str(),
        &*r.key,
        r.lane.as_str(),
        dur_to_sql(r.priority),
        ts_to_sql(r.run_after),
        r.ttl.map(dur_to_sql),
        r.ttl_deadline.map(ts_to_sql),
        r.idempotency_key.as_deref(),
        r.retry.attempts_max,
        r.retry.factor,
        dur_to_sql(r.retry.min),
        dur_to_sql(r.retry.max),
        r.retry.jitter,
        r.max_duration.map(dur_to_sql),
        r.attempt,
        r.status.as_str(),
        r.output.as_deref(),
        r.error.as_deref(),
        ts_to_sql(r.created_at),
        r.finished_at.map(ts_to_sql),
        r.source.as_str(),
        r.retry_of.map(id_to_sql),
        r.started_at.map(ts_to_sql),
        r.cancel_requested_at.map(ts_to_sql),
    ])?;
    for (seq, attempt) in r.attempts.iter().enumerate() {
        append_attempt_at(conn, r.id, seq as i64, attempt)?;
    }
    Ok(())
}

/// The statement of [`append_attempt`]: one statement, the next `seq` is read inside the
/// INSERT (no separate SELECT round trip). A scalar subquery in VALUES, not `INSERT … SELECT …
/// FROM attempts`: a SELECT reading the table it inserts into makes SQLite copy its row into a
/// temporary table first (an ephemeral B-tree opened and closed per row).
pub(crate) const APPEND_ATTEMPT: &str =
    "INSERT INTO attempts (run_id, seq, number, outcome, error, ended_at) \
     VALUES (?1, (SELECT coalesce(max(seq) + 1, 0) FROM attempts WHERE run_id = ?1), \
     ?2, ?3, ?4, ?5)";

/// Appends an attempt after the run's last recorded one.
pub(crate) fn append_attempt(
    conn: &Connection,
    run: RunId,
    attempt: &AttemptRecord,
) -> Result<(), DbError> {
    let mut stmt = conn.prepare_cached(APPEND_ATTEMPT)?;
    append_attempt_with(&mut stmt, run, attempt)
}

/// [`append_attempt`] with its statement already prepared (callers appending many at once).
pub(crate) fn append_attempt_with(
    stmt: &mut Statement<'_>,
    run: RunId,
    attempt: &AttemptRecord,
) -> Result<(), DbError> {
    stmt.execute(params![
        id_to_sql(run),
        attempt.number,
        attempt.outcome,
        attempt.error.as_deref(),
        ts_to_sql(attempt.ended_at),
    ])?;
    Ok(())
}

fn append_attempt_at(
    conn: &Connection,
    run: RunId,
    seq: i64,
    a: &AttemptRecord,
) -> Result<(), DbError> {
    conn.prepare_cached(
        "INSERT INTO attempts (run_id, seq, number, outcome, error, ended_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        id_to_sql(run),
        seq,
        a.number,
        a.outcome,
        a.error.as_deref(),
        ts_to_sql(a.ended_at),
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_sixteen_bytes_in_time_order() {
        let a = RunId(1 << 80);
        let b = RunId((2 << 80) | 1);
        assert!(id_to_sql(a) < id_to_sql(b), "byte order is id order");
        assert_eq!(id_from_sql(&id_to_sql(b)).ok(), Some(b));
        assert!(id_from_sql(&[1, 2, 3]).is_err());
    }
}
