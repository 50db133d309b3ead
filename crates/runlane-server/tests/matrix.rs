//! The generated auth matrix: every route × {no key, revoked key, other env's key, worker
//! key, env key, admin key}, each with its expected status; and the OpenAPI check: every
//! documented route is in the matrix and answers (not 404/405), and every route of
//! docs/API.md is documented.

mod support;

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{Shape, TestServer, ADMIN};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    NoKey,
    Revoked,
    OtherEnv,
    Worker,
    Env,
    Admin,
}

const WHO: [Who; 6] = [
    Who::NoKey,
    Who::Revoked,
    Who::OtherEnv,
    Who::Worker,
    Who::Env,
    Who::Admin,
];

/// Who may call a route.
#[derive(Clone, Copy, Debug)]
enum Access {
    /// No key needed.
    Public,
    /// Admin keys only.
    Admin,
    /// Admin, env and other-env keys (a listing filtered by the key's envs).
    AnyEnvKey,
    /// Admin, or an env key of `prod` (other env: 403).
    EnvOfProd,
    /// A run of `prod`: admin, or an env key of `prod` (other env: 404).
    RunOfProd,
    /// The worker protocol for `prod`: admin, or a worker key of `prod` (any other key: 403).
    WorkerOfProd,
    /// Reads of `prod`'s versions: admin, or an env or worker key of `prod` (other env: 403).
    ReadOfProd,
}

/// What a row needs made fresh before each call.
#[derive(Clone, Copy, Debug)]
enum Fresh {
    Nothing,
    DelayedRun,
    CanceledRun,
    Key,
    /// A worker registered for `prod` (`{id}`); `{run}` is a fresh delayed run it does not
    /// hold (run calls of an allowed caller answer 409 `stale_token`).
    Worker,
    /// A version of `prod` registered for this call (`{version}`).
    Version,
}

struct Row {
    method: Method,
    /// The documented path.
    path: &'static str,
    body: Option<fn(u64) -> Value>,
    access: Access,
    fresh: Fresh,
    /// The status of an allowed call.
    ok: StatusCode,
}

fn rows() -> Vec<Row> {
    use Access::*;
    let row = |method: Method, path, body, access, fresh, ok| Row {
        method,
        path,
        body,
        access,
        fresh,
        ok,
    };
    vec![
        row(
            Method::GET,
            "/health",
            None,
            Public,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::GET,
            "/metrics",
            None,
            Public,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::GET,
            "/v1/openapi.json",
            None,
            Public,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/envs",
            Some(|n| json!({"name": format!("e{n}")})),
            Admin,
            Fresh::Nothing,
            StatusCode::CREATED,
        ),
        row(
            Method::GET,
            "/v1/envs",
            None,
            AnyEnvKey,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::GET,
            "/v1/envs/{env}",
            None,
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::PATCH,
            "/v1/envs/{env}",
            Some(|_| json!({"limit": 100})),
            Admin,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/keys",
            Some(|_| json!({"role": "env", "envs": ["prod"]})),
            Admin,
            Fresh::Nothing,
            StatusCode::CREATED,
        ),
        row(
            Method::GET,
            "/v1/keys",
            None,
            Admin,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/keys/{id}/rotate",
            None,
            Admin,
            Fresh::Key,
            StatusCode::CREATED,
        ),
        row(
            Method::POST,
            "/v1/keys/{id}/revoke",
            None,
            Admin,
            Fresh::Key,
            StatusCode::OK,
        ),
        row(
            Method::GET,
            "/v1/lanes",
            None,
            AnyEnvKey,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/lanes",
            Some(|n| json!({"name": format!("lane{n}")})),
            Admin,
            Fresh::Nothing,
            StatusCode::CREATED,
        ),
        row(
            Method::GET,
            "/v1/envs/{env}/queues",
            None,
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::GET,
            "/v1/envs/{env}/schedules",
            None,
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::PATCH,
            "/v1/envs/{env}/queues/{queue}",
            Some(|_| json!({"limit": 5})),
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/envs/{env}/queues/{queue}/pause",
            None,
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/envs/{env}/queues/{queue}/resume",
            None,
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/envs/{env}/runs",
            Some(|_| json!({"task": "t", "delay_ms": 3600000})),
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::CREATED,
        ),
        row(
            Method::GET,
            "/v1/envs/{env}/runs",
            None,
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/envs/{env}/runs/batch",
            Some(|_| json!({"runs": [{"task": "t", "delay_ms": 3600000}]})),
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::CREATED,
        ),
        row(
            Method::POST,
            "/v1/envs/{env}/runs/wait",
            Some(|_| json!({"task": "nobody", "timeout_ms": 1})),
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::ACCEPTED,
        ),
        row(
            Method::GET,
            "/v1/envs/{env}/events",
            None,
            EnvOfProd,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::GET,
            "/v1/runs/{id}",
            None,
            RunOfProd,
            Fresh::DelayedRun,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/runs/{id}/cancel",
            None,
            RunOfProd,
            Fresh::DelayedRun,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/runs/{id}/reschedule",
            Some(|_| json!({"delay_ms": 7200000})),
            RunOfProd,
            Fresh::DelayedRun,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/runs/{id}/retry",
            None,
            RunOfProd,
            Fresh::CanceledRun,
            StatusCode::CREATED,
        ),
        row(
            Method::GET,
            "/v1/runs/{id}/events",
            None,
            RunOfProd,
            Fresh::CanceledRun,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/envs/{env}/versions",
            Some(|_| json!({"tasks": [{"name": "t", "queue_limit": 3}]})),
            WorkerOfProd,
            Fresh::Nothing,
            StatusCode::CREATED,
        ),
        row(
            Method::POST,
            "/v1/versions",
            Some(|_| json!({"env": "prod", "tasks": [{"name": "t"}]})),
            WorkerOfProd,
            Fresh::Nothing,
            StatusCode::CREATED,
        ),
        row(
            Method::GET,
            "/v1/envs/{env}/versions",
            None,
            ReadOfProd,
            Fresh::Nothing,
            StatusCode::OK,
        ),
        row(
            Method::GET,
            "/v1/envs/{env}/versions/{version}",
            None,
            ReadOfProd,
            Fresh::Version,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/envs/{env}/versions/{version}/promote",
            None,
            Admin,
            Fresh::Version,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/workers",
            Some(|_| json!({"envs": [{"env": "prod"}], "workloops": "manual>*:1"})),
            WorkerOfProd,
            Fresh::Nothing,
            StatusCode::CREATED,
        ),
        row(
            Method::POST,
            "/v1/workers/{id}/claim",
            Some(|_| json!({"workloop": 0, "max": 1})),
            WorkerOfProd,
            Fresh::Worker,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/workers/{id}/heartbeat",
            Some(|_| json!({"runs": []})),
            WorkerOfProd,
            Fresh::Worker,
            StatusCode::OK,
        ),
        row(
            Method::POST,
            "/v1/workers/{id}/runs/{run}/complete",
            Some(|_| json!({"token": 0, "output": null})),
            WorkerOfProd,
            Fresh::Worker,
            StatusCode::CONFLICT,
        ),
        row(
            Method::POST,
            "/v1/workers/{id}/runs/{run}/fail",
            Some(|_| json!({"token": 0, "error": "x"})),
            WorkerOfProd,
            Fresh::Worker,
            StatusCode::CONFLICT,
        ),
        row(
            Method::POST,
            "/v1/workers/{id}/runs/{run}/progress",
            Some(|_| json!({"token": 0, "progress": 1})),
            WorkerOfProd,
            Fresh::Worker,
            StatusCode::CONFLICT,
        ),
        row(
            Method::DELETE,
            "/v1/workers/{id}",
            None,
            WorkerOfProd,
            Fresh::Worker,
            StatusCode::NO_CONTENT,
        ),
    ]
}

fn expected(access: Access, who: Who, ok: StatusCode) -> StatusCode {
    use Who::*;
    match (access, who) {
        (Access::Public, _) => ok,
        (_, NoKey | Revoked) => StatusCode::UNAUTHORIZED,
        (_, Admin) => ok,
        (Access::WorkerOfProd, Worker) => ok,
        (Access::WorkerOfProd, _) => StatusCode::FORBIDDEN,
        (Access::ReadOfProd, Worker | Env) => ok,
        (Access::ReadOfProd, _) => StatusCode::FORBIDDEN,
        (_, Worker) => StatusCode::FORBIDDEN,
        (Access::Admin, _) => StatusCode::FORBIDDEN,
        (Access::AnyEnvKey, _) => ok,
        (Access::EnvOfProd, Env) => ok,
        (Access::EnvOfProd, _) => StatusCode::FORBIDDEN,
        (Access::RunOfProd, Env) => ok,
        (Access::RunOfProd, _) => StatusCode::NOT_FOUND,
    }
}

async fn fresh_run(s: &TestServer, cancel: bool) -> String {
    let (st, body) = s
        .post(
            "/v1/envs/prod/runs",
            ADMIN,
            json!({"task": "t", "delay_ms": 3600000}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let id = body["run_id"].as_str().expect("id").to_string();
    if cancel {
        let (st, _) = s
            .call(
                Method::POST,
                &format!("/v1/runs/{id}/cancel"),
                Some(ADMIN),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
    }
    id
}

/// A worker registered for `prod` (admin key); answers its id.
async fn fresh_worker(s: &TestServer) -> String {
    let (st, body) = s
        .post(
            "/v1/workers",
            ADMIN,
            json!({"envs": [{"env": "prod"}], "workloops": "manual>*:1"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    body["worker_id"].as_str().expect("worker_id").to_string()
}

/// A version of `prod` (admin key); answers its number.
async fn fresh_version(s: &TestServer) -> String {
    let (st, body) = s
        .post(
            "/v1/envs/prod/versions",
            ADMIN,
            json!({"tasks": [{"name": "t"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    body["version"].as_u64().expect("version").to_string()
}

/// The path with its parameters filled for this call.
async fn concrete(s: &TestServer, row: &Row) -> String {
    let mut path = row.path.replace("{env}", "prod").replace("{queue}", "q");
    if path.contains("{id}") {
        let id = match row.fresh {
            Fresh::DelayedRun => fresh_run(s, false).await,
            Fresh::CanceledRun => fresh_run(s, true).await,
            Fresh::Key => s.key("env", &["prod"]).await.0,
            Fresh::Worker => fresh_worker(s).await,
            Fresh::Nothing | Fresh::Version => {
                unreachable!("a path with {{id}} names what it needs")
            }
        };
        path = path.replace("{id}", &id);
    }
    if path.contains("{version}") {
        path = path.replace("{version}", &fresh_version(s).await);
    }
    if path.contains("{run}") {
        path = path.replace("{run}", &fresh_run(s, false).await);
    }
    path
}

/// Sends one call; answers its status (streams are not read past their headers).
async fn send(
    s: &TestServer,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> StatusCode {
    let mut req = s.client.request(method, format!("{}{path}", s.base));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.expect("request sent").status()
}

async fn matrix(shape: Shape) {
    let s = TestServer::start(shape).await;
    s.env("prod").await;
    s.env("other").await;
    let (revoked_id, revoked) = s.key("env", &["prod"]).await;
    let (st, _) = s
        .call(
            Method::POST,
            &format!("/v1/keys/{revoked_id}/revoke"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, other) = s.key("env", &["other"]).await;
    let (_, worker) = s.key("worker", &["prod"]).await;
    let (_, env) = s.key("env", &["prod"]).await;

    let mut n = 0u64;
    let mut failures = Vec::new();
    let rows = rows();
    for row in &rows {
        for who in WHO {
            n += 1;
            let key = match who {
                Who::NoKey => None,
                Who::Revoked => Some(revoked.as_str()),
                Who::OtherEnv => Some(other.as_str()),
                Who::Worker => Some(worker.as_str()),
                Who::Env => Some(env.as_str()),
                Who::Admin => Some(ADMIN),
            };
            let path = concrete(&s, row).await;
            let body = row.body.map(|b| b(n));
            let got = send(&s, row.method.clone(), &path, key, body).await;
            let want = expected(row.access, who, row.ok);
            if got != want {
                failures.push(format!(
                    "{} {} as {who:?}: got {got}, want {want}",
                    row.method, row.path
                ));
            }
        }
    }
    println!(
        "auth matrix ({shape:?}): {} routes × {} callers = {n} calls, {} wrong",
        rows.len(),
        WHO.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_memory() {
    matrix(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_embedded() {
    matrix(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    matrix(Shape::Distributed).await;
}

/// `(METHOD, path)` of every route in the OpenAPI document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// `(METHOD, path)` of every route docs/API.md lists (`` `POST /v1/envs` ``).
fn in_api_md() -> BTreeSet<(String, String)> {
    let text = include_str!("../../../docs/API.md");
    let mut out = BTreeSet::new();
    for piece in text.split('`') {
        let mut words = piece.split_whitespace();
        let (Some(method), Some(path), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        if ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method) && path.starts_with('/') {
            out.insert((method.to_string(), path.to_string()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route_and_every_documented_route_answers() {
    let s = TestServer::start(Shape::Memory).await;
    s.env("prod").await;
    let (st, doc) = s.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    let mut documented = documented(&doc);
    // The document's own route is served beside the documented ones.
    documented.insert(("GET".into(), "/v1/openapi.json".into()));

    // The matrix covers exactly the documented routes (a new route needs a row).
    let in_matrix: BTreeSet<(String, String)> = rows()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let missing_rows: Vec<_> = documented.difference(&in_matrix).collect();
    assert!(
        missing_rows.is_empty(),
        "documented routes without a matrix row: {missing_rows:?}"
    );
    let undocumented: Vec<_> = in_matrix.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "matrix rows the document lacks: {undocumented:?}"
    );

    // Every route of docs/API.md is in the document.
    let md_missing: Vec<_> = in_api_md()
        .into_iter()
        .filter(|r| !documented.contains(r))
        .collect();
    assert!(
        md_missing.is_empty(),
        "docs/API.md routes missing from the document: {md_missing:?}"
    );

    // Every documented route answers (admin key, real parameters): never 404 or 405.
    for row in rows() {
        let path = concrete(&s, &row).await;
        let got = send(
            &s,
            row.method.clone(),
            &path,
            Some(ADMIN),
            row.body.map(|b| b(9_999)),
        )
        .await;
        assert!(
            got != StatusCode::NOT_FOUND && got != StatusCode::METHOD_NOT_ALLOWED,
            "{} {} answered {got}",
            row.method,
            row.path
        );
    }
    // And an undocumented route is a 404 in the error shape.
    let (st, body) = s.get("/v1/nothing-here", ADMIN).await;
    support::assert_error(st, &body, StatusCode::NOT_FOUND, "not_found");
    s.stop().await;
}
