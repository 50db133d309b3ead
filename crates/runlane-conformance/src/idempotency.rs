//! IDEM: idempotency keys (SPEC §7). Scope `(env, task, key)`; a hit returns the existing run,
//! whatever its state or payload, with `idempotent_hit: true`; duplicates inside a batch
//! collapse; concurrent triggers with one key yield exactly one run.

use std::collections::HashSet;

use runlane_core::RunStatus;
use runlane_engine::TriggerRequest;
use serde_json::json;

use crate::kit::{ok, within, Backends, Harness, Probe};

/// IDEM-01: an idempotency hit returns the existing run with `idempotent_hit: true` whatever
/// the new payload and whatever its state (ready, then completed); another task or another env
/// with the same key is a different scope and makes a new run.
pub async fn idem_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_env("other", runlane_core::EnvSettings::default())
        .await;
    let first = ok(h
        .engine
        .trigger("t")
        .idempotency_key("k")
        .payload(&json!({"a": 1}))
        .send())
    .await;
    assert!(!first.idempotent_hit);
    let hit = ok(h
        .engine
        .trigger("t")
        .idempotency_key("k")
        .payload(&json!({"a": 2}))
        .send())
    .await;
    assert!(hit.idempotent_hit, "IDEM-01: a hit");
    assert_eq!(hit.run.id, first.run.id, "IDEM-01: the existing run");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&hit.run.payload).expect("json"),
        json!({"a": 1}),
        "IDEM-01: the existing payload, not the new one"
    );

    let mut probe = Probe::new();
    let _w = h
        .start(
            h.engine
                .worker()
                .handler("t", probe.auto(|_| Ok(json!("done")))),
        )
        .await;
    probe.next().await;
    h.wait_terminal(first.run.id).await;
    let late = ok(h.engine.trigger("t").idempotency_key("k").send()).await;
    assert!(late.idempotent_hit, "IDEM-01: a hit on a completed run");
    assert_eq!(
        (late.run.id, late.run.status),
        (first.run.id, RunStatus::Completed)
    );

    let other_task = ok(h.engine.trigger("u").idempotency_key("k").send()).await;
    let other_env = ok(h
        .engine
        .trigger("t")
        .env("other")
        .idempotency_key("k")
        .send())
    .await;
    assert!(
        !other_task.idempotent_hit && !other_env.idempotent_hit,
        "IDEM-01: scope (env, task, key)"
    );
    assert_ne!(other_task.run.id, first.run.id);
    assert_ne!(other_env.run.id, first.run.id);
    let runs = h.all_runs().await;
    assert_eq!(runs.len(), 3, "IDEM-01: hits stored nothing");
}

/// IDEM-02: duplicates inside one batch collapse onto the first: `[k1, k1, k2]` answers the
/// same run twice (the second a hit) and stores two runs.
pub async fn idem_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let request = |key: &str, n: i32| {
        h.engine
            .trigger("t")
            .idempotency_key(key)
            .payload(&json!(n))
            .request()
            .expect("a valid request")
    };
    let batch: Vec<TriggerRequest> = vec![request("k1", 1), request("k1", 2), request("k2", 3)];
    let answers = ok(h.engine.trigger_batch(batch)).await;
    assert_eq!(answers.len(), 3, "IDEM-02: one answer per item");
    assert!(!answers[0].idempotent_hit && answers[1].idempotent_hit && !answers[2].idempotent_hit);
    assert_eq!(
        answers[0].run.id, answers[1].run.id,
        "IDEM-02: the duplicate collapses"
    );
    assert_ne!(answers[0].run.id, answers[2].run.id);
    assert_eq!(
        &*answers[1].run.payload, "1",
        "IDEM-02: the first item's payload"
    );
    assert_eq!(h.all_runs().await.len(), 2, "IDEM-02: two runs stored");
    assert_eq!(h.snapshot().await.len(), 2, "IDEM-02: two runs enqueued");
}

/// IDEM-03: 50 concurrent triggers with one idempotency key yield exactly one run: every answer
/// names it, exactly one is not a hit, and the store and the queue backend hold one run.
pub async fn idem_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let engine = h.engine.clone();
        tasks.push(tokio::spawn(async move {
            engine
                .trigger("t")
                .idempotency_key("once")
                .payload(&i)
                .send()
                .await
        }));
    }
    let mut ids = HashSet::new();
    let mut new = 0;
    for t in tasks {
        let answer = within("a concurrent trigger", t)
            .await
            .expect("the trigger task panicked")
            .unwrap_or_else(|e| panic!("IDEM-03: a concurrent trigger was refused: {e}"));
        ids.insert(answer.run.id);
        new += usize::from(!answer.idempotent_hit);
    }
    assert_eq!(ids.len(), 1, "IDEM-03: one run id for all 50");
    assert_eq!(new, 1, "IDEM-03: exactly one trigger made the run");
    assert_eq!(h.all_runs().await.len(), 1, "IDEM-03: one run stored");
    assert_eq!(h.snapshot().await.len(), 1, "IDEM-03: one run enqueued");
    assert_eq!(
        h.usage("default").await.running,
        1,
        "IDEM-03: one slot taken"
    );
}
