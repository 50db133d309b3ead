//! Two servers over one Redis key prefix and one PostgreSQL schema: a key made on one works on
//! the other (keys live in PostgreSQL), a run triggered on one is read and cancelled on the
//! other, and a revocation on one is refused at once there.

mod support;

use reqwest::{Method, StatusCode};
use runlane_server::BackendConfig;
use serde_json::json;
use support::{Shape, TestServer, ADMIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_keys_and_runs() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    // A owns the throwaway prefix and schema; B opens the same ones and leaves them be.
    let a = TestServer::start(Shape::Distributed).await;
    let BackendConfig::Distributed(shared) = a.state().config().backend.clone() else {
        panic!("a distributed server");
    };
    let b = TestServer::start_with(Shape::Memory, |c| {
        let mut shared = shared.clone();
        shared.throwaway = false;
        c.backend = BackendConfig::Distributed(shared);
    })
    .await;

    a.env("prod").await;
    let (key_id, key) = a.key("env", &["prod"]).await;
    let (st, body) = b
        .post(
            "/v1/envs/prod/runs",
            &key,
            json!({"task": "t", "delay_ms": 3_600_000}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let run = body["run_id"].as_str().expect("id").to_string();
    let (st, got) = a.get(&format!("/v1/runs/{run}"), &key).await;
    assert_eq!(st, StatusCode::OK, "{got}");
    assert_eq!(got["status"], "delayed");
    let (st, got) = a
        .call(
            Method::POST,
            &format!("/v1/runs/{run}/cancel"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{got}");
    let (_, got) = b.get(&format!("/v1/runs/{run}"), &key).await;
    assert_eq!(got["status"], "canceled");

    // Revoked on B: refused on B at once.
    let (st, _) = b
        .call(
            Method::POST,
            &format!("/v1/keys/{key_id}/revoke"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = b.get(&format!("/v1/runs/{run}"), &key).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Both list the same keys.
    let (_, ka) = a.get("/v1/keys", ADMIN).await;
    let (_, kb) = b.get("/v1/keys", ADMIN).await;
    assert_eq!(ka, kb);
    b.stop().await;
    a.stop().await;
}

/// Two servers of one deployment race to create the same env: the store's insert decides, so
/// exactly one create answers 201 and every other one 409 `conflict`, on either server, and
/// both servers then read the winner's settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_create_one_env_once() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    let a = TestServer::start(Shape::Distributed).await;
    let BackendConfig::Distributed(shared) = a.state().config().backend.clone() else {
        panic!("a distributed server");
    };
    let b = TestServer::start_with(Shape::Memory, |c| {
        let mut shared = shared.clone();
        shared.throwaway = false;
        c.backend = BackendConfig::Distributed(shared);
    })
    .await;
    let a = std::sync::Arc::new(a);
    let b = std::sync::Arc::new(b);
    let calls: Vec<_> = (0..8u32)
        .map(|i| {
            let server = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let body = json!({ "name": "raced", "limit": 10 + i });
                let (status, answer) = server
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
            StatusCode::CONFLICT => {
                assert_eq!(answer["error"]["code"], "conflict");
                assert_eq!(answer["error"]["field"], "name");
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one create wins: {won:?}");
    for server in [&a, &b] {
        let (status, env) = server.get("/v1/envs/raced", ADMIN).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(env["limit"], won[0]);
    }
    let b = std::sync::Arc::into_inner(b).expect("no other handle");
    b.stop().await;
    let a = std::sync::Arc::into_inner(a).expect("no other handle");
    a.stop().await;
}
