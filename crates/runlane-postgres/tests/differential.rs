//! A differential property test: random sequences of run-store calls applied to the
//! PostgreSQL store and to `runlane_memory::MemoryStore` (the reference), every answer compared
//! after every step. Each case runs on a fresh schema; proptest prints the failing sequence.

mod common;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use runlane_core::backend::{
    AttemptRecord, IdempotencyClaim, Retention, RunFilter, RunRecord, RunStore,
};
use runlane_core::{
    EnvName, EnvSettings, LaneName, QueueName, RunId, RunStatus, TaskName, Timestamp,
    TriggerSource, VersionDef,
};
use runlane_memory::MemoryStore;

#[derive(Clone, Debug)]
struct NewRun {
    env: u8,
    task: u8,
    key: Option<u8>,
    key_ttl: u64,
    payload: u8,
}

#[derive(Clone, Debug)]
enum Step {
    Insert(Vec<NewRun>),
    /// A run inserted again under a stored run's id, in its env and task (with a new run
    /// beside it when `pair`): the stored row is replaced; a key it held stays with the id.
    Reinsert {
        pick: usize,
        run: NewRun,
        pair: bool,
    },
    Finish {
        pick: usize,
        status: u8,
        attempt: bool,
        output: Option<u8>,
    },
    Retry {
        pick: usize,
        delay: u64,
    },
    Reschedule {
        pick: usize,
        run_after: u64,
        ttl: Option<u64>,
    },
    Remove(usize),
    RequestCancel(usize),
    NoteStart(usize),
    Get(usize),
    List {
        env: Option<u8>,
        status: Option<u8>,
        after: Option<usize>,
        limit: Option<u8>,
        task: Option<u8>,
        created: Option<(u64, u64)>,
        lane_version_queue: bool,
    },
    Unfinished,
    Purge(u64),
    NextPurge(u64),
    PutEnv {
        env: u8,
        limit: u32,
    },
    Envs,
    AddVersion(u8),
    Promote {
        env: u8,
        version: u8,
    },
    Current(u8),
    /// Every version of an env, with creation times.
    Versions(u8),
    Version {
        env: u8,
        version: u8,
    },
    Advance(u64),
}

fn new_run() -> impl Strategy<Value = NewRun> {
    (
        0..2u8,
        0..2u8,
        prop::option::of(0..2u8),
        0..3_000u64,
        any::<u8>(),
    )
        .prop_map(|(env, task, key, key_ttl, payload)| NewRun {
            env,
            task,
            key,
            key_ttl,
            payload,
        })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => prop::collection::vec(new_run(), 1..4).prop_map(Step::Insert),
        1 => (any::<usize>(), new_run(), any::<bool>())
            .prop_map(|(pick, run, pair)| Step::Reinsert { pick, run, pair }),
        3 => (any::<usize>(), 0..5u8, any::<bool>(), prop::option::of(any::<u8>())).prop_map(
            |(pick, status, attempt, output)| Step::Finish { pick, status, attempt, output }
        ),
        2 => (any::<usize>(), 0..2_000u64).prop_map(|(pick, delay)| Step::Retry { pick, delay }),
        1 => (any::<usize>(), 0..5_000u64, prop::option::of(0..5_000u64))
            .prop_map(|(pick, run_after, ttl)| Step::Reschedule { pick, run_after, ttl }),
        1 => any::<usize>().prop_map(Step::Remove),
        2 => any::<usize>().prop_map(Step::RequestCancel),
        2 => any::<usize>().prop_map(Step::NoteStart),
        2 => any::<usize>().prop_map(Step::Get),
        2 => (
            prop::option::of(0..2u8),
            prop::option::of(0..9u8),
            prop::option::of(any::<usize>()),
            prop::option::of(1..6u8),
            prop::option::of(0..2u8),
            prop::option::of((0..6_000u64, 0..6_000u64)),
            any::<bool>(),
        )
            .prop_map(|(env, status, after, limit, task, created, lane_version_queue)| {
                Step::List { env, status, after, limit, task, created, lane_version_queue }
            }),
        1 => Just(Step::Unfinished),
        1 => (0..3_000u64).prop_map(Step::Purge),
        1 => (0..3_000u64).prop_map(Step::NextPurge),
        1 => (0..2u8, 1..50u32).prop_map(|(env, limit)| Step::PutEnv { env, limit }),
        1 => Just(Step::Envs),
        1 => (0..2u8).prop_map(Step::AddVersion),
        1 => (0..2u8, 0..3u8).prop_map(|(env, version)| Step::Promote { env, version }),
        1 => (0..2u8).prop_map(Step::Current),
        1 => (0..2u8).prop_map(Step::Versions),
        1 => (0..2u8, 0..3u8).prop_map(|(env, version)| Step::Version { env, version }),
        2 => (1..1_500u64).prop_map(Step::Advance),
    ]
}

const ENVS: [&str; 2] = ["prod", "dev"];
const TERMINAL: [RunStatus; 5] = [
    RunStatus::Completed,
    RunStatus::Failed,
    RunStatus::Canceled,
    RunStatus::Expired,
    RunStatus::TimedOut,
];

fn env(i: u8) -> EnvName {
    EnvName::new(ENVS[usize::from(i) % 2]).expect("env")
}

/// Applies `steps` to both stores, comparing every answer.
async fn check(steps: Vec<Step>) {
    let pg = common::open(common::config()).await;
    let mem = MemoryStore::new();
    let mut now = 1_000_000u64;
    let mut ids: Vec<RunId> = Vec::new();
    let pick = |ids: &[RunId], i: usize| ids.get(i % ids.len().max(1)).copied();
    for (n, step) in steps.into_iter().enumerate() {
        let at = Timestamp(now);
        let ctx = format!("step {n}: {step:?}");
        match step {
            Step::Insert(runs) => {
                let batch: Vec<(RunRecord, Option<IdempotencyClaim>)> = runs
                    .iter()
                    .map(|r| {
                        let mut rec = common::record(ids.len() as u128 + 1);
                        rec.env = env(r.env);
                        rec.task =
                            TaskName::new(["t1", "t2"][usize::from(r.task) % 2]).expect("task");
                        rec.payload = Arc::from(format!("{{\"n\":{}}}", r.payload));
                        rec.created_at = at;
                        rec.idempotency_key = r.key.map(|k| format!("k{k}"));
                        ids.push(rec.id);
                        let claim = r.key.map(|k| IdempotencyClaim {
                            key: format!("k{k}"),
                            expires_at: Timestamp(now + r.key_ttl),
                        });
                        (rec, claim)
                    })
                    .collect();
                assert_eq!(
                    pg.insert(batch.clone(), at).await,
                    mem.insert(batch, at).await,
                    "{ctx}"
                );
            }
            Step::Reinsert { pick, run, pair } => {
                if ids.is_empty() {
                    continue;
                }
                // The same run stored again (its env and task), with a new payload.
                let i = pick % ids.len();
                let mut rec = common::record(i as u128 + 1);
                match mem.get(rec.id).await.expect("get") {
                    Some(stored) => {
                        rec.env = stored.env;
                        rec.task = stored.task;
                    }
                    None => rec.env = env(run.env),
                }
                rec.payload = Arc::from(format!("{{\"again\":{}}}", run.payload));
                rec.created_at = at;
                let mut batch = vec![(rec, None)];
                if pair {
                    let mut fresh = common::record(ids.len() as u128 + 1);
                    fresh.created_at = at;
                    ids.push(fresh.id);
                    batch.push((fresh, None));
                }
                assert_eq!(
                    pg.insert(batch.clone(), at).await,
                    mem.insert(batch, at).await,
                    "{ctx}"
                );
            }
            Step::Finish {
                pick: i,
                status,
                attempt,
                output,
            } => {
                let Some(run) = pick(&ids, i) else { continue };
                let status = TERMINAL[usize::from(status) % TERMINAL.len()];
                let output: Option<Arc<str>> = output.map(|o| Arc::from(o.to_string()));
                let attempt = attempt.then(|| AttemptRecord {
                    number: 1 + (i % 3) as u32,
                    outcome: "failed".into(),
                    error: Some(format!("boom {i}")),
                    ended_at: at,
                });
                assert_eq!(
                    pg.finish(run, status, output.clone(), attempt.clone(), at)
                        .await,
                    mem.finish(run, status, output, attempt, at).await,
                    "{ctx}"
                );
            }
            Step::Retry { pick: i, delay } => {
                let Some(run) = pick(&ids, i) else { continue };
                let attempt = AttemptRecord {
                    number: 1 + (i % 4) as u32,
                    outcome: "crashed".into(),
                    error: (delay % 2 == 0).then(|| "lost".to_string()),
                    ended_at: at,
                };
                let next = Timestamp(now + delay);
                assert_eq!(
                    pg.record_retry(run, attempt.clone(), next).await,
                    mem.record_retry(run, attempt, next).await,
                    "{ctx}"
                );
            }
            Step::Reschedule {
                pick: i,
                run_after,
                ttl,
            } => {
                let Some(run) = pick(&ids, i) else { continue };
                let run_after = Timestamp(now + run_after);
                let ttl = ttl.map(|t| Timestamp(now + t));
                assert_eq!(
                    pg.reschedule(run, run_after, ttl).await,
                    mem.reschedule(run, run_after, ttl).await,
                    "{ctx}"
                );
            }
            Step::Remove(i) => {
                let Some(run) = pick(&ids, i) else { continue };
                assert_eq!(pg.remove(run).await, mem.remove(run).await, "{ctx}");
            }
            Step::RequestCancel(i) => {
                let Some(run) = pick(&ids, i) else { continue };
                assert_eq!(
                    pg.request_cancel(run, at).await,
                    mem.request_cancel(run, at).await,
                    "{ctx}"
                );
            }
            Step::NoteStart(i) => {
                let Some(run) = pick(&ids, i) else { continue };
                // Only runs the reference holds (an id that never was stored is never noted
                // by the engine either).
                let Ok(Some(r)) = mem.get(run).await else {
                    continue;
                };
                pg.note_start(run, r.attempt, at);
                mem.note_start(run, r.attempt, at);
            }
            Step::Get(i) => {
                let Some(run) = pick(&ids, i) else { continue };
                assert_eq!(pg.get(run).await, mem.get(run).await, "{ctx}");
            }
            Step::List {
                env: e,
                status,
                after,
                limit,
                task,
                created,
                lane_version_queue,
            } => {
                let filter = RunFilter {
                    env: e.map(env),
                    status: status.map(|s| RunStatus::ALL[usize::from(s) % 9]),
                    after: after.and_then(|i| pick(&ids, i)),
                    limit: limit.map(u32::from),
                    task: task.map(|t| TaskName::new(["t1", "t2"][usize::from(t)]).expect("task")),
                    created_from: created.map(|(from, _)| Timestamp(1_000_000 + from)),
                    created_to: created.map(|(_, to)| Timestamp(1_000_000 + to)),
                    lane: lane_version_queue.then(LaneName::default_lane),
                    queue: lane_version_queue.then(|| QueueName::new("email").expect("queue")),
                    version: lane_version_queue.then_some(0),
                    source: lane_version_queue.then_some(TriggerSource::Standard),
                };
                assert_eq!(pg.list(&filter).await, mem.list(&filter).await, "{ctx}");
            }
            Step::Unfinished => {
                assert_eq!(pg.unfinished().await, mem.unfinished().await, "{ctx}");
            }
            Step::Purge(keep) => {
                let retention = Retention::uniform(Duration::from_millis(keep));
                assert_eq!(
                    pg.purge_finished(&retention, at).await,
                    mem.purge_finished(&retention, at).await,
                    "{ctx}"
                );
            }
            Step::NextPurge(keep) => {
                let mut retention = Retention::uniform(Duration::from_millis(keep));
                retention.failed = None;
                assert_eq!(
                    pg.next_purge_at(&retention).await,
                    mem.next_purge_at(&retention).await,
                    "{ctx}"
                );
            }
            Step::PutEnv { env: e, limit } => {
                let settings = EnvSettings {
                    limit,
                    burst: 1.5,
                    ..EnvSettings::default()
                };
                assert_eq!(
                    pg.put_env(&env(e), settings).await,
                    mem.put_env(&env(e), settings).await,
                    "{ctx}"
                );
            }
            Step::Envs => assert_eq!(pg.envs().await, mem.envs().await, "{ctx}"),
            Step::AddVersion(e) => {
                assert_eq!(
                    pg.add_version(&env(e), VersionDef::default(), at).await,
                    mem.add_version(&env(e), VersionDef::default(), at).await,
                    "{ctx}"
                );
            }
            Step::Promote { env: e, version } => {
                let v = u32::from(version);
                assert_eq!(
                    pg.promote(&env(e), v).await,
                    mem.promote(&env(e), v).await,
                    "{ctx}"
                );
            }
            Step::Current(e) => assert_eq!(
                pg.current_version(&env(e)).await,
                mem.current_version(&env(e)).await,
                "{ctx}"
            ),
            Step::Versions(e) => assert_eq!(
                pg.versions(&env(e)).await,
                mem.versions(&env(e)).await,
                "{ctx}"
            ),
            Step::Version { env: e, version } => {
                let v = u32::from(version);
                assert_eq!(
                    pg.version(&env(e), v).await,
                    mem.version(&env(e), v).await,
                    "{ctx}"
                );
            }
            Step::Advance(ms) => now += ms,
        }
    }
    // The whole contents agree at the end too.
    let all = RunFilter {
        limit: Some(1000),
        ..RunFilter::default()
    };
    assert_eq!(pg.list(&all).await, mem.list(&all).await, "final contents");
    common::finish(pg).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_postgres_store_answers_like_the_memory_store(
        steps in prop::collection::vec(step(), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(check(steps));
    }
}
