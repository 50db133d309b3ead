//! Versions as a user workflow: listing, showing, the current version, and the precedence of
//! task-defined queue limits over runtime admin changes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Harness, T0};
use runlane_core::backend::{QueueBackend, VersionInfo};
use runlane_core::{EnvName, QueueName, QueueSettings, TaskDef, TaskName, VersionDef};
use runlane_engine::{Engine, EngineBuilder, EngineError, ManualClock};
use runlane_memory::{MemoryQueue, MemoryStore};

fn task(name: &str) -> TaskDef {
    TaskDef::new(TaskName::new(name).expect("task"))
}

/// `email` in queue `mail` with the given limits.
fn mail(queue_limit: Option<u32>, key_total_limit: Option<u32>) -> VersionDef {
    let mut t = task("email");
    t.queue = Some(QueueName::new("mail").expect("queue"));
    t.queue_limit = queue_limit;
    t.key_total_limit = key_total_limit;
    VersionDef { tasks: vec![t] }
}

async fn mail_settings(e: &Engine) -> QueueSettings {
    e.queues("default")
        .await
        .expect("queues")
        .into_iter()
        .find(|q| q.name.as_str() == "mail")
        .map(|q| q.settings)
        .unwrap_or_default()
}

#[tokio::test]
async fn versions_are_listed_by_number_with_their_definitions_and_times() {
    let h = Harness::new().await;
    let e = &h.engine;
    assert_eq!(e.versions("default").await.expect("versions"), []);
    assert_eq!(e.current_version("default").await.expect("current"), 0);

    let mut retried = task("report");
    retried.ttl = Some(Duration::from_secs(90));
    retried.retry.attempts_max = 5;
    let v1 = VersionDef {
        tasks: vec![task("email"), retried],
    };
    let v2 = mail(Some(3), None);
    assert_eq!(e.register_version("default", v1.clone()).await, Ok(1));
    h.clock.advance(Duration::from_secs(5));
    assert_eq!(e.register_version("default", v2.clone()).await, Ok(2));

    let listed = e.versions("default").await.expect("versions");
    assert_eq!(
        listed,
        [
            VersionInfo {
                number: 1,
                created_at: Some(T0),
                def: v1.clone(),
            },
            VersionInfo {
                number: 2,
                created_at: Some(T0.saturating_add(Duration::from_secs(5))),
                def: v2.clone(),
            },
        ]
    );
    assert_eq!(e.version("default", 1).await.expect("v1"), listed[0]);
    let zero = e.version("default", 0).await.expect("v0");
    assert_eq!((zero.number, zero.created_at), (0, None));
    assert!(zero.def.tasks.is_empty());
    assert!(matches!(
        e.version("default", 3).await,
        Err(EngineError::UnknownVersion { version: 3, .. })
    ));
    assert_eq!(
        e.current_version("default").await,
        Ok(0),
        "registering promotes nothing"
    );
    e.promote("default", 2).await.expect("promote");
    assert_eq!(e.current_version("default").await, Ok(2));

    // Versions belong to their env.
    e.create_env("other", Default::default())
        .await
        .expect("env");
    assert_eq!(e.versions("other").await.expect("versions"), []);
    assert_eq!(e.current_version("other").await, Ok(0));
    for unknown in [
        e.versions("ghost").await.map(|_| ()),
        e.version("ghost", 1).await.map(|_| ()),
        e.current_version("ghost").await.map(|_| ()),
    ] {
        assert!(
            matches!(unknown, Err(EngineError::EnvNotFound(ref env)) if env == "ghost"),
            "{unknown:?}"
        );
    }
}

#[tokio::test]
async fn task_limits_are_capped_and_a_refused_version_is_not_stored() {
    let h = Harness::new().await;
    let e = &h.engine;
    for (def, field) in [
        (mail(Some(1_000_001), None), "queue_limit"),
        (mail(None, Some(1_000_001)), "key_total_limit"),
    ] {
        match e.register_version("default", def).await {
            Err(EngineError::Invalid(i)) => assert_eq!(i.field, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let dup = VersionDef {
        tasks: vec![task("a"), task("a")],
    };
    assert!(matches!(
        e.register_version("default", dup).await,
        Err(EngineError::Invalid(i)) if i.field == "tasks"
    ));
    assert_eq!(e.versions("default").await.expect("versions"), []);
    assert_eq!(
        e.register_version("default", mail(Some(1_000_000), Some(1_000_000)))
            .await,
        Ok(1),
        "the cap itself is accepted"
    );
}

/// The precedence rule: a runtime admin change to a queue setting holds until the next
/// promotion of a version whose task definition sets that setting for that queue.
#[tokio::test]
async fn admin_changes_hold_until_a_promotion_that_sets_the_same_setting() {
    let h = Harness::new().await;
    let e = &h.engine;
    let v1 = e
        .register_version("default", mail(Some(5), None))
        .await
        .expect("v1");
    let only_total = e
        .register_version("default", mail(None, Some(4)))
        .await
        .expect("v2");
    let no_limits = e
        .register_version("default", mail(None, None))
        .await
        .expect("v3");
    let both = e
        .register_version("default", mail(Some(6), Some(9)))
        .await
        .expect("v4");

    e.promote("default", v1).await.expect("promote v1");
    assert_eq!(
        mail_settings(e).await,
        QueueSettings {
            limit: Some(5),
            ..QueueSettings::default()
        }
    );

    // The admin changes every setting at runtime.
    let admin = QueueSettings {
        limit: Some(2),
        key_total_limit: Some(8),
        max_queued: Some(100),
        paused: false,
    };
    e.set_queue("default", "mail", admin).await.expect("admin");
    e.pause_queue("default", "mail").await.expect("pause");

    // A definition that sets only key_total_limit replaces only that one.
    e.promote("default", only_total).await.expect("promote v2");
    assert_eq!(
        mail_settings(e).await,
        QueueSettings {
            limit: Some(2),
            key_total_limit: Some(4),
            max_queued: Some(100),
            paused: true,
        }
    );

    // A definition that sets nothing leaves everything, also the admin's limit.
    e.promote("default", no_limits).await.expect("promote v3");
    assert_eq!(mail_settings(e).await.limit, Some(2));
    assert_eq!(mail_settings(e).await.key_total_limit, Some(4));

    // Promoting v1 again sets its limit again.
    e.promote("default", v1).await.expect("promote v1 again");
    assert_eq!(mail_settings(e).await.limit, Some(5));
    assert_eq!(mail_settings(e).await.key_total_limit, Some(4));

    e.promote("default", both).await.expect("promote v4");
    assert_eq!(
        mail_settings(e).await,
        QueueSettings {
            limit: Some(6),
            key_total_limit: Some(9),
            max_queued: Some(100),
            paused: true,
        }
    );
}

/// Opening an engine puts the queue settings the store keeps, then writes the current
/// version's limits only where the queue backend holds none: an admin change survives a
/// restart over the kept backend and over an empty one (issue 4), and the version fills the
/// limit the admin left unset.
#[tokio::test]
async fn a_restart_fills_missing_limits_and_keeps_admin_changes() {
    let clock = Arc::new(ManualClock::new(T0));
    let store = Arc::new(MemoryStore::new());
    let queue = Arc::new(MemoryQueue::new(Default::default()));
    let open = |queue: Arc<MemoryQueue>| {
        let (clock, store) = (clock.clone(), store.clone());
        async move {
            EngineBuilder::new()
                .clock(clock)
                .open(queue, store)
                .await
                .expect("open")
        }
    };
    let first = open(queue.clone()).await;
    let v1 = first
        .register_version("default", mail(Some(5), Some(7)))
        .await
        .expect("v1");
    first.promote("default", v1).await.expect("promote");
    first
        .set_queue(
            "default",
            "mail",
            QueueSettings {
                limit: Some(2),
                ..QueueSettings::default()
            },
        )
        .await
        .expect("admin");
    first.shutdown().await;

    let kept = open(queue.clone()).await;
    assert_eq!(
        mail_settings(&kept).await.limit,
        Some(2),
        "the admin change survives a restart over the same queue state"
    );
    kept.shutdown().await;

    let fresh_queue = Arc::new(MemoryQueue::new(Default::default()));
    let fresh = open(fresh_queue.clone()).await;
    let env = EnvName::new("default").expect("env");
    let mail_q = QueueName::new("mail").expect("queue");
    assert_eq!(
        fresh_queue
            .queue_settings(&env, &mail_q)
            .await
            .expect("settings"),
        QueueSettings {
            limit: Some(2),
            key_total_limit: Some(7),
            ..QueueSettings::default()
        },
        "an empty queue backend gets the admin settings kept in the store, and the current \
         version's limit where they leave one unset"
    );
    fresh.shutdown().await;
}
