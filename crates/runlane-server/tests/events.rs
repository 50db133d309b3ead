//! Server-Sent Events: per run and per env, the snapshot and latest progress first, and
//! resumption with `Last-Event-ID`.

mod support;

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::json;
use support::{assert_error, Shape, SseReader, TestServer, ADMIN};

async fn events(shape: Shape) {
    let s = TestServer::start(shape).await;
    s.env("prod").await;
    let (_, env_key) = s.key("env", &["prod"]).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let worker = s
        .engine()
        .worker()
        .env("prod")
        .workloops("default:1")
        .handler("step", {
            let gate = gate.clone();
            move |ctx| {
                let gate = gate.clone();
                async move {
                    ctx.progress(&json!({"pct": 50}));
                    let _permit = gate.acquire().await;
                    Ok(json!("done"))
                }
            }
        })
        .start()
        .await
        .expect("worker");

    let mut env_stream = SseReader::open(&s, "/v1/envs/prod/events", &env_key, None).await;
    let (st, body) = s
        .post("/v1/envs/prod/runs", &env_key, json!({"task": "step"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let run = body["run_id"].as_str().expect("id").to_string();
    let progress = env_stream
        .until(|e| e.event == "progress" && e.data["run_id"] == run.as_str())
        .await;
    assert_eq!(progress.data["progress"]["pct"], 50);
    let progress_id = progress.id.clone().expect("progress has an id");

    // A new run subscriber: snapshot, then the latest progress.
    let path = format!("/v1/runs/{run}/events");
    let mut run_stream = SseReader::open(&s, &path, &env_key, None).await;
    let first = run_stream.next().await.expect("snapshot");
    assert_eq!(first.event, "snapshot");
    assert_eq!(first.data["id"], run.as_str());
    assert_eq!(first.data["status"], "executing");
    let second = run_stream.next().await.expect("latest progress");
    assert_eq!(second.event, "progress");
    assert_eq!(second.data["progress"]["pct"], 50);

    gate.add_permits(1);
    let end = run_stream
        .until(|e| e.event == "status" && e.data["status"] == "completed")
        .await;
    let end_id: u64 = end.id.clone().expect("id").parse().expect("numeric id");
    assert!(
        run_stream.next().await.is_none(),
        "the run stream ends after the terminal status"
    );
    env_stream
        .until(|e| e.event == "status" && e.data["status"] == "completed")
        .await;

    // Resume the env stream after the progress event: what came after it, nothing before.
    let mut resumed =
        SseReader::open(&s, "/v1/envs/prod/events", &env_key, Some(&progress_id)).await;
    let replayed = resumed.until(|e| e.data["run_id"] == run.as_str()).await;
    let replayed_id: u64 = replayed.id.clone().expect("id").parse().expect("numeric");
    assert!(replayed_id > progress_id.parse::<u64>().expect("numeric"));
    // The progress event is not repeated; the run's end (after it) is replayed.
    assert_eq!(replayed.event, "status", "{replayed:?}");
    assert_eq!(replayed.data["status"], "completed");
    assert_eq!(replayed_id, end_id);

    // Resume the run stream after the progress event: no snapshot, the end, then done.
    let mut run_resumed = SseReader::open(&s, &path, &env_key, Some(&progress_id)).await;
    let mut seen = Vec::new();
    while let Some(e) = run_resumed.next().await {
        seen.push(e);
    }
    assert!(seen.iter().all(|e| e.event != "snapshot"), "{seen:?}");
    let last = seen.last().expect("events replayed");
    assert_eq!(last.data["status"], "completed");
    assert_eq!(
        last.id
            .as_deref()
            .map(|i| i.parse::<u64>().expect("numeric")),
        Some(end_id)
    );

    // A finished run's new subscriber: snapshot, then its end.
    let mut done = SseReader::open(&s, &path, &env_key, None).await;
    assert_eq!(
        done.next().await.expect("snapshot").data["status"],
        "completed"
    );
    assert_eq!(done.next().await.expect("end").data["status"], "completed");
    assert!(done.next().await.is_none());

    // Bad Last-Event-ID.
    let resp = s
        .client
        .get(format!("{}{path}", s.base))
        .bearer_auth(ADMIN)
        .header("last-event-id", "yesterday")
        .send()
        .await
        .expect("sent");
    let status = resp.status();
    let body = resp.json().await.expect("json");
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    drop(env_stream);
    drop(resumed);
    worker.stop().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_memory() {
    events(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_embedded() {
    events(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    events(Shape::Distributed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_do_not_block_shutdown() {
    let s = TestServer::start(Shape::Memory).await;
    s.env("prod").await;
    let mut stream = SseReader::open(&s, "/v1/envs/prod/events", ADMIN, None).await;
    // The server stops although a stream is open; the stream ends.
    s.stop().await;
    assert!(stream.next().await.is_none());
}
