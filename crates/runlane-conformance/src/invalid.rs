//! BAD: bad input gets a typed error naming the field and changes nothing (SPEC §7). Every
//! refusal is checked with [`Harness::refused`], which lists the runs and the queue backend's
//! contents before and after.

use std::time::Duration;

use runlane_core::{
    EnvSettings, QueueSettings, RetryPolicy, RunStatus, TaskDef, TaskName, VersionDef,
};
use runlane_engine::EngineError;

use crate::kit::{assert_invalid, ok, secs, Backends, Harness};

/// BAD-01: task names: empty and longer than 128 bytes are refused naming `task`; 128 bytes
/// are accepted.
pub async fn bad_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let err = h
        .refused("an empty task", h.engine.trigger("").send())
        .await;
    assert_invalid(&err, "task");
    let long = "x".repeat(129);
    let err = h
        .refused("a 129-byte task", h.engine.trigger(&long).send())
        .await;
    assert_invalid(&err, "task");
    let err = h
        .refused("a task with a space", h.engine.trigger("a b").send())
        .await;
    assert_invalid(&err, "task");
    h.trigger(h.engine.trigger(&"x".repeat(128))).await;
}

/// BAD-02: a TTL of zero is refused naming `ttl`; so is a zero max duration (`max_duration`) and
/// a retry policy allowing no attempt (`retry.attempts_max`).
pub async fn bad_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let err = h
        .refused("ttl 0", h.engine.trigger("t").ttl(Duration::ZERO).send())
        .await;
    assert_invalid(&err, "ttl");
    let err = h
        .refused(
            "max_duration 0",
            h.engine.trigger("t").max_duration(Duration::ZERO).send(),
        )
        .await;
    assert_invalid(&err, "max_duration");
    let policy = RetryPolicy {
        attempts_max: 0,
        ..RetryPolicy::default()
    };
    let err = h
        .refused("attempts_max 0", h.engine.trigger("t").retry(policy).send())
        .await;
    match &err {
        EngineError::Invalid(i) => {
            assert!(i.field.starts_with("retry"), "BAD-02: field {}", i.field)
        }
        other => panic!("BAD-02: want Invalid retry.*, got {other:?}"),
    }
}

/// BAD-03: a priority above 2,592,000 s (30 days) is refused naming `priority`; exactly 30
/// days is accepted.
pub async fn bad_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let err = h
        .refused(
            "priority 30 days + 1 s",
            h.engine.trigger("t").priority(secs(2_592_001)).send(),
        )
        .await;
    assert_invalid(&err, "priority");
    h.trigger(h.engine.trigger("t").priority(secs(2_592_000)))
        .await;
}

/// BAD-04: a lane that does not exist, or is not a lane name, is refused naming `lane`.
pub async fn bad_04(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let err = h
        .refused("an unknown lane", h.engine.trigger("t").lane("nope").send())
        .await;
    assert_invalid(&err, "lane");
    let err = h
        .refused("a malformed lane", h.engine.trigger("t").lane("a-b").send())
        .await;
    assert_invalid(&err, "lane");
    ok(h.engine.add_lane("nope")).await;
    h.trigger(h.engine.trigger("t").lane("nope")).await;
}

/// BAD-05: a malformed workloops spec is refused at `start` naming `workloops`; no consumer is
/// registered and a ready run stays ready.
pub async fn bad_05(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let run = h.run("t").await;
    let specs = [
        "",
        "manual>*:0",
        "*>manual:1",
        "manual>*>*:1",
        "a-b:1",
        "fast_lane:x",
        "manual>:1",
    ];
    for spec in specs {
        let answer = crate::kit::within(
            "a worker start",
            h.engine
                .worker()
                .handler("t", |_| async { Ok(serde_json::Value::Null) })
                .workloops(spec)
                .start(),
        )
        .await;
        match answer {
            Ok(_) => panic!("BAD-05: workloops {spec:?} accepted"),
            Err(err) => assert_invalid(&err, "workloops"),
        }
    }
    let lanes = ok(h.engine.lanes()).await;
    assert!(
        lanes.iter().all(|l| l.consumers == 0),
        "BAD-05: a refused worker registered: {lanes:?}"
    );
    assert_eq!(
        h.status(run).await,
        RunStatus::Ready,
        "BAD-05: nothing claimed"
    );
}

/// BAD-06: `lock_to_version` naming a version that does not exist, or one that does not define
/// the task, is refused with `UnknownVersion`.
pub async fn bad_06(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let v = ok(h.engine.register_version(
        "default",
        VersionDef {
            tasks: vec![TaskDef::new(TaskName::new("known").expect("valid"))],
        },
    ))
    .await;
    let err = h
        .refused(
            "an unknown version",
            h.engine.trigger("known").lock_to_version(v + 7).send(),
        )
        .await;
    assert_eq!(
        err,
        EngineError::UnknownVersion {
            version: v + 7,
            task: "known".into()
        }
    );
    let err = h
        .refused(
            "a version without the task",
            h.engine.trigger("other").lock_to_version(v).send(),
        )
        .await;
    assert_eq!(
        err,
        EngineError::UnknownVersion {
            version: v,
            task: "other".into()
        }
    );
    let run = h
        .trigger(h.engine.trigger("known").lock_to_version(v))
        .await;
    assert_eq!((run.version, run.locked), (v, true));
}

/// BAD-07: a strict env refuses a task no version defines with `UnknownTask`, and accepts a
/// task its current version defines.
pub async fn bad_07(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_env(
        "strict",
        EnvSettings {
            strict_tasks: true,
            ..EnvSettings::default()
        },
    )
    .await;
    let v = ok(h.engine.register_version(
        "strict",
        VersionDef {
            tasks: vec![TaskDef::new(TaskName::new("known").expect("valid"))],
        },
    ))
    .await;
    ok(h.engine.promote("strict", v)).await;
    let err = h
        .refused(
            "an unknown task",
            h.engine.trigger("unknown").env("strict").send(),
        )
        .await;
    assert_eq!(
        err,
        EngineError::UnknownTask {
            env: "strict".into(),
            task: "unknown".into()
        }
    );
    h.trigger(h.engine.trigger("known").env("strict")).await;
    h.trigger(h.engine.trigger("unknown")).await; // env default is not strict
}

/// BAD-08: other trigger fields: an env that does not exist (`EnvNotFound`), a malformed env
/// (`env`), an oversized concurrency key (`key`), a malformed queue (`queue`), a payload over
/// the limit (`payload`).
pub async fn bad_08(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let err = h
        .refused("an unknown env", h.engine.trigger("t").env("nope").send())
        .await;
    assert_eq!(err, EngineError::EnvNotFound("nope".into()));
    let err = h
        .refused("a malformed env", h.engine.trigger("t").env("a.b").send())
        .await;
    assert_invalid(&err, "env");
    let err = h
        .refused(
            "a 257-byte key",
            h.engine.trigger("t").key(&"k".repeat(257)).send(),
        )
        .await;
    assert_invalid(&err, "key");
    let err = h
        .refused("a malformed queue", h.engine.trigger("t").queue("").send())
        .await;
    assert_invalid(&err, "queue");
    let big = "x".repeat((1 << 20) + 1);
    let err = h
        .refused(
            "a payload over 1 MiB",
            h.engine.trigger("t").payload(&big).send(),
        )
        .await;
    assert_invalid(&err, "payload");
}

/// BAD-09: a batch with one bad item is refused whole, naming the item (`BatchItem`), and
/// stores nothing.
pub async fn bad_09(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let good = h.engine.trigger("t").request().expect("valid");
    let mut bad = h.engine.trigger("t").request().expect("valid");
    bad.ttl = Some(Duration::ZERO);
    let err = h
        .refused(
            "a batch with a bad item",
            h.engine.trigger_batch(vec![good.clone(), bad, good]),
        )
        .await;
    match err {
        EngineError::BatchItem { index, source } => {
            assert_eq!(index, 1, "BAD-09: the bad item's index");
            assert_invalid(&source, "ttl");
        }
        other => panic!("BAD-09: want BatchItem, got {other:?}"),
    }
}

/// BAD-10: bad settings are refused naming the field and leave the settings as they were:
/// env `burst` and `weight`, queue `max_queued`.
pub async fn bad_10(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_env(
        "e",
        EnvSettings {
            limit: 7,
            ..EnvSettings::default()
        },
    )
    .await;
    let before = ok(h.engine.env_settings("e")).await;
    let err = h
        .refused(
            "burst 0.5",
            h.engine.set_env(
                "e",
                EnvSettings {
                    burst: 0.5,
                    ..before
                },
            ),
        )
        .await;
    assert_invalid(&err, "burst");
    let err = h
        .refused(
            "weight 0",
            h.engine.set_env(
                "e",
                EnvSettings {
                    weight: 0,
                    ..before
                },
            ),
        )
        .await;
    assert_invalid(&err, "weight");
    assert_eq!(
        ok(h.engine.env_settings("e")).await,
        before,
        "BAD-10: env settings unchanged"
    );

    h.set_queue(
        "q",
        QueueSettings {
            limit: Some(3),
            ..QueueSettings::default()
        },
    )
    .await;
    let err = h
        .refused(
            "max_queued 0",
            h.engine.set_queue(
                "default",
                "q",
                QueueSettings {
                    max_queued: Some(0),
                    ..QueueSettings::default()
                },
            ),
        )
        .await;
    assert_invalid(&err, "max_queued");
    assert_eq!(
        h.queue_info("q").await.settings.limit,
        Some(3),
        "BAD-10: queue settings unchanged"
    );
}

/// BAD-11: `create_env` of a name that exists is refused with `EnvExists` and leaves the
/// settings it has; bad settings on a new name are refused naming the field and create nothing.
pub async fn bad_11(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let first = EnvSettings {
        limit: 7,
        ..EnvSettings::default()
    };
    ok(h.engine.create_env("e", first)).await;
    let err = h
        .refused(
            "creating e again",
            h.engine.create_env(
                "e",
                EnvSettings {
                    limit: 9,
                    ..EnvSettings::default()
                },
            ),
        )
        .await;
    assert_eq!(err, EngineError::EnvExists("e".into()));
    assert_eq!(ok(h.engine.env_settings("e")).await, first);
    let err = h
        .refused(
            "a bad weight",
            h.engine.create_env(
                "f",
                EnvSettings {
                    weight: 0,
                    ..EnvSettings::default()
                },
            ),
        )
        .await;
    assert_invalid(&err, "weight");
    assert_eq!(
        h.engine.env_settings("f").await,
        Err(EngineError::EnvNotFound("f".into()))
    );
}

/// BAD-12: a concurrency key or an idempotency key holding a NUL character is refused naming
/// `key` or `idempotency_key` (stores refuse NUL in text; Redis separates names with it).
pub async fn bad_12(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let err = h
        .refused("a key with a NUL", h.engine.trigger("t").key("a\0b").send())
        .await;
    assert_invalid(&err, "key");
    let err = h
        .refused(
            "an idempotency key with a NUL",
            h.engine.trigger("t").idempotency_key("a\0b").send(),
        )
        .await;
    assert_invalid(&err, "idempotency_key");
}
