//! Shared by the store's integration tests: the server URL, a fresh schema per test (named
//! with the pid and a counter, dropped at the end; leftovers of dead pids dropped at the next
//! run), and record builders.
#![allow(dead_code)] // each test binary uses its own subset

use std::sync::atomic::{AtomicU64, Ordering};

use runlane_core::backend::RunRecord;
use runlane_core::{EnvName, RunId, TaskName, Timestamp};
use runlane_postgres::{admin, PostgresConfig, PostgresStore};

/// The server the tests use (`RUNLANE_DATABASE_URL`, default the local trust-auth server).
pub fn url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

static NEXT: AtomicU64 = AtomicU64::new(0);
static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// The prefix of every schema these tests create.
pub const PREFIX: &str = "rlt_store_";

/// A schema name no other test (of this or another process) uses.
pub fn fresh_schema() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}_{n}", std::process::id())
}

/// Drops schemas left by test processes that are gone (once per process).
pub async fn sweep_dead() {
    SWEPT
        .get_or_init(|| async {
            let Ok(names) = admin::schemas(&url(), PREFIX).await else {
                return;
            };
            for name in names {
                let pid = name[PREFIX.len()..].split('_').next().unwrap_or("");
                let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
                if !alive {
                    let _ = admin::drop_schema(&url(), &name).await;
                }
            }
        })
        .await;
}

/// A config on a fresh schema.
pub fn config() -> PostgresConfig {
    let mut c = PostgresConfig::new(url());
    c.schema = fresh_schema();
    c
}

/// Opens a store; the server must be there (these tests never skip).
pub async fn open(config: PostgresConfig) -> PostgresStore {
    sweep_dead().await;
    match PostgresStore::open(config).await {
        Ok(store) => store,
        Err(e) => panic!("postgresql is required for these tests (RUNLANE_DATABASE_URL): {e}"),
    }
}

/// Drops the store's schema (the end of a test).
pub async fn finish(store: PostgresStore) {
    let schema = store.schema().to_string();
    drop(store);
    admin::drop_schema(&url(), &schema)
        .await
        .expect("drop the test schema");
}

/// A queued run `n` of env `prod`, task `email`.
pub fn record(n: u128) -> RunRecord {
    RunRecord::queued(
        RunId((1_000u128 << 80) | n),
        EnvName::new("prod").expect("env"),
        TaskName::new("email").expect("task"),
        r#"{"to": "a@example.com"}"#,
        Timestamp(1_000),
    )
}

/// Inserts runs `0..n` (see [`record`]) in one call at instant 1 and returns them.
pub async fn insert_records(store: &PostgresStore, n: u128) -> Vec<RunRecord> {
    use runlane_core::backend::RunStore;
    let runs: Vec<_> = (0..n).map(record).collect();
    store
        .insert(
            runs.iter().map(|r| (r.clone(), None)).collect(),
            Timestamp(1),
        )
        .await
        .expect("insert");
    runs
}

/// Installs a row trigger (test only) on the schema's `runs` table that records every insert
/// and update in `row_writes (op, id)`, and returns a connection to read it with.
pub async fn count_row_writes(schema: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&url()).await.expect("connect");
    let s = schema;
    let ddl = format!(
        "CREATE TABLE \"{s}\".row_writes (op text NOT NULL, id bytea NOT NULL); \
         CREATE FUNCTION \"{s}\".count_row_write() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO \"{s}\".row_writes VALUES (TG_OP, NEW.id); RETURN NEW; END $$; \
         CREATE TRIGGER count_row_writes AFTER INSERT OR UPDATE ON \"{s}\".runs \
         FOR EACH ROW EXECUTE FUNCTION \"{s}\".count_row_write();"
    );
    sqlx::Executor::execute(&mut conn, ddl.as_str())
        .await
        .expect("install the counting trigger");
    conn
}

/// Waits (bounded, 10 s) until `cond` holds on the store's stats.
pub async fn until(
    store: &PostgresStore,
    what: &str,
    cond: impl Fn(&runlane_postgres::PostgresStats) -> bool,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond(&store.stats()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            store.stats()
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// A second, small store on `config`'s schema (another process): it reads the rows
/// themselves, not the kept starts of the store under test.
pub async fn reader(config: &PostgresConfig) -> PostgresStore {
    let mut config = config.clone();
    config.writers = 1;
    config.pool_size = 2;
    PostgresStore::open(config).await.expect("second store")
}
