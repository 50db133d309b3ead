//! The first routes end to end on a real server: envs, keys, trigger, get, health, OpenAPI,
//! and the error shape of bad input and bad keys.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{assert_error, Shape, TestServer, ADMIN};

async fn envs_keys_runs(shape: Shape) {
    let s = TestServer::start(shape).await;
    s.env("prod").await;
    let (st, body) = s.post("/v1/envs", ADMIN, json!({"name": "prod"})).await;
    assert_error(st, &body, StatusCode::CONFLICT, "conflict");

    let (st, body) = s
        .patch(
            "/v1/envs/prod",
            ADMIN,
            json!({"limit": 7, "fast_lane_limit": 3}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["limit"], 7);
    assert_eq!(body["fast_lane_limit"], 3);
    let (st, body) = s
        .patch("/v1/envs/prod", ADMIN, json!({"fast_lane_limit": null}))
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["fast_lane_limit"], serde_json::Value::Null);
    assert_eq!(body["limit"], 7);

    let (_, env_key) = s.key("env", &["prod"]).await;
    let (st, body) = s.get("/v1/envs/prod", &env_key).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "prod");
    let (st, body) = s.get("/v1/envs", &env_key).await;
    assert_eq!(st, StatusCode::OK);
    let names: Vec<&str> = body["envs"]
        .as_array()
        .expect("envs")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, vec!["prod"]);

    let (st, body) = s
        .post(
            "/v1/envs/prod/runs",
            &env_key,
            json!({"task": "email", "payload": {"to": "a@example.com"}, "delay_ms": 60000}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["status"], "delayed");
    assert_eq!(body["idempotent_hit"], false);
    let id = body["run_id"].as_str().expect("run id").to_string();
    let (st, run) = s.get(&format!("/v1/runs/{id}"), &env_key).await;
    assert_eq!(st, StatusCode::OK, "{run}");
    assert_eq!(run["env"], "prod");
    assert_eq!(run["task"], "email");
    assert_eq!(run["payload"]["to"], "a@example.com");
    assert_eq!(run["status"], "delayed");

    // Keys: list, rotate (old revoked at once), revoke.
    let (st, body) = s.get("/v1/keys", ADMIN).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["keys"].as_array().map(Vec::len), Some(2));
    let env_key_id = body["keys"][1]["id"].as_str().expect("id").to_string();
    let (st, rotated) = s
        .call(
            Method::POST,
            &format!("/v1/keys/{env_key_id}/rotate"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{rotated}");
    let new_key = rotated["key"].as_str().expect("key").to_string();
    let (st, body) = s.get(&format!("/v1/runs/{id}"), &env_key).await;
    assert_error(st, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    let (st, _) = s.get(&format!("/v1/runs/{id}"), &new_key).await;
    assert_eq!(st, StatusCode::OK);
    let new_id = rotated["id"].as_str().expect("id");
    let (st, body) = s
        .call(
            Method::POST,
            &format!("/v1/keys/{new_id}/revoke"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body["revoked_at_ms"].is_u64());
    let (st, _) = s.get(&format!("/v1/runs/{id}"), &new_key).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envs_keys_runs_memory() {
    envs_keys_runs(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envs_keys_runs_embedded() {
    envs_keys_runs(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envs_keys_runs_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    envs_keys_runs(Shape::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_has_the_error_shape() {
    let s = TestServer::start_with(Shape::Memory, |c| c.max_body_bytes = 4096).await;
    s.env("prod").await;
    let url = format!("{}/v1/envs/prod/runs", s.base);
    let send = |body: &'static str, ct: &'static str| {
        s.client
            .post(&url)
            .bearer_auth(ADMIN)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let check = |resp: reqwest::Response, want: StatusCode, code: &'static str| async move {
        let st = resp.status();
        let body: serde_json::Value = resp.json().await.expect("json error body");
        assert_error(st, &body, want, code);
        body
    };
    check(
        send("{\"task\":", "application/json").await.expect("sent"),
        StatusCode::BAD_REQUEST,
        "malformed_json",
    )
    .await;
    check(
        send("{\"task\":\"a\"}", "text/plain").await.expect("sent"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let body = check(
        send("{\"task\":\"a\",\"nope\":1}", "application/json")
            .await
            .expect("sent"),
        StatusCode::BAD_REQUEST,
        "unknown_field",
    )
    .await;
    assert_eq!(body["error"]["field"], "nope");
    let body = check(
        send("{\"task\":\"a\",\"ttl_ms\":0}", "application/json")
            .await
            .expect("sent"),
        StatusCode::BAD_REQUEST,
        "invalid_input",
    )
    .await;
    assert_eq!(body["error"]["field"], "ttl_ms");
    let body = check(
        send("{\"task\":\"a\",\"lane\":\"nope\"}", "application/json")
            .await
            .expect("sent"),
        StatusCode::BAD_REQUEST,
        "unknown_lane",
    )
    .await;
    assert_eq!(body["error"]["field"], "lane");
    let big = format!("{{\"task\":\"a\",\"payload\":\"{}\"}}", "x".repeat(5000));
    let resp = s
        .client
        .post(&url)
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("sent");
    check(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    let (st, body) = s
        .get("/v1/runs/run_00000000000000000000000000000000", ADMIN)
        .await;
    assert_error(st, &body, StatusCode::NOT_FOUND, "not_found");
    let (st, body) = s.get("/v1/runs/garbage", ADMIN).await;
    assert_error(st, &body, StatusCode::NOT_FOUND, "not_found");
    // Nothing was stored by any of the refused triggers.
    let (_, queues) = s.get("/health", ADMIN).await;
    assert_eq!(queues["status"], "ok");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_the_routes_and_health_needs_no_key() {
    let s = TestServer::start(Shape::Memory).await;
    let (st, doc) = s.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(st, StatusCode::OK);
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/v1/envs",
        "/v1/envs/{env}",
        "/v1/keys",
        "/v1/envs/{env}/runs",
        "/v1/runs/{id}",
        "/health",
    ] {
        assert!(paths.contains_key(p), "{p} missing from the document");
    }
    let (st, body) = s.call(Method::GET, "/health", None, None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok");
    let (st, body) = s.call(Method::GET, "/v1/envs", None, None).await;
    assert_error(st, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    for (header, want) in [
        (format!("bearer {ADMIN}"), StatusCode::OK),
        (format!("Basic {ADMIN}"), StatusCode::UNAUTHORIZED),
        ("Bearer ".to_string(), StatusCode::UNAUTHORIZED),
        (ADMIN.to_string(), StatusCode::UNAUTHORIZED),
    ] {
        let status = s
            .client
            .get(format!("{}/v1/envs", s.base))
            .header("authorization", header.clone())
            .send()
            .await
            .expect("sent")
            .status();
        assert_eq!(status, want, "{header}");
    }
    s.stop().await;
}
