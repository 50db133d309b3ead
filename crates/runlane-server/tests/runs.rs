//! Run routes end to end: trigger, batch, trigger-and-wait, list with filters and cursor,
//! cancel, reschedule, retry; on memory, embedded and distributed.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{assert_error, Shape, TestServer, ADMIN};

async fn post0(s: &TestServer, path: &str) -> (StatusCode, Value) {
    s.call(Method::POST, path, Some(ADMIN), None).await
}

async fn runs_lifecycle(shape: Shape) {
    let s = TestServer::start_with(shape, |c| c.max_batch = 5).await;
    s.env("prod").await;

    // Batch: 3 runs, all delayed; over the limit refused; a bad item names its index.
    let trig = |task: &str| json!({"task": task, "delay_ms": 3_600_000});
    let (st, body) = s
        .post(
            "/v1/envs/prod/runs/batch",
            ADMIN,
            json!({"runs": [trig("a"), trig("a"), trig("b")]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let ids: Vec<String> = body["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["run_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let six: Vec<Value> = (0..6).map(|_| trig("a")).collect();
    let (st, body) = s
        .post("/v1/envs/prod/runs/batch", ADMIN, json!({"runs": six}))
        .await;
    assert_error(st, &body, StatusCode::BAD_REQUEST, "batch_too_large");
    let (st, body) = s
        .post(
            "/v1/envs/prod/runs/batch",
            ADMIN,
            json!({"runs": [trig("a"), {"task": "a", "ttl_ms": 0}]}),
        )
        .await;
    assert_error(st, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(body["error"]["field"], "runs[1].ttl_ms");

    // List: filters and cursor pagination.
    let (st, page) = s.get("/v1/envs/prod/runs?limit=2", ADMIN).await;
    assert_eq!(st, StatusCode::OK, "{page}");
    assert_eq!(page["runs"].as_array().map(Vec::len), Some(2));
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (_, page2) = s
        .get(
            &format!("/v1/envs/prod/runs?limit=2&cursor={cursor}"),
            ADMIN,
        )
        .await;
    assert_eq!(page2["runs"].as_array().map(Vec::len), Some(1));
    assert_eq!(page2["next_cursor"], Value::Null);
    assert_eq!(page2["runs"][0]["id"], ids[2].as_str());
    let (_, by_task) = s.get("/v1/envs/prod/runs?task=b", ADMIN).await;
    assert_eq!(by_task["runs"].as_array().map(Vec::len), Some(1));
    let (_, delayed) = s
        .get("/v1/envs/prod/runs?status=delayed&source=standard", ADMIN)
        .await;
    assert_eq!(delayed["runs"].as_array().map(Vec::len), Some(3));
    let (st, body) = s.get("/v1/envs/prod/runs?status=bogus", ADMIN).await;
    assert_error(st, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(body["error"]["field"], "status");
    let (st, body) = s.get("/v1/envs/prod/runs?colour=red", ADMIN).await;
    assert_error(st, &body, StatusCode::BAD_REQUEST, "unknown_field");

    // Reschedule a delayed run; cancel; cancel again is 409; retry makes a new run.
    let (st, run) = s
        .post(
            &format!("/v1/runs/{}/reschedule", ids[0]),
            ADMIN,
            json!({"delay_ms": 7_200_000}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{run}");
    assert_eq!(run["status"], "delayed");
    assert!(
        run["run_at_ms"].as_u64().expect("run_at")
            > run["created_at_ms"].as_u64().expect("created") + 3_600_000
    );
    let (st, body) = s
        .post(
            &format!("/v1/runs/{}/reschedule", ids[0]),
            ADMIN,
            json!({"delay_ms": 1, "run_at_ms": 1}),
        )
        .await;
    assert_error(st, &body, StatusCode::BAD_REQUEST, "invalid_input");
    let (st, run) = post0(&s, &format!("/v1/runs/{}/cancel", ids[0])).await;
    assert_eq!(st, StatusCode::OK, "{run}");
    assert_eq!(run["status"], "canceled");
    assert_eq!(
        run["cancel_requested_at_ms"], run["finished_at_ms"],
        "the request is kept, at the instant the run ended: {run}"
    );
    assert!(run["cancel_requested_at_ms"].is_u64(), "{run}");
    let (st, body) = post0(&s, &format!("/v1/runs/{}/cancel", ids[0])).await;
    assert_error(st, &body, StatusCode::CONFLICT, "already_finished");
    let (st, body) = s
        .post(
            &format!("/v1/runs/{}/reschedule", ids[0]),
            ADMIN,
            json!({"delay_ms": 5}),
        )
        .await;
    assert_error(st, &body, StatusCode::CONFLICT, "already_finished");
    let (st, retried) = post0(&s, &format!("/v1/runs/{}/retry", ids[0])).await;
    assert_eq!(st, StatusCode::CREATED, "{retried}");
    let new_id = retried["run_id"].as_str().expect("id");
    let (_, new_run) = s.get(&format!("/v1/runs/{new_id}"), ADMIN).await;
    assert_eq!(new_run["retry_of"], ids[0].as_str());
    assert_eq!(new_run["source"], "manual");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_lifecycle_memory() {
    runs_lifecycle(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_lifecycle_embedded() {
    runs_lifecycle(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_lifecycle_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    runs_lifecycle(Shape::Distributed).await;
}

async fn trigger_and_wait(shape: Shape) {
    let s = TestServer::start(shape).await;
    s.env("prod").await;
    let worker = s
        .engine()
        .worker()
        .env("prod")
        .workloops("fast_lane:2")
        .handler("double", |ctx| async move {
            let n: u64 = ctx.payload()?;
            Ok(json!(n * 2))
        })
        .start()
        .await
        .expect("worker starts");
    let (st, body) = s
        .post(
            "/v1/envs/prod/runs/wait",
            ADMIN,
            json!({"task": "double", "payload": 21, "timeout_ms": 30000}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["output"], 42);
    let (_, run) = s
        .get(
            &format!("/v1/runs/{}", body["run_id"].as_str().expect("id")),
            ADMIN,
        )
        .await;
    assert_eq!(run["lane"], "fast_lane");
    assert_eq!(run["source"], "sync");
    worker.stop().await;

    // No worker for this task: 202 after the timeout with the current status.
    let (st, body) = s
        .post(
            "/v1/envs/prod/runs/wait",
            ADMIN,
            json!({"task": "nobody", "timeout_ms": 50}),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    assert!(body["status"].is_string());
    let (st, body) = s
        .post(
            "/v1/envs/prod/runs/wait",
            ADMIN,
            json!({"task": "x", "timeout_ms": 300001}),
        )
        .await;
    assert_error(st, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(body["error"]["field"], "timeout_ms");
    let (st, body) = s
        .post(
            "/v1/envs/prod/runs/wait",
            ADMIN,
            json!({"task": "x", "bogus": 1}),
        )
        .await;
    assert_error(st, &body, StatusCode::BAD_REQUEST, "unknown_field");

    // A full fast lane: 429 with Retry-After.
    let (st, _) = s
        .patch("/v1/envs/prod", ADMIN, json!({"fast_lane_limit": 0}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let resp = s
        .client
        .post(format!("{}/v1/envs/prod/runs/wait", s.base))
        .bearer_auth(ADMIN)
        .json(&json!({"task": "double", "payload": 1, "timeout_ms": 100}))
        .send()
        .await
        .expect("sent");
    let status = resp.status();
    let retry_after = resp.headers().get("retry-after").cloned();
    let body: Value = resp.json().await.expect("json");
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "fast_lane_full",
    );
    assert!(retry_after.is_some(), "Retry-After header");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_and_wait_memory() {
    trigger_and_wait(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_and_wait_embedded() {
    trigger_and_wait(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_and_wait_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    trigger_and_wait(Shape::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_pass_through_exactly() {
    let s = TestServer::start(Shape::Memory).await;
    s.env("prod").await;
    // Key order and a number no f64 holds survive the round trip.
    let payload = r#"{"b":1,"a":12345678901234567890123,"c":[1.50,"x"]}"#;
    let body = format!(r#"{{"task":"t","delay_ms":60000,"payload":{payload}}}"#);
    let resp = s
        .client
        .post(format!("{}/v1/envs/prod/runs", s.base))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let triggered: Value = resp.json().await.expect("json");
    let id = triggered["run_id"].as_str().expect("id");
    let text = s
        .client
        .get(format!("{}/v1/runs/{id}", s.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains(&format!(r#""payload":{payload}"#)),
        "payload changed: {text}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batch_above_the_engine_default_is_honoured() {
    let s = TestServer::start_with(Shape::Memory, |c| c.max_batch = 1_100).await;
    s.env("prod").await;
    let runs: Vec<Value> = (0..1_001)
        .map(|_| json!({"task": "t", "delay_ms": 3_600_000}))
        .collect();
    let (st, body) = s
        .post("/v1/envs/prod/runs/batch", ADMIN, json!({ "runs": runs }))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["runs"].as_array().map(Vec::len), Some(1_001));
    s.stop().await;
}
