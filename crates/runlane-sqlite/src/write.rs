//! The write steps of the run store, each run by the writer thread inside the open batch
//! transaction (under its own savepoint). Their semantics are exactly those of
//! `runlane_memory::MemoryStore`: each reads what it needs, refuses before writing anything,
//! then writes.

use std::sync::Arc;

use runlane_core::backend::{AttemptEnd, AttemptRecord, IdempotencyClaim, Inserted, RunRecord};
use runlane_core::{
    EnvName, EnvSettings, QueueName, QueueSettings, RunId, RunStatus, StoreError, TaskName,
    Timestamp, VersionDef,
};
use rusqlite::{params, Connection, OptionalExtension};

use crate::config::Retention;
use crate::error::DbError;
use crate::record::{
    append_attempt, ended_attempt, id_from_sql, id_to_sql, load_run, status_from_sql, store_run,
    ts_from_sql, ts_to_sql,
};

/// Stores new runs; a live idempotency key answers its run instead. Each run is written before
/// the next one is looked up, so duplicates inside one call (and one batch) collapse onto the
/// first.
pub(crate) fn insert(
    conn: &Connection,
    runs: &[(RunRecord, Option<IdempotencyClaim>)],
    now: Timestamp,
) -> Result<Vec<Inserted>, DbError> {
    let mut out = Vec::with_capacity(runs.len());
    for (record, claim) in runs {
        if let Some(claim) = claim {
            let scope = params![record.env.as_str(), record.task.as_str(), claim.key];
            let held: Option<(Vec<u8>, i64)> = conn
                .prepare_cached(
                    "SELECT run_id, expires_at FROM idempotency_keys \
                     WHERE env = ?1 AND task = ?2 AND idempotency_key = ?3",
                )?
                .query_row(scope, |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((holder, expires_at)) = &held {
                // A live key whose run is gone (removed, purged) no longer deduplicates.
                if ts_from_sql(*expires_at)? > now {
                    if let Some(existing) = load_run(conn, id_from_sql(holder)?)? {
                        out.push(Inserted::Existing(Box::new(existing)));
                        continue;
                    }
                }
            }
            // Update or insert rather than `INSERT OR REPLACE`: a REPLACE makes SQLite open a
            // statement journal for every call.
            let sql = if held.is_some() {
                "UPDATE idempotency_keys SET run_id = ?4, expires_at = ?5 \
                 WHERE env = ?1 AND task = ?2 AND idempotency_key = ?3"
            } else {
                "INSERT INTO idempotency_keys (env, task, idempotency_key, run_id, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)"
            };
            conn.prepare_cached(sql)?.execute(params![
                record.env.as_str(),
                record.task.as_str(),
                claim.key,
                id_to_sql(record.id),
                ts_to_sql(claim.expires_at),
            ])?;
        }
        store_run(conn, record)?;
        out.push(Inserted::New);
    }
    Ok(out)
}

/// Deletes a run, its attempts, and its idempotency key when the key still names it.
pub(crate) fn remove(conn: &Connection, run: RunId) -> Result<(), DbError> {
    let found: Option<(String, String, Option<String>)> = conn
        .prepare_cached("SELECT env, task, idempotency_key FROM runs WHERE id = ?1")?
        .query_row([id_to_sql(run)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((env, task, key)) = found {
        delete_run(conn, run, &env, &task, key.as_deref())?;
    }
    Ok(())
}

fn delete_run(
    conn: &Connection,
    run: RunId,
    env: &str,
    task: &str,
    key: Option<&str>,
) -> Result<(), DbError> {
    let id = id_to_sql(run);
    conn.prepare_cached("DELETE FROM runs WHERE id = ?1")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM attempts WHERE run_id = ?1")?
        .execute([id])?;
    if let Some(key) = key {
        conn.prepare_cached(
            "DELETE FROM idempotency_keys \
             WHERE env = ?1 AND task = ?2 AND idempotency_key = ?3 AND run_id = ?4",
        )?
        .execute(params![env, task, key, id])?;
    }
    Ok(())
}

/// The status of a run that may still change: `NotFound` or `AlreadyFinished` otherwise.
fn live_status(conn: &Connection, run: RunId) -> Result<RunStatus, DbError> {
    let status: Option<String> = conn
        .prepare_cached("SELECT status FROM runs WHERE id = ?1")?
        .query_row([id_to_sql(run)], |r| r.get(0))
        .optional()?;
    let status = status_from_sql(&status.ok_or(StoreError::NotFound(run))?)?;
    if status.is_terminal() {
        return Err(StoreError::AlreadyFinished { run, status }.into());
    }
    Ok(status)
}

/// Checks that `run` is waiting for the end of `attempt`: `NotFound`, `AlreadyFinished`, or
/// `StaleAttempt` when the run has moved on to another attempt (a write for a lapsed lease).
fn live_attempt(conn: &Connection, run: RunId, attempt: u32) -> Result<(), DbError> {
    let row: Option<(String, u32)> = conn
        .prepare_cached("SELECT status, attempt FROM runs WHERE id = ?1")?
        .query_row([id_to_sql(run)], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (status, current) = row.ok_or(StoreError::NotFound(run))?;
    let status = status_from_sql(&status)?;
    if status.is_terminal() {
        return Err(StoreError::AlreadyFinished { run, status }.into());
    }
    if current != attempt {
        return Err(StoreError::StaleAttempt {
            run,
            attempt,
            current,
        }
        .into());
    }
    Ok(())
}

/// Records a failed attempt that will be retried, and the next `run_after`.
pub(crate) fn record_retry(
    conn: &Connection,
    run: RunId,
    attempt: &AttemptRecord,
    next_run_after: Timestamp,
) -> Result<(), DbError> {
    live_attempt(conn, run, attempt.number)?;
    let status = if next_run_after > attempt.ended_at {
        RunStatus::Delayed
    } else {
        RunStatus::Queued
    };
    conn.prepare_cached(
        "UPDATE runs SET status = ?2, error = ?3, attempt = ?4, run_after = ?5, started_at = NULL \
         WHERE id = ?1",
    )?
    .execute(params![
        id_to_sql(run),
        status.as_str(),
        attempt.error.as_deref(),
        attempt.number.saturating_add(1),
        ts_to_sql(next_run_after),
    ])?;
    append_attempt(conn, run, attempt)?;
    Ok(())
}

/// Records a requested cancel (the first request's instant stays) and answers the instant in
/// force; `NotFound` or `AlreadyFinished` otherwise, changing nothing.
pub(crate) fn request_cancel(
    conn: &Connection,
    run: RunId,
    at: Timestamp,
) -> Result<Timestamp, DbError> {
    live_status(conn, run)?;
    conn.prepare_cached(
        "UPDATE runs SET cancel_requested_at = ?2 WHERE id = ?1 AND cancel_requested_at IS NULL",
    )?
    .execute(params![id_to_sql(run), ts_to_sql(at)])?;
    let kept: Option<i64> = conn
        .prepare_cached("SELECT cancel_requested_at FROM runs WHERE id = ?1")?
        .query_row([id_to_sql(run)], |r| r.get(0))?;
    match kept {
        Some(kept) => Ok(ts_from_sql(kept)?),
        None => Err(DbError::Corrupt(format!(
            "run {run}: the cancel request was not kept"
        ))),
    }
}

/// Marks the start of `attempt` (advisory, for crash recovery); a run that moved on or
/// finished is left alone.
pub(crate) fn note_start(
    conn: &Connection,
    run: RunId,
    attempt: u32,
    at: Timestamp,
) -> Result<(), DbError> {
    conn.prepare_cached(
        "UPDATE runs SET started_at = ?3 WHERE id = ?1 AND attempt = ?2 AND finished_at IS NULL",
    )?
    .execute(params![id_to_sql(run), attempt, ts_to_sql(at)])?;
    Ok(())
}

/// Clears the start mark of `attempt` (its run was handed back without counting it); a run
/// that moved on or finished is left alone.
pub(crate) fn clear_start(conn: &Connection, run: RunId, attempt: u32) -> Result<(), DbError> {
    conn.prepare_cached(
        "UPDATE runs SET started_at = NULL WHERE id = ?1 AND attempt = ?2 AND finished_at IS NULL",
    )?
    .execute(params![id_to_sql(run), attempt])?;
    Ok(())
}

/// Many start marks (see [`note_start`]), in the order they were noted.
pub(crate) fn note_starts(
    conn: &Connection,
    marks: &[(RunId, u32, Timestamp)],
) -> Result<(), DbError> {
    for &(run, attempt, at) in marks {
        note_start(conn, run, attempt, at)?;
    }
    Ok(())
}

/// The terminal `UPDATE` of [`finish`]: the ended attempt (if any) is kept in the row.
const FINISH: &str = "UPDATE runs SET status = ?2, output = ?3, finished_at = ?4, error = ?5, \
     attempt = ?6, end_outcome = ?7, end_at = ?8 WHERE id = ?1";

/// The terminal write: the first one wins, later ones get `AlreadyFinished`.
pub(crate) fn finish(
    conn: &Connection,
    run: RunId,
    status: RunStatus,
    output: Option<&Arc<str>>,
    attempt: Option<&AttemptRecord>,
    now: Timestamp,
) -> Result<RunRecord, DbError> {
    debug_assert!(status.is_terminal(), "finish needs a terminal status");
    let mut r = load_run(conn, run)?.ok_or(StoreError::NotFound(run))?;
    if r.status.is_terminal() {
        return Err(StoreError::AlreadyFinished {
            run,
            status: r.status,
        }
        .into());
    }
    if let Some(a) = attempt {
        if a.number != r.attempt {
            return Err(StoreError::StaleAttempt {
                run,
                attempt: a.number,
                current: r.attempt,
            }
            .into());
        }
    }
    r.status = status;
    r.output = output.cloned();
    r.finished_at = Some(now);
    if let Some(a) = attempt {
        r.error = a.error.clone();
        r.attempt = a.number;
        r.attempts.push(a.clone());
    }
    // The ended attempt stays in the row (see `record::ended_attempt`), no attempt row.
    let (end_outcome, end_at) = ended_attempt(attempt);
    conn.prepare_cached(FINISH)?.execute(params![
        id_to_sql(run),
        r.status.as_str(),
        r.output.as_deref(),
        ts_to_sql(now),
        r.error.as_deref(),
        r.attempt,
        end_outcome,
        end_at,
    ])?;
    Ok(r)
}

/// Terminal writes of attempts the engine holds the leases of, without reading the runs back:
/// per run one conditional `UPDATE` (the first terminal write wins) that also keeps the ended
/// attempt in the row (no attempt row, see `record::ended_attempt`). A run the `UPDATE` did
/// not match is looked up only to name the refusal, and nothing of it is written. Answers per
/// run.
pub(crate) fn finish_many(
    conn: &Connection,
    ends: &[AttemptEnd],
    now: Timestamp,
) -> Result<Vec<Result<(), StoreError>>, DbError> {
    let mut answers = Vec::with_capacity(ends.len());
    // Each statement is taken from the cache once for the whole call, not once per run.
    let mut update = conn.prepare_cached(
        "UPDATE runs SET status = ?2, output = ?3, finished_at = ?4, error = ?5, \
         attempt = ?6, end_outcome = ?7, end_at = ?8 \
         WHERE id = ?1 AND finished_at IS NULL AND attempt = ?6",
    )?;
    for end in ends {
        debug_assert!(end.status.is_terminal(), "finish needs a terminal status");
        let a = &end.attempt;
        let (end_outcome, end_at) = ended_attempt(Some(a));
        let updated = update.execute(params![
            id_to_sql(end.run),
            end.status.as_str(),
            end.output.as_deref(),
            ts_to_sql(now),
            a.error.as_deref(),
            a.number,
            end_outcome,
            end_at,
        ])?;
        if updated == 0 {
            // Refused: find out why (nothing was written for this run).
            answers.push(match live_attempt(conn, end.run, a.number) {
                Err(DbError::Store(refusal)) => Err(refusal),
                Err(failure) => return Err(failure),
                Ok(()) => {
                    return Err(DbError::Corrupt(format!(
                        "run {} waits for attempt {} but has a finish time",
                        end.run, a.number
                    )))
                }
            });
            continue;
        }
        answers.push(Ok(()));
    }
    Ok(answers)
}

/// A new `run_after` and TTL deadline for a run that is not finished.
pub(crate) fn reschedule(
    conn: &Connection,
    run: RunId,
    run_after: Timestamp,
    ttl_deadline: Option<Timestamp>,
) -> Result<(), DbError> {
    live_status(conn, run)?;
    conn.prepare_cached("UPDATE runs SET run_after = ?2, ttl_deadline = ?3 WHERE id = ?1")?
        .execute(params![
            id_to_sql(run),
            ts_to_sql(run_after),
            ttl_deadline.map(ts_to_sql)
        ])?;
    Ok(())
}

/// Creates or replaces an env's settings.
pub(crate) fn put_env(
    conn: &Connection,
    env: &EnvName,
    settings: &EnvSettings,
) -> Result<(), DbError> {
    let json = serde_json::to_string(settings)
        .map_err(|e| DbError::Corrupt(format!("env settings do not encode: {e}")))?;
    conn.prepare_cached("INSERT OR REPLACE INTO envs (name, settings) VALUES (?1, ?2)")?
        .execute(params![env.as_str(), json])?;
    Ok(())
}

/// Creates or replaces a queue's admin settings.
pub(crate) fn put_queue_settings(
    conn: &Connection,
    env: &EnvName,
    queue: &QueueName,
    settings: &QueueSettings,
) -> Result<(), DbError> {
    let json = serde_json::to_string(settings)
        .map_err(|e| DbError::Corrupt(format!("queue settings do not encode: {e}")))?;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO queue_settings (env, queue, settings) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![env.as_str(), queue.as_str(), json])?;
    Ok(())
}

/// Inserts a new env's settings unless the env exists; answers whether it was inserted.
pub(crate) fn create_env(
    conn: &Connection,
    env: &EnvName,
    settings: &EnvSettings,
) -> Result<bool, DbError> {
    let json = serde_json::to_string(settings)
        .map_err(|e| DbError::Corrupt(format!("env settings do not encode: {e}")))?;
    let inserted = conn
        .prepare_cached("INSERT INTO envs (name, settings) VALUES (?1, ?2) ON CONFLICT DO NOTHING")?
        .execute(params![env.as_str(), json])?;
    Ok(inserted == 1)
}

/// Registers the env's next version and returns its number.
pub(crate) fn add_version(
    conn: &Connection,
    env: &EnvName,
    def: &VersionDef,
    now: Timestamp,
) -> Result<u32, DbError> {
    let json = serde_json::to_string(def)
        .map_err(|e| DbError::Corrupt(format!("version definition does not encode: {e}")))?;
    let last: i64 = conn
        .prepare_cached("SELECT coalesce(max(number), 0) FROM versions WHERE env = ?1")?
        .query_row([env.as_str()], |r| r.get(0))?;
    let number = u32::try_from(last.saturating_add(1)).unwrap_or(u32::MAX);
    conn.prepare_cached(
        "INSERT OR REPLACE INTO versions (env, number, definition, created_at) \
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![env.as_str(), number, json, ts_to_sql(now)])?;
    Ok(number)
}

/// Makes a known version current (0, the empty version, always is known).
pub(crate) fn promote(conn: &Connection, env: &EnvName, version: u32) -> Result<(), DbError> {
    let known = version == 0
        || conn
            .prepare_cached("SELECT 1 FROM versions WHERE env = ?1 AND number = ?2")?
            .exists(params![env.as_str(), version])?;
    if !known {
        return Err(StoreError::UnknownVersion {
            env: env.to_string(),
            version,
        }
        .into());
    }
    conn.prepare_cached("INSERT OR REPLACE INTO current_versions (env, version) VALUES (?1, ?2)")?
        .execute(params![env.as_str(), version])?;
    Ok(())
}

/// Moves a schedule cursor from `from` (no row) to `to`, only while it is at `from`; answers
/// whether it moved.
pub(crate) fn advance_schedule_cursor(
    conn: &Connection,
    env: &EnvName,
    task: &TaskName,
    index: u32,
    from: Option<Timestamp>,
    to: Timestamp,
) -> Result<bool, DbError> {
    let changed = match from {
        None => conn
            .prepare_cached(
                "INSERT INTO schedule_cursors (env, task, schedule_index, last_tick) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            )?
            .execute(params![env.as_str(), task.as_str(), index, ts_to_sql(to)])?,
        Some(from) => conn
            .prepare_cached(
                "UPDATE schedule_cursors SET last_tick = ?4 \
                 WHERE env = ?1 AND task = ?2 AND schedule_index = ?3 AND last_tick = ?5",
            )?
            .execute(params![
                env.as_str(),
                task.as_str(),
                index,
                ts_to_sql(to),
                ts_to_sql(from)
            ])?,
    };
    Ok(changed == 1)
}

/// Deletes at most `limit` finished runs past their retention at `now` (with their attempts and
/// idempotency keys); returns how many.
pub(crate) fn purge(
    conn: &Connection,
    retention: &Retention,
    now: Timestamp,
    limit: u32,
) -> Result<u32, DbError> {
    let mut victims: Vec<(Vec<u8>, String, String, Option<String>)> = Vec::new();
    for status in RunStatus::ALL {
        let Some(keep) = retention.keep(status) else {
            continue;
        };
        let room = limit.saturating_sub(victims.len() as u32);
        if room == 0 {
            break;
        }
        let before = now.saturating_sub(keep);
        let mut stmt = conn.prepare_cached(
            "SELECT id, env, task, idempotency_key FROM runs \
             WHERE status = ?1 AND finished_at <= ?2 LIMIT ?3",
        )?;
        let mut rows = stmt.query(params![status.as_str(), ts_to_sql(before), room])?;
        while let Some(row) = rows.next()? {
            victims.push((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?));
        }
    }
    for (id, env, task, key) in &victims {
        delete_run(conn, id_from_sql(id)?, env, task, key.as_deref())?;
    }
    Ok(victims.len() as u32)
}
