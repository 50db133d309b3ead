//! The conformance suite on the embedded shape (`MemoryQueue` + `SqliteStore`, durable with
//! `synchronous = FULL`): the same scenarios as every backend, unchanged.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use runlane::core::backend::{QueueBackend, RunStore};
use runlane::SqliteConfig;
use runlane_memory::{MemoryConfig, MemoryQueue};

/// A fresh database file per scenario, under cargo's per-target scratch directory.
struct Embedded;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn fresh_path() -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("conformance-embedded")
        .join(format!("{}-{n}", std::process::id()))
        .join("runs.db")
}

#[async_trait::async_trait]
impl runlane_conformance::Backends for Embedded {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn open(&self) -> (Arc<dyn QueueBackend>, Arc<dyn RunStore>) {
        let path = fresh_path();
        if let Some(dir) = path.parent() {
            // A leftover from an earlier run with the same pid would make the file foreign.
            let _ = std::fs::remove_dir_all(dir);
        }
        let store = runlane::open_sqlite(path, SqliteConfig::default())
            .await
            .expect("open the sqlite run store");
        (Arc::new(MemoryQueue::new(MemoryConfig::default())), store)
    }
}

runlane_conformance::conformance_suite!(Embedded);
