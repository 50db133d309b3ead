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
     cancel_requested_at, end_outcome, end_at";

use runlane_core::columns::{dur_from_sql, name_from_sql as name, source_from_sql};
pub(crate) use runlane_core::columns::{
    dur_to_sql, id_from_sql, status_from_sql, ts_from_sql, ts_to_sql, u32_from_sql,
};

/// A run id as stored: 16 big-endian bytes.
pub(crate) fn id_to_sql(id: RunId) -> [u8; 16] {
    id.to_bytes()
}

/// Reads one `runs` row selected with [`RUN_COLUMNS`]. Its `attempts` hold only the attempt
/// its terminal write ended (kept in the row, see [`ended_attempt`]); the earlier ones are rows
/// of `attempts`, put in front by [`with_attempts`].
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
    let attempt = u32_from_sql(row.get(20)?)?;
    let error: Option<String> = row.get(23)?;
    let end_outcome: Option<String> = row.get(30)?;
    let end_at: Option<i64> = row.get(31)?;
    let attempts = match (end_outcome, end_at) {
        (Some(outcome), Some(ended_at)) => vec![AttemptRecord {
            number: attempt,
            outcome,
            error: error.clone(),
            ended_at: ts_from_sql(ended_at)?,
        }],
        (None, None) => Vec::new(),
        _ => {
            return Err(DbError::Corrupt(
                "a run row has only one of end_outcome and end_at".into(),
            ))
        }
    };
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
        attempt,
        status: status_from_sql(&status)?,
        output: output.map(Arc::from),
        error,
        attempts,
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

/// Puts the attempts recorded as rows of `attempts` before the one the run's row keeps (a
/// terminal write is the last write of a run, so its attempt is the last).
fn with_attempts(conn: &Connection, record: &mut RunRecord) -> Result<(), DbError> {
    let mut attempts = load_attempts(conn, record.id)?;
    attempts.append(&mut record.attempts);
    record.attempts = attempts;
    Ok(())
}

/// The columns a terminal write sets for the attempt it ends: `end_outcome`, `end_at` (its
/// number and error are the row's `attempt` and `error`).
pub(crate) fn ended_attempt(attempt: Option<&AttemptRecord>) -> (Option<&str>, Option<i64>) {
    match attempt {
        Some(a) => (Some(a.outcome.as_str()), Some(ts_to_sql(a.ended_at))),
        None => (None, None),
    }
}

/// One run with its attempts.
pub(crate) fn load_run(conn: &Connection, run: RunId) -> Result<Option<RunRecord>, DbError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))?;
    let mut rows = stmt.query([id_to_sql(run)])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let mut record = decode_run(row)?;
    with_attempts(conn, &mut record)?;
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
        with_attempts(conn, record)?;
    }
    Ok(out)
}

/// Writes a whole record (replacing a run with the same id, attempts included). Every attempt
/// goes to `attempts`, the row keeps none (reading it back gives the same list).
pub(crate) fn store_run(conn: &Connection, r: &RunRecord) -> Result<(), DbError> {
    let id = id_to_sql(r.id);
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO runs ({RUN_COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, \
          ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, NULL, NULL)"
    ))?;
    let mut insert = || {
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
        ])
    };
    // Insert first; an existing id (the rare case) is replaced by delete + insert. Not
    // `INSERT OR REPLACE`, which makes SQLite open a statement journal on every insert, and no
    // lookup before the insert, which cost a second seek per run. A one-row INSERT checks its
    // keys before it writes anything, so a refused one leaves nothing to undo.
    match insert() {
        Ok(_) => {}
        Err(e) if is_primary_key_conflict(&e) => {
            conn.prepare_cached("DELETE FROM runs WHERE id = ?1")?
                .execute([id])?;
            conn.prepare_cached("DELETE FROM attempts WHERE run_id = ?1")?
                .execute([id])?;
            insert()?;
        }
        Err(e) => return Err(e.into()),
    }
    for (seq, attempt) in r.attempts.iter().enumerate() {
        append_attempt_at(conn, r.id, seq as i64, attempt)?;
    }
    Ok(())
}

/// Whether `e` is a refused insert of a primary key already present.
fn is_primary_key_conflict(e: &rusqlite::Error) -> bool {
    e.sqlite_error()
        .is_some_and(|f| f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// The statement of [`append_attempt`]: one statement, the next `seq` is read inside the
/// INSERT (no separate SELECT round trip). A scalar subquery in VALUES, not `INSERT … SELECT …
/// FROM attempts`: a SELECT reading the table it inserts into makes SQLite copy its row into a
/// temporary table first (an ephemeral B-tree opened and closed per row).
const APPEND_ATTEMPT: &str =
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
fn append_attempt_with(
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
