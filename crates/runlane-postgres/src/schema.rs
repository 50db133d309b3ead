//! The schema and its migrations.
//!
//! Every table lives in the store's own schema (`PostgresConfig::schema`); connections find
//! them through their `search_path`. Migrations run in one transaction under a transaction-level
//! advisory lock keyed by the schema name, so several processes may open the same schema at
//! once: the first migrates, the others wait and then find the work done. A schema stamped by a
//! newer runlane is refused before anything is written.
//!
//! Encodings: run ids are 16-byte `bytea` (big-endian, so byte order is time order); instants
//! and durations are `bigint` milliseconds (values past `i64::MAX` are stored as `i64::MAX`,
//! which reads back as "never"); payloads and outputs are JSON `text`, kept byte for byte;
//! attempts are a `jsonb` array; retry policies, env settings and version definitions are JSON
//! `text`.

use sqlx::{Connection, Executor, PgConnection};

use crate::error::PostgresError;

/// The migrations, in order: `MIGRATIONS[i]` takes schema version `i` to `i + 1`.
/// Never edit a released entry; append a new one.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: runs (attempts inline), envs, versions.
    r#"
    -- One row per run. Two row writes on the success path: the insert and the terminal update.
    CREATE TABLE runs (
        id                  bytea PRIMARY KEY,
        env                 text NOT NULL,
        task                text NOT NULL,
        version             bigint NOT NULL,
        locked              boolean NOT NULL,
        payload             text NOT NULL,
        queue               text NOT NULL,
        concurrency_key     text NOT NULL,
        lane                text NOT NULL,
        priority_ms         bigint NOT NULL,
        run_after           bigint NOT NULL,
        ttl_ms              bigint,
        ttl_deadline        bigint,
        idempotency_key     text,
        retry               text NOT NULL,
        max_duration_ms     bigint,
        attempt             bigint NOT NULL,
        status              text NOT NULL,
        output              text,
        error               text,
        attempts            jsonb NOT NULL,
        created_at          bigint NOT NULL,
        finished_at         bigint,
        started_at          bigint,
        source              text NOT NULL,
        retry_of            bytea,
        -- The idempotency key this run holds (scope env, task), until claim_expires_at. A key
        -- that expired is cleared when another run takes it.
        claim_key           text,
        claim_expires_at    bigint,
        -- SPEC §7 store first, queue second: 'pending_enqueue' until the queue has the run.
        dispatch_state      text NOT NULL,
        dispatch_since      bigint NOT NULL
    );
    -- Concurrent triggers with one key yield exactly one run: the second insert conflicts here.
    CREATE UNIQUE INDEX runs_claim ON runs (env, task, claim_key) WHERE claim_key IS NOT NULL;
    -- Listing one env (optionally by status) in id order.
    CREATE INDEX runs_by_env ON runs (env, id);
    CREATE INDEX runs_by_env_status ON runs (env, status, id);
    -- Recovery at start: only unfinished runs are in it.
    CREATE INDEX runs_unfinished ON runs (id)
        WHERE status IN ('delayed', 'queued', 'ready', 'executing');
    -- Retention: finished runs per status by finish time.
    CREATE INDEX runs_finished ON runs (status, finished_at) WHERE finished_at IS NOT NULL;
    -- The reconciler: rows that may have missed their enqueue, oldest first.
    CREATE INDEX runs_pending_enqueue ON runs (dispatch_since, id)
        WHERE dispatch_state = 'pending_enqueue';

    CREATE TABLE envs (
        name        text PRIMARY KEY,
        settings    text NOT NULL
    );
    -- Versions are numbered 1, 2, ... per env; 0 is the implicit empty version (never stored).
    CREATE TABLE versions (
        env         text NOT NULL,
        number      bigint NOT NULL,
        definition  text NOT NULL,
        created_at  bigint NOT NULL,
        PRIMARY KEY (env, number)
    );
    -- The last version number handed out per env (an upsert makes numbering atomic).
    CREATE TABLE version_counters (
        env         text PRIMARY KEY,
        last        bigint NOT NULL
    );
    CREATE TABLE current_versions (
        env         text PRIMARY KEY,
        version     bigint NOT NULL
    );
    "#,
    // 2: schedule cursors.
    r#"
    -- The last tick fired of each schedule (a task's `schedules[schedule_index]`); advanced
    -- by compare-and-set so that two processes never both move it.
    CREATE TABLE schedule_cursors (
        env             text NOT NULL,
        task            text NOT NULL,
        schedule_index  bigint NOT NULL,
        last_tick       bigint NOT NULL,
        PRIMARY KEY (env, task, schedule_index)
    );
    "#,
    // 3: a requested cancel is kept with the run, so it outlives a process and a lost Redis
    // (issue 5).
    r#"
    ALTER TABLE runs ADD COLUMN cancel_requested_at bigint;
    "#,
    // 4: admin queue settings outlive a lost Redis (issue 4).
    r#"
    -- A queue's settings as an admin set them at runtime (limit, key_total_limit,
    -- max_queued, paused; JSON), put back into Redis at open and by a rebuild.
    CREATE TABLE queue_settings (
        env         text NOT NULL,
        queue       text NOT NULL,
        settings    text NOT NULL,
        PRIMARY KEY (env, queue)
    );
    "#,
    // 5: the reconciler's sweep of waiting runs past their TTL (issue 5).
    r#"
    -- Waiting runs with a TTL by deadline: a run whose expiry was reported to a process that
    -- died before recording it is found here once its deadline is past, and enqueued again.
    -- Runs without a TTL never enter it, and a run leaves it when it finishes.
    CREATE INDEX runs_ttl_waiting ON runs (ttl_deadline, id)
        WHERE ttl_deadline IS NOT NULL AND status IN ('delayed', 'queued', 'ready', 'executing');
    "#,
    // 6: a refused trigger's run stays when its key answered another trigger (issue 5).
    r#"
    -- Idempotency hits this run answered (a trigger with its key, in any process, was handed
    -- this run). A trigger whose enqueue was refused removes its run only while this is 0:
    -- else the run stays, for the trigger it was handed to.
    ALTER TABLE runs ADD COLUMN key_hits integer NOT NULL DEFAULT 0;
    "#,
    // 7: the reconciler's sweep of cancels whose requesting process may have died (issue 5).
    r#"
    -- Unfinished runs whose cancel was requested, by request time: few, and only for the
    -- moments between a request and the run's end.
    CREATE INDEX runs_cancel_requested ON runs (cancel_requested_at, id)
        WHERE cancel_requested_at IS NOT NULL
        AND status IN ('delayed', 'queued', 'ready', 'executing');
    "#,
    // 8: one index entry less per run row written (insert, mark, terminal write).
    r#"
    -- An env's runs in id order, any status, are the runs of each status in id order from
    -- `runs_by_env_status`, merged (`list`).
    DROP INDEX runs_by_env;
    "#,
];

/// The schema version this build writes.
pub fn schema_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// The advisory lock key of migrating `schema` (one per schema, stable across builds).
fn lock_key(schema: &str) -> i64 {
    // FNV-1a: stable, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"runlane.migrate.".iter().chain(schema.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// Creates the schema if needed and applies the missing migrations, in one transaction under
/// the schema's advisory lock. Refuses a schema stamped by a newer build.
pub(crate) async fn migrate(
    conn: &mut PgConnection,
    schema: &str,
    address: &str,
) -> Result<(), PostgresError> {
    let pg = |source| PostgresError::Postgres {
        address: address.to_string(),
        schema: schema.to_string(),
        source,
    };
    let mut tx = conn.begin().await.map_err(pg)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key(schema))
        .execute(&mut *tx)
        .await
        .map_err(pg)?;
    // The name was validated as a plain identifier; quoting keeps it exact anyway.
    let create = format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; \
         CREATE TABLE IF NOT EXISTS \"{schema}\".runlane_schema (version integer NOT NULL); \
         INSERT INTO \"{schema}\".runlane_schema (version) \
            SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM \"{schema}\".runlane_schema);"
    );
    Executor::execute(&mut *tx, create.as_str())
        .await
        .map_err(pg)?;
    let found: i32 = sqlx::query_scalar(&format!(
        "SELECT max(version) FROM \"{schema}\".runlane_schema"
    ))
    .fetch_one(&mut *tx)
    .await
    .map_err(pg)?;
    let found = u32::try_from(found).unwrap_or(0);
    if found > schema_version() {
        return Err(PostgresError::SchemaTooNew {
            schema: schema.to_string(),
            found,
            supported: schema_version(),
        });
    }
    if found < schema_version() {
        let path = format!("SET LOCAL search_path TO \"{schema}\"");
        Executor::execute(&mut *tx, path.as_str())
            .await
            .map_err(pg)?;
        for sql in &MIGRATIONS[found as usize..] {
            Executor::execute(&mut *tx, *sql).await.map_err(pg)?;
        }
        sqlx::query(&format!(
            "UPDATE \"{schema}\".runlane_schema SET version = $1"
        ))
        .bind(schema_version() as i32)
        .execute(&mut *tx)
        .await
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_per_schema_and_are_stable() {
        assert_ne!(lock_key("a"), lock_key("b"));
        assert_eq!(lock_key("runlane"), lock_key("runlane"));
    }
}
