//! Lanes and queues over HTTP: list with depth, add a lane, change queue limits, pause and
//! resume (a paused queue admits nothing; resuming admits at once); concurrent creates of one env
//! (one 201, the rest 409).

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{assert_error, Shape, TestServer, ADMIN};

fn queue<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == name)
        .unwrap_or(&Value::Null)
}

async fn lanes_and_queues(shape: Shape) {
    let s = TestServer::start(shape).await;
    s.env("prod").await;
    let (_, env_key) = s.key("env", &["prod"]).await;

    let (st, lane) = s.post("/v1/lanes", ADMIN, json!({"name": "gpu"})).await;
    assert_eq!(st, StatusCode::CREATED, "{lane}");
    assert_eq!(lane["name"], "gpu");
    let (st, body) = s.post("/v1/lanes", ADMIN, json!({"name": "gpu"})).await;
    assert_error(st, &body, StatusCode::CONFLICT, "conflict");
    let (st, body) = s.post("/v1/lanes", &env_key, json!({"name": "cpu"})).await;
    assert_error(st, &body, StatusCode::FORBIDDEN, "forbidden");

    // Two runs on the new lane, none claimed: the lane shows depth.
    for _ in 0..2 {
        let (st, body) = s
            .post(
                "/v1/envs/prod/runs",
                &env_key,
                json!({"task": "render", "lane": "gpu"}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
    }
    let (st, lanes) = s.get("/v1/lanes", &env_key).await;
    assert_eq!(st, StatusCode::OK, "{lanes}");
    let gpu = lanes["lanes"]
        .as_array()
        .expect("lanes")
        .iter()
        .find(|l| l["name"] == "gpu")
        .expect("gpu listed")
        .clone();
    assert_eq!(gpu["ready"], 2);
    assert_eq!(gpu["consumers"], 0);

    // Queues: pause, a trigger waits queued; limits; resume admits.
    let (st, q) = s
        .call(
            Method::POST,
            "/v1/envs/prod/queues/mail/pause",
            Some(&env_key),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{q}");
    assert_eq!(q["paused"], true);
    let (st, body) = s
        .post("/v1/envs/prod/runs", &env_key, json!({"task": "mail"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "queued");
    let (st, list) = s.get("/v1/envs/prod/queues", &env_key).await;
    assert_eq!(st, StatusCode::OK, "{list}");
    assert_eq!(queue(&list, "mail")["queued"], 1);
    assert_eq!(queue(&list, "render")["running"], 2);

    let (st, q) = s
        .patch(
            "/v1/envs/prod/queues/mail",
            &env_key,
            json!({"limit": 3, "max_queued": 10}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{q}");
    assert_eq!(q["limit"], 3);
    assert_eq!(q["max_queued"], 10);
    assert_eq!(q["paused"], true);
    let (st, q) = s
        .patch(
            "/v1/envs/prod/queues/mail",
            &env_key,
            json!({"limit": null}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{q}");
    assert_eq!(q["limit"], Value::Null);
    assert_eq!(q["max_queued"], 10);
    let (st, body) = s
        .patch(
            "/v1/envs/prod/queues/mail",
            &env_key,
            json!({"max_queued": 0}),
        )
        .await;
    assert_error(st, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(body["error"]["field"], "max_queued");

    let (st, q) = s
        .call(
            Method::POST,
            "/v1/envs/prod/queues/mail/resume",
            Some(&env_key),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{q}");
    assert_eq!(q["paused"], false);
    assert_eq!(q["queued"], 0);
    assert_eq!(q["running"], 1);

    let (st, body) = s.get("/v1/envs/nope/queues", ADMIN).await;
    assert_error(st, &body, StatusCode::NOT_FOUND, "not_found");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_and_queues_memory() {
    lanes_and_queues(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_and_queues_embedded() {
    lanes_and_queues(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_and_queues_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    lanes_and_queues(Shape::Distributed).await;
}

/// Concurrent creates of one env name: exactly one 201, every other one 409 `conflict`, and the
/// env keeps the settings of the create that won.
async fn concurrent_env_creates(shape: Shape) {
    let s = std::sync::Arc::new(TestServer::start(shape).await);
    let calls: Vec<_> = (0..8u32)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let body = json!({ "name": "raced", "limit": 10 + i });
                let (status, answer) = s
                    .call(Method::POST, "/v1/envs", Some(ADMIN), Some(body))
                    .await;
                (status, answer, 10 + i)
            })
        })
        .collect();
    let mut won = Vec::new();
    for call in calls {
        let (status, answer, limit) = call.await.expect("call");
        match status {
            StatusCode::CREATED => won.push(limit),
            StatusCode::CONFLICT => assert_eq!(answer["error"]["code"], "conflict"),
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one create wins: {won:?}");
    let (status, env) = s
        .call(Method::GET, "/v1/envs/raced", Some(ADMIN), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(env["limit"], won[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_env_creates_memory() {
    concurrent_env_creates(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_env_creates_embedded() {
    concurrent_env_creates(Shape::Embedded).await;
}
