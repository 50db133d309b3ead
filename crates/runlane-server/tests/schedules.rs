//! `GET /v1/envs/{env}/schedules` over HTTP: the schedules of the env's current version with
//! their next tick (as the core computes it) and the last tick fired (after an every-second
//! schedule fired twice, waited for on the env's run events); env keys of other envs are refused.

mod support;

use reqwest::StatusCode;
use runlane::core::schedule::next_tick;
use runlane::core::{ScheduleDef, TriggerSource, VersionDef};
use runlane::RunEventKind;
use serde_json::{json, Value};
use support::{assert_error, Shape, TestServer, ADMIN};

/// The bound of a wait on an event; only a hang reaches it.
const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

async fn schedules_list(shape: Shape) {
    let s = TestServer::start(shape).await;
    s.env("prod").await;
    s.env("dev").await;
    let (_, prod_key) = s.key("env", &["prod"]).await;
    let (_, dev_key) = s.key("env", &["dev"]).await;

    let (st, body) = s.get("/v1/envs/prod/schedules", &prod_key).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"schedules": []}), "no version, no schedules");

    // Yearly patterns have the same next tick for the whole call; the every-second one fires.
    let def: VersionDef = serde_json::from_value(json!({"tasks": [
        {"name": "yearly", "schedules": [
            {"cron": "0 0 1 1 *"},
            {"cron": "30 2 1 7 *", "timezone": "America/New_York"}
        ]},
        {"name": "tick", "schedules": [{"cron": "* * * * * *"}]},
        {"name": "plain"}
    ]}))
    .expect("a version definition");
    let engine = s.engine().clone();
    let mut events = engine.subscribe_env("prod").expect("subscribe");
    let version = engine
        .register_version("prod", def)
        .await
        .expect("register");
    engine.promote("prod", version).await.expect("promote");

    // Wait for two scheduled runs (real time: about a second each). The second tick is only
    // triggered after the first one's cursor moved, so by then a last tick is listed.
    let fired = tokio::time::timeout(WAIT, async {
        let mut fired = Vec::new();
        while let Some(event) = events.next().await {
            if !matches!(event.kind, RunEventKind::Status { .. }) {
                continue;
            }
            let run = engine.get(event.run).await.expect("the run");
            if run.source == TriggerSource::Scheduled
                && !fired
                    .iter()
                    .any(|r: &runlane::core::backend::RunRecord| r.id == run.id)
            {
                fired.push(run);
                if fired.len() == 2 {
                    return fired;
                }
            }
        }
        panic!("the event stream ended");
    })
    .await
    .expect("two scheduled runs within the wait bound");
    assert!(fired.iter().all(|r| r.task.as_str() == "tick"));
    // The second tick fired after the first one's cursor moved, so its count is in.
    let resp = s
        .client
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .expect("sent");
    let text = resp.text().await.expect("metrics text");
    let counted = text
        .lines()
        .find_map(|l| l.strip_prefix("runlane_schedule_ticks_fired_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("the fired-ticks series");
    assert!(counted >= 1, "{text}");
    let first_tick: Value = serde_json::from_str(&fired[0].payload).expect("payload");
    let first_tick = first_tick["tick"]
        .as_u64()
        .expect("the tick in the payload");

    let (st, body) = s.get("/v1/envs/prod/schedules", &prod_key).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let now = engine.now();
    let list = body["schedules"].as_array().expect("schedules");
    let rows: Vec<(&str, u64, &str, &str)> = list
        .iter()
        .map(|r| {
            (
                r["task"].as_str().expect("task"),
                r["index"].as_u64().expect("index"),
                r["cron"].as_str().expect("cron"),
                r["timezone"].as_str().expect("timezone"),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("yearly", 0, "0 0 1 1 *", "UTC"),
            ("yearly", 1, "30 2 1 7 *", "America/New_York"),
            ("tick", 0, "* * * * * *", "UTC"),
        ]
    );
    let expect_next = |cron: &str, zone: &str| {
        let def = ScheduleDef::new(cron).in_timezone(zone);
        next_tick(&def, now).map(|t| Value::from(t.as_millis()))
    };
    assert_eq!(
        Some(&list[0]["next_tick_ms"]),
        expect_next("0 0 1 1 *", "UTC").as_ref()
    );
    assert_eq!(
        Some(&list[1]["next_tick_ms"]),
        expect_next("30 2 1 7 *", "America/New_York").as_ref()
    );
    assert_eq!(list[0]["last_tick_ms"], Value::Null, "never fired");
    let last = list[2]["last_tick_ms"].as_u64().expect("the tick fired");
    assert!(last >= first_tick, "the cursor is at a fired tick");
    assert_eq!(last % 1000, 0, "ticks fall on whole seconds");
    assert!(list[2]["next_tick_ms"].as_u64().expect("next") > last);

    // Another env's key is refused; an unknown env is 404.
    let (st, body) = s.get("/v1/envs/prod/schedules", &dev_key).await;
    assert_error(st, &body, StatusCode::FORBIDDEN, "forbidden");
    let (st, body) = s.get("/v1/envs/nowhere/schedules", ADMIN).await;
    assert_error(st, &body, StatusCode::NOT_FOUND, "not_found");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_list_memory() {
    schedules_list(Shape::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_list_embedded() {
    schedules_list(Shape::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_list_distributed() {
    if !support::distributed_available() {
        eprintln!("skipped: Redis or PostgreSQL not reachable (CI is not set)");
        return;
    }
    schedules_list(Shape::Distributed).await;
}
