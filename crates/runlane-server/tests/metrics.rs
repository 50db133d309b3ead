//! `/metrics` and `/health` after some work: counters move, gauges show depth and limits.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{Shape, TestServer, ADMIN};

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

async fn metrics(shape: Shape) {
    let s = TestServer::start(shape).await;
    s.env("prod").await;
    let worker = s
        .engine()
        .worker()
        .env("prod")
        .workloops("fast_lane:1")
        .handler("echo", |ctx| async move { Ok(json!(ctx.payload_text())) })
        .start()
        .await
        .expect("worker");
    for _ in 0..3 {
        let (st, body) = s
            .post(
                "/v1/envs/prod/runs/wait",
                ADMIN,
                json!({"task": "echo", "payload": 1}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    let (st, _) = s
        .post(
            "/v1/envs/prod/runs",
            ADMIN,
            json!({"task": "later", "delay_ms": 600000}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let resp = s
        .client
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain")));
    let text = resp.text().await.expect("text");
    assert_eq!(value(&text, "runlane_triggered_total"), 4.0);
    assert_eq!(value(&text, "runlane_claimed_total"), 3.0);
    // No version carries schedules here: the series are there, at zero.
    assert_eq!(value(&text, "runlane_schedule_ticks_fired_total"), 0.0);
    assert_eq!(value(&text, "runlane_schedule_ticks_refused_total"), 0.0);
    assert_eq!(value(&text, "runlane_start_latency_seconds_count"), 3.0);
    assert_eq!(
        value(&text, "runlane_start_latency_seconds_bucket{le=\"+Inf\"}"),
        3.0
    );
    assert_eq!(value(&text, "runlane_env_limit{env=\"prod\"}"), 100.0);
    assert_eq!(
        value(&text, "runlane_queue_delayed{env=\"prod\",queue=\"later\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "runlane_lane_consumers{lane=\"fast_lane\"}"),
        1.0
    );
    assert_eq!(value(&text, "runlane_orphan_lanes"), 0.0);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            line.rsplit(' ')
                .next()
                .is_some_and(|v| v.parse::<f64>().is_ok()),
            "bad line {line:?}"
        );
    }

    let (st, health) = s.call(Method::GET, "/health", None, None).await;
    assert_eq!(st, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok");
    let fast = health["lanes"]
        .as_array()
        .expect("lanes")
        .iter()
        .find(|l| l["name"] == "fast_lane")
        .expect("fast_lane")
        .clone();
    assert!(fast["last_claim_at_ms"].is_u64(), "{fast}");
    assert_eq!(fast["consumers"], 1);
    worker.stop().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_memory() {
    metrics(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_embedded() {
    metrics(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    metrics(Shape::Distributed).await;
}
