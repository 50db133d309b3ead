//! Reads: a small pool of read connections used from tokio's blocking pool, and the read
//! queries of the run store.
//!
//! In WAL mode readers never wait for the writer, so reads do not queue behind the writer
//! thread. Each read runs in its own read transaction: a run row and its attempts come from
//! the same snapshot even while the writer commits.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use runlane_core::backend::{RunFilter, RunRecord, ScheduleCursor, VersionInfo};
use runlane_core::{
    EnvName, EnvSettings, QueueName, QueueSettings, RunStatus, StoreError, TaskName, Timestamp,
    VersionDef,
};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::Semaphore;

use crate::error::{DbError, SqliteError};
use crate::record::{id_to_sql, load_runs, ts_from_sql, ts_to_sql, u32_from_sql, RUN_COLUMNS};

/// The default page size of a listing, and its cap (as in the memory store).
const LIST_LIMIT_DEFAULT: u32 = 100;
const LIST_LIMIT_MAX: u32 = 1000;

type Conns = Arc<Mutex<Vec<Connection>>>;

/// A fixed set of read connections; a semaphore hands them out, so no more reads run at once
/// than there are connections.
pub(crate) struct ReadPool {
    conns: Conns,
    permits: Arc<Semaphore>,
}

fn lock(conns: &Conns) -> MutexGuard<'_, Vec<Connection>> {
    // A read that panicked left the vector intact (the guard below returns its connection).
    conns.lock().unwrap_or_else(|e| e.into_inner())
}

/// Puts a connection back into the pool when the read ends, even by unwinding.
struct Lent<'a> {
    conn: Option<Connection>,
    pool: &'a Conns,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            lock(self.pool).push(conn);
        }
    }
}

impl ReadPool {
    /// Opens `n` read connections on `path`.
    pub(crate) fn open(
        path: &Path,
        n: usize,
        configure: impl Fn(&Connection) -> rusqlite::Result<()>,
    ) -> Result<ReadPool, SqliteError> {
        let sqlite = |source| SqliteError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = Connection::open(path).map_err(sqlite)?;
            configure(&conn).map_err(sqlite)?;
            // A read connection never writes, whatever a bug asks of it.
            conn.pragma_update(None, "query_only", true)
                .map_err(sqlite)?;
            conns.push(conn);
        }
        Ok(ReadPool {
            conns: Arc::new(Mutex::new(conns)),
            permits: Arc::new(Semaphore::new(n)),
        })
    }

    /// Runs `read` on a pooled connection inside one read transaction.
    pub(crate) async fn run<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("sqlite read pool closed".into()))?;
        let conns = self.conns.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let lent = Lent {
                conn: lock(&conns).pop(),
                pool: &conns,
            };
            let Some(conn) = lent.conn.as_ref() else {
                // Permits equal connections, so a permit always finds one.
                debug_assert!(false, "read permit without a connection");
                return Err(StoreError::Unavailable("no sqlite read connection".into()));
            };
            let tx = conn.unchecked_transaction().map_err(DbError::from)?;
            let value = read(&tx)?;
            // Ending a read transaction cannot lose anything; a failure only means SQLite
            // ended it itself.
            let _ = tx.finish();
            Ok(value)
        });
        match task.await {
            Ok(result) => result,
            Err(e) => Err(StoreError::Unavailable(format!("sqlite read failed: {e}"))),
        }
    }
}

/// Runs matching the filter, in id order.
///
/// One env across every status (no status asked) is one arm per status of
/// `runs_by_env_status`, merged in id order by SQLite (`UNION ALL … ORDER BY id LIMIT`, read
/// lazily: about `limit` rows in all, no sort). An index on env alone served it before; it
/// cost every trigger one more B-tree insert (schema v6 dropped it).
pub(crate) fn list(conn: &Connection, filter: &RunFilter) -> Result<Vec<RunRecord>, DbError> {
    // Every condition but the status, each with its value.
    let mut rest = String::new();
    let mut args: Vec<Value> = Vec::new();
    let mut clause = |sql_part: &str, value: Value| {
        rest.push_str(sql_part);
        args.push(value);
    };
    if let Some(env) = &filter.env {
        clause(" AND env = ?", Value::Text(env.to_string()));
    }
    if let Some(task) = &filter.task {
        clause(" AND task = ?", Value::Text(task.to_string()));
    }
    if let Some(queue) = &filter.queue {
        clause(" AND queue = ?", Value::Text(queue.to_string()));
    }
    if let Some(lane) = &filter.lane {
        clause(" AND lane = ?", Value::Text(lane.to_string()));
    }
    if let Some(source) = filter.source {
        clause(" AND source = ?", Value::Text(source.as_str().into()));
    }
    if let Some(version) = filter.version {
        clause(" AND version = ?", Value::Integer(version.into()));
    }
    if let Some(from) = filter.created_from {
        clause(" AND created_at >= ?", Value::Integer(ts_to_sql(from)));
    }
    if let Some(to) = filter.created_to {
        clause(" AND created_at < ?", Value::Integer(ts_to_sql(to)));
    }
    if let Some(after) = filter.after {
        clause(" AND id > ?", Value::Blob(id_to_sql(after).to_vec()));
    }
    let limit = filter
        .limit
        .unwrap_or(LIST_LIMIT_DEFAULT)
        .min(LIST_LIMIT_MAX);
    let arm = |status: Option<RunStatus>| match status {
        // Statuses are this crate's own words, never caller input.
        Some(status) => format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE status = '{}'{rest}",
            status.as_str()
        ),
        None => format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1{rest}"),
    };
    let (sql, arms) = match (filter.status, &filter.env) {
        (None, Some(_)) => {
            let arms: Vec<String> = RunStatus::ALL.into_iter().map(|s| arm(Some(s))).collect();
            (arms.join(" UNION ALL "), arms.len())
        }
        (status, _) => (arm(status), 1),
    };
    let sql = format!("{sql} ORDER BY id LIMIT ?");
    let mut all: Vec<Value> = Vec::with_capacity(args.len() * arms + 1);
    for _ in 0..arms {
        all.extend(args.iter().cloned());
    }
    all.push(Value::Integer(limit.into()));
    load_runs(conn, &sql, rusqlite::params_from_iter(all))
}

/// Every run not yet terminal, in id order.
///
/// Found through `runs_by_env_status`: the envs that have runs are walked one index seek
/// each (the next env name after the last), and each env's waiting and executing runs are one
/// range per status, so the cost follows the unfinished runs and the envs, not the finished
/// runs kept. (No index of its own: keeping one cost every trigger an insert and every
/// terminal write a delete.)
pub(crate) fn unfinished(conn: &Connection) -> Result<Vec<RunRecord>, DbError> {
    let mut next_env =
        conn.prepare_cached("SELECT env FROM runs WHERE env > ?1 ORDER BY env LIMIT 1")?;
    let by_status =
        format!("SELECT {RUN_COLUMNS} FROM runs WHERE env = ?1 AND status = ?2 ORDER BY id");
    let mut out = Vec::new();
    let mut env = String::new();
    while let Some(found) = next_env
        .query_row([&env], |r| r.get::<_, String>(0))
        .optional()?
    {
        for status in RunStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
            out.extend(load_runs(
                conn,
                &by_status,
                params![found, status.as_str()],
            )?);
        }
        env = found;
    }
    out.sort_unstable_by_key(|r| r.id);
    Ok(out)
}

/// Every env with its settings, by name.
pub(crate) fn envs(conn: &Connection) -> Result<Vec<(EnvName, EnvSettings)>, DbError> {
    let mut stmt = conn.prepare_cached("SELECT name, settings FROM envs ORDER BY name")?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let name: String = row.get(0)?;
        let settings: String = row.get(1)?;
        let name = EnvName::new(&name).map_err(|e| DbError::Corrupt(e.to_string()))?;
        let settings = serde_json::from_str(&settings)
            .map_err(|e| DbError::Corrupt(format!("settings of env {name}: {e}")))?;
        out.push((name, settings));
    }
    Ok(out)
}

/// Every queue's admin settings, by env and queue.
pub(crate) fn queue_settings_all(
    conn: &Connection,
) -> Result<Vec<(EnvName, QueueName, QueueSettings)>, DbError> {
    let mut stmt =
        conn.prepare_cached("SELECT env, queue, settings FROM queue_settings ORDER BY env, queue")?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let env: String = row.get(0)?;
        let queue: String = row.get(1)?;
        let settings: String = row.get(2)?;
        let env = EnvName::new(&env).map_err(|e| DbError::Corrupt(e.to_string()))?;
        let queue = QueueName::new(&queue).map_err(|e| DbError::Corrupt(e.to_string()))?;
        let settings = serde_json::from_str(&settings)
            .map_err(|e| DbError::Corrupt(format!("settings of queue {env}/{queue}: {e}")))?;
        out.push((env, queue, settings));
    }
    Ok(out)
}

/// The schedule cursors of an env.
pub(crate) fn schedule_cursors(
    conn: &Connection,
    env: &EnvName,
) -> Result<Vec<ScheduleCursor>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT task, schedule_index, last_tick FROM schedule_cursors WHERE env = ?1",
    )?;
    let mut rows = stmt.query([env.as_str()])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let task: String = row.get(0)?;
        out.push(ScheduleCursor {
            task: TaskName::new(&task).map_err(|e| DbError::Corrupt(e.to_string()))?,
            index: u32_from_sql(row.get(1)?)?,
            last_tick: ts_from_sql(row.get(2)?)?,
        });
    }
    Ok(out)
}

/// A version's definition (0 is always the empty version).
pub(crate) fn version(
    conn: &Connection,
    env: &EnvName,
    version: u32,
) -> Result<Option<VersionDef>, DbError> {
    if version == 0 {
        return Ok(Some(VersionDef::default()));
    }
    let json: Option<String> = conn
        .prepare_cached("SELECT definition FROM versions WHERE env = ?1 AND number = ?2")?
        .query_row(params![env.as_str(), version], |r| r.get(0))
        .optional()?;
    json.map(|json| {
        serde_json::from_str(&json)
            .map_err(|e| DbError::Corrupt(format!("version {version} of env {env}: {e}")))
    })
    .transpose()
}

/// Every registered version of `env` with its creation time, by number.
pub(crate) fn versions(conn: &Connection, env: &EnvName) -> Result<Vec<VersionInfo>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT number, definition, created_at FROM versions WHERE env = ?1 ORDER BY number",
    )?;
    let mut rows = stmt.query([env.as_str()])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let number = u32_from_sql(row.get(0)?)?;
        let json: String = row.get(1)?;
        let def = serde_json::from_str(&json)
            .map_err(|e| DbError::Corrupt(format!("version {number} of env {env}: {e}")))?;
        out.push(VersionInfo {
            number,
            created_at: Some(ts_from_sql(row.get(2)?)?),
            def,
        });
    }
    Ok(out)
}

/// The current version (0 before any promotion).
pub(crate) fn current_version(conn: &Connection, env: &EnvName) -> Result<u32, DbError> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT version FROM current_versions WHERE env = ?1")?
        .query_row([env.as_str()], |r| r.get(0))
        .optional()?;
    Ok(v.map(u32_from_sql).transpose()?.unwrap_or(0))
}

/// The earliest finish time of each terminal status that has finished runs.
pub(crate) fn earliest_finished(conn: &Connection) -> Result<Vec<(RunStatus, Timestamp)>, DbError> {
    let mut out = Vec::new();
    for status in RunStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
        // One seek per status in the `runs_finished` index.
        let min: Option<i64> = conn
            .prepare_cached(
                "SELECT min(finished_at) FROM runs WHERE status = ?1 AND finished_at IS NOT NULL",
            )?
            .query_row([status.as_str()], |r| r.get(0))?;
        if let Some(min) = min {
            out.push((status, ts_from_sql(min)?));
        }
    }
    Ok(out)
}

/// The database's size and run counts.
pub(crate) fn size(conn: &Connection) -> Result<crate::StoreSize, DbError> {
    let pragma = |name: &str| -> Result<u64, DbError> {
        let v: i64 = conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))?;
        Ok(u64::try_from(v).unwrap_or(0))
    };
    let page_size = pragma("page_size")?;
    let page_count = pragma("page_count")?;
    let freelist = pragma("freelist_count")?;
    let count = |sql: &str| -> Result<u64, DbError> {
        let v: i64 = conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?;
        Ok(u64::try_from(v).unwrap_or(0))
    };
    Ok(crate::StoreSize {
        bytes: page_size * page_count,
        free_bytes: page_size * freelist,
        runs: count("SELECT count(*) FROM runs")?,
        finished_runs: count("SELECT count(*) FROM runs WHERE finished_at IS NOT NULL")?,
    })
}
