//! The worker protocol over real HTTP (a server on port 0) on memory and embedded, and on
//! distributed when Redis and PostgreSQL answer (always under CI): the whole cycle (register,
//! claim, heartbeat, progress, complete, fail with each retry choice, delete), stale tokens
//! (409 `stale_token`), bad input naming its field (400), keys of another env or role (403),
//! a cancel reported by the heartbeat, a delete after a cancel ending the run canceled (not back
//! in its queue), a worker dropped after three idle leases (its run no longer held), and a
//! long-poll longer than three leases keeping its worker. The worker routes' rows of the auth
//! matrix are in `matrix.rs`.

mod support;

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{assert_error, distributed_available, Shape, TestServer, ADMIN};

/// Triggers a run of `job` in env `default`; answers its id.
async fn trigger(server: &TestServer, n: u64) -> String {
    let (status, body) = server
        .post(
            "/v1/envs/default/runs",
            ADMIN,
            json!({ "task": "job", "payload": { "n": n } }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["run_id"].as_str().expect("run_id").to_string()
}

/// Registers a worker for env `default` with `key`; answers its id.
async fn register(server: &TestServer, key: &str, workloops: &str, lease_ms: u64) -> String {
    let (status, body) = server
        .post(
            "/v1/workers",
            key,
            json!({ "envs": [{ "env": "default" }], "workloops": workloops, "lease_ms": lease_ms }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["worker_id"].as_str().expect("worker_id").to_string()
}

/// Claims until `want` runs came (each claim long-polls up to 5 s), bounded.
async fn claim(server: &TestServer, key: &str, worker: &str, want: usize) -> Vec<Value> {
    let start = Instant::now();
    let mut got: Vec<Value> = Vec::new();
    while got.len() < want {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "claimed {} of {want} runs",
            got.len()
        );
        let (status, body) = server
            .post(
                &format!("/v1/workers/{worker}/claim"),
                key,
                json!({ "workloop": 0, "max": want - got.len(), "wait_ms": 5000 }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        got.extend(body["runs"].as_array().expect("runs").iter().cloned());
    }
    got
}

async fn run_status(server: &TestServer, run: &str) -> Value {
    let (status, body) = server.get(&format!("/v1/runs/{run}"), ADMIN).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Everything a bad worker call could have changed: runs, envs (a declared task makes a new
/// version), lanes (a registration adds consumers).
async fn snapshot(server: &TestServer) -> Value {
    let mut out = serde_json::Map::new();
    for path in [
        "/v1/envs/default/runs?limit=1000",
        "/v1/envs",
        "/v1/envs/default",
        "/v1/lanes",
    ] {
        let (status, mut body) = server.get(path, ADMIN).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        // A claim's start mark is advisory and written after the claim (the embedded store
        // buffers it for its writer's next transaction): not a change a call makes.
        for run in body["runs"].as_array_mut().into_iter().flatten() {
            if let Some(run) = run.as_object_mut() {
                run.remove("started_at_ms");
            }
        }
        out.insert(path.to_string(), body);
    }
    Value::Object(out)
}

async fn worker_key(server: &TestServer) -> String {
    server.key("worker", &["default"]).await.1
}

// ---- scenarios -----------------------------------------------------------------------------

async fn whole_cycle(shape: Shape) {
    let server = TestServer::start(shape).await;
    let key = worker_key(&server).await;
    let first = trigger(&server, 1).await;

    let (status, body) = server
        .post(
            "/v1/workers",
            &key,
            json!({
                "envs": [{ "env": "default" }],
                "workloops": "manual>*:2",
                "lease_ms": 30000,
                "tasks": ["job"],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let worker = body["worker_id"].as_str().expect("worker_id").to_string();
    assert_eq!(body["lease_ms"], 30000);
    assert_eq!(
        body["workloops"],
        json!([{ "index": 0, "chain": "manual>*", "slots": 2 }])
    );

    let claimed = claim(&server, &key, &worker, 1).await;
    let c = &claimed[0];
    assert_eq!(c["run_id"], first.as_str());
    assert_eq!(c["task"], "job");
    assert_eq!(c["env"], "default");
    assert_eq!(c["payload"], json!({ "n": 1 }));
    assert_eq!(c["attempt"], 1);
    assert!(c["token"].is_u64(), "{c}");
    assert_eq!(run_status(&server, &first).await["status"], "executing");
    let token = c["token"].clone();

    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/heartbeat"),
            &key,
            json!({ "runs": [{ "run_id": first, "token": token }] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "cancelled": [], "lost": [] }));

    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/runs/{first}/progress"),
            &key,
            json!({ "token": token, "progress": { "done": 1 } }),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/runs/{first}/complete"),
            &key,
            json!({ "token": token, "output": { "ok": true } }),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let run = run_status(&server, &first).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["output"], json!({ "ok": true }));

    // Fail without retry, then with an instant.
    let second = trigger(&server, 2).await;
    let third = trigger(&server, 3).await;
    let claimed = claim(&server, &key, &worker, 2).await;
    let token_of = |run: &str| {
        claimed
            .iter()
            .find(|c| c["run_id"] == run)
            .map(|c| c["token"].clone())
            .expect("claimed")
    };
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/runs/{second}/fail"),
            &key,
            json!({ "token": token_of(&second), "error": "fatal", "retry": "none" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "status": "failed", "retry_at_ms": null }));
    let run = run_status(&server, &second).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["error"], "fatal");

    let at = run["created_at_ms"].as_u64().expect("created_at_ms") + 3_600_000;
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/runs/{third}/fail"),
            &key,
            json!({ "token": token_of(&third), "error": "later", "retry": { "at_ms": at } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "status": "delayed", "retry_at_ms": at }));
    let run = run_status(&server, &third).await;
    assert_eq!(run["status"], "delayed");
    assert_eq!(run["run_at_ms"], at);
    assert_eq!(run["attempt"], 2);

    // The policy's backoff.
    let fourth = trigger(&server, 4).await;
    let claimed = claim(&server, &key, &worker, 1).await;
    assert_eq!(claimed[0]["run_id"], fourth.as_str());
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/runs/{fourth}/fail"),
            &key,
            json!({ "token": claimed[0]["token"], "error": "boom", "retry": "policy" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "delayed");
    assert!(body["retry_at_ms"].is_u64(), "{body}");

    let (status, body) = server
        .call(
            Method::DELETE,
            &format!("/v1/workers/{worker}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/claim"),
            &key,
            json!({ "workloop": 0, "max": 1 }),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    server.stop().await;
}

async fn stale_token_is_409(shape: Shape) {
    let server = TestServer::start(shape).await;
    let key = worker_key(&server).await;
    let run = trigger(&server, 1).await;
    let worker = register(&server, &key, "manual>*:1", 30000).await;
    let claimed = claim(&server, &key, &worker, 1).await;
    let token = claimed[0]["token"].as_u64().expect("token");

    let complete = |token: u64| {
        let (server, worker, run, key) = (&server, &worker, &run, &key);
        async move {
            server
                .post(
                    &format!("/v1/workers/{worker}/runs/{run}/complete"),
                    key,
                    json!({ "token": token, "output": 1 }),
                )
                .await
        }
    };
    let (status, body) = complete(token + 1).await;
    assert_error(status, &body, StatusCode::CONFLICT, "stale_token");
    assert_eq!(body["error"]["field"], "token");
    assert_eq!(run_status(&server, &run).await["status"], "executing");

    let (status, body) = complete(token).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = complete(token).await;
    assert_error(status, &body, StatusCode::CONFLICT, "stale_token");
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/runs/{run}/fail"),
            &key,
            json!({ "token": token, "error": "late" }),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "stale_token");
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/runs/{run}/progress"),
            &key,
            json!({ "token": token, "progress": 1 }),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "stale_token");
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/heartbeat"),
            &key,
            json!({ "runs": [{ "run_id": run, "token": token }] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "cancelled": [], "lost": [run] }));
    assert_eq!(run_status(&server, &run).await["status"], "completed");
    server.stop().await;
}

async fn bad_input_names_the_field(shape: Shape) {
    let server = TestServer::start(shape).await;
    let key = worker_key(&server).await;
    let register_with = |body: Value| {
        let (server, key) = (&server, &key);
        async move { server.post("/v1/workers", key, body).await }
    };
    let before = snapshot(&server).await;
    let (status, body) = register_with(
        json!({ "envs": [{ "env": "default" }], "workloops": "manual>*:x", "tasks": ["new"] }),
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(body["error"]["field"], "workloops");
    let (status, body) =
        register_with(json!({ "envs": [{ "env": "default" }], "workloops": "" })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(body["error"]["field"], "workloops");
    let (status, body) = register_with(
        json!({ "envs": [{ "env": "default" }], "workloops": "manual>*:1", "lease_ms": 0 }),
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(body["error"]["field"], "lease_ms");
    let (status, body) = register_with(json!({ "envs": [], "workloops": "manual>*:1" })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(body["error"]["field"], "envs");
    let (status, body) = register_with(
        json!({ "envs": [{ "env": "default" }], "workloops": "manual>*:1", "colour": 1 }),
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "unknown_field");
    assert_eq!(body["error"]["field"], "colour");
    let (status, body) = register_with(
        json!({ "envs": [{ "env": "default" }], "workloops": "manual>*:1", "tasks": ["bad name!"] }),
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(body["error"]["field"], "tasks");
    let (status, body) = register_with(
        json!({ "envs": [{ "env": "default", "version": 99 }], "workloops": "manual>*:1" }),
    )
    .await;
    assert!(status.is_client_error(), "{status} {body}");
    assert_eq!(
        snapshot(&server).await,
        before,
        "a refused registration changes nothing"
    );

    let worker = register(&server, &key, "manual>*:1", 30000).await;
    let claim_with = |body: Value| {
        let (server, key, worker) = (&server, &key, &worker);
        async move {
            server
                .post(&format!("/v1/workers/{worker}/claim"), key, body)
                .await
        }
    };
    for (body, field) in [
        (json!({ "workloop": 3, "max": 1 }), "workloop"),
        (json!({ "workloop": 0, "max": 0 }), "max"),
        (
            json!({ "workloop": 0, "max": 1, "wait_ms": 60_001 }),
            "wait_ms",
        ),
    ] {
        let (status, answer) = claim_with(body.clone()).await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, "invalid_input");
        assert_eq!(answer["error"]["field"], field, "{body}");
    }

    let run = trigger(&server, 1).await;
    let claimed = claim(&server, &key, &worker, 1).await;
    let token = claimed[0]["token"].clone();
    let before = snapshot(&server).await;
    for (retry, field) in [
        (json!("sometimes"), "retry"),
        (json!({ "at_ms": "soon" }), "retry.at_ms"),
        (json!({ "at_ms": 1 }), "retry.at_ms"),
    ] {
        let (status, body) = server
            .post(
                &format!("/v1/workers/{worker}/runs/{run}/fail"),
                &key,
                json!({ "token": token, "error": "x", "retry": retry }),
            )
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
        assert_eq!(body["error"]["field"], field, "{retry}");
    }
    assert_eq!(run_status(&server, &run).await["status"], "executing");
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/heartbeat"),
            &key,
            json!({ "runs": [{ "run_id": "nope", "token": 1 }] }),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(body["error"]["field"], "runs[0].run_id");
    assert_eq!(
        snapshot(&server).await,
        before,
        "refused run calls change nothing"
    );
    let (status, body) = server
        .post(
            "/v1/workers/w_nobody/claim",
            &key,
            json!({ "workloop": 0, "max": 1 }),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    server.stop().await;
}

async fn keys_outside_their_env_or_role_are_403(shape: Shape) {
    let server = TestServer::start(shape).await;
    server.env("other").await;
    let mine = worker_key(&server).await;
    let (_, theirs) = server.key("worker", &["other"]).await;
    let (_, env_key) = server.key("env", &["default"]).await;

    let body = json!({ "envs": [{ "env": "default" }], "workloops": "manual>*:1" });
    let (status, answer) = server.post("/v1/workers", &theirs, body.clone()).await;
    assert_error(status, &answer, StatusCode::FORBIDDEN, "forbidden");
    let (status, answer) = server.post("/v1/workers", &env_key, body.clone()).await;
    assert_error(status, &answer, StatusCode::FORBIDDEN, "forbidden");
    let (status, answer) = server
        .call(Method::POST, "/v1/workers", None, Some(body))
        .await;
    assert_error(status, &answer, StatusCode::UNAUTHORIZED, "unauthorized");

    let worker = register(&server, &mine, "manual>*:1", 30000).await;
    let run = trigger(&server, 1).await;
    let claim_body = json!({ "workloop": 0, "max": 1 });
    let (status, answer) = server
        .post(
            &format!("/v1/workers/{worker}/claim"),
            &theirs,
            claim_body.clone(),
        )
        .await;
    assert_error(status, &answer, StatusCode::FORBIDDEN, "forbidden");
    let (status, answer) = server
        .call(
            Method::DELETE,
            &format!("/v1/workers/{worker}"),
            Some(&theirs),
            None,
        )
        .await;
    assert_error(status, &answer, StatusCode::FORBIDDEN, "forbidden");
    // The run is untouched and the owner still claims it.
    let status = run_status(&server, &run).await["status"].clone();
    assert!(status == "ready" || status == "queued", "{status}");
    let claimed = claim(&server, &mine, &worker, 1).await;
    assert_eq!(claimed[0]["run_id"], run.as_str());
    // An admin key may drive any worker.
    let (status, answer) = server
        .post(
            &format!("/v1/workers/{worker}/heartbeat"),
            ADMIN,
            json!({ "runs": [{ "run_id": run, "token": claimed[0]["token"] }] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    server.stop().await;
}

async fn a_cancel_is_reported_by_the_heartbeat(shape: Shape) {
    let server = TestServer::start(shape).await;
    let key = worker_key(&server).await;
    let run = trigger(&server, 1).await;
    let worker = register(&server, &key, "manual>*:1", 30000).await;
    let claimed = claim(&server, &key, &worker, 1).await;
    let token = claimed[0]["token"].clone();

    let heartbeat = json!({ "runs": [{ "run_id": run, "token": token }] });
    let path = format!("/v1/workers/{worker}/heartbeat");
    let (status, body) = server.post(&path, &key, heartbeat.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "cancelled": [], "lost": [] }));

    let (status, body) = server
        .call(
            Method::POST,
            &format!("/v1/runs/{run}/cancel"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = server.post(&path, &key, heartbeat).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "cancelled": [run], "lost": [] }));

    // The worker stops the run and reports it: a cancelled run ends canceled.
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/runs/{run}/fail"),
            &key,
            json!({ "token": token, "error": "stopped" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "status": "canceled", "retry_at_ms": null }));
    assert_eq!(run_status(&server, &run).await["status"], "canceled");
    server.stop().await;
}

async fn a_delete_after_a_cancel_ends_the_run_canceled(shape: Shape) {
    let server = TestServer::start(shape).await;
    let key = worker_key(&server).await;
    let cancelled = trigger(&server, 1).await;
    let other = trigger(&server, 2).await;
    let worker = register(&server, &key, "manual>*:2", 30000).await;
    claim(&server, &key, &worker, 2).await;
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/v1/runs/{cancelled}/cancel"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "executing", "{body}");

    // The worker deregisters while the cancelled run is still running: the cancel survives.
    let (status, body) = server
        .call(
            Method::DELETE,
            &format!("/v1/workers/{worker}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let run = run_status(&server, &cancelled).await;
    assert_eq!(run["status"], "canceled", "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    let run = run_status(&server, &other).await;
    assert!(
        ["queued", "ready"].contains(&run["status"].as_str().unwrap_or("")),
        "the other run is back in its queue: {run}"
    );
    assert_eq!(run["attempt"], 1, "{run}");

    // A new worker gets only the run that was not cancelled.
    let again = register(&server, &key, "manual>*:2", 30000).await;
    let claimed = claim(&server, &key, &again, 1).await;
    assert_eq!(claimed[0]["run_id"], other.as_str());
    server.stop().await;
}

async fn an_idle_worker_is_dropped(shape: Shape) {
    let server = TestServer::start(shape).await;
    server.env("other").await;
    let key = worker_key(&server).await;
    let (_, theirs) = server.key("worker", &["other"]).await;
    let run = trigger(&server, 1).await;
    // Three leases (3 s) of no activity drop it; the claim comes well before.
    let worker = register(&server, &key, "manual>*:1", 1000).await;
    let claimed = claim(&server, &key, &worker, 1).await;
    assert_eq!(claimed[0]["run_id"], run.as_str());
    // Probed with another env's key: 403 while the worker exists, 404 once dropped; the probe
    // is refused before it could count as the worker's activity.
    let start = Instant::now();
    loop {
        let (status, body) = server
            .post(
                &format!("/v1/workers/{worker}/heartbeat"),
                &theirs,
                json!({ "runs": [] }),
            )
            .await;
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the idle worker was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its run is no longer held: the lease lapsed (a crashed attempt) or the drop released it.
    let status = run_status(&server, &run).await["status"].clone();
    assert!(
        ["delayed", "queued", "ready"].contains(&status.as_str().unwrap_or("")),
        "{status}"
    );
    // Its owner's key gets 404 too.
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/claim"),
            &key,
            json!({ "workloop": 0, "max": 1 }),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    server.stop().await;
}

async fn a_long_poll_keeps_its_worker(shape: Shape) {
    let server = TestServer::start(shape).await;
    let key = worker_key(&server).await;
    // Three leases are 3 s; the poll waits 5 s with nothing to claim (the heartbeat after it
    // has 3 s to come).
    let worker = register(&server, &key, "manual>*:1", 1000).await;
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/claim"),
            &key,
            json!({ "workloop": 0, "max": 1, "wait_ms": 5000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "runs": [] }));
    // The claim's end counts as activity too: the worker is still there.
    let (status, body) = server
        .post(
            &format!("/v1/workers/{worker}/heartbeat"),
            &key,
            json!({ "runs": [] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}

macro_rules! on_shapes {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Shape::Memory).await;
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Shape::Embedded).await;
                }
            )*
        }
        mod distributed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if !super::distributed_available() {
                        eprintln!("skipped: Redis or PostgreSQL is not reachable");
                        return;
                    }
                    super::$scenario(super::Shape::Distributed).await;
                }
            )*
        }
    };
}

on_shapes!(
    whole_cycle,
    stale_token_is_409,
    bad_input_names_the_field,
    keys_outside_their_env_or_role_are_403,
    a_cancel_is_reported_by_the_heartbeat,
    a_delete_after_a_cancel_ends_the_run_canceled,
    an_idle_worker_is_dropped,
    a_long_poll_keeps_its_worker,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_routes_are_in_the_openapi_document() {
    let server = TestServer::start(Shape::Memory).await;
    let (status, doc) = server
        .call(Method::GET, "/v1/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    for (path, method) in [
        ("/v1/workers", "post"),
        ("/v1/workers/{id}/claim", "post"),
        ("/v1/workers/{id}/heartbeat", "post"),
        ("/v1/workers/{id}/runs/{run}/complete", "post"),
        ("/v1/workers/{id}/runs/{run}/fail", "post"),
        ("/v1/workers/{id}/runs/{run}/progress", "post"),
        ("/v1/workers/{id}", "delete"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    server.stop().await;
}
