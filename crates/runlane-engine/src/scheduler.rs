//! The scheduler: triggers the cron schedules of every env's current version.
//!
//! One task per engine, owned by it like the timer service (it holds the engine weakly and ends
//! with it or at shutdown). It plans, sleeps on the engine's clock until the earliest tick, fires
//! what is due, and plans again. Nothing polls: a plan is also redone when this process promotes
//! a version and when another process's promotion is announced
//! ([`crate::Engine::meta_announcements`]).
//!
//! **Firing a tick** triggers a run of the task with source `scheduled` and the idempotency key
//! `schedule:{task}:{index}:{tick_ms}` (kept 24 h), then advances the schedule's cursor in the
//! run store by compare-and-set. Every process of a deployment runs a scheduler; the key makes
//! their triggers of one tick one run, and the compare-and-set lets exactly one of them move the
//! cursor. A process that dies between the trigger and the cursor write leaves the cursor
//! behind; the next plan fires that tick again, which the key turns into the same run.
//!
//! **Missed ticks** (the processes were down, or the clock jumped) fire once: the latest tick in
//! `(last fired, now]`, never one run per missed tick. A schedule with no cursor yet starts
//! counting when this process first plans it, so a new schedule does not fire ticks from before
//! it existed. A cursor belongs to (env, task, schedule index), not to a pattern: a promotion
//! that changes a schedule's pattern keeps its cursor, so a tick of the new pattern between the
//! last fired tick and the promotion fires once, as a missed tick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use runlane_core::schedule::Schedule;
use runlane_core::{EnvName, TaskName, Timestamp, TriggerSource, VersionDef};
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::engine::{Engine, Inner};
use crate::error::EngineError;
use crate::meta::MetaWatch;
use crate::trigger::TriggerRequest;

/// How long the idempotency key of a scheduled run deduplicates the triggers of its tick.
pub const SCHEDULE_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The backoff after a failed plan or tick, first and largest.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One schedule of a task in an env's current version, with where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScheduleInfo {
    /// The task.
    pub task: TaskName,
    /// The schedule's position in the task's `schedules`.
    pub index: u32,
    /// The cron pattern.
    pub cron: String,
    /// The time zone the pattern is read in.
    pub timezone: String,
    /// The first tick after now (`None`: the pattern never matches again).
    pub next_tick: Option<Timestamp>,
    /// The last tick fired (`None`: none yet).
    pub last_tick: Option<Timestamp>,
}

/// The key of a schedule: env, task, index.
type ScheduleKey = (EnvName, TaskName, u32);

/// The scheduler's shared state (held by the engine).
#[derive(Default)]
pub(crate) struct Scheduler {
    /// Rung to plan again (a local promotion, shutdown).
    notify: Arc<Notify>,
    handle: Mutex<Option<JoinHandle<()>>>,
    /// When this process first planned each schedule that has no cursor yet: where counting
    /// its ticks starts.
    first_seen: Mutex<HashMap<ScheduleKey, Timestamp>>,
}

impl Scheduler {
    fn first_seen(&self) -> MutexGuard<'_, HashMap<ScheduleKey, Timestamp>> {
        self.first_seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self) -> MutexGuard<'_, Option<JoinHandle<()>>> {
        self.handle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plans again (after a promotion in this process).
    pub(crate) fn replan(&self) {
        // `notify_one` keeps a permit when the scheduler is busy, so no promotion is missed.
        self.notify.notify_one();
    }

    /// Starts the scheduler task of `inner`. The first plan runs here, before the engine is
    /// handed out: it reads each env's current version once (warming the task metadata
    /// cache) and notes when counting starts for schedules with no cursor yet.
    pub(crate) async fn start(inner: &Arc<Inner>) {
        if let Err(e) = inner.plan_schedules(inner.now()).await {
            tracing::warn!(error = %e, "scheduler: the first plan failed; retrying");
        }
        let announcements = inner.meta.watch();
        let handle = tokio::spawn(serve(
            Arc::downgrade(inner),
            inner.clock.clone(),
            inner.scheduler.notify.clone(),
            announcements,
        ));
        *inner.scheduler.handle() = Some(handle);
    }

    /// Wakes the task so it sees the shutdown, and waits for it to end.
    pub(crate) async fn stop(&self) {
        self.notify.notify_one();
        let handle = self.handle().take();
        if let Some(handle) = handle {
            if let Err(e) = handle.await {
                tracing::warn!(error = %e, "scheduler ended abnormally");
            }
        }
    }

    /// Wakes the task (the engine is being dropped).
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }
}

/// One schedule to fire, as planned.
struct Planned {
    env: EnvName,
    task: TaskName,
    index: u32,
    schedule: Schedule,
    /// The cursor when planned.
    last: Option<Timestamp>,
    /// Ticks after this instant are due (the cursor, or when counting started).
    base: Timestamp,
    /// The first tick after `base`.
    next: Timestamp,
}

/// The scheduler task (see the module docs).
async fn serve(
    engine: Weak<Inner>,
    clock: Arc<dyn Clock>,
    notify: Arc<Notify>,
    mut announcements: watch::Receiver<MetaWatch>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        // Enabled before planning: a promotion during the plan leaves a permit.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        announcements.mark_unchanged();
        let plan = {
            let Some(inner) = engine.upgrade() else {
                return;
            };
            if inner.is_shut_down() {
                return;
            }
            inner.plan_schedules(clock.now()).await
        };
        let plan = match plan {
            Ok(plan) => plan,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler: planning failed");
                let retry_at = clock.now().saturating_add(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                tokio::select! {
                    () = clock.sleep_until(retry_at) => {}
                    () = &mut notified => {}
                }
                continue;
            }
        };
        let earliest = plan.iter().map(|p| p.next).min();
        let woke = tokio::select! {
            () = sleep_until(clock.as_ref(), earliest) => true,
            () = &mut notified => false,
            changed = announcements.changed() => {
                if changed.is_err() {
                    return; // The engine (and its cache) is gone.
                }
                false
            }
        };
        if !woke {
            continue;
        }
        let Some(inner) = engine.upgrade() else {
            return;
        };
        if inner.is_shut_down() {
            return;
        }
        let now = clock.now();
        let mut failed = false;
        for due in plan.iter().filter(|p| p.next <= now) {
            if let Err(e) = inner.fire(due, now).await {
                tracing::warn!(
                    env = %due.env, task = %due.task, index = due.index, error = %e,
                    "scheduler: a tick did not fire; retrying"
                );
                failed = true;
            }
        }
        drop(inner);
        if failed {
            // The tick stays due (its cursor did not move): try again after a backoff, not in
            // a hot loop.
            let retry_at = now.saturating_add(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                () = clock.sleep_until(retry_at) => {}
                () = &mut notified => {}
            }
        } else {
            backoff = BACKOFF_MIN;
        }
    }
}

/// Sleeps until `at`, or forever when nothing is scheduled.
async fn sleep_until(clock: &dyn Clock, at: Option<Timestamp>) {
    match at {
        Some(at) => clock.sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether a trigger error will pass if the same tick is tried again (the store or queue was
/// unreachable), rather than a refusal that would repeat (a full queue, a bad definition).
fn worth_retrying(e: &EngineError) -> bool {
    matches!(e, EngineError::Unavailable(_) | EngineError::ShutDown)
}

impl Inner {
    /// Every schedule of every env's current version, with its next tick. Definitions come
    /// through the task metadata cache and envs from its list, so after the first plan (at
    /// open, which warms the cache) a plan reads no metadata from the store.
    async fn plan_schedules(&self, now: Timestamp) -> Result<Vec<Planned>, EngineError> {
        let mut plan = Vec::new();
        for env in self.meta.env_names() {
            let (_, def) = self.meta.current(self.store.as_ref(), &env).await?;
            if !has_schedules(&def) {
                continue;
            }
            let cursors = self.cursors(&env).await?;
            for task in &def.tasks {
                for (index, sd) in task.schedules.iter().enumerate() {
                    let index = u32::try_from(index).unwrap_or(u32::MAX);
                    let schedule = match sd.parse() {
                        Ok(schedule) => schedule,
                        Err(e) => {
                            // Definitions are validated at registration; a stored one that no
                            // longer parses is skipped, not fatal to the other schedules.
                            tracing::warn!(%env, task = %task.name, index, error = %e,
                                "scheduler: skipping a schedule that does not parse");
                            continue;
                        }
                    };
                    let key = (env.clone(), task.name.clone(), index);
                    let last = cursors.get(&(task.name.clone(), index)).copied();
                    let base = match last {
                        Some(last) => last,
                        None => *self.scheduler.first_seen().entry(key).or_insert(now),
                    };
                    let Some(next) = schedule.next_after(base) else {
                        continue;
                    };
                    plan.push(Planned {
                        env: env.clone(),
                        task: task.name.clone(),
                        index,
                        schedule,
                        last,
                        base,
                        next,
                    });
                }
            }
        }
        Ok(plan)
    }

    async fn cursors(
        &self,
        env: &EnvName,
    ) -> Result<HashMap<(TaskName, u32), Timestamp>, EngineError> {
        Ok(self
            .store
            .schedule_cursors(env)
            .await?
            .into_iter()
            .map(|c| ((c.task, c.index), c.last_tick))
            .collect())
    }

    /// Fires a due schedule: one run for the latest tick up to `now`, then the cursor.
    async fn fire(self: &Arc<Self>, due: &Planned, now: Timestamp) -> Result<(), EngineError> {
        let tick = due
            .schedule
            .latest_between(due.base, now)
            .unwrap_or(due.next);
        let mut request = TriggerRequest::new(due.task.as_str())?;
        request.env = due.env.clone();
        request.source = TriggerSource::Scheduled;
        request.idempotency_key = Some(format!(
            "schedule:{}:{}:{}",
            due.task,
            due.index,
            tick.as_millis()
        ));
        request.idempotency_ttl = Some(SCHEDULE_KEY_TTL);
        request.payload = Arc::from(
            serde_json::json!({
                "schedule": due.index,
                "tick": tick.as_millis(),
                "last_tick": due.last.map(Timestamp::as_millis),
            })
            .to_string(),
        );
        let engine = Engine {
            inner: self.clone(),
        };
        match engine.trigger_request(request).await {
            Ok(triggered) => {
                if !triggered.idempotent_hit {
                    self.counters.schedule_fired();
                }
            }
            Err(e) if worth_retrying(&e) => return Err(e),
            Err(e) => {
                self.counters.schedule_refused();
                // Trying the same tick again would be refused again: the tick is skipped.
                tracing::warn!(env = %due.env, task = %due.task, index = due.index,
                    tick = tick.as_millis(), error = %e, "scheduler: a scheduled trigger was refused");
            }
        }
        // `false` means another process moved the cursor first; the run is the same one.
        self.store
            .advance_schedule_cursor(&due.env, &due.task, due.index, due.last, tick)
            .await?;
        if due.last.is_none() {
            self.scheduler
                .first_seen()
                .remove(&(due.env.clone(), due.task.clone(), due.index));
        }
        Ok(())
    }

    /// The schedules of `env`'s current version with their next and last ticks.
    pub(crate) async fn schedule_infos(
        &self,
        env: &EnvName,
        now: Timestamp,
    ) -> Result<Vec<ScheduleInfo>, EngineError> {
        let (_, def) = self.meta.current(self.store.as_ref(), env).await?;
        if !has_schedules(&def) {
            return Ok(Vec::new());
        }
        let cursors = self.cursors(env).await?;
        let mut out = Vec::new();
        for task in &def.tasks {
            for (index, sd) in task.schedules.iter().enumerate() {
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                out.push(ScheduleInfo {
                    task: task.name.clone(),
                    index,
                    cron: sd.cron.clone(),
                    timezone: sd.timezone.clone(),
                    next_tick: sd.parse().ok().and_then(|s| s.next_after(now)),
                    last_tick: cursors.get(&(task.name.clone(), index)).copied(),
                });
            }
        }
        Ok(out)
    }
}

fn has_schedules(def: &VersionDef) -> bool {
    def.tasks.iter().any(|t| !t.schedules.is_empty())
}
