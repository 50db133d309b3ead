//! VER: versions of an env's task definitions (SPEC §1, §4). A promotion changes which version
//! new unlocked triggers take, while locked triggers keep theirs; the versions are listed in
//! order with their registration times and shown exactly as registered.

use std::time::Duration;

use runlane_core::{EnvSettings, LaneName, QueueName, RetryPolicy, TaskDef, TaskName, VersionDef};
use runlane_engine::EngineError;

use crate::kit::{at, ok, secs, Backends, Harness};

fn job(queue: &str, ttl: Option<Duration>) -> VersionDef {
    let mut t = TaskDef::new(TaskName::new("job").expect("valid"));
    t.queue = Some(QueueName::new(queue).expect("valid"));
    t.ttl = ttl;
    VersionDef { tasks: vec![t] }
}

/// VER-01: with v1 current, unlocked triggers take v1's definition and a trigger locked to
/// v2 takes v2's; after promoting v2, unlocked triggers take v2 and a trigger locked to v1
/// still takes v1. Runs keep the version they were triggered with.
pub async fn ver_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let e = &h.engine;
    let v1 = ok(e.register_version("default", job("q1", Some(secs(60))))).await;
    let v2 = ok(e.register_version("default", job("q2", None))).await;
    assert_eq!((v1, v2), (1, 2), "VER-01: versions count from 1");
    assert_eq!(
        ok(e.current_version("default")).await,
        0,
        "VER-01: registering promotes nothing"
    );
    ok(e.promote("default", v1)).await;
    assert_eq!(ok(e.current_version("default")).await, v1);

    let before = h.trigger(e.trigger("job").delay(secs(3600))).await;
    assert_eq!(
        (before.version, before.locked, before.queue.as_str()),
        (v1, false, "q1"),
        "VER-01: an unlocked trigger takes the current version"
    );
    assert_eq!(
        before.ttl_deadline,
        Some(at(secs(3660))),
        "VER-01: v1's ttl"
    );
    let locked2 = h
        .trigger(e.trigger("job").delay(secs(3600)).lock_to_version(v2))
        .await;
    assert_eq!(
        (locked2.version, locked2.locked, locked2.queue.as_str()),
        (v2, true, "q2"),
        "VER-01: a locked trigger takes its version"
    );
    assert_eq!(locked2.ttl_deadline, None, "VER-01: v2 has no ttl");

    ok(e.promote("default", v2)).await;
    assert_eq!(ok(e.current_version("default")).await, v2);
    let after = h.trigger(e.trigger("job").delay(secs(3600))).await;
    assert_eq!(
        (after.version, after.locked, after.queue.as_str()),
        (v2, false, "q2"),
        "VER-01: after the promotion unlocked triggers take v2"
    );
    let locked1 = h
        .trigger(e.trigger("job").delay(secs(3600)).lock_to_version(v1))
        .await;
    assert_eq!(
        (locked1.version, locked1.locked, locked1.queue.as_str()),
        (v1, true, "q1"),
        "VER-01: a trigger locked to v1 still takes v1"
    );
    for (run, version) in [(&before, v1), (&locked2, v2)] {
        let stored = h.get(run.id).await;
        assert_eq!(
            (stored.version, stored.queue.as_str()),
            (version, run.queue.as_str()),
            "VER-01: a run keeps the version it was triggered with"
        );
    }
    let refused = e.promote("default", 3).await;
    assert!(
        matches!(refused, Err(EngineError::UnknownVersion { version: 3, .. })),
        "VER-01: promoting an unknown version: {refused:?}"
    );
    assert_eq!(
        ok(e.current_version("default")).await,
        v2,
        "VER-01: a refused promotion changes nothing"
    );
}

/// VER-02: versions are listed by number with their registration instants; each shows
/// exactly the definition registered (every field); version 0 is the empty version; another
/// env numbers its own versions from 1.
pub async fn ver_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let e = &h.engine;
    let mut full = TaskDef::new(TaskName::new("report").expect("valid"));
    full.queue = Some(QueueName::new("reports").expect("valid"));
    full.queue_limit = Some(3);
    full.key_total_limit = Some(10);
    full.lane = Some(LaneName::fast_lane());
    full.ttl = Some(Duration::from_millis(90_500));
    full.retry = RetryPolicy {
        attempts_max: 7,
        factor: 1.5,
        min: Duration::from_millis(250),
        max: secs(600),
        jitter: 0.25,
    };
    full.max_duration = Some(secs(30));
    let defs = [
        VersionDef {
            tasks: vec![full, TaskDef::new(TaskName::new("email").expect("valid"))],
        },
        VersionDef::default(),
        job("q", Some(secs(5))),
    ];
    for (i, def) in defs.iter().enumerate() {
        let number = ok(e.register_version("default", def.clone())).await;
        assert_eq!(number as usize, i + 1, "VER-02: numbered in order");
        h.clock.advance(secs(1));
    }
    let listed = ok(e.versions("default")).await;
    assert_eq!(
        listed
            .iter()
            .map(|v| (v.number, v.created_at))
            .collect::<Vec<_>>(),
        [
            (1, Some(at(secs(0)))),
            (2, Some(at(secs(1)))),
            (3, Some(at(secs(2)))),
        ],
        "VER-02: listed by number with their registration instants"
    );
    for (info, def) in listed.iter().zip(&defs) {
        assert_eq!(&info.def, def, "VER-02: the list holds the definition");
        let shown = ok(e.version("default", info.number)).await;
        assert_eq!(&shown, info, "VER-02: show returns what the list holds");
    }
    let zero = ok(e.version("default", 0)).await;
    assert_eq!((zero.number, zero.def), (0, VersionDef::default()));
    assert!(
        matches!(
            e.version("default", 4).await,
            Err(EngineError::UnknownVersion { version: 4, .. })
        ),
        "VER-02: an unknown version is refused"
    );

    h.set_env("other", EnvSettings::default()).await;
    assert!(ok(e.versions("other")).await.is_empty());
    assert_eq!(ok(e.register_version("other", job("o", None))).await, 1);
    assert_eq!(
        ok(e.versions("default")).await.len(),
        3,
        "VER-02: versions belong to their env"
    );
}
