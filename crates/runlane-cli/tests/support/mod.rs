//! A real server as a child process (`runlane serve --memory --listen 127.0.0.1:0`) and the
//! `runlane` binary run against it.

// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// The admin key the test server is started with.
pub const ADMIN_KEY: &str = "rl_test_admin_key_for_the_cli_tests";

/// A running `runlane serve`, killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    /// The embedded server's data directory, removed on drop.
    data: Option<std::path::PathBuf>,
}

impl Server {
    /// Starts a memory server on a free port and waits for it to say where it listens.
    pub fn start() -> Server {
        Server::start_with(&["--memory"], None)
    }

    /// Starts an embedded server (SQLite in a fresh directory, removed on drop).
    pub fn start_embedded(name: &str) -> Server {
        let dir =
            std::env::temp_dir().join(format!("runlane-cli-serve-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.display().to_string();
        Server::start_with(&["--data", &data], Some(dir))
    }

    fn start_with(backend: &[&str], data: Option<std::path::PathBuf>) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_runlane"))
            .arg("serve")
            .args(backend)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUNLANE_ADMIN_KEY", ADMIN_KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runlane serve starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        // Reads the server's stderr to its end so the server never blocks on a full pipe;
        // hands over the address line.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("http://") {
                    let addr: String = line[at..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    let _ = tx.send(addr);
                }
                eprintln!("[server] {line}");
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(addr) => addr,
            Err(e) => {
                let _ = child.kill();
                panic!("the server did not say where it listens: {e}");
            }
        };
        Server { child, addr, data }
    }

    /// The CLI with the admin key.
    pub fn admin(&self) -> Cli {
        self.with_key(ADMIN_KEY)
    }

    /// The CLI with `key` (empty: no key).
    pub fn with_key(&self, key: &str) -> Cli {
        Cli {
            server: self.addr.clone(),
            key: key.to_string(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.data {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The `runlane` binary pointed at a server with a key.
#[derive(Clone)]
pub struct Cli {
    /// Server address.
    pub server: String,
    /// API key.
    pub key: String,
}

impl Cli {
    /// Runs `runlane ARGS`.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut env = vec![("RUNLANE_SERVER", self.server.as_str())];
        if !self.key.is_empty() {
            env.push(("RUNLANE_KEY", self.key.as_str()));
        }
        runlane(args, &env)
    }

    /// Runs `runlane ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "runlane {args:?} failed: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs `runlane ARGS --json`, which must succeed; its JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut with = args.to_vec();
        with.push("--json");
        let out = self.ok(&with);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("runlane {args:?}: not JSON ({e}): {out}"))
    }

    /// Runs `runlane ARGS`, which must fail with a non-zero exit and nothing on stdout; its
    /// stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "runlane {args:?} should have failed: {}",
            text(&out.stdout)
        );
        assert!(
            out.stdout.is_empty(),
            "runlane {args:?} printed {}",
            text(&out.stdout)
        );
        text(&out.stderr)
    }
}

/// Runs the binary with exactly these client variables (the caller's RUNLANE_* are removed).
pub fn runlane(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runlane"));
    cmd.args(args)
        .env_remove("RUNLANE_SERVER")
        .env_remove("RUNLANE_KEY")
        .env_remove("RUNLANE_ENV")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the runlane binary runs")
}

/// Bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
