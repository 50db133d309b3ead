//! The trigger path, run operations, admin and the timer service, without workers.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{at, bounded, ms, until_status, Harness, T0};
use runlane_core::backend::{QueueBackend, RunFilter};
use runlane_core::{
    EnvSettings, QueueSettings, RunStatus, TaskDef, TaskName, TriggerSource, VersionDef,
};
use runlane_engine::{
    EngineBuilder, EngineConfig, EngineError, ManualClock, TriggerRequest, WaitOutcome,
};
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};

fn field(e: EngineError) -> &'static str {
    match e {
        EngineError::Invalid(i) => i.field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[tokio::test]
async fn the_timer_wakes_exactly_once_at_a_delayed_runs_due_instant() {
    let h = Harness::new().await;
    let run = h
        .engine
        .trigger("report")
        .delay(Duration::from_secs(10))
        .send()
        .await
        .expect("trigger")
        .run;
    assert_eq!(run.status, RunStatus::Delayed);
    assert_eq!(run.run_after, at(Duration::from_secs(10)));

    // The timer parks on the due instant: one sleeper, no wake-up yet.
    bounded(h.clock.wait_sleepers(1)).await;
    assert_eq!(h.clock.sleeping_until(), vec![at(Duration::from_secs(10))]);
    let mut events = h.engine.subscribe(run.id).await.expect("subscribe");

    h.clock.advance(ms(9_999));
    assert_eq!(h.clock.sleepers(), 1, "1 ms early wakes nothing");
    assert!(
        h.engine.timer_stats().wakeups.is_empty(),
        "no poll before the due instant"
    );

    h.clock.advance(ms(1));
    until_status(&mut events, RunStatus::Queued).await;
    until_status(&mut events, RunStatus::Ready).await;
    assert_eq!(
        h.engine.timer_stats().wakeups,
        vec![at(Duration::from_secs(10))],
        "exactly one wake-up, at the due instant"
    );
    let live = h.engine.get(run.id).await.expect("get");
    assert_eq!(
        live.status,
        RunStatus::Ready,
        "no worker: it waits in its lane"
    );

    // Re-armed for the next deadline the backend holds (the orphan lane's ready timeout),
    // not for a poll interval.
    let orphan_deadline = at(Duration::from_secs(10) + Duration::from_secs(300));
    bounded(h.clock.wait_sleeper_at(orphan_deadline)).await;
    assert_eq!(h.clock.sleeping_until(), vec![orphan_deadline]);
    assert_eq!(h.engine.timer_stats().wakeups.len(), 1);
    h.check_invariants();
}

#[tokio::test]
async fn an_earlier_deadline_rearms_the_timer_without_counting_a_wakeup() {
    let h = Harness::new().await;
    h.engine
        .trigger("late")
        .delay(Duration::from_secs(60))
        .send()
        .await
        .expect("trigger");
    bounded(h.clock.wait_sleepers(1)).await;
    assert_eq!(h.clock.sleeping_until(), vec![at(Duration::from_secs(60))]);

    let early = h
        .engine
        .trigger("early")
        .delay(Duration::from_secs(5))
        .send()
        .await
        .expect("trigger")
        .run;
    let mut events = h.engine.subscribe(early.id).await.expect("subscribe");
    // The re-armed sleep replaces the old one.
    bounded(h.clock.wait_sleeper_at(at(Duration::from_secs(5)))).await;
    assert_eq!(h.clock.sleeping_until(), vec![at(Duration::from_secs(5))]);
    assert!(
        h.engine.timer_stats().wakeups.is_empty(),
        "a re-arm is not a wake-up"
    );

    h.clock.advance(Duration::from_secs(5));
    until_status(&mut events, RunStatus::Queued).await;
    assert_eq!(
        h.engine.timer_stats().wakeups,
        vec![at(Duration::from_secs(5))]
    );
}

#[tokio::test]
async fn a_ttl_expires_a_waiting_run_at_its_deadline() {
    let h = Harness::new().await;
    h.engine
        .pause_queue("default", "expiring")
        .await
        .expect("pause");
    let run = h
        .engine
        .trigger("expiring")
        .ttl(Duration::from_secs(3))
        .send()
        .await
        .expect("trigger")
        .run;
    assert_eq!(run.ttl_deadline, Some(at(Duration::from_secs(3))));
    let mut events = h.engine.subscribe(run.id).await.expect("subscribe");
    bounded(h.clock.wait_sleepers(1)).await;
    h.clock.advance(Duration::from_secs(3));
    until_status(&mut events, RunStatus::Expired).await;
    assert!(
        events.next().await.is_none(),
        "the stream ends with the run"
    );
    let run = h.engine.get(run.id).await.expect("get");
    assert_eq!(run.status, RunStatus::Expired);
    assert_eq!(
        h.engine.cancel(run.id).await.expect_err("finished"),
        EngineError::AlreadyFinished {
            run: run.id,
            status: RunStatus::Expired
        }
    );
}

#[tokio::test]
async fn builder_validation_names_each_field_and_changes_nothing() {
    let h = Harness::with_config(EngineConfig {
        payload_max_bytes: 64,
        ..EngineConfig::default()
    })
    .await;
    let e = &h.engine;
    let bad_payload: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
    let cases = [
        ("task", e.trigger("no spaces").send().await),
        ("env", e.trigger("t").env("bad env!").send().await),
        ("payload", e.trigger("t").payload(&bad_payload).send().await),
        (
            "payload",
            e.trigger("t").payload(&"x".repeat(100)).send().await,
        ),
        ("ttl", e.trigger("t").ttl(Duration::ZERO).send().await),
        (
            "priority",
            e.trigger("t")
                .priority(Duration::from_secs(2_592_001))
                .send()
                .await,
        ),
        ("lane", e.trigger("t").lane("a-b").send().await),
        ("lane", e.trigger("t").lane("missing").send().await),
        ("key", e.trigger("t").key(&"k".repeat(257)).send().await),
        (
            "idempotency_key",
            e.trigger("t")
                .idempotency_key(&"i".repeat(300))
                .send()
                .await,
        ),
    ];
    for (want, result) in cases {
        assert_eq!(field(result.expect_err(want)), want);
    }
    // The first bad option wins over later good ones.
    let err = e.trigger("t").ttl(Duration::ZERO).env("other").request();
    assert_eq!(field(err.expect_err("ttl")), "ttl");

    let worker_cases = [
        ("workloops", e.worker().workloops("a>*>b:1").start().await),
        ("workloops", e.worker().workloops("").start().await),
        ("env", e.worker().env("bad env!").start().await),
        (
            "task",
            e.worker()
                .handler("bad task", |_| async { Ok(serde_json::Value::Null) })
                .start()
                .await,
        ),
    ];
    for (want, result) in worker_cases {
        assert_eq!(field(result.err().expect(want)), want);
    }
    assert!(matches!(
        e.worker().env("nowhere").start().await.err(),
        Some(EngineError::EnvNotFound(_))
    ));

    assert!(matches!(
        e.trigger("t").env("nowhere").send().await,
        Err(EngineError::EnvNotFound(env)) if env == "nowhere"
    ));
    let runs = e.list(&RunFilter::default()).await.expect("list");
    assert!(runs.is_empty(), "a refused trigger stores nothing");
    let held = h.queue.snapshot().await.expect("snapshot");
    assert!(held.is_empty(), "and enqueues nothing");
}

#[tokio::test]
async fn strict_envs_and_locked_versions_resolve_task_definitions() {
    let h = Harness::new().await;
    let e = &h.engine;
    e.set_env(
        "strict",
        EnvSettings {
            strict_tasks: true,
            ..EnvSettings::default()
        },
    )
    .await
    .expect("env");
    e.add_lane("reports").await.expect("lane");
    assert!(matches!(
        e.trigger("build").env("strict").send().await,
        Err(EngineError::UnknownTask { task, .. }) if task == "build"
    ));
    let mut def = TaskDef::new(TaskName::new("build").expect("task"));
    def.lane = Some(runlane_core::LaneName::new("reports").expect("lane"));
    def.ttl = Some(Duration::from_secs(60));
    def.queue_limit = Some(2);
    let v1 = e
        .register_version("strict", VersionDef { tasks: vec![def] })
        .await
        .expect("register");
    assert_eq!(v1, 1);
    assert!(
        matches!(
            e.trigger("build").env("strict").send().await,
            Err(EngineError::UnknownTask { .. })
        ),
        "registered but not promoted"
    );
    let locked = e
        .trigger("build")
        .env("strict")
        .lock_to_version(1)
        .send()
        .await
        .expect("locked trigger");
    assert!(locked.run.locked);
    assert_eq!(locked.run.version, 1);
    assert_eq!(locked.run.lane.as_str(), "reports");
    assert!(matches!(
        e.trigger("build")
            .env("strict")
            .lock_to_version(9)
            .send()
            .await,
        Err(EngineError::UnknownVersion { version: 9, .. })
    ));
    assert!(matches!(
        e.promote("strict", 9).await,
        Err(EngineError::UnknownVersion { version: 9, .. })
    ));

    e.promote("strict", 1).await.expect("promote");
    let run = e
        .trigger("build")
        .env("strict")
        .send()
        .await
        .expect("trigger")
        .run;
    assert_eq!((run.version, run.locked), (1, false));
    assert_eq!(run.ttl_deadline, Some(at(Duration::from_secs(60))));
    assert_eq!(run.queue.as_str(), "build");
    let queues = e.queues("strict").await.expect("queues");
    let build = queues
        .iter()
        .find(|q| q.name.as_str() == "build")
        .expect("queue");
    assert_eq!(
        build.settings.limit,
        Some(2),
        "promotion applies the task's queue limit"
    );

    // Non-strict default env: an unknown task takes the defaults.
    let run = e.trigger("anything").send().await.expect("trigger").run;
    assert_eq!(run.queue.as_str(), "anything");
    assert_eq!(run.lane.as_str(), "default");
    assert_eq!(run.version, 0);
}

#[tokio::test]
async fn idempotency_keys_and_batches_collapse_duplicates() {
    let h = Harness::new().await;
    let e = &h.engine;
    let first = e
        .trigger("charge")
        .idempotency_key("order-1")
        .send()
        .await
        .expect("first");
    let second = e
        .trigger("charge")
        .idempotency_key("order-1")
        .payload(&"different")
        .send()
        .await
        .expect("second");
    assert!(!first.idempotent_hit);
    assert!(second.idempotent_hit);
    assert_eq!(second.run.id, first.run.id);
    assert_eq!(
        &*second.run.payload, "null",
        "the existing run, whatever the payload"
    );

    let mut a = TriggerRequest::new("charge").expect("req");
    a.idempotency_key = Some("order-2".into());
    let b = a.clone();
    let c = TriggerRequest::new("other").expect("req");
    let out = e.trigger_batch(vec![a, b, c]).await.expect("batch");
    assert_eq!(out.len(), 3);
    assert!(!out[0].idempotent_hit && out[1].idempotent_hit && !out[2].idempotent_hit);
    assert_eq!(out[1].run.id, out[0].run.id);

    let good = TriggerRequest::new("charge").expect("req");
    let mut bad = TriggerRequest::new("charge").expect("req");
    bad.ttl = Some(Duration::ZERO);
    let before = e.list(&RunFilter::default()).await.expect("list").len();
    match e.trigger_batch(vec![good, bad]).await {
        Err(EngineError::BatchItem { index, source }) => {
            assert_eq!(index, 1);
            assert_eq!(field(*source), "ttl");
        }
        other => panic!("expected a batch item error, got {other:?}"),
    }
    let after = e.list(&RunFilter::default()).await.expect("list").len();
    assert_eq!(before, after, "nothing of a refused batch is stored");
}

#[tokio::test]
async fn a_full_queue_refuses_and_keeps_nothing() {
    let h = Harness::new().await;
    let e = &h.engine;
    e.set_queue(
        "default",
        "mail",
        QueueSettings {
            max_queued: Some(1),
            paused: true,
            ..QueueSettings::default()
        },
    )
    .await
    .expect("queue");
    let kept = e.trigger("mail").send().await.expect("first fits").run;
    assert_eq!(kept.status, RunStatus::Queued);
    let err = e.trigger("mail").send().await.expect_err("full");
    assert!(matches!(err, EngineError::QueueFull { max_queued: 1, .. }));
    let runs = e.list(&RunFilter::default()).await.expect("list");
    assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), vec![kept.id]);

    // Resuming admits at once: the run moves to its lane.
    let mut events = e.subscribe(kept.id).await.expect("subscribe");
    e.resume_queue("default", "mail").await.expect("resume");
    until_status(&mut events, RunStatus::Ready).await;
    let filter = RunFilter {
        status: Some(RunStatus::Ready),
        ..RunFilter::default()
    };
    let ready = e.list(&filter).await.expect("list ready");
    assert_eq!(ready.len(), 1, "list filters on the live status");
    assert_eq!(ready[0].status, RunStatus::Ready);
    h.check_invariants();
}

#[tokio::test]
async fn a_batch_refused_by_the_queue_is_taken_back_whole() {
    let h = Harness::new().await;
    let e = &h.engine;
    e.set_queue(
        "default",
        "mail",
        QueueSettings {
            max_queued: Some(1),
            paused: true,
            ..QueueSettings::default()
        },
    )
    .await
    .expect("queue");
    let other = TriggerRequest::new("other").expect("req");
    let first = TriggerRequest::new("mail").expect("req");
    let second = TriggerRequest::new("mail").expect("req");
    match e.trigger_batch(vec![other, first, second]).await {
        Err(EngineError::BatchItem { index, source }) => {
            assert_eq!(index, 2);
            assert!(matches!(
                *source,
                EngineError::QueueFull { max_queued: 1, .. }
            ));
        }
        other => panic!("expected the third item to be refused, got {other:?}"),
    }
    assert!(e
        .list(&RunFilter::default())
        .await
        .expect("list")
        .is_empty());
    let held = h.queue.snapshot().await.expect("snapshot");
    assert!(held.is_empty(), "the enqueued items were taken back");
    h.check_invariants();
}

#[tokio::test]
async fn cancel_reschedule_wait_and_manual_retry_of_waiting_runs() {
    let h = Harness::new().await;
    let e = &h.engine;
    let run = e
        .trigger("later")
        .delay(Duration::from_secs(3600))
        .ttl(Duration::from_secs(10))
        .send()
        .await
        .expect("trigger")
        .run;
    assert_eq!(run.ttl_deadline, Some(at(Duration::from_secs(3610))));

    let moved = e
        .reschedule(run.id, at(Duration::from_secs(20)))
        .await
        .expect("reschedule");
    assert_eq!(moved.status, RunStatus::Delayed);
    assert_eq!(moved.run_after, at(Duration::from_secs(20)));
    assert_eq!(moved.ttl_deadline, Some(at(Duration::from_secs(30))));

    match e.wait(run.id, Duration::ZERO).await.expect("wait") {
        WaitOutcome::Pending { run_id, status } => {
            assert_eq!((run_id, status), (run.id, RunStatus::Delayed));
        }
        other => panic!("expected pending, got {other:?}"),
    }

    let canceled = e.cancel(run.id).await.expect("cancel");
    assert_eq!(canceled.status, RunStatus::Canceled);
    let again = e.cancel(run.id).await.expect_err("repeat");
    assert_eq!(
        again,
        EngineError::AlreadyFinished {
            run: run.id,
            status: RunStatus::Canceled
        }
    );
    assert_eq!(
        e.cancel(run.id).await.expect_err("repeat"),
        again,
        "same answer"
    );
    assert!(matches!(
        e.reschedule(run.id, T0).await,
        Err(EngineError::WrongState { .. })
    ));
    match e
        .wait(run.id, Duration::from_secs(3600))
        .await
        .expect("wait")
    {
        WaitOutcome::Finished(r) => assert_eq!(r.status, RunStatus::Canceled),
        other => panic!("a finished run answers at once, got {other:?}"),
    }

    let retried = e.retry_run(run.id).await.expect("manual retry").run;
    assert_eq!(retried.retry_of, Some(run.id));
    assert_eq!(retried.source, TriggerSource::Manual);
    assert_eq!(retried.lane.as_str(), "manual");
    assert_eq!(
        retried.status,
        RunStatus::Ready,
        "due now: fast path into its lane"
    );
    assert!(matches!(
        e.retry_run(retried.id).await,
        Err(EngineError::WrongState {
            operation: "retry",
            ..
        })
    ));
    h.check_invariants();
}

#[tokio::test]
async fn env_events_see_every_status_of_the_env() {
    let h = Harness::new().await;
    let e = &h.engine;
    let mut events = e.subscribe_env("default").expect("subscribe");
    let run = e.trigger("x").send().await.expect("trigger").run;
    let first = bounded(events.next()).await.expect("event");
    assert_eq!(first.run, run.id);
    assert_eq!(first.status(), Some(RunStatus::Ready));
    e.cancel(run.id).await.expect("cancel");
    let second = bounded(events.next()).await.expect("event");
    assert_eq!(second.status(), Some(RunStatus::Canceled));
    assert!(second.seq > first.seq);

    e.shutdown().await;
    assert!(bounded(events.next()).await.is_none(), "ends at shutdown");
    assert_eq!(
        e.trigger("x").send().await.expect_err("shut down"),
        EngineError::ShutDown
    );
}

#[tokio::test]
async fn open_recovers_unfinished_runs_from_the_store() {
    let clock = std::sync::Arc::new(runlane_engine::ManualClock::new(T0));
    let store = std::sync::Arc::new(runlane_memory::MemoryStore::new());
    let open = |store: std::sync::Arc<runlane_memory::MemoryStore>| {
        let clock = clock.clone();
        async move {
            runlane_engine::EngineBuilder::new()
                .clock(clock)
                .open(
                    std::sync::Arc::new(runlane_memory::MemoryQueue::new(Default::default())),
                    store,
                )
                .await
                .expect("open")
        }
    };
    let first = open(store.clone()).await;
    first.add_lane("reports").await.expect("lane");
    let waiting = first
        .trigger("r")
        .lane("reports")
        .delay(Duration::from_secs(5))
        .send()
        .await
        .expect("trigger")
        .run;
    let done = first.trigger("d").send().await.expect("trigger").run;
    first.cancel(done.id).await.expect("cancel");
    first.shutdown().await;

    // A new engine over the same store and an empty queue backend.
    let second = open(store).await;
    let recovered = second.get(waiting.id).await.expect("get");
    assert_eq!(
        recovered.status,
        RunStatus::Delayed,
        "back in the queue backend"
    );
    assert_eq!(recovered.lane.as_str(), "reports");
    assert_eq!(
        second.get(done.id).await.expect("get").status,
        RunStatus::Canceled
    );
    let lanes = second.lanes().await.expect("lanes");
    assert!(lanes.iter().any(|l| l.name.as_str() == "reports"));
}

/// Another engine on the same backends (another process) ends a run this engine's `wait`
/// follows; its status event never reaches this engine's bus, as when a shape's cross-process
/// subscription drops a message. `resync_after_gap` makes the subscription (what `wait` reads)
/// read the store and answer.
#[tokio::test]
async fn a_wait_answers_from_the_store_after_a_gap_in_events_from_elsewhere() {
    let clock = Arc::new(ManualClock::new(T0));
    let queue = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    let open = || {
        EngineBuilder::new()
            .clock(clock.clone())
            .open(queue.clone(), store.clone())
    };
    let here = open().await.expect("open here");
    let elsewhere = open().await.expect("open elsewhere");
    let run = here.trigger("report").send().await.expect("trigger").run.id;

    // Subscribed before the end (what `wait` does): only an event or a resync answers it.
    let mut events = here.subscribe(run).await.expect("subscribe");
    let canceled = elsewhere.cancel(run).await.expect("cancel elsewhere");
    assert_eq!(canceled.status, RunStatus::Canceled);

    here.resync_after_gap();
    let end = bounded(until_status(&mut events, RunStatus::Canceled)).await;
    assert_eq!(end.run, run);
}

/// A trigger's future is copied whole at each await of its callers (and of theirs): the path
/// holds no second copy of its request or record, and no rare branch's future.
#[tokio::test]
async fn a_triggers_future_stays_small() {
    let h = Harness::new().await;
    let send = h.engine.trigger("report").send();
    let size = std::mem::size_of_val(&send);
    drop(send);
    // 6,080 bytes when each level held its arguments twice; 3,376 now.
    assert!(size <= 4096, "a trigger's future is {size} bytes");
}
