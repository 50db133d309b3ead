//! `runlane worker --exec` against a stand-in of the worker protocol (docs/API.md, "Worker
//! protocol") served in-process on port 0: registration, claims within the workloop's slots,
//! complete with the command's output, fail with its stderr, a cancel or a lost lease reported
//! by the heartbeat stopping the child, and SIGTERM on the worker deregistering it.
//!
//! The stand-in hands out runs the test queues and records what the worker reports; every wait
//! is on a change of that record, bounded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// What the stand-in has seen.
#[derive(Default, Debug, Clone)]
struct Record {
    registration: Option<Value>,
    pending: VecDeque<Value>,
    claimed: Vec<String>,
    completed: HashMap<String, Value>,
    failed: HashMap<String, Value>,
    /// Runs the test cancelled: the next heartbeat naming them answers `cancelled`.
    cancel: HashSet<String>,
    /// Runs whose lease the test declared lost: the next heartbeat naming them answers `lost`.
    lose: HashSet<String>,
    /// Runs named by any heartbeat.
    heartbeated: HashSet<String>,
    max_asked: u64,
    deregistered: bool,
}

type Shared = Arc<watch::Sender<Record>>;

const WORKER_ID: &str = "wk_test";

async fn register(State(s): State<Shared>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    s.send_modify(|r| r.registration = Some(body));
    (
        StatusCode::CREATED,
        Json(json!({
            "worker_id": WORKER_ID,
            "lease_ms": 900,
            "workloops": [{"index": 0, "chain": "manual>*", "slots": 2}],
        })),
    )
}

async fn claim(State(s): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    let max = body["max"].as_u64().unwrap_or(0);
    let wait = Duration::from_millis(body["wait_ms"].as_u64().unwrap_or(0));
    let mut rx = s.subscribe();
    let _ = tokio::time::timeout(wait, rx.wait_for(|r| !r.pending.is_empty())).await;
    let mut runs = Vec::new();
    s.send_modify(|r| {
        r.max_asked = r.max_asked.max(max);
        while (runs.len() as u64) < max {
            let Some(run) = r.pending.pop_front() else {
                break;
            };
            r.claimed
                .push(run["run_id"].as_str().unwrap_or_default().to_string());
            runs.push(run);
        }
    });
    Json(json!({ "runs": runs }))
}

async fn heartbeat(State(s): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    let ids: Vec<String> = body["runs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["run_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut cancelled = Vec::new();
    let mut lost = Vec::new();
    s.send_modify(|r| {
        for id in &ids {
            r.heartbeated.insert(id.clone());
            if r.cancel.contains(id) {
                cancelled.push(id.clone());
            }
            if r.lose.contains(id) {
                lost.push(id.clone());
            }
        }
    });
    Json(json!({ "cancelled": cancelled, "lost": lost }))
}

async fn complete(
    State(s): State<Shared>,
    Path((_w, run)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> StatusCode {
    s.send_modify(|r| {
        r.completed.insert(run, body);
    });
    StatusCode::NO_CONTENT
}

async fn fail(
    State(s): State<Shared>,
    Path((_w, run)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Json<Value> {
    s.send_modify(|r| {
        r.failed.insert(run, body);
    });
    Json(json!({ "status": "failed", "retry_at_ms": null }))
}

async fn deregister(State(s): State<Shared>) -> StatusCode {
    s.send_modify(|r| r.deregistered = true);
    StatusCode::NO_CONTENT
}

/// The stand-in, serving until the test ends.
struct Fake {
    addr: String,
    record: Shared,
}

impl Fake {
    async fn start() -> Fake {
        let (tx, _rx) = watch::channel(Record::default());
        let record = Arc::new(tx);
        let app = Router::new()
            .route("/v1/workers", post(register))
            .route("/v1/workers/{id}/claim", post(claim))
            .route("/v1/workers/{id}/heartbeat", post(heartbeat))
            .route("/v1/workers/{id}/runs/{run}/complete", post(complete))
            .route("/v1/workers/{id}/runs/{run}/fail", post(fail))
            .route("/v1/workers/{id}", delete(deregister))
            .with_state(record.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port");
        let addr = format!("http://{}", listener.local_addr().expect("local addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fake { addr, record }
    }

    fn push(&self, run_id: &str, payload: Value) {
        let run = json!({
            "run_id": run_id, "token": 7, "env": "default", "task": "echo",
            "payload": payload, "attempt": 1, "queue": "echo", "key": "", "lane": "manual",
            "max_duration_ms": null,
        });
        self.record.send_modify(|r| r.pending.push_back(run));
    }

    /// Waits (at most 60 s) until `cond` holds of the record; the record then.
    async fn until(&self, what: &str, cond: impl Fn(&Record) -> bool) -> Record {
        let mut rx = self.record.subscribe();
        let got =
            match tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|r| cond(r))).await {
                Ok(Ok(r)) => Some(r.clone()),
                _ => None,
            };
        got.unwrap_or_else(|| panic!("timed out waiting for {what}: {:?}", self.record.borrow()))
    }

    fn worker(&self, exec: &str, grace: &str) -> Child {
        self.worker_command(exec, grace)
            .spawn()
            .expect("runlane worker starts")
    }

    /// A worker whose stderr lines are handed over (and echoed).
    fn worker_with_lines(
        &self,
        exec: &str,
        grace: &str,
    ) -> (Child, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::AsyncBufReadExt;
        let mut child = self
            .worker_command(exec, grace)
            .stderr(Stdio::piped())
            .spawn()
            .expect("runlane worker starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[worker] {line}");
                let _ = tx.send(line);
            }
        });
        (child, rx)
    }

    fn worker_command(&self, exec: &str, grace: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runlane"));
        cmd.args(["worker", "--server", &self.addr, "--key", "rl_worker"])
            .args([
                "--env",
                "default",
                "--task",
                "echo",
                "--workloops",
                "manual>*:2",
            ])
            .args(["--exec", exec, "--grace", grace, "--claim-wait", "5s"])
            .env_remove("RUNLANE_ENV")
            // The key is also in the worker's environment: the command must not see it.
            .env("RUNLANE_KEY", "rl_worker")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }
}

/// SIGTERM to the worker.
fn sigterm(worker: &Child) {
    let pid = worker.id().expect("the worker runs");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal the worker");
}

/// SIGTERM to the worker, then its exit status (bounded).
async fn stop(mut worker: Child) -> std::process::ExitStatus {
    sigterm(&worker);
    tokio::time::timeout(Duration::from_secs(60), worker.wait())
        .await
        .expect("the worker stops")
        .expect("the worker's status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cat_completes_runs_with_the_payload_as_output_then_sigterm_deregisters() {
    let fake = Fake::start().await;
    for i in 0..5 {
        fake.push(&format!("run_{i}"), json!({ "n": i, "s": "héllo" }));
    }
    let worker = fake.worker("cat", "5s");
    let r = fake
        .until("five completions", |r| r.completed.len() == 5)
        .await;
    for i in 0..5 {
        let done = &r.completed[&format!("run_{i}")];
        assert_eq!(done["output"], json!({ "n": i, "s": "héllo" }));
        assert_eq!(done["token"], 7);
    }
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert!(
        r.max_asked <= 2,
        "never more than the workloop's slots: {}",
        r.max_asked
    );
    let reg = r.registration.expect("registered");
    assert_eq!(
        reg,
        json!({"envs": [{"env": "default"}], "workloops": "manual>*:2", "tasks": ["echo"]})
    );

    let status = stop(worker).await;
    assert!(status.success(), "{status}");
    assert!(fake.record.borrow().deregistered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_fails_the_attempt_with_its_stderr_and_the_env_is_set() {
    let fake = Fake::start().await;
    fake.push("run_bad", json!(null));
    let worker = fake.worker(
        "echo \"$RUNLANE_TASK $RUNLANE_RUN_ID attempt $RUNLANE_ATTEMPT: no\" >&2; exit 3",
        "5s",
    );
    let r = fake
        .until("a failure", |r| r.failed.contains_key("run_bad"))
        .await;
    let failed = &r.failed["run_bad"];
    assert_eq!(failed["error"], "echo run_bad attempt 1: no");
    assert_eq!(failed["retry"], "policy");
    assert_eq!(failed["token"], 7);
    assert!(r.completed.is_empty());
    assert!(stop(worker).await.success());
}

/// A named pipe in a fresh directory; reading it waits for the child to write it.
fn fifo(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo {}", path.display());
    path
}

/// Reads a fifo to its end: waits (at most 60 s) until a writer opened and closed it.
async fn read_fifo(path: &std::path::Path) -> String {
    let path = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(path));
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the child wrote the fifo in time")
        .expect("the reader ran")
        .expect("the fifo reads")
}

/// Runs a command that waits for SIGTERM, has the heartbeat report it with `mark`, and checks
/// the command got SIGTERM; the record once the worker stopped.
async fn stopped_by_the_heartbeat(name: &str, mark: impl FnOnce(&mut Record)) -> Record {
    let fake = Fake::start().await;
    let dir =
        std::env::temp_dir().join(format!("runlane-worker-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ready = fifo(&dir, "ready");
    let term = fifo(&dir, "term");
    fake.push("run_long", json!(null));
    // Says when its trap is set; the trap says when SIGTERM came. The sleep is in the same
    // process group, so it gets the signal too.
    let exec = format!(
        "trap 'echo term > \"{}\"; exit 143' TERM; echo ready > \"{}\"; sleep 1000 & wait",
        term.display(),
        ready.display()
    );
    let worker = fake.worker(&exec, "10s");
    assert_eq!(read_fifo(&ready).await.trim(), "ready");
    fake.record.send_modify(mark);
    assert_eq!(
        read_fifo(&term).await.trim(),
        "term",
        "the child got SIGTERM"
    );
    // Nothing is left running: the worker stops without waiting out its 10 s grace.
    let status = stop(worker).await;
    assert!(status.success(), "{status}");
    let r = fake.record.borrow().clone();
    assert!(r.heartbeated.contains("run_long"), "{r:?}");
    assert!(!r.completed.contains_key("run_long"), "{r:?}");
    assert!(r.deregistered);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_from_the_heartbeat_sends_sigterm_and_fails_the_run_without_retry() {
    let r = stopped_by_the_heartbeat("cancel", |r| {
        r.cancel.insert("run_long".into());
    })
    .await;
    let failed = &r.failed["run_long"];
    assert_eq!(failed["retry"], "none", "{r:?}");
    assert_eq!(failed["error"], "exit status 143");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_sends_sigterm_and_reports_nothing() {
    let r = stopped_by_the_heartbeat("lost", |r| {
        r.lose.insert("run_long".into());
    })
    .await;
    assert!(!r.failed.contains_key("run_long"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_out_the_grace_then_kills_and_deregisters() {
    let fake = Fake::start().await;
    fake.push("run_stuck", json!(null));
    // Ignores SIGTERM: only SIGKILL after the worker's grace ends it.
    let worker = fake.worker("trap '' TERM; exec sleep 1000", "300ms");
    fake.until("a heartbeat naming the run", |r| {
        r.heartbeated.contains("run_stuck")
    })
    .await;
    let status = stop(worker).await;
    assert!(status.success(), "{status}");
    let r = fake.record.borrow().clone();
    assert!(r.deregistered);
    assert!(!r.completed.contains_key("run_stuck") && !r.failed.contains_key("run_stuck"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_kills_running_commands_without_waiting_out_the_grace() {
    let fake = Fake::start().await;
    fake.push("run_stuck", json!(null));
    // Ignores SIGTERM, and the grace is ten minutes: only the second signal ends it in time.
    let (worker, mut lines) = fake.worker_with_lines("trap '' TERM; exec sleep 1000", "600s");
    fake.until("a heartbeat naming the run", |r| {
        r.heartbeated.contains("run_stuck")
    })
    .await;
    sigterm(&worker);
    // Two signals sent before the first is handled may arrive as one: wait for the first.
    let said = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.recv().await {
            if line.contains("stopping") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(said, Ok(true), "the worker said it is stopping");
    let status = stop(worker).await;
    assert!(status.success(), "{status}");
    let r = fake.record.borrow().clone();
    assert!(r.deregistered);
    assert!(!r.completed.contains_key("run_stuck") && !r.failed.contains_key("run_stuck"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_does_not_see_the_workers_key() {
    let fake = Fake::start().await;
    fake.push("run_env", json!(null));
    let worker = fake.worker("printf %s \"${RUNLANE_KEY:-unset}\"", "5s");
    let r = fake
        .until("a completion", |r| r.completed.contains_key("run_env"))
        .await;
    assert_eq!(r.completed["run_env"]["output"], "unset");
    assert!(stop(worker).await.success());
}
