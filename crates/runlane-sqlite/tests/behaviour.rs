//! The SQLite store answers exactly like the memory store (the reference): one scripted
//! sequence covering every `RunStore` method runs against both, and the transcripts of their
//! answers must be identical. The script also asserts the answers it expects, so two stores
//! that were wrong in the same way would still fail.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{attempt, env, id, record, task};
use runlane_core::backend::{IdempotencyClaim, Inserted, RunFilter, RunRecord, RunStore};
use runlane_core::{
    EnvSettings, LaneName, QueueName, QueueSettings, RetryPolicy, RunStatus, StoreError, TaskDef,
    Timestamp, TriggerSource, VersionDef,
};
use runlane_memory::MemoryStore;

fn claim(key: &str, expires_ms: u64) -> Option<IdempotencyClaim> {
    Some(IdempotencyClaim {
        key: key.into(),
        expires_at: Timestamp(expires_ms),
    })
}

fn existing_id(answer: &Inserted) -> Option<runlane_core::RunId> {
    match answer {
        Inserted::Existing(r) => Some(r.id),
        Inserted::New => None,
    }
}

fn ids(runs: &[RunRecord]) -> Vec<u128> {
    runs.iter().map(|r| r.id.0).collect()
}

/// Records every answer as text; the two stores' transcripts are compared line by line.
#[derive(Default)]
struct Transcript(Vec<String>);

impl Transcript {
    fn note<T: std::fmt::Debug>(&mut self, step: &str, answer: &T) {
        self.0.push(format!("{step}: {answer:?}"));
    }
}

async fn script<S: RunStore>(store: &S) -> Transcript {
    let mut t = Transcript::default();
    let prod = env("prod");
    let dev = env("dev");

    // Envs: put twice (the second replaces), list by name.
    t.note(
        "put_env prod",
        &store.put_env(&prod, EnvSettings::default()).await,
    );
    t.note(
        "put_env dev",
        &store.put_env(&dev, EnvSettings::default()).await,
    );
    let tuned = EnvSettings {
        limit: 7,
        burst: 1.5,
        fast_lane_limit: Some(3),
        weight: 4,
        strict_tasks: true,
        fast_path: false,
    };
    t.note("put_env prod again", &store.put_env(&prod, tuned).await);
    let envs = store.envs().await.expect("envs");
    assert_eq!(envs.len(), 2);
    assert_eq!(envs[0].0, dev, "envs are listed by name");
    assert_eq!(envs[1].1, tuned, "the second put replaced the first");
    t.note("envs", &envs);

    // Queue settings: none at first; put twice for one queue (the second replaces), listed
    // by env then queue.
    t.note(
        "queue_settings_all empty",
        &store.queue_settings_all().await,
    );
    let mail = QueueName::new("mail").expect("queue");
    let paused = QueueSettings {
        limit: Some(2),
        key_total_limit: Some(9),
        max_queued: Some(40),
        paused: true,
    };
    for (step, e, settings) in [
        (
            "put_queue_settings prod/mail",
            &prod,
            QueueSettings::default(),
        ),
        (
            "put_queue_settings dev/mail",
            &dev,
            QueueSettings::default(),
        ),
        ("put_queue_settings prod/mail again", &prod, paused),
    ] {
        t.note(step, &store.put_queue_settings(e, &mail, &settings).await);
    }
    let queues = store.queue_settings_all().await.expect("queue settings");
    assert_eq!(
        queues,
        vec![
            (dev.clone(), mail.clone(), QueueSettings::default()),
            (prod.clone(), mail.clone(), paused),
        ]
    );
    t.note("queue_settings_all", &queues);

    // Plain inserts, one of them with every optional field set.
    let a = record(id(1_000, 1), "prod", "email", 1_000);
    let mut b = record(id(1_000, 2), "prod", "sms", 1_000);
    b.version = 2;
    b.locked = true;
    b.key = Arc::from("customer-9");
    b.lane = LaneName::fast_lane();
    b.queue = QueueName::new("notify").expect("queue");
    b.priority = Duration::from_secs(30);
    b.run_after = Timestamp(5_000);
    b.status = RunStatus::Delayed;
    b.ttl = Some(Duration::from_secs(60));
    b.ttl_deadline = Some(Timestamp(65_000));
    b.retry = RetryPolicy {
        attempts_max: 5,
        factor: 1.5,
        min: Duration::from_millis(250),
        max: Duration::from_secs(10),
        jitter: 0.25,
    };
    b.max_duration = Some(Duration::from_secs(90));
    b.source = TriggerSource::Sync;
    b.retry_of = Some(id(500, 7));
    b.payload = Arc::from(r#"{"text":"héllo \"quoted\" ✓","list":[1,2,3]}"#);
    let ins = store
        .insert(vec![(a.clone(), None), (b.clone(), None)], Timestamp(1_000))
        .await;
    assert!(matches!(ins.as_deref(), Ok([Inserted::New, Inserted::New])));
    t.note("insert a b", &ins);
    assert_eq!(
        store.get(b.id).await.expect("get"),
        Some(b.clone()),
        "round trip"
    );
    t.note("get b", &store.get(b.id).await);
    t.note("get unknown", &store.get(id(1, 1)).await);

    // Idempotency: a live key answers its run, whatever the new payload.
    let mut c = record(id(2_000, 1), "prod", "email", 2_000);
    c.idempotency_key = Some("k1".into());
    let ins = store
        .insert(vec![(c.clone(), claim("k1", 10_000))], Timestamp(2_000))
        .await;
    t.note("insert c k1", &ins);
    let mut c_dup = record(id(2_500, 1), "prod", "email", 2_500);
    c_dup.idempotency_key = Some("k1".into());
    c_dup.payload = Arc::from(r#"{"other":true}"#);
    let ins = store
        .insert(vec![(c_dup.clone(), claim("k1", 12_000))], Timestamp(2_500))
        .await
        .expect("insert dup");
    assert_eq!(
        existing_id(&ins[0]),
        Some(c.id),
        "hit returns the existing run"
    );
    t.note("insert c_dup k1 (hit)", &ins);
    assert_eq!(
        store.get(c_dup.id).await.expect("get"),
        None,
        "nothing stored"
    );
    // Same key, other task: a different scope.
    let mut c_other_task = record(id(2_500, 2), "prod", "sms", 2_500);
    c_other_task.idempotency_key = Some("k1".into());
    let ins = store
        .insert(vec![(c_other_task, claim("k1", 12_000))], Timestamp(2_500))
        .await;
    assert!(matches!(ins.as_deref(), Ok([Inserted::New])));
    t.note("insert k1 other task", &ins);

    // Duplicates inside one batch collapse onto the first; a live key from before still hits.
    let d1 = record(id(3_000, 1), "prod", "email", 3_000);
    let d2 = record(id(3_000, 2), "prod", "email", 3_000);
    let d3 = record(id(3_000, 3), "prod", "email", 3_000);
    let d4 = record(id(3_000, 4), "prod", "email", 3_000);
    let ins = store
        .insert(
            vec![
                (d1.clone(), claim("k2", 20_000)),
                (d2, claim("k2", 20_000)),
                (d3.clone(), None),
                (d4, claim("k1", 20_000)),
            ],
            Timestamp(3_000),
        )
        .await
        .expect("batch insert");
    assert!(matches!(ins[0], Inserted::New));
    assert_eq!(existing_id(&ins[1]), Some(d1.id));
    assert!(matches!(ins[2], Inserted::New));
    assert_eq!(existing_id(&ins[3]), Some(c.id));
    t.note("insert batch with duplicates", &ins);

    // An expired key no longer deduplicates: the new run takes it over.
    let mut e = record(id(11_000, 1), "prod", "email", 11_000);
    e.idempotency_key = Some("k1".into());
    let ins = store
        .insert(vec![(e.clone(), claim("k1", 30_000))], Timestamp(11_000))
        .await;
    assert!(
        matches!(ins.as_deref(), Ok([Inserted::New])),
        "k1 expired at 10_000"
    );
    t.note("insert e k1 after expiry", &ins);
    let mut e_dup = record(id(11_500, 1), "prod", "email", 11_500);
    e_dup.idempotency_key = Some("k1".into());
    let ins = store
        .insert(vec![(e_dup, claim("k1", 30_000))], Timestamp(11_500))
        .await
        .expect("insert");
    assert_eq!(existing_id(&ins[0]), Some(e.id), "the key now names e");
    t.note("insert e_dup k1", &ins);

    // record_retry: delayed when the next run_after is later than the attempt's end, queued
    // when it is not; refused for unknown and finished runs.
    t.note(
        "retry a (delayed)",
        &store
            .record_retry(
                a.id,
                attempt(1, "failed", Some("boom"), 4_000),
                Timestamp(6_000),
            )
            .await,
    );
    t.note(
        "retry a (queued)",
        &store
            .record_retry(a.id, attempt(2, "crashed", None, 7_000), Timestamp(7_000))
            .await,
    );
    let got = store.get(a.id).await.expect("get").expect("a");
    assert_eq!(got.attempt, 3);
    assert_eq!(got.status, RunStatus::Queued);
    assert_eq!(got.attempts.len(), 2);
    assert_eq!(got.error, None, "the last attempt's error");
    t.note("get a", &got);
    let missing = store
        .record_retry(id(9, 9), attempt(1, "failed", None, 1), Timestamp(2))
        .await;
    assert_eq!(missing, Err(StoreError::NotFound(id(9, 9))));
    t.note("retry unknown", &missing);

    // finish: the first terminal write wins.
    let done = store
        .finish(
            a.id,
            RunStatus::Completed,
            Some(Arc::from(r#"{"ok":1}"#)),
            Some(attempt(3, "completed", None, 8_000)),
            Timestamp(8_000),
        )
        .await;
    t.note("finish a", &done);
    let done = done.expect("finish");
    assert_eq!(done.finished_at, Some(Timestamp(8_000)));
    assert_eq!(done.attempts.len(), 3);
    assert_eq!(
        store.get(a.id).await.expect("get"),
        Some(done),
        "answer = stored"
    );
    let again = store
        .finish(a.id, RunStatus::Failed, None, None, Timestamp(9_000))
        .await;
    assert_eq!(
        again,
        Err(StoreError::AlreadyFinished {
            run: a.id,
            status: RunStatus::Completed
        })
    );
    t.note("finish a again", &again);
    t.note(
        "retry finished a",
        &store
            .record_retry(a.id, attempt(4, "failed", None, 9_000), Timestamp(9_500))
            .await,
    );
    t.note(
        "finish d3 canceled without attempt",
        &store
            .finish(d3.id, RunStatus::Canceled, None, None, Timestamp(9_000))
            .await,
    );
    t.note(
        "finish unknown",
        &store
            .finish(id(9, 9), RunStatus::Expired, None, None, Timestamp(9_000))
            .await,
    );

    // reschedule: waiting runs only.
    t.note(
        "reschedule b",
        &store
            .reschedule(b.id, Timestamp(40_000), Some(Timestamp(100_000)))
            .await,
    );
    t.note(
        "reschedule b no ttl",
        &store.reschedule(b.id, Timestamp(41_000), None).await,
    );
    t.note("get b rescheduled", &store.get(b.id).await);
    t.note(
        "reschedule finished a",
        &store.reschedule(a.id, Timestamp(1), None).await,
    );
    t.note(
        "reschedule unknown",
        &store.reschedule(id(9, 9), Timestamp(1), None).await,
    );

    // remove: deletes the run and frees its key; unknown runs are fine.
    t.note("remove e", &store.remove(e.id).await);
    t.note("remove unknown", &store.remove(id(9, 9)).await);
    assert_eq!(store.get(e.id).await.expect("get"), None);
    let mut f = record(id(12_000, 1), "prod", "email", 12_000);
    f.idempotency_key = Some("k1".into());
    let ins = store
        .insert(vec![(f, claim("k1", 40_000))], Timestamp(12_000))
        .await;
    assert!(
        matches!(ins.as_deref(), Ok([Inserted::New])),
        "key freed by remove"
    );
    t.note("insert f k1 after remove", &ins);

    // A few runs in another env with other sources, versions and lanes.
    let mut g = record(id(13_000, 1), "dev", "report", 13_000);
    g.source = TriggerSource::Manual;
    g.lane = LaneName::manual();
    g.version = 1;
    let mut h = record(id(14_000, 1), "dev", "report", 14_000);
    h.source = TriggerSource::Scheduled;
    h.status = RunStatus::Executing;
    t.note(
        "insert g h",
        &store
            .insert(vec![(g, None), (h, None)], Timestamp(14_000))
            .await,
    );

    // list: every filter, the cursor and the limit.
    let all = store.list(&RunFilter::default()).await.expect("list");
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "id order");
    assert_eq!(all.len(), 9);
    t.note("list all", &all);
    let filters = [
        (
            "env dev",
            RunFilter {
                env: Some(dev.clone()),
                ..Default::default()
            },
        ),
        (
            "status queued",
            RunFilter {
                status: Some(RunStatus::Queued),
                ..Default::default()
            },
        ),
        (
            "env prod status completed",
            RunFilter {
                env: Some(prod.clone()),
                status: Some(RunStatus::Completed),
                ..Default::default()
            },
        ),
        (
            "task sms",
            RunFilter {
                task: Some(task("sms")),
                ..Default::default()
            },
        ),
        (
            "queue notify",
            RunFilter {
                queue: Some(QueueName::new("notify").expect("q")),
                ..Default::default()
            },
        ),
        (
            "lane manual",
            RunFilter {
                lane: Some(LaneName::manual()),
                ..Default::default()
            },
        ),
        (
            "source scheduled",
            RunFilter {
                source: Some(TriggerSource::Scheduled),
                ..Default::default()
            },
        ),
        (
            "version 2",
            RunFilter {
                version: Some(2),
                ..Default::default()
            },
        ),
        (
            "created [2000, 12000)",
            RunFilter {
                created_from: Some(Timestamp(2_000)),
                created_to: Some(Timestamp(12_000)),
                ..Default::default()
            },
        ),
        (
            "limit 0",
            RunFilter {
                limit: Some(0),
                ..Default::default()
            },
        ),
        (
            "limit 5000 (capped)",
            RunFilter {
                limit: Some(5_000),
                ..Default::default()
            },
        ),
        (
            "env prod after b limit 2",
            RunFilter {
                env: Some(prod.clone()),
                after: Some(b.id),
                limit: Some(2),
                ..Default::default()
            },
        ),
    ];
    for (name, filter) in filters {
        let runs = store.list(&filter).await;
        t.note(&format!("list {name}"), &runs.map(|r| ids(&r)));
    }
    let completed = store
        .list(&RunFilter {
            status: Some(RunStatus::Completed),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(ids(&completed), vec![a.id.0]);
    // Paging with the cursor visits every run once, in order.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(&RunFilter {
                after,
                limit: Some(2),
                ..Default::default()
            })
            .await
            .expect("page");
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        paged.extend(ids(&page));
    }
    assert_eq!(paged, ids(&all));

    // unfinished: exactly the non-terminal runs.
    let unfinished = store.unfinished().await.expect("unfinished");
    assert!(unfinished.iter().all(|r| !r.status.is_terminal()));
    assert_eq!(
        unfinished.len(),
        all.iter().filter(|r| !r.status.is_terminal()).count()
    );
    t.note("unfinished", &ids(&unfinished));

    // Versions: 0 is the empty version and always current before a promotion.
    t.note("version prod 0", &store.version(&prod, 0).await);
    t.note("version prod 1 (none)", &store.version(&prod, 1).await);
    t.note("current prod", &store.current_version(&prod).await);
    let unknown = store.promote(&prod, 1).await;
    assert_eq!(
        unknown,
        Err(StoreError::UnknownVersion {
            env: "prod".into(),
            version: 1
        })
    );
    t.note("promote prod 1 (unknown)", &unknown);
    let mut def = TaskDef::new(task("email"));
    def.ttl = Some(Duration::from_secs(60));
    def.lane = Some(LaneName::fast_lane());
    def.max_duration = Some(Duration::from_secs(5));
    let v1 = VersionDef { tasks: vec![def] };
    let v2 = VersionDef {
        tasks: vec![TaskDef::new(task("sms")), TaskDef::new(task("email"))],
    };
    t.note(
        "add_version prod v1",
        &store
            .add_version(&prod, v1.clone(), Timestamp(15_000))
            .await,
    );
    t.note(
        "add_version prod v2",
        &store.add_version(&prod, v2, Timestamp(15_001)).await,
    );
    t.note(
        "add_version dev v1",
        &store.add_version(&dev, v1.clone(), Timestamp(15_002)).await,
    );
    let listed = store.versions(&prod).await.expect("versions");
    assert_eq!(
        listed
            .iter()
            .map(|v| (v.number, v.created_at))
            .collect::<Vec<_>>(),
        [(1, Some(Timestamp(15_000))), (2, Some(Timestamp(15_001)))]
    );
    assert_eq!(listed[0].def, v1);
    t.note("versions prod", &listed);
    t.note("versions dev", &store.versions(&dev).await);
    t.note(
        "versions of an env without any",
        &store.versions(&env("nope")).await,
    );
    assert_eq!(store.version(&prod, 1).await.expect("version"), Some(v1));
    t.note("version prod 1", &store.version(&prod, 1).await);
    t.note("version prod 2", &store.version(&prod, 2).await);
    t.note("version prod 3 (none)", &store.version(&prod, 3).await);
    t.note("promote prod 2", &store.promote(&prod, 2).await);
    t.note("current prod", &store.current_version(&prod).await);
    t.note("promote dev 2 (unknown)", &store.promote(&dev, 2).await);
    t.note("current dev", &store.current_version(&dev).await);
    t.note("promote prod 0", &store.promote(&prod, 0).await);
    assert_eq!(store.current_version(&prod).await, Ok(0));
    t.note("current prod after 0", &store.current_version(&prod).await);
    t.note(
        "current unknown env",
        &store.current_version(&env("nope")).await,
    );
    t
}

#[tokio::test]
async fn sqlite_answers_like_the_memory_store() {
    let memory = script(&MemoryStore::new()).await;
    let dir = common::tempdir();
    let sqlite = script(&common::open(&dir.path().join("runs.db"))).await;
    for (i, (m, s)) in memory.0.iter().zip(&sqlite.0).enumerate() {
        assert_eq!(m, s, "step {i} differs");
    }
    assert_eq!(memory.0.len(), sqlite.0.len());
    assert!(memory.0.len() > 60, "the script covers every method");
}
