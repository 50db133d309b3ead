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

/// A running `runlane serve` (a child process, killed on drop) or, for the distributed shape,
/// the server in a thread of this process under a fresh key prefix and schema (stopped on
/// drop, its keys and schema removed).
pub struct Server {
    child: Option<Child>,
    in_process: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
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

    /// Starts an embedded server on an existing data directory (removed on drop), e.g. one a
    /// test prepared with an embedded engine first.
    pub fn start_on_data(dir: std::path::PathBuf) -> Server {
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
        Server {
            child: Some(child),
            in_process: None,
            addr,
            data,
        }
    }

    /// The distributed shape (Redis `RUNLANE_REDIS_URL`, PostgreSQL `RUNLANE_DATABASE_URL`)
    /// under a fresh key prefix and schema; `None` when the services do not answer, except
    /// under CI where that is a failure.
    pub fn start_distributed(name: &str) -> Option<Server> {
        let redis = std::env::var("RUNLANE_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
        let pg = std::env::var("RUNLANE_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        let up = std::net::TcpStream::connect("127.0.0.1:6379").is_ok()
            && std::net::TcpStream::connect("127.0.0.1:5432").is_ok();
        if !up {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but Redis or PostgreSQL does not answer"
            );
            eprintln!("skipped: Redis or PostgreSQL does not answer");
            return None;
        }
        let tag = format!("rlcli_{}_{name}", std::process::id());
        let mut c = runlane::DistributedConfig::new(redis, pg);
        c.redis.prefix = tag.clone();
        c.postgres.schema = tag;
        c.throwaway = true;
        let mut config = runlane_server::ServerConfig::new(
            runlane_server::BackendConfig::Distributed(Box::new(c)),
        );
        config.listen = "127.0.0.1:0".parse().expect("address");
        config.admin_key = Some(ADMIN_KEY.to_string());
        config.print_admin_key = false;
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let server = runlane_server::Server::bind(config)
                    .await
                    .expect("the distributed server starts");
                let addr = server.local_addr().expect("bound address");
                let _ = addr_tx.send(format!("http://{addr}"));
                server
                    .run(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("the server runs");
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the distributed server said where it listens");
        Some(Server {
            child: None,
            in_process: Some((stop_tx, thread)),
            addr,
            data: None,
        })
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
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some((stop, thread)) = self.in_process.take() {
            let _ = stop.send(());
            // The engine drops its key prefix and schema as it shuts down.
            let _ = thread.join();
        }
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
