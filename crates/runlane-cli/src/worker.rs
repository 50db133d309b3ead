//! `runlane worker --exec CMD`: a generic worker over the HTTP worker protocol.
//!
//! It registers, runs one claim long-poll loop per workloop that keeps the workloop's slots
//! full, runs CMD once per claimed run (see [`crate::child`]), reports complete or fail, and
//! sends one heartbeat per lease/3 for all its running runs; a run the server reports cancelled
//! or lost gets SIGTERM, then SIGKILL after the grace period. On SIGINT or SIGTERM it stops
//! claiming, gives running children the grace period, kills what is left, and deregisters so the
//! server puts the runs it still held back in their queues.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::child::{self, Stop};
use crate::client::{self, Claimed, Client, ClientError};
use crate::duration;

/// Arguments of `runlane worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The server's address.
    #[arg(long, env = "RUNLANE_SERVER", default_value = client::DEFAULT_SERVER)]
    pub server: String,
    /// A worker (or admin) API key.
    #[arg(
        long,
        visible_alias = "api-key",
        env = "RUNLANE_KEY",
        hide_env_values = true
    )]
    pub key: Option<String>,
    /// An env to serve (repeat for several).
    #[arg(long = "env", env = "RUNLANE_ENV", required = true, value_name = "ENV")]
    pub envs: Vec<String>,
    /// The version the worker runs in every env it serves.
    #[arg(long)]
    pub version: Option<u32>,
    /// A task to declare to the env (repeat for several); it does not filter claims.
    #[arg(long = "task", value_name = "NAME")]
    pub tasks: Vec<String>,
    /// Workloops, e.g. `fast_lane:1 manual>*:4` (each `CHAIN:SLOTS`).
    #[arg(long, env = "RUNLANE_WORKLOOPS")]
    pub workloops: String,
    /// The command run per run through `sh -c`, with the payload (JSON) on standard input and
    /// RUNLANE_TASK, RUNLANE_RUN_ID, RUNLANE_ATTEMPT, RUNLANE_ENV set; standard output is the
    /// output, a non-zero exit fails the attempt with standard error as the error.
    #[arg(long)]
    pub exec: String,
    /// Time a stopped command gets between SIGTERM and SIGKILL, and running commands get when
    /// the worker stops.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub grace: Duration,
    /// Lease length asked of the server (its default when absent).
    #[arg(long, value_parser = duration::parse)]
    pub lease: Option<Duration>,
    /// How long one claim long-poll waits for runs.
    #[arg(long, default_value = "20s", value_parser = duration::parse)]
    pub claim_wait: Duration,
}

/// Why the worker stopped a running command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    /// The server reported the run cancelled: the attempt is reported failed without retry,
    /// which ends the run `canceled`.
    Cancelled,
    /// The server reported the lease lost: the attempt is no longer ours; nothing is reported.
    Lost,
    /// The worker is stopping and the grace ran out: deregistering returns the run.
    Shutdown,
}

/// A running attempt: its fencing token, how to stop it, and why it was stopped.
struct Active {
    token: Value,
    stop: watch::Sender<Stop>,
    reason: Option<Reason>,
}

/// What the worker's tasks share.
struct Shared {
    client: Client,
    worker_id: String,
    spec: child::Spec,
    active: Mutex<HashMap<String, Active>>,
}

impl Shared {
    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<String, Active>> {
        // A panic while holding this lock leaves a map that is still consistent.
        self.active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks the run's child to stop; the first reason given is the one kept.
    fn stop(&self, run_id: &str, how: Stop, reason: Reason) {
        if let Some(a) = self.active().get_mut(run_id) {
            a.reason.get_or_insert(reason);
            a.stop.send_if_modified(|s| {
                if *s < how {
                    *s = how;
                    true
                } else {
                    false
                }
            });
        }
    }
}

/// The registration body.
pub fn registration(args: &Args) -> Value {
    let envs: Vec<Value> = args
        .envs
        .iter()
        .map(|e| match args.version {
            Some(v) => json!({ "env": e, "version": v }),
            None => json!({ "env": e }),
        })
        .collect();
    let mut body = json!({ "envs": envs, "workloops": args.workloops });
    if !args.tasks.is_empty() {
        body["tasks"] = json!(args.tasks);
    }
    if let Some(l) = args.lease {
        body["lease_ms"] = json!(client::millis(l));
    }
    body
}

/// Runs the worker until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (on_signal, on_second) = (shutdown.clone(), force.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if on_signal.is_cancelled() {
                eprintln!("runlane worker: killing running commands");
                on_second.cancel();
                return;
            }
            eprintln!(
                "runlane worker: stopping (no new claims; waiting for running commands; \
                 a second signal kills them now)"
            );
            on_signal.cancel();
        }
    });
    run_until(args, shutdown, force).await
}

/// Runs the worker until `shutdown` is cancelled (or a fatal error); `force` cuts the grace
/// given to running commands short.
pub async fn run_until(
    args: Args,
    shutdown: CancellationToken,
    force: CancellationToken,
) -> anyhow::Result<()> {
    let client = Client::new(&args.server, args.key.clone())?;
    let reg = client
        .register_worker(&registration(&args))
        .await
        .context("registering the worker")?
        .value;
    eprintln!(
        "runlane worker {} registered: {} workloop(s), lease {}",
        reg.worker_id,
        reg.workloops.len(),
        duration::format(Duration::from_millis(reg.lease_ms))
    );
    let shared = Arc::new(Shared {
        client,
        worker_id: reg.worker_id.clone(),
        spec: child::Spec {
            command: args.exec.clone(),
            grace: args.grace,
        },
        active: Mutex::new(HashMap::new()),
    });

    let runs = TaskTracker::new();
    let fatal: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));
    let loops = TaskTracker::new();
    for wl in &reg.workloops {
        let slots = usize::try_from(wl.slots).unwrap_or(usize::MAX).max(1);
        loops.spawn(claim_loop(
            shared.clone(),
            wl.index,
            slots,
            args.claim_wait,
            shutdown.clone(),
            runs.clone(),
            fatal.clone(),
        ));
    }
    loops.close();

    let heartbeats_done = CancellationToken::new();
    let lease = Duration::from_millis(reg.lease_ms.max(300));
    let heartbeat = tokio::spawn(heartbeat_loop(
        shared.clone(),
        lease / 3,
        heartbeats_done.clone(),
    ));

    loops.wait().await;
    // No more claims: running commands get the grace period, then SIGKILL.
    runs.close();
    let drained = tokio::select! {
        r = tokio::time::timeout(args.grace, runs.wait()) => r.is_ok(),
        () = force.cancelled() => false,
    };
    if !drained {
        let ids: Vec<String> = shared.active().keys().cloned().collect();
        eprintln!(
            "runlane worker: killing {} command(s) still running",
            ids.len()
        );
        for id in ids {
            shared.stop(&id, Stop::Kill, Reason::Shutdown);
        }
        runs.wait().await;
    }
    heartbeats_done.cancel();
    let _ = heartbeat.await;
    shared
        .client
        .deregister_worker(&shared.worker_id)
        .await
        .context("deregistering the worker")?;
    eprintln!("runlane worker {} stopped", shared.worker_id);
    let fatal = fatal
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Attempts at reporting one run's end.
const REPORT_TRIES: u32 = 4;

/// Whether an error may pass if the call is made again.
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Transport { .. } => true,
        ClientError::Api(a) => a.status == 503,
        _ => false,
    }
}

/// Whether a claim error means the worker cannot go on (its key or its registration is gone).
fn is_fatal(e: &ClientError) -> bool {
    matches!(e, ClientError::Api(a) if matches!(a.status, 400 | 401 | 403 | 404))
}

/// Claims for one workloop while it has free slots, until shutdown.
async fn claim_loop(
    shared: Arc<Shared>,
    workloop: u64,
    slots: usize,
    wait: Duration,
    shutdown: CancellationToken,
    runs: TaskTracker,
    fatal: Arc<Mutex<Option<anyhow::Error>>>,
) {
    let free = Arc::new(Semaphore::new(slots));
    let mut backoff = Duration::from_millis(100);
    loop {
        let first = tokio::select! {
            p = free.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let mut permits = vec![first];
        while let Ok(p) = free.clone().try_acquire_owned() {
            permits.push(p);
        }
        let max = u64::try_from(permits.len()).unwrap_or(u64::MAX);
        let claim = tokio::select! {
            r = shared.client.claim(&shared.worker_id, workloop, max, wait) => r,
            // Dropping the long-poll is safe: runs the server handed out after it returns go
            // back to their queues when the worker deregisters.
            () = shutdown.cancelled() => return,
        };
        match claim {
            Ok(reply) => {
                backoff = Duration::from_millis(100);
                for run in reply.value.runs {
                    let permit = permits.pop();
                    let shared = shared.clone();
                    runs.spawn(async move {
                        execute(&shared, run).await;
                        drop(permit);
                    });
                }
            }
            Err(e) if is_fatal(&e) => {
                eprintln!("runlane worker: claim on workloop {workloop} refused: {e}; stopping");
                let mut f = fatal
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if f.is_none() {
                    *f = Some(anyhow::anyhow!("claim refused: {e}"));
                }
                shutdown.cancel();
                return;
            }
            Err(e) => {
                eprintln!(
                    "runlane worker: claim on workloop {workloop} failed: {e}; retrying in {}",
                    duration::format(backoff)
                );
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs one claimed run's command and reports its end.
async fn execute(shared: &Shared, run: Claimed) {
    let (stop_tx, stop_rx) = watch::channel(Stop::No);
    shared.active().insert(
        run.run_id.clone(),
        Active {
            token: run.token.clone(),
            stop: stop_tx,
            reason: None,
        },
    );
    let payload = serde_json::to_vec(&run.payload).unwrap_or_else(|_| b"null".to_vec());
    let env = [
        ("RUNLANE_TASK", run.task.clone()),
        ("RUNLANE_RUN_ID", run.run_id.clone()),
        ("RUNLANE_ATTEMPT", run.attempt.to_string()),
        ("RUNLANE_ENV", run.env.clone()),
    ];
    let finished = child::run(&shared.spec, &payload, &env, stop_rx).await;
    let reason = shared.active().remove(&run.run_id).and_then(|a| a.reason);
    let (outcome, retry) = match (finished, reason) {
        (Err(e), _) => (
            Err(format!("runlane worker: cannot start the command: {e}")),
            "policy",
        ),
        (Ok(f), Some(Reason::Cancelled)) => {
            // Failing a run whose cancel was requested ends it `canceled` at once, instead of
            // when the server's cancel grace runs out (a command that finished cleanly anyway
            // still reports its output).
            eprintln!("runlane worker: run {} cancelled", run.run_id);
            (f.result(), "none")
        }
        (Ok(f), Some(Reason::Lost | Reason::Shutdown)) => {
            // The lease is gone, or the run goes back to its queue when the worker
            // deregisters: there is nothing to report.
            eprintln!(
                "runlane worker: run {} stopped ({})",
                run.run_id,
                if f.stopped.is_some() {
                    "killed"
                } else {
                    "exited"
                }
            );
            return;
        }
        (Ok(f), None) => (f.result(), "policy"),
    };
    // A transient failure (connection, 503) is retried a few times: giving up leaves the run
    // to its lease, which runs it again elsewhere.
    let mut pause = Duration::from_millis(200);
    let mut tries = 1;
    let reported = loop {
        let r = match &outcome {
            Ok(output) => {
                shared
                    .client
                    .complete(&shared.worker_id, &run.run_id, &run.token, output)
                    .await
            }
            Err(error) => {
                shared
                    .client
                    .fail(&shared.worker_id, &run.run_id, &run.token, error, retry)
                    .await
            }
        };
        match r {
            Err(e) if is_transient(&e) && tries < REPORT_TRIES => {
                tokio::time::sleep(pause).await;
                pause *= 2;
                tries += 1;
            }
            other => break other,
        }
    };
    if let Err(e) = reported {
        let what = if outcome.is_ok() { "complete" } else { "fail" };
        eprintln!(
            "runlane worker: {what} of run {} not recorded: {e}",
            run.run_id
        );
    }
}

/// One heartbeat per `every` for all running runs; stops the children of cancelled or lost runs.
async fn heartbeat_loop(shared: Arc<Shared>, every: Duration, done: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = done.cancelled() => return,
        }
        let runs: Vec<(String, Value)> = shared
            .active()
            .iter()
            .map(|(id, a)| (id.clone(), a.token.clone()))
            .collect();
        match shared.client.heartbeat(&shared.worker_id, &runs).await {
            Ok(reply) => {
                for id in &reply.value.cancelled {
                    shared.stop(id, Stop::Term, Reason::Cancelled);
                }
                for id in &reply.value.lost {
                    shared.stop(id, Stop::Term, Reason::Lost);
                }
            }
            Err(e) => eprintln!("runlane worker: heartbeat failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn registration_names_envs_tasks_and_lease() {
        let t = T::try_parse_from([
            "worker",
            "--env=a",
            "--env=b",
            "--version=2",
            "--task=email",
            "--task=sms",
            "--workloops=manual>*:4",
            "--exec=cat",
            "--lease=30s",
        ])
        .expect("parses");
        assert_eq!(t.args.grace, Duration::from_secs(10));
        assert_eq!(
            registration(&t.args),
            json!({
                "envs": [{"env": "a", "version": 2}, {"env": "b", "version": 2}],
                "workloops": "manual>*:4",
                "tasks": ["email", "sms"],
                "lease_ms": 30000,
            })
        );
    }

    #[test]
    fn exec_and_workloops_are_required() {
        assert!(T::try_parse_from(["worker", "--env=a", "--exec=cat"]).is_err());
        assert!(T::try_parse_from(["worker", "--env=a", "--workloops=x:1"]).is_err());
    }
}
