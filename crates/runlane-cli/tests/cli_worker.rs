//! `runlane worker --exec` against a real server (`runlane serve` on port 0: memory, and
//! embedded and distributed for the main paths), runs triggered through the CLI: `cat` completes them with the
//! payload as output, a failing command fails them with its stderr, a cancel kills the running
//! command, `--task` declares a task to a strict env, and keys are held to their roles.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};
use support::{Cli, Server};

/// A `runlane worker` child process, SIGTERM-ed and waited for on drop.
struct Worker(Child);

impl Worker {
    /// Starts a worker of env `default` and waits until it says it registered.
    fn start(cli: &Cli, exec: &str) -> Worker {
        Worker::start_in(cli, "default", exec)
    }

    /// Starts a worker of `env` (declaring the task `echo`) and waits until it registered.
    fn start_in(cli: &Cli, env: &str, exec: &str) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_runlane"))
            .args(["worker", "--server", &cli.server, "--key", &cli.key])
            .args(["--env", env, "--task", "echo"])
            .args(["--workloops", "fast_lane:2 *:2", "--exec", exec])
            .args(["--grace", "2s", "--claim-wait", "5s", "--lease", "3s"])
            .env_remove("RUNLANE_ENV")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runlane worker starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(" registered: ") {
                    let _ = tx.send(());
                }
                eprintln!("[worker] {line}");
            }
        });
        let worker = Worker(child);
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the worker registered in time");
        worker
    }

    /// SIGTERM, then the exit status (bounded).
    fn stop(mut self) -> std::process::ExitStatus {
        let status = terminate(&mut self.0);
        std::mem::forget(self);
        status
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    // std's Child has no wait with a timeout: check its exit until a bounded deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("the worker's status") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker did not stop within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh directory for fifos.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("runlane-cli-worker-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn fifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo {}", path.display());
    path
}

/// Reads a fifo to its end: waits (at most 60 s) for the child to write it.
fn read_fifo(path: &Path) -> String {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    // The reader thread is left behind if the child never writes; the test fails anyway.
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_to_string(p));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the child wrote the fifo in time")
        .expect("the fifo reads")
}

#[test]
fn cat_completes_triggered_runs_with_the_payload_as_output() {
    cat_completes(Server::start());
}

#[test]
fn cat_completes_triggered_runs_on_the_embedded_backend() {
    cat_completes(Server::start_embedded("cat"));
}

#[test]
fn cat_completes_triggered_runs_on_the_distributed_backend() {
    if let Some(server) = Server::start_distributed("cat") {
        cat_completes(server);
    }
}

fn cat_completes(server: Server) {
    let admin = server.admin();
    let worker = Worker::start(&admin, "cat");
    for i in 0..3 {
        let payload = json!({ "n": i, "text": "héllo" }).to_string();
        let out = admin.run(&[
            "trigger",
            "echo",
            "--env",
            "default",
            "--payload",
            &payload,
            "--wait=60s",
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", support::text(&out.stderr));
        let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(answer["status"], "completed", "{answer}");
        assert_eq!(answer["output"], json!({ "n": i, "text": "héllo" }));
    }
    let status = worker.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn a_failing_command_fails_the_run_with_its_stderr() {
    let server = Server::start();
    let admin = server.admin();
    let worker = Worker::start(&admin, "echo \"$RUNLANE_TASK says no\" >&2; exit 3");
    let out = admin.run(&[
        "trigger",
        "echo",
        "--env",
        "default",
        "--max-attempts",
        "1",
        "--wait=60s",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", support::text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answer["status"], "failed", "{answer}");
    assert_eq!(answer["error"], "echo says no");
    let id = answer["run_id"].as_str().expect("run id");
    let run = admin.json(&["runs", "show", id]);
    assert_eq!(run["status"], "failed");
    assert!(worker.stop().success());
}

#[test]
fn cancel_of_a_running_run_kills_its_command() {
    cancel_kills(Server::start(), "memory");
}

#[test]
fn cancel_of_a_running_run_kills_its_command_on_the_embedded_backend() {
    cancel_kills(Server::start_embedded("cancel"), "embedded");
}

#[test]
fn cancel_of_a_running_run_kills_its_command_on_the_distributed_backend() {
    if let Some(server) = Server::start_distributed("cancel") {
        cancel_kills(server, "distributed");
    }
}

fn cancel_kills(server: Server, name: &str) {
    let admin = server.admin();
    let dir = scratch(name);
    let ready = fifo(&dir, "ready");
    let term = fifo(&dir, "term");
    let exec = format!(
        "trap 'echo term > \"{}\"; exit 143' TERM; echo ready > \"{}\"; sleep 1000 & wait",
        term.display(),
        ready.display()
    );
    let worker = Worker::start(&admin, &exec);
    let t = admin.json(&["trigger", "echo", "--env", "default"]);
    let id = t["run_id"].as_str().expect("run id").to_string();
    assert_eq!(read_fifo(&ready).trim(), "ready");
    let cancelled = admin.json(&["runs", "cancel", &id]);
    assert!(
        ["canceled", "executing"].contains(&cancelled["status"].as_str().unwrap_or("")),
        "{cancelled}"
    );
    assert_eq!(read_fifo(&term).trim(), "term", "the command got SIGTERM");
    // The worker has nothing left to wait for: it stops at once (well inside its grace).
    assert!(worker.stop().success());
    let run = admin.json(&["runs", "show", &id]);
    assert_eq!(run["status"], "canceled", "{run}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn task_declares_the_task_to_a_strict_env() {
    let server = Server::start();
    let admin = server.admin();
    admin.ok(&["env", "create", "strict", "--strict-tasks", "true"]);
    let refused = admin.fails(&["trigger", "echo", "--env", "strict"]);
    assert!(refused.contains("unknown_task"), "{refused}");
    let worker = Worker::start_in(&admin, "strict", "cat");
    let out = admin.run(&[
        "trigger",
        "echo",
        "--env",
        "strict",
        "--payload",
        "7",
        "--wait=60s",
        "--json",
    ]);
    assert!(out.status.success(), "{}", support::text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answer["output"], 7, "{answer}");
    assert!(worker.stop().success());
}

#[test]
fn a_worker_key_of_the_env_runs_it_and_an_env_key_cannot() {
    let server = Server::start();
    let admin = server.admin();
    let made = admin.json(&["env", "create-key", "--role", "worker", "--env", "default"]);
    let worker_key = server.with_key(made["key"].as_str().expect("secret"));
    let worker = Worker::start(&worker_key, "cat");
    let out = admin.run(&[
        "trigger",
        "echo",
        "--env",
        "default",
        "--payload",
        "\"hi\"",
        "--wait=60s",
        "--json",
    ]);
    assert!(out.status.success(), "{}", support::text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answer["output"], "hi", "{answer}");
    assert!(worker.stop().success());

    // A worker key is for the worker protocol only.
    let refused = worker_key.fails(&["runs", "list", "--env", "default"]);
    assert!(refused.contains("forbidden"), "{refused}");
    // An env key cannot register a worker: the worker exits non-zero saying why.
    let made = admin.json(&["env", "create-key", "--role", "env", "--env", "default"]);
    let out = support::runlane(
        &[
            "worker",
            "--env",
            "default",
            "--workloops",
            "*:1",
            "--exec",
            "cat",
        ],
        &[
            ("RUNLANE_SERVER", server.addr.as_str()),
            ("RUNLANE_KEY", made["key"].as_str().expect("secret")),
        ],
    );
    assert!(!out.status.success());
    let stderr = support::text(&out.stderr);
    assert!(stderr.contains("forbidden"), "{stderr}");
}
