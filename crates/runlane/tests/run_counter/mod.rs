//! Shared by the distributed tests: a worker whose `job` handler counts how many times each run
//! executed, so a test can prove "exactly once".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use runlane::core::RunId;
use runlane::{HandlerError, RunContext, Worker, WorkerBuilder};
use serde_json::Value;

/// Executions per run, as counted by [`counting_worker`].
pub type Executions = Arc<Mutex<HashMap<RunId, u32>>>;

/// Starts `builder` with a `job` handler that counts each execution of each run in `executed`.
pub async fn counting_worker(builder: WorkerBuilder, executed: &Executions) -> Worker {
    let executed = executed.clone();
    builder
        .handler("job", move |ctx: RunContext| {
            let executed = executed.clone();
            async move {
                *executed
                    .lock()
                    .map_err(|_| HandlerError::new("poisoned"))?
                    .entry(ctx.run_id())
                    .or_insert(0) += 1;
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker")
}
