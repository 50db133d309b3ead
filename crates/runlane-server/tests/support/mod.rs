//! A real server on port 0 and a small HTTP client for the tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use reqwest::{Method, StatusCode};
use runlane_server::{BackendConfig, Server, ServerConfig};
use serde_json::Value;

/// The admin key every test server takes.
pub const ADMIN: &str = "rl_test_admin_key";

/// Which engine shape a test server opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Memory,
    Embedded,
    Distributed,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique() -> String {
    format!(
        "{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether the distributed services should be used (always under CI).
pub fn distributed_available() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::net::TcpStream::connect("127.0.0.1:6379").is_ok()
            && std::net::TcpStream::connect("127.0.0.1:5432").is_ok()
}

/// A running test server; stopped (and its data removed) on drop.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    /// The server's state (dropped by `stop` before it waits, so the engine closes).
    pub state: Option<runlane_server::AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    dir: Option<PathBuf>,
}

impl TestServer {
    /// Starts a server of `shape` with the given config tweaks.
    pub async fn start_with(shape: Shape, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let mut dir = None;
        let backend = match shape {
            Shape::Memory => BackendConfig::Memory,
            Shape::Embedded => {
                let d = std::env::temp_dir().join(format!("runlane-server-test-{}", unique()));
                dir = Some(d.clone());
                BackendConfig::Embedded { data_dir: d }
            }
            Shape::Distributed => {
                let redis = std::env::var("RUNLANE_REDIS_URL")
                    .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
                let pg = std::env::var("RUNLANE_DATABASE_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
                let mut c = runlane::DistributedConfig::new(redis, pg);
                let id = unique();
                c.redis.prefix = format!("rlsrv_{id}");
                c.postgres.schema = format!("rlsrv_{id}");
                c.throwaway = true;
                BackendConfig::Distributed(Box::new(c))
            }
        };
        let mut config = ServerConfig::new(backend);
        config.listen = "127.0.0.1:0".parse().expect("address");
        config.admin_key = Some(ADMIN.to_string());
        config.print_admin_key = false;
        tweak(&mut config);
        let server = Server::bind(config).await.expect("server starts");
        let addr = server.local_addr().expect("bound address");
        let state = server.state().clone();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async move {
                    let _ = rx.await;
                })
                .await
                .expect("server runs");
        });
        TestServer {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            state: Some(state),
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    /// Starts a server of `shape` with default settings.
    pub async fn start(shape: Shape) -> TestServer {
        Self::start_with(shape, |_| {}).await
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        self.state.take();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }

    /// Sends a request; answers the status and the JSON body (Null when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let text = resp.text().await.expect("body read");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(key), None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(key), Some(body)).await
    }

    pub async fn patch(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(key), Some(body)).await
    }

    /// The server's engine.
    pub fn engine(&self) -> &runlane::Engine {
        self.state().engine()
    }

    /// The server's state.
    pub fn state(&self) -> &runlane_server::AppState {
        self.state.as_ref().expect("the server is running")
    }

    /// Creates an env (admin) and asserts it worked.
    pub async fn env(&self, name: &str) {
        let (status, body) = self
            .post("/v1/envs", ADMIN, serde_json::json!({ "name": name }))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    /// Creates a key (admin) and answers (id, secret).
    pub async fn key(&self, role: &str, envs: &[&str]) -> (String, String) {
        let (status, body) = self
            .post(
                "/v1/keys",
                ADMIN,
                serde_json::json!({ "role": role, "envs": envs }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (
            body["id"].as_str().expect("id").to_string(),
            body["key"].as_str().expect("key").to_string(),
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Asserts the error shape and code.
pub fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"].get("field").is_some(), "{body}");
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// Reads Server-Sent Events from a response.
pub struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

impl SseReader {
    /// Opens `path` as an event stream.
    pub async fn open(s: &TestServer, path: &str, key: &str, last_id: Option<&str>) -> SseReader {
        let mut req = s
            .client
            .get(format!("{}{path}", s.base))
            .bearer_auth(key)
            .header("accept", "text/event-stream");
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.expect("stream opened");
        assert_eq!(resp.status(), StatusCode::OK, "stream status");
        SseReader {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (comments skipped); None when the stream ends. Panics after 10 s.
    pub async fn next(&mut self) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let mut event = String::from("message");
                let mut id = None;
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() && id.is_none() {
                    continue; // a keep-alive comment
                }
                let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                return Some(Sse { event, id, data });
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .expect("an event within 10 s")
                .expect("stream read");
            match chunk {
                Some(bytes) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                None => return None,
            }
        }
    }

    /// Skips events until one matches.
    pub async fn until(&mut self, f: impl Fn(&Sse) -> bool) -> Sse {
        loop {
            let e = self.next().await.expect("stream ended before the event");
            if f(&e) {
                return e;
            }
        }
    }
}
