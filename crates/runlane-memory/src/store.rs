//! The in-memory run store: records, attempts, idempotency keys, envs and versions behind one
//! mutex. Each method is one atomic step, so concurrent triggers with one idempotency key yield
//! exactly one run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use runlane_core::backend::{
    AttemptEnd, AttemptRecord, IdempotencyClaim, Inserted, Retention, RunFilter, RunRecord,
    RunStore, ScheduleCursor, ToStart, VersionInfo,
};
use runlane_core::idhash::IdBuild;
use runlane_core::{
    EnvName, EnvSettings, QueueName, QueueSettings, RunId, RunStatus, StoreError, TaskName,
    Timestamp, VersionDef,
};

/// The default page size of a listing, and its cap.
const LIST_LIMIT_DEFAULT: u32 = 100;
const LIST_LIMIT_MAX: u32 = 1000;

type IdemKey = (EnvName, TaskName, String);

/// The records by id (a hash lookup: a worker's read, start mark and end each look one up, and
/// a B-tree of a million records cost several cache misses per lookup), with the ids in order
/// beside them for listing. Boxed: a table slot is sized for its largest entry.
#[derive(Default)]
struct Runs {
    by_id: HashMap<RunId, Box<RunRecord>, IdBuild>,
    order: BTreeSet<RunId>,
}

impl Runs {
    fn get(&self, run: &RunId) -> Option<&RunRecord> {
        self.by_id.get(run).map(|r| &**r)
    }

    fn get_mut(&mut self, run: &RunId) -> Option<&mut RunRecord> {
        self.by_id.get_mut(run).map(|r| &mut **r)
    }

    fn insert(&mut self, record: RunRecord) {
        self.order.insert(record.id);
        self.by_id.insert(record.id, Box::new(record));
    }

    fn remove(&mut self, run: &RunId) -> Option<RunRecord> {
        self.order.remove(run);
        self.by_id.remove(run).map(|r| *r)
    }

    /// The records after `after` (all without), in id order.
    fn after(&self, after: Option<RunId>) -> impl Iterator<Item = &RunRecord> {
        let ids = match after {
            Some(after) => self
                .order
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.order.range(..),
        };
        ids.filter_map(|id| self.get(id))
    }

    /// Every record, in id order.
    fn values(&self) -> impl Iterator<Item = &RunRecord> {
        self.after(None)
    }
}

#[derive(Default)]
struct State {
    runs: Runs,
    idempotency: HashMap<IdemKey, (RunId, Timestamp)>,
    envs: BTreeMap<EnvName, EnvSettings>,
    /// Per env, version `n` at index `n - 1` with its registration time.
    versions: HashMap<EnvName, Vec<(VersionDef, Timestamp)>>,
    current: HashMap<EnvName, u32>,
    /// The last tick fired of each (env, task, schedule index).
    cursors: HashMap<(EnvName, TaskName, u32), Timestamp>,
    /// Admin queue settings by (env, queue).
    queue_settings: BTreeMap<(EnvName, QueueName), QueueSettings>,
}

/// Appends an attempt without the spare room a growing `Vec` keeps (most runs have one
/// attempt, kept as long as the run).
fn push_attempt(attempts: &mut Vec<AttemptRecord>, attempt: AttemptRecord) {
    attempts.reserve_exact(1);
    attempts.push(attempt);
}

/// One attempt's terminal write (`finish_many`'s, per end): the first terminal write wins.
fn end_attempt(st: &mut State, end: AttemptEnd, now: Timestamp) -> Result<(), StoreError> {
    let run = end.run;
    let r = st.runs.get_mut(&run).ok_or(StoreError::NotFound(run))?;
    if r.status.is_terminal() {
        return Err(StoreError::AlreadyFinished {
            run,
            status: r.status,
        });
    }
    if end.attempt.number != r.attempt {
        return Err(StoreError::StaleAttempt {
            run,
            attempt: end.attempt.number,
            current: r.attempt,
        });
    }
    debug_assert!(end.status.is_terminal(), "finish needs a terminal status");
    r.status = end.status;
    r.output = end.output;
    r.finished_at = Some(now);
    r.error = end.attempt.error.clone();
    r.attempt = end.attempt.number;
    push_attempt(&mut r.attempts, end.attempt);
    Ok(())
}

/// Run records, idempotency keys, envs and versions in memory (implements [`RunStore`]).
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore {
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn matches(filter: &RunFilter, r: &RunRecord) -> bool {
    filter.env.as_ref().is_none_or(|e| e == &r.env)
        && filter.status.is_none_or(|s| s == r.status)
        && filter.task.as_ref().is_none_or(|t| t == &r.task)
        && filter.queue.as_ref().is_none_or(|q| q == &r.queue)
        && filter.lane.as_ref().is_none_or(|l| l == &r.lane)
        && filter.source.is_none_or(|s| s == r.source)
        && filter.version.is_none_or(|v| v == r.version)
        && filter.created_from.is_none_or(|t| r.created_at >= t)
        && filter.created_to.is_none_or(|t| r.created_at < t)
}

#[async_trait]
impl RunStore for MemoryStore {
    async fn insert(
        &self,
        runs: Vec<(RunRecord, Option<IdempotencyClaim>)>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError> {
        let mut st = self.lock();
        let mut out = Vec::with_capacity(runs.len());
        for (record, claim) in runs {
            if let Some(claim) = &claim {
                let key = (record.env.clone(), record.task.clone(), claim.key.clone());
                let hit = st
                    .idempotency
                    .get(&key)
                    .filter(|(_, expires)| *expires > now)
                    .and_then(|(id, _)| st.runs.get(id))
                    .map(|r| Box::new(r.clone()));
                if let Some(existing) = hit {
                    out.push(Inserted::Existing(existing));
                    continue;
                }
                st.idempotency.insert(key, (record.id, claim.expires_at));
            }
            st.runs.insert(record);
            out.push(Inserted::New);
        }
        Ok(out)
    }

    async fn remove(&self, run: RunId) -> Result<(), StoreError> {
        let mut st = self.lock();
        if let Some(record) = st.runs.remove(&run) {
            if let Some(key) = record.idempotency_key {
                let k = (record.env, record.task, key);
                if st.idempotency.get(&k).is_some_and(|(id, _)| *id == run) {
                    st.idempotency.remove(&k);
                }
            }
        }
        Ok(())
    }

    async fn get(&self, run: RunId) -> Result<Option<RunRecord>, StoreError> {
        Ok(self.lock().runs.get(&run).cloned())
    }

    async fn get_to_start(&self, runs: &[RunId]) -> Result<Vec<Option<ToStart>>, StoreError> {
        let st = self.lock();
        Ok(runs
            .iter()
            .map(|run| st.runs.get(run).map(ToStart::from))
            .collect())
    }

    async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        let st = self.lock();
        let limit = filter
            .limit
            .unwrap_or(LIST_LIMIT_DEFAULT)
            .min(LIST_LIMIT_MAX) as usize;
        Ok(st
            .runs
            .after(filter.after)
            .filter(|r| matches(filter, r))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn record_retry(
        &self,
        run: RunId,
        attempt: AttemptRecord,
        next_run_after: Timestamp,
    ) -> Result<(), StoreError> {
        let mut st = self.lock();
        let r = st.runs.get_mut(&run).ok_or(StoreError::NotFound(run))?;
        if r.status.is_terminal() {
            return Err(StoreError::AlreadyFinished {
                run,
                status: r.status,
            });
        }
        if attempt.number != r.attempt {
            return Err(StoreError::StaleAttempt {
                run,
                attempt: attempt.number,
                current: r.attempt,
            });
        }
        r.status = if next_run_after > attempt.ended_at {
            RunStatus::Delayed
        } else {
            RunStatus::Queued
        };
        r.error = attempt.error.clone();
        r.attempt = attempt.number + 1;
        r.run_after = next_run_after;
        r.started_at = None;
        push_attempt(&mut r.attempts, attempt);
        Ok(())
    }

    async fn request_cancel(&self, run: RunId, at: Timestamp) -> Result<Timestamp, StoreError> {
        let mut st = self.lock();
        let r = st.runs.get_mut(&run).ok_or(StoreError::NotFound(run))?;
        if r.status.is_terminal() {
            return Err(StoreError::AlreadyFinished {
                run,
                status: r.status,
            });
        }
        Ok(*r.cancel_requested_at.get_or_insert(at))
    }

    fn note_start(&self, run: RunId, attempt: u32, at: Timestamp) {
        let mut st = self.lock();
        if let Some(r) = st.runs.get_mut(&run) {
            if r.attempt == attempt && !r.status.is_terminal() {
                r.started_at = Some(at);
            }
        }
    }

    async fn purge_finished(
        &self,
        retention: &Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let doomed: std::collections::HashSet<RunId> = st
            .runs
            .values()
            .filter(|r| {
                r.finished_at
                    .and_then(|at| retention.purge_at(r.status, at))
                    .is_some_and(|due| due <= now)
            })
            .map(|r| r.id)
            .collect();
        for id in &doomed {
            st.runs.remove(id);
        }
        st.idempotency.retain(|_, (id, _)| !doomed.contains(id));
        Ok(doomed.len() as u64)
    }

    async fn next_purge_at(&self, retention: &Retention) -> Result<Option<Timestamp>, StoreError> {
        let st = self.lock();
        Ok(st
            .runs
            .values()
            .filter_map(|r| {
                r.finished_at
                    .and_then(|at| retention.purge_at(r.status, at))
            })
            .min())
    }

    async fn finish(
        &self,
        run: RunId,
        status: RunStatus,
        output: Option<Arc<str>>,
        attempt: Option<AttemptRecord>,
        now: Timestamp,
    ) -> Result<RunRecord, StoreError> {
        let mut st = self.lock();
        let r = st.runs.get_mut(&run).ok_or(StoreError::NotFound(run))?;
        if r.status.is_terminal() {
            return Err(StoreError::AlreadyFinished {
                run,
                status: r.status,
            });
        }
        if let Some(a) = &attempt {
            if a.number != r.attempt {
                return Err(StoreError::StaleAttempt {
                    run,
                    attempt: a.number,
                    current: r.attempt,
                });
            }
        }
        debug_assert!(status.is_terminal(), "finish needs a terminal status");
        r.status = status;
        r.output = output;
        r.finished_at = Some(now);
        if let Some(a) = attempt {
            r.error = a.error.clone();
            r.attempt = a.number;
            push_attempt(&mut r.attempts, a);
        }
        Ok(RunRecord::clone(r))
    }

    async fn finish_many(
        &self,
        ends: Vec<AttemptEnd>,
        now: Timestamp,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let mut st = self.lock();
        Ok(ends
            .into_iter()
            .map(|end| end_attempt(&mut st, end, now))
            .collect())
    }

    fn finishes_now(&self) -> bool {
        true
    }

    fn finish_now(&self, end: AttemptEnd, now: Timestamp) -> Result<(), StoreError> {
        end_attempt(&mut self.lock(), end, now)
    }

    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
    ) -> Result<(), StoreError> {
        let mut st = self.lock();
        let r = st.runs.get_mut(&run).ok_or(StoreError::NotFound(run))?;
        if r.status.is_terminal() {
            return Err(StoreError::AlreadyFinished {
                run,
                status: r.status,
            });
        }
        r.run_after = run_after;
        r.ttl_deadline = ttl_deadline;
        Ok(())
    }

    async fn unfinished(&self) -> Result<Vec<RunRecord>, StoreError> {
        Ok(self
            .lock()
            .runs
            .values()
            .filter(|r| !r.status.is_terminal())
            .cloned()
            .collect())
    }

    async fn put_env(&self, env: &EnvName, settings: EnvSettings) -> Result<(), StoreError> {
        self.lock().envs.insert(env.clone(), settings);
        Ok(())
    }

    async fn create_env(&self, env: &EnvName, settings: EnvSettings) -> Result<bool, StoreError> {
        let mut st = self.lock();
        if st.envs.contains_key(env) {
            return Ok(false);
        }
        st.envs.insert(env.clone(), settings);
        Ok(true)
    }

    async fn envs(&self) -> Result<Vec<(EnvName, EnvSettings)>, StoreError> {
        Ok(self
            .lock()
            .envs
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect())
    }

    async fn put_queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: &QueueSettings,
    ) -> Result<(), StoreError> {
        self.lock()
            .queue_settings
            .insert((env.clone(), queue.clone()), *settings);
        Ok(())
    }

    async fn queue_settings_all(
        &self,
    ) -> Result<Vec<(EnvName, QueueName, QueueSettings)>, StoreError> {
        Ok(self
            .lock()
            .queue_settings
            .iter()
            .map(|((env, queue), settings)| (env.clone(), queue.clone(), *settings))
            .collect())
    }

    async fn add_version(
        &self,
        env: &EnvName,
        def: VersionDef,
        now: Timestamp,
    ) -> Result<u32, StoreError> {
        let mut st = self.lock();
        let versions = st.versions.entry(env.clone()).or_default();
        versions.push((def, now));
        Ok(u32::try_from(versions.len()).unwrap_or(u32::MAX))
    }

    async fn version(&self, env: &EnvName, version: u32) -> Result<Option<VersionDef>, StoreError> {
        if version == 0 {
            return Ok(Some(VersionDef::default()));
        }
        let st = self.lock();
        Ok(st
            .versions
            .get(env)
            .and_then(|v| v.get(version as usize - 1))
            .map(|(def, _)| def.clone()))
    }

    async fn promote(&self, env: &EnvName, version: u32) -> Result<(), StoreError> {
        let mut st = self.lock();
        let known = version == 0
            || st
                .versions
                .get(env)
                .is_some_and(|v| (version as usize) <= v.len());
        if !known {
            return Err(StoreError::UnknownVersion {
                env: env.to_string(),
                version,
            });
        }
        st.current.insert(env.clone(), version);
        Ok(())
    }

    async fn current_version(&self, env: &EnvName) -> Result<u32, StoreError> {
        Ok(self.lock().current.get(env).copied().unwrap_or(0))
    }

    async fn versions(&self, env: &EnvName) -> Result<Vec<VersionInfo>, StoreError> {
        let st = self.lock();
        let Some(versions) = st.versions.get(env) else {
            return Ok(Vec::new());
        };
        Ok(versions
            .iter()
            .zip(1u32..)
            .map(|((def, at), number)| VersionInfo {
                number,
                created_at: Some(*at),
                def: def.clone(),
            })
            .collect())
    }
    async fn schedule_cursors(&self, env: &EnvName) -> Result<Vec<ScheduleCursor>, StoreError> {
        Ok(self
            .lock()
            .cursors
            .iter()
            .filter(|((e, _, _), _)| e == env)
            .map(|((_, task, index), last_tick)| ScheduleCursor {
                task: task.clone(),
                index: *index,
                last_tick: *last_tick,
            })
            .collect())
    }

    async fn advance_schedule_cursor(
        &self,
        env: &EnvName,
        task: &TaskName,
        index: u32,
        from: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let key = (env.clone(), task.clone(), index);
        if st.cursors.get(&key).copied() != from {
            return Ok(false);
        }
        st.cursors.insert(key, to);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runlane_core::retry::RetryPolicy;

    fn record(n: u128) -> RunRecord {
        RunRecord::queued(
            RunId(n),
            EnvName::new("prod").expect("env"),
            TaskName::new("email").expect("task"),
            "{}",
            Timestamp(1_000),
        )
    }

    fn attempt(number: u32, outcome: &str) -> AttemptRecord {
        AttemptRecord {
            number,
            outcome: outcome.into(),
            error: None,
            ended_at: Timestamp(2_000),
        }
    }

    fn end(run: u128, number: u32) -> AttemptEnd {
        AttemptEnd {
            run: RunId(run),
            status: RunStatus::Completed,
            output: Some(Arc::from("1")),
            attempt: attempt(number, "completed"),
        }
    }

    /// What a worker reads to start a run is what the whole record says (the trait's default
    /// reads records), in the order asked, `None` for a run not stored; a cancel request and a
    /// terminal status show.
    #[tokio::test]
    async fn what_a_worker_reads_to_start_a_run_matches_its_record() {
        let store = MemoryStore::new();
        let mut third = record(3);
        third.payload = Arc::from(r#"{"to":"a@b"}"#);
        third.retry.attempts_max = 5;
        let runs = vec![(record(1), None), (record(2), None), (third, None)];
        store.insert(runs, Timestamp(1_000)).await.expect("insert");
        let ended = store.finish_many(vec![end(1, 1)], Timestamp(2_000)).await;
        assert_eq!(ended, Ok(vec![Ok(())]));
        let requested = store.request_cancel(RunId(2), Timestamp(3_000)).await;
        assert_eq!(requested, Ok(Timestamp(3_000)));

        let ids = [RunId(3), RunId(9), RunId(1), RunId(2)];
        let read = store.get_to_start(&ids).await.expect("read");
        let mut expected = Vec::new();
        for id in ids {
            expected.push(
                store
                    .get(id)
                    .await
                    .expect("get")
                    .as_ref()
                    .map(ToStart::from),
            );
        }
        assert_eq!(read, expected);
        let summary: Vec<Option<(RunStatus, bool, &str, u32)>> = read
            .iter()
            .map(|r| {
                r.as_ref().map(|r| {
                    (
                        r.status,
                        r.cancel_requested,
                        &*r.payload,
                        r.retry.attempts_max,
                    )
                })
            })
            .collect();
        let fresh = RetryPolicy::default().attempts_max;
        assert_eq!(
            summary,
            vec![
                Some((RunStatus::Queued, false, r#"{"to":"a@b"}"#, 5)),
                None,
                Some((RunStatus::Completed, false, "{}", fresh)),
                Some((RunStatus::Queued, true, "{}", fresh)),
            ]
        );
    }

    /// Listing walks the ids in order, after removals and from a cursor.
    #[tokio::test]
    async fn a_list_walks_ids_in_order_after_removals() {
        let store = MemoryStore::new();
        let runs = [5, 1, 4, 2, 3].map(|n| (record(n), None)).to_vec();
        store.insert(runs, Timestamp(1_000)).await.expect("insert");
        store.remove(RunId(4)).await.expect("remove");
        let all = RunFilter::default();
        let ids = |rs: Vec<RunRecord>| rs.iter().map(|r| r.id.0).collect::<Vec<_>>();
        assert_eq!(ids(store.list(&all).await.expect("list")), vec![1, 2, 3, 5]);
        let after = RunFilter {
            after: Some(RunId(2)),
            ..RunFilter::default()
        };
        assert_eq!(ids(store.list(&after).await.expect("list")), vec![3, 5]);
        assert_eq!(store.get(RunId(4)).await, Ok(None));
    }

    /// `finish_now` answers each end as `finish_many` does and leaves the same records.
    #[tokio::test]
    async fn an_end_written_now_answers_and_leaves_what_finish_many_does() {
        let (now, many) = (MemoryStore::new(), MemoryStore::new());
        for s in [&now, &many] {
            assert!(s.finishes_now());
            let runs = vec![(record(1), None), (record(2), None)];
            let inserted = s.insert(runs, Timestamp(1_000)).await.expect("insert");
            assert!(inserted.iter().all(|i| matches!(i, Inserted::New)));
        }
        // A first end, the same end again, a stale attempt's end and an unknown run's.
        let ends = [end(1, 1), end(1, 1), end(2, 2), end(9, 1)];
        let mut answers = Vec::new();
        for e in ends.clone() {
            answers.push(now.finish_now(e, Timestamp(3_000)));
        }
        let expected = many
            .finish_many(ends.to_vec(), Timestamp(3_000))
            .await
            .expect("one call");
        assert_eq!(answers, expected);
        assert!(matches!(answers[0], Ok(())));
        assert!(matches!(
            answers[1],
            Err(StoreError::AlreadyFinished { .. })
        ));
        assert!(matches!(answers[2], Err(StoreError::StaleAttempt { .. })));
        assert!(matches!(answers[3], Err(StoreError::NotFound(_))));
        for n in [1, 2] {
            assert_eq!(
                now.get(RunId(n)).await.expect("get"),
                many.get(RunId(n)).await.expect("get")
            );
        }
    }

    /// The attempts a kept run holds take the room they need and no more: a `Vec` grown by
    /// `push` keeps room for four, three of them empty for as long as the run is kept.
    #[tokio::test]
    async fn a_kept_run_holds_its_attempts_without_spare_room() {
        let store = MemoryStore::new();
        let runs = vec![(record(1), None), (record(2), None), (record(3), None)];
        store.insert(runs, Timestamp(1_000)).await.expect("insert");
        // Run 1 ends at its first attempt; run 2 fails once, then ends; run 3 by `finish`.
        let ended = store.finish_many(vec![end(1, 1)], Timestamp(2_000)).await;
        assert_eq!(ended, Ok(vec![Ok(())]));
        let retried = store
            .record_retry(RunId(2), attempt(1, "failed"), Timestamp(3_000))
            .await;
        assert_eq!(retried, Ok(()));
        let ended = store.finish_many(vec![end(2, 2)], Timestamp(4_000)).await;
        assert_eq!(ended, Ok(vec![Ok(())]));
        let third = store
            .finish(
                RunId(3),
                RunStatus::Completed,
                None,
                Some(attempt(1, "completed")),
                Timestamp(2_000),
            )
            .await
            .map(|r| r.status);
        assert_eq!(third, Ok(RunStatus::Completed));

        let st = store.lock();
        let kept: Vec<(usize, usize)> = [1, 2, 3]
            .iter()
            .map(|n| {
                let a = &st.runs.get(&RunId(*n)).expect("stored").attempts;
                (a.len(), a.capacity())
            })
            .collect();
        assert_eq!(kept, vec![(1, 1), (2, 2), (1, 1)]);
    }
}
