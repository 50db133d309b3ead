//! The conformance suite on `MemoryQueue` + `PostgresStore` (strict durability): the same
//! scenarios as every backend, unchanged. Each scenario gets its own schema, named with the
//! pid and a counter and dropped when its store is dropped; schemas left by test processes
//! that died are dropped at the next run. PostgreSQL is required (`RUNLANE_DATABASE_URL`,
//! default the local server): a missing server fails the tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use runlane::core::backend::forward::{Forward, StoreHook};
use runlane::core::backend::{QueueBackend, RunStore};
use runlane::{PostgresConfig, PostgresStore};
use runlane_memory::{MemoryConfig, MemoryQueue};

const PREFIX: &str = "rlt_conf_";

fn url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

static NEXT: AtomicU64 = AtomicU64::new(0);
static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Drops schemas of test processes that are gone.
async fn sweep_dead() {
    SWEPT
        .get_or_init(|| async {
            let Ok(names) = runlane_postgres::admin::schemas(&url(), PREFIX).await else {
                return;
            };
            for name in names {
                let pid = name[PREFIX.len()..].split('_').next().unwrap_or("");
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = runlane_postgres::admin::drop_schema(&url(), &name).await;
                }
            }
        })
        .await;
}

/// The hook of one scenario's store: dropping the store drops its schema (after the store
/// itself, which `Forward` drops first).
struct Scoped {
    schema: String,
}

impl StoreHook for Scoped {}

impl Drop for Scoped {
    fn drop(&mut self) {
        let schema = std::mem::take(&mut self.schema);
        // Drop runs outside any runtime context (it may run while a runtime shuts down), so
        // the schema is dropped from a thread with its own small runtime.
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let _ = rt.block_on(runlane_postgres::admin::drop_schema(&url(), &schema));
        });
        let _ = dropper.join();
    }
}

/// A fresh schema per scenario.
struct Postgres;

#[async_trait]
impl runlane_conformance::Backends for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn open(&self) -> (Arc<dyn QueueBackend>, Arc<dyn RunStore>) {
        sweep_dead().await;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut config = PostgresConfig::new(url());
        config.schema = format!("{PREFIX}{}_{n}", std::process::id());
        config.pool_size = 4;
        config.writers = 1;
        let store = match PostgresStore::open(config).await {
            Ok(store) => store,
            Err(e) => panic!("postgresql is required (RUNLANE_DATABASE_URL): {e}"),
        };
        let schema = store.schema().to_string();
        (
            Arc::new(MemoryQueue::new(MemoryConfig::default())),
            Arc::new(Forward::new(Arc::new(store), Scoped { schema })),
        )
    }
}

runlane_conformance::conformance_suite!(Postgres);
