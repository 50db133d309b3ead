//! The database's identity and schema: the application id that marks a file as ours, the
//! ordered migrations, and the checks run at open before anything is written.
//!
//! A file is only ever written once it is known to be ours or empty: the magic header is read
//! with plain file I/O, then SQLite is asked (read-only statements only) for the application id,
//! the schema version (`PRAGMA user_version`) and whether any table exists. Only then are WAL
//! mode and the migrations applied, all migrations in one transaction.
//!
//! Encodings: run ids are 16-byte BLOBs (big-endian, so byte order is time order); instants and
//! durations are INTEGER milliseconds (values past `i64::MAX` ms are stored as `i64::MAX`, which
//! reads back as "never", `u64::MAX`); statuses, sources and names are TEXT; payloads and outputs
//! are JSON TEXT; env settings and version definitions are JSON TEXT.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use rusqlite::Connection;

use crate::error::SqliteError;

/// The `PRAGMA application_id` of a runlane database: `RLAN` in ASCII.
pub const APPLICATION_ID: u32 = 0x524C_414E;

/// The migrations, in order: `MIGRATIONS[i]` takes schema version `i` to `i + 1`.
/// Never edit a released entry; append a new one.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: runs, attempts, idempotency keys, envs, versions.
    r#"
    -- One row per run. WITHOUT ROWID clusters the table by run id, so listing in id order is a
    -- range scan and no second copy of the 16-byte id is kept for a rowid index.
    CREATE TABLE runs (
        id                  BLOB PRIMARY KEY NOT NULL,
        env                 TEXT NOT NULL,
        task                TEXT NOT NULL,
        version             INTEGER NOT NULL,
        locked              INTEGER NOT NULL,
        payload             TEXT NOT NULL,
        queue               TEXT NOT NULL,
        concurrency_key     TEXT NOT NULL,
        lane                TEXT NOT NULL,
        priority_ms         INTEGER NOT NULL,
        run_after           INTEGER NOT NULL,
        ttl_ms              INTEGER,
        ttl_deadline        INTEGER,
        idempotency_key     TEXT,
        retry_attempts_max  INTEGER NOT NULL,
        retry_factor        REAL NOT NULL,
        retry_min_ms        INTEGER NOT NULL,
        retry_max_ms        INTEGER NOT NULL,
        retry_jitter        REAL NOT NULL,
        max_duration_ms     INTEGER,
        attempt             INTEGER NOT NULL,
        status              TEXT NOT NULL,
        output              TEXT,
        error               TEXT,
        created_at          INTEGER NOT NULL,
        finished_at         INTEGER,
        started_at          INTEGER,
        source              TEXT NOT NULL,
        retry_of            BLOB
    ) WITHOUT ROWID;

    -- Listing one env in id order (= trigger-time order; an index of a WITHOUT ROWID table
    -- ends with the primary key). Creation-time ranges are filtered along this order.
    CREATE INDEX runs_by_env ON runs (env);
    -- Listing one env by status in id order.
    CREATE INDEX runs_by_env_status ON runs (env, status);
    -- Recovery at start (`unfinished`): only waiting and executing runs are in it, so it stays
    -- small however many finished runs are kept. (Written with OR, not IN: SQLite evaluates an
    -- IN list through a temporary table on every write to `runs`.)
    CREATE INDEX runs_unfinished ON runs (status)
        WHERE status = 'delayed' OR status = 'queued' OR status = 'ready' OR status = 'executing';
    -- Retention: finished runs per status by finish time.
    CREATE INDEX runs_finished ON runs (status, finished_at) WHERE finished_at IS NOT NULL;

    -- Attempts that ended, in the order they were recorded (`seq`, 0-based).
    CREATE TABLE attempts (
        run_id      BLOB NOT NULL,
        seq         INTEGER NOT NULL,
        number      INTEGER NOT NULL,
        outcome     TEXT NOT NULL,
        error       TEXT,
        ended_at    INTEGER NOT NULL,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID;

    -- Idempotency keys, scope (env, task, key) (SPEC §7); a key deduplicates until expires_at.
    CREATE TABLE idempotency_keys (
        env             TEXT NOT NULL,
        task            TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        run_id          BLOB NOT NULL,
        expires_at      INTEGER NOT NULL,
        PRIMARY KEY (env, task, idempotency_key)
    ) WITHOUT ROWID;

    CREATE TABLE envs (
        name        TEXT PRIMARY KEY NOT NULL,
        settings    TEXT NOT NULL
    ) WITHOUT ROWID;

    -- Versions are numbered 1, 2, ... per env; 0 is the implicit empty version (never stored).
    CREATE TABLE versions (
        env         TEXT NOT NULL,
        number      INTEGER NOT NULL,
        definition  TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (env, number)
    ) WITHOUT ROWID;

    CREATE TABLE current_versions (
        env         TEXT PRIMARY KEY NOT NULL,
        version     INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 2: schedule cursors.
    r#"
    -- The last tick fired of each schedule (a task's `schedules[schedule_index]`); advanced
    -- by compare-and-set so that two processes never both move it.
    CREATE TABLE schedule_cursors (
        env             TEXT NOT NULL,
        task            TEXT NOT NULL,
        schedule_index  INTEGER NOT NULL,
        last_tick       INTEGER NOT NULL,
        PRIMARY KEY (env, task, schedule_index)
    ) WITHOUT ROWID;
    "#,
    // 3: a requested cancel is kept with the run, so it outlives the process (issue 5).
    r#"
    ALTER TABLE runs ADD COLUMN cancel_requested_at INTEGER;
    "#,
    // 4: cheaper terminal writes (issue 3).
    r#"
    -- Recovery finds unfinished runs through runs_by_env_status (one range per env and
    -- unfinished status), so a terminal write no longer deletes an entry of this index, nor
    -- does a trigger insert one.
    DROP INDEX runs_unfinished;
    -- The attempt a terminal write ends is kept in the run's row (its number and error are
    -- the row's `attempt` and `error`): a terminal write is one UPDATE, no attempt row. Only
    -- attempts followed by another (retries) are rows of `attempts`; a run finished before
    -- this migration has its last attempt there and NULL here.
    ALTER TABLE runs ADD COLUMN end_outcome TEXT;
    ALTER TABLE runs ADD COLUMN end_at INTEGER;
    "#,
    // 5: admin queue settings outlive the in-memory queue state (issue 4).
    r#"
    -- A queue's settings as an admin set them at runtime (limit, key_total_limit,
    -- max_queued, paused; JSON), put back into the queue backend at open.
    CREATE TABLE queue_settings (
        env         TEXT NOT NULL,
        queue       TEXT NOT NULL,
        settings    TEXT NOT NULL,
        PRIMARY KEY (env, queue)
    ) WITHOUT ROWID;
    "#,
    // 6: one index write less per trigger (issue 3).
    r#"
    -- Listing one env across statuses merges one range of runs_by_env_status per status in
    -- id order (read.rs `list`), so the index on env alone only cost every trigger an insert.
    DROP INDEX runs_by_env;
    "#,
];

/// The schema version this build writes.
pub fn schema_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// The first bytes of every SQLite database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Refuses a non-empty file that does not start with SQLite's magic header, using plain file
/// I/O so that SQLite never gets the chance to write to it.
pub(crate) fn check_header(path: &Path) -> Result<(), SqliteError> {
    let io = |source| SqliteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        // A new (or never written) database: SQLite creates the header. A WAL next to an
        // empty file holds the data of a database that crashed before its first checkpoint.
        return Ok(());
    }
    let mut head = [0u8; 16];
    let n = file.read(&mut head).map_err(io)?;
    if n < head.len() || &head != SQLITE_MAGIC {
        return Err(SqliteError::NotADatabase {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// What the probe found in the file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// An empty database: ours to create.
    Empty,
    /// A runlane database at this schema version (possibly older than [`schema_version`]).
    Ours(u32),
}

/// Identifies the database with read-only statements (they go through the WAL, so a database
/// that crashed before a checkpoint is seen as it was committed).
pub(crate) fn probe(conn: &Connection, path: &Path) -> Result<Found, SqliteError> {
    let corrupt = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => SqliteError::NotADatabase {
            path: path.to_path_buf(),
        },
        _ => SqliteError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    };
    let application_id: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(corrupt)?;
    let user_version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(corrupt)?;
    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(corrupt)?;
    // Both pragmas are 32-bit header fields; SQLite reports them signed.
    let application_id = application_id as u32;
    let user_version = user_version as u32;
    if application_id == 0 && user_version == 0 && objects == 0 {
        return Ok(Found::Empty);
    }
    if application_id != APPLICATION_ID {
        return Err(SqliteError::Foreign {
            path: path.to_path_buf(),
            application_id,
            expected: APPLICATION_ID,
        });
    }
    if user_version > schema_version() {
        return Err(SqliteError::SchemaTooNew {
            path: path.to_path_buf(),
            found: user_version,
            supported: schema_version(),
        });
    }
    Ok(Found::Ours(user_version))
}

/// Applies the missing migrations and stamps the file as ours, all in one transaction.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), SqliteError> {
    let sqlite = |source| SqliteError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sqlite)?;
    // Read again under the write lock: the probe ran outside any transaction.
    let current: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sqlite)?;
    let current = current as u32;
    if current == schema_version() {
        return Ok(());
    }
    if current > schema_version() {
        return Err(SqliteError::SchemaTooNew {
            path: path.to_path_buf(),
            found: current,
            supported: schema_version(),
        });
    }
    for sql in &MIGRATIONS[current as usize..] {
        tx.execute_batch(sql).map_err(sqlite)?;
    }
    // Header fields are written inside the transaction, so a crash leaves either the old
    // schema or the new one with its stamp, never a half-migrated file.
    tx.execute_batch(&format!(
        "PRAGMA application_id = {}; PRAGMA user_version = {};",
        APPLICATION_ID as i32,
        schema_version()
    ))
    .map_err(sqlite)?;
    tx.commit().map_err(sqlite)
}
