//! SCHED: cron schedules. A task's schedule fires one run with source `scheduled` at each tick,
//! armed on the engine clock (no poll); ticks missed while nothing ran fire once; a promotion
//! re-plans; the run store's cursors move by compare-and-set only; bad schedules are refused
//! naming the field.

use std::collections::HashSet;
use std::time::Duration;

use runlane_core::backend::{RunFilter, RunRecord};
use runlane_core::{
    EnvName, RunId, ScheduleDef, TaskDef, TaskName, Timestamp, TriggerSource, VersionDef,
};
use runlane_engine::{EngineError, ScheduleInfo};

use crate::kit::{at, secs, within, Backends, Harness};

/// A version with one task carrying `crons` (UTC).
fn version(task: &str, crons: &[&str]) -> VersionDef {
    let mut def = TaskDef::new(TaskName::new(task).expect("task name"));
    def.schedules = crons.iter().map(|c| ScheduleDef::new(*c)).collect();
    VersionDef { tasks: vec![def] }
}

/// Registers and promotes `def` in env `default`.
async fn promote(h: &Harness, def: VersionDef) -> u32 {
    let v = within(
        "register_version",
        h.engine.register_version("default", def),
    )
    .await
    .unwrap_or_else(|e| panic!("[{}] register_version refused: {e}", h.backend));
    within("promote", h.engine.promote("default", v))
        .await
        .unwrap_or_else(|e| panic!("[{}] promote refused: {e}", h.backend));
    v
}

/// Runs with source `scheduled`, in id order.
async fn scheduled_runs(h: &Harness) -> Vec<RunRecord> {
    let filter = RunFilter {
        source: Some(TriggerSource::Scheduled),
        ..RunFilter::default()
    };
    within("list", h.engine.list(&filter))
        .await
        .expect("list scheduled runs")
}

/// Waits until `n` scheduled runs exist. Every trigger publishes a status event, so between
/// two looks it waits for an event about a run the previous look did not list (one listing
/// answers both questions, so a run stored in between is never missed).
async fn wait_scheduled(h: &Harness, n: usize) -> Vec<RunRecord> {
    within(&format!("{n} scheduled runs"), async {
        loop {
            let all = h.all_runs().await;
            let scheduled: Vec<RunRecord> = all
                .iter()
                .filter(|r| r.source == TriggerSource::Scheduled)
                .cloned()
                .collect();
            if scheduled.len() >= n {
                return scheduled;
            }
            let known: HashSet<RunId> = all.iter().map(|r| r.id).collect();
            h.wait_event("an event of a new run", |e| !known.contains(&e.run))
                .await;
        }
    })
    .await
}

/// Waits until no sleeper is parked until `at` any more (a timer disarmed by a re-plan).
async fn disarmed(h: &Harness, at: Timestamp) {
    within(&format!("the sleeper at {at} to go"), async {
        while h.clock.sleeping_until().contains(&at) {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

fn key(task: &str, index: u32, tick: Timestamp) -> String {
    format!("schedule:{task}:{index}:{}", tick.as_millis())
}

async fn schedules(h: &Harness) -> Vec<ScheduleInfo> {
    within("schedules", h.engine.schedules("default"))
        .await
        .expect("schedules of default")
}

/// SCHED-01: a tick fires exactly one run: the scheduler sleeps until the tick (every 30 s;
/// EPOCH is at :20, so the first tick is EPOCH + 10 s), nothing fires 1 ms early, at the tick
/// one run with source `scheduled`, key `schedule:report:0:{tick_ms}` and the tick in its
/// payload is triggered, the cursor moves to the tick and the next tick is armed. A second
/// trigger of the same tick (another process's) is an idempotency hit.
pub async fn sched_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let tick = at(secs(10));
    promote(&h, version("report", &["*/30 * * * * *"])).await;
    h.armed_at(tick).await;
    let task = TaskName::new("report").expect("task");
    assert_eq!(
        schedules(&h).await,
        vec![ScheduleInfo {
            task: task.clone(),
            index: 0,
            cron: "*/30 * * * * *".into(),
            timezone: "UTC".into(),
            next_tick: Some(tick),
            last_tick: None,
        }],
        "SCHED-01: the schedule is listed with its next tick"
    );

    h.set_clock(tick.saturating_sub(Duration::from_millis(1)));
    h.armed_at(tick).await;
    assert!(
        scheduled_runs(&h).await.is_empty(),
        "SCHED-01: nothing fires 1 ms early"
    );

    h.set_clock(tick);
    let runs = wait_scheduled(&h, 1).await;
    let run = &runs[0];
    assert_eq!(run.task, task);
    assert_eq!(run.source, TriggerSource::Scheduled);
    assert_eq!(
        run.idempotency_key.as_deref(),
        Some(key("report", 0, tick).as_str())
    );
    let payload: serde_json::Value = serde_json::from_str(&run.payload).expect("payload JSON");
    assert_eq!(
        payload,
        serde_json::json!({"schedule": 0, "tick": tick.as_millis(), "last_tick": null}),
        "SCHED-01: the payload names the tick"
    );

    let next = at(secs(40));
    h.armed_at(next).await;
    let info = schedules(&h).await;
    assert_eq!(
        (info[0].last_tick, info[0].next_tick),
        (Some(tick), Some(next)),
        "SCHED-01: the cursor is at the tick and the next one is armed"
    );
    assert_eq!(
        scheduled_runs(&h).await.len(),
        1,
        "SCHED-01: exactly one run"
    );

    let again = within(
        "a second trigger of the tick",
        h.engine
            .trigger("report")
            .source(TriggerSource::Scheduled)
            .idempotency_key(&key("report", 0, tick))
            .send(),
    )
    .await
    .expect("trigger");
    assert!(again.idempotent_hit, "SCHED-01: the tick's key dedupes");
    assert_eq!(again.run.id, run.id);
}

/// SCHED-02: ticks missed while nothing ran fire once: after the tick at EPOCH + 10 s, time
/// jumps to EPOCH + 165 s over five ticks (40, 70, 100, 130, 160 s); exactly one run fires,
/// for the latest (160 s), with the last fired tick in its payload, and the next tick
/// (190 s) is armed.
pub async fn sched_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    promote(&h, version("report", &["*/30 * * * * *"])).await;
    h.armed_at(at(secs(10))).await;
    h.set_clock(at(secs(10)));
    wait_scheduled(&h, 1).await;
    h.armed_at(at(secs(40))).await;

    h.set_clock(at(secs(165)));
    let runs = wait_scheduled(&h, 2).await;
    h.armed_at(at(secs(190))).await;
    let runs_now = scheduled_runs(&h).await;
    assert_eq!(
        runs_now.len(),
        2,
        "SCHED-02: five missed ticks fire one run, not five"
    );
    let latest = at(secs(160));
    assert_eq!(
        runs[1].idempotency_key.as_deref(),
        Some(key("report", 0, latest).as_str()),
        "SCHED-02: the latest missed tick fires"
    );
    let payload: serde_json::Value = serde_json::from_str(&runs[1].payload).expect("payload");
    assert_eq!(payload["last_tick"], at(secs(10)).as_millis());
    assert_eq!(schedules(&h).await[0].last_tick, Some(latest));
}

/// SCHED-03: a promotion re-plans: replacing every-30-s with every-minute disarms the tick at
/// 10 s and arms 40 s (22:14:00), which fires one run; promoting a version without schedules
/// disarms the next one and lists none.
pub async fn sched_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    promote(&h, version("report", &["*/30 * * * * *"])).await;
    h.armed_at(at(secs(10))).await;

    promote(&h, version("report", &["0 * * * * *"])).await;
    h.armed_at(at(secs(40))).await;
    disarmed(&h, at(secs(10))).await;
    assert_eq!(schedules(&h).await[0].cron, "0 * * * * *");

    h.set_clock(at(secs(40)));
    let runs = wait_scheduled(&h, 1).await;
    assert_eq!(
        runs[0].idempotency_key.as_deref(),
        Some(key("report", 0, at(secs(40))).as_str()),
        "SCHED-03: the new pattern's tick fired"
    );
    h.armed_at(at(secs(100))).await;

    promote(&h, version("report", &[])).await;
    disarmed(&h, at(secs(100))).await;
    assert!(
        schedules(&h).await.is_empty(),
        "SCHED-03: no schedule is left"
    );
}

/// SCHED-04: the run store's schedule cursors move only by compare-and-set: the first advance
/// (from none) wins once, an advance from a stale tick changes nothing, of eight concurrent
/// advances from the same tick exactly one wins, and cursors are per env, task and index.
pub async fn sched_04(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let store = h.store.clone();
    let env = EnvName::new("default").expect("env");
    let other = EnvName::new("other").expect("env");
    let task = TaskName::new("report").expect("task");
    let (t1, t2, t3) = (at(secs(1)), at(secs(2)), at(secs(3)));
    let advance = |from, to| store.advance_schedule_cursor(&env, &task, 0, from, to);

    assert_eq!(advance(None, t1).await, Ok(true), "SCHED-04: first advance");
    assert_eq!(
        advance(None, t2).await,
        Ok(false),
        "SCHED-04: no second first"
    );
    assert_eq!(
        advance(Some(t2), t3).await,
        Ok(false),
        "SCHED-04: stale from"
    );
    assert_eq!(
        advance(Some(t1), t2).await,
        Ok(true),
        "SCHED-04: from the cursor"
    );
    assert_eq!(
        store
            .advance_schedule_cursor(&env, &task, 1, None, t1)
            .await,
        Ok(true),
        "SCHED-04: another index has its own cursor"
    );

    let racers: Vec<_> = (0..8)
        .map(|_| {
            let (store, env, task) = (store.clone(), env.clone(), task.clone());
            tokio::spawn(async move {
                store
                    .advance_schedule_cursor(&env, &task, 0, Some(t2), t3)
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for racer in racers {
        if within("a racing advance", racer)
            .await
            .expect("racer")
            .expect("advance")
        {
            won += 1;
        }
    }
    assert_eq!(won, 1, "SCHED-04: exactly one concurrent advance wins");

    let mut cursors = store.schedule_cursors(&env).await.expect("cursors");
    cursors.sort_by_key(|c| c.index);
    let seen: Vec<_> = cursors
        .iter()
        .map(|c| (c.task.as_str(), c.index, c.last_tick))
        .collect();
    assert_eq!(seen, vec![("report", 0, t3), ("report", 1, t1)]);
    assert_eq!(
        store.schedule_cursors(&other).await,
        Ok(Vec::new()),
        "SCHED-04: cursors are per env"
    );
}

/// SCHED-05: a version with a bad schedule is refused naming the field (`schedules[i].cron`,
/// `schedules[i].timezone`) and registers nothing.
pub async fn sched_05(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut bad_zone = version("report", &["@hourly", "@daily"]);
    bad_zone.tasks[0].schedules[1].timezone = "Atlantis/Capital".into();
    let cases = [
        (version("report", &["61 * * * *"]), "schedules[0].cron"),
        (bad_zone, "schedules[1].timezone"),
    ];
    for (def, field) in cases {
        let err = h
            .refused(
                "a version with a bad schedule",
                h.engine.register_version("default", def),
            )
            .await;
        match err {
            EngineError::Invalid(e) => assert_eq!(e.field, field, "SCHED-05"),
            other => panic!(
                "[{}] SCHED-05: want Invalid({field}), got {other:?}",
                h.backend
            ),
        }
    }
    assert!(schedules(&h).await.is_empty());
}
