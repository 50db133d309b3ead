//! A [`RunStore`] that forwards every method to another one, with hooks around each call
//! ([`ForwardQueue`] does the same for a queue backend).
//!
//! Tests use it to watch or hold a real store (count reads, park a call until the test lets it
//! go, clean up on drop) without writing out the whole trait: a hook implements only the
//! [`StoreHook`] methods it needs. A method added to [`RunStore`] is forwarded here once, and
//! every wrapper built on [`Forward`] gets it. One answer is the hook's, not the inner
//! store's: [`RunStore::finishes_now`] is `false` unless the hook says otherwise
//! ([`StoreHook::finishes_now`]), so an end goes through `finish_many`, a call a hook can
//! hold, and not through the synchronous [`RunStore::finish_now`] a queue makes inside its
//! own step.
//!
//! ```
//! use std::sync::Arc;
//! use runlane_core::backend::forward::{Forward, StoreHook};
//! use runlane_core::backend::RunStore;
//!
//! /// Claims to group commits whatever the store below says.
//! struct Grouping;
//! impl StoreHook for Grouping {
//!     fn group_commits(&self, _inner: bool) -> bool {
//!         true
//!     }
//! }
//!
//! fn wrap(store: Arc<dyn RunStore>) -> Arc<Forward<Grouping>> {
//!     Arc::new(Forward::new(store, Grouping))
//! }
//! ```

use async_trait::async_trait;
use std::sync::Arc;

mod queue;
pub use queue::{ForwardQueue, QueueHook, QueueOp};

use super::{
    AttemptEnd, AttemptRecord, IdempotencyClaim, Inserted, Retention, RunFilter, RunRecord,
    RunStore, ScheduleCursor, ToStart, VersionInfo,
};
use crate::error::StoreError;
use crate::id::RunId;
use crate::name::{EnvName, QueueName, TaskName};
use crate::run::RunStatus;
use crate::settings::{EnvSettings, QueueSettings, VersionDef};
use crate::time::Timestamp;

/// Which [`RunStore`] method a [`Forward`] is calling, with the arguments a hook may want to
/// look at (counts instead of whole batches).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum StoreOp<'a> {
    /// [`RunStore::insert`] of `runs` runs.
    Insert {
        /// How many runs.
        runs: usize,
    },
    /// [`RunStore::remove`].
    Remove(RunId),
    /// [`RunStore::get`].
    Get(RunId),
    /// [`RunStore::get_many`] (and [`RunStore::get_to_start`]).
    GetMany(&'a [RunId]),
    /// [`RunStore::list`].
    List(&'a RunFilter),
    /// [`RunStore::record_retry`] of an attempt.
    RecordRetry {
        /// The run.
        run: RunId,
        /// The attempt's number.
        attempt: u32,
    },
    /// [`RunStore::note_start`] (synchronous: see [`StoreHook::before_sync`]).
    NoteStart {
        /// The run.
        run: RunId,
        /// The attempt's number.
        attempt: u32,
    },
    /// [`RunStore::clear_start`].
    ClearStart(RunId),
    /// [`RunStore::forget_start`] (synchronous: see [`StoreHook::before_sync`]).
    ForgetStart {
        /// The run.
        run: RunId,
        /// The attempt's number.
        attempt: u32,
    },
    /// [`RunStore::request_cancel`].
    RequestCancel(RunId),
    /// [`RunStore::finish`].
    Finish {
        /// The run.
        run: RunId,
        /// Its terminal status.
        status: RunStatus,
    },
    /// [`RunStore::reschedule`].
    Reschedule(RunId),
    /// [`RunStore::unfinished`].
    Unfinished,
    /// [`RunStore::purge_finished`].
    PurgeFinished,
    /// [`RunStore::next_purge_at`].
    NextPurgeAt,
    /// [`RunStore::put_env`].
    PutEnv(&'a EnvName),
    /// [`RunStore::envs`].
    Envs,
    /// [`RunStore::create_env`].
    CreateEnv(&'a EnvName),
    /// [`RunStore::put_queue_settings`].
    PutQueueSettings(&'a EnvName, &'a QueueName),
    /// [`RunStore::queue_settings_all`].
    QueueSettingsAll,
    /// [`RunStore::add_version`].
    AddVersion(&'a EnvName),
    /// [`RunStore::version`].
    Version(&'a EnvName, u32),
    /// [`RunStore::promote`].
    Promote(&'a EnvName, u32),
    /// [`RunStore::current_version`].
    CurrentVersion(&'a EnvName),
    /// [`RunStore::versions`].
    Versions(&'a EnvName),
    /// [`RunStore::current_definition`].
    CurrentDefinition(&'a EnvName),
    /// [`RunStore::schedule_cursors`].
    ScheduleCursors(&'a EnvName),
    /// [`RunStore::advance_schedule_cursor`] of schedule `index` of `task`.
    AdvanceScheduleCursor {
        /// The env.
        env: &'a EnvName,
        /// The task.
        task: &'a TaskName,
        /// The schedule's position in the task's `schedules`.
        index: u32,
    },
    /// [`RunStore::finish_many`] of `ends` attempt ends.
    FinishMany {
        /// How many ends.
        ends: usize,
    },
    /// [`RunStore::finish_now`] (synchronous: see [`StoreHook::before_sync`]).
    FinishNow(RunId),
}

/// What a [`Forward`] does around the calls it forwards. Every method has a no-op default.
#[async_trait]
pub trait StoreHook: Send + Sync + 'static {
    /// Called before an async method is forwarded; it may wait (hold the call).
    async fn before(&self, op: StoreOp<'_>) {
        let _ = op;
    }
    /// Called after [`StoreHook::before`]: an error here is the async method's answer and
    /// the call is not forwarded (a store that fails a call: a full disk, a lost connection).
    fn refuse(&self, op: StoreOp<'_>) -> Option<StoreError> {
        let _ = op;
        None
    }
    /// Called after an async method was forwarded, before its answer is returned; it may
    /// wait (park the caller after the store was read). It does not see the answer.
    async fn after(&self, op: StoreOp<'_>) {
        let _ = op;
    }
    /// Called before the synchronous [`RunStore::note_start`], [`RunStore::forget_start`] and
    /// [`RunStore::finish_now`] are forwarded; it must not block (`finish_now` runs inside a
    /// queue's step). [`StoreHook::refuse`] is asked next for `finish_now`.
    fn before_sync(&self, op: StoreOp<'_>) {
        let _ = op;
    }
    /// The answer to [`RunStore::group_commits`], given the inner store's.
    fn group_commits(&self, inner: bool) -> bool {
        inner
    }
    /// The answer to [`RunStore::finishes_now`], given the inner store's: `false` by default,
    /// so that ends are calls the other hooks see and may hold.
    fn finishes_now(&self, inner: bool) -> bool {
        let _ = inner;
        false
    }
    /// The answer to [`RunStore::shared_between_processes`], given the inner store's.
    fn shared_between_processes(&self, inner: bool) -> bool {
        inner
    }
}

/// Forwards nothing extra: `Forward<()>` is the inner store, unchanged.
impl StoreHook for () {}

/// A [`RunStore`] that forwards every method to `inner`, calling `hook` around each.
///
/// Fields drop in order: the inner store first, then the hook (so a hook's `Drop` may clean up
/// what the store used once the store is closed, if no one else holds it).
pub struct Forward<H> {
    inner: Arc<dyn RunStore>,
    hook: H,
}

impl<H: StoreHook> Forward<H> {
    /// Wraps `inner` with `hook`.
    pub fn new(inner: Arc<dyn RunStore>, hook: H) -> Self {
        Forward { inner, hook }
    }

    /// The hook (to read what it recorded).
    pub fn hook(&self) -> &H {
        &self.hook
    }

    /// The store calls are forwarded to.
    pub fn inner(&self) -> &Arc<dyn RunStore> {
        &self.inner
    }

    /// Runs `call` on the inner store between the `before` and `after` hooks, unless the hook
    /// refuses it.
    async fn around<T>(
        &self,
        op: StoreOp<'_>,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.hook.before(op).await;
        if let Some(e) = self.hook.refuse(op) {
            return Err(e);
        }
        let answer = call.await;
        self.hook.after(op).await;
        answer
    }
}

#[async_trait]
impl<H: StoreHook> RunStore for Forward<H> {
    async fn insert(
        &self,
        runs: Vec<(RunRecord, Option<IdempotencyClaim>)>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError> {
        let op = StoreOp::Insert { runs: runs.len() };
        self.around(op, self.inner.insert(runs, now)).await
    }
    async fn remove(&self, run: RunId) -> Result<(), StoreError> {
        self.around(StoreOp::Remove(run), self.inner.remove(run))
            .await
    }
    async fn remove_refused(&self, run: RunId) -> Result<bool, StoreError> {
        self.around(StoreOp::Remove(run), self.inner.remove_refused(run))
            .await
    }
    async fn get(&self, run: RunId) -> Result<Option<RunRecord>, StoreError> {
        self.around(StoreOp::Get(run), self.inner.get(run)).await
    }
    async fn get_many(&self, runs: &[RunId]) -> Result<Vec<Option<RunRecord>>, StoreError> {
        self.around(StoreOp::GetMany(runs), self.inner.get_many(runs))
            .await
    }
    async fn get_to_start(&self, runs: &[RunId]) -> Result<Vec<Option<ToStart>>, StoreError> {
        // A read of many runs to a hook, as `get_many` is.
        self.around(StoreOp::GetMany(runs), self.inner.get_to_start(runs))
            .await
    }
    async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        self.around(StoreOp::List(filter), self.inner.list(filter))
            .await
    }
    async fn record_retry(
        &self,
        run: RunId,
        attempt: AttemptRecord,
        next_run_after: Timestamp,
    ) -> Result<(), StoreError> {
        let op = StoreOp::RecordRetry {
            run,
            attempt: attempt.number,
        };
        self.around(op, self.inner.record_retry(run, attempt, next_run_after))
            .await
    }
    fn note_start(&self, run: RunId, attempt: u32, at: Timestamp) {
        self.hook.before_sync(StoreOp::NoteStart { run, attempt });
        self.inner.note_start(run, attempt, at)
    }
    fn forget_start(&self, run: RunId, attempt: u32) {
        self.hook.before_sync(StoreOp::ForgetStart { run, attempt });
        self.inner.forget_start(run, attempt)
    }
    fn finishes_now(&self) -> bool {
        self.hook.finishes_now(self.inner.finishes_now())
    }
    fn finish_now(&self, end: AttemptEnd, now: Timestamp) -> Result<(), StoreError> {
        let op = StoreOp::FinishNow(end.run);
        self.hook.before_sync(op);
        match self.hook.refuse(op) {
            Some(e) => Err(e),
            None => self.inner.finish_now(end, now),
        }
    }
    async fn clear_start(&self, run: RunId, attempt: u32) -> Result<(), StoreError> {
        self.around(
            StoreOp::ClearStart(run),
            self.inner.clear_start(run, attempt),
        )
        .await
    }
    async fn request_cancel(&self, run: RunId, at: Timestamp) -> Result<Timestamp, StoreError> {
        self.around(
            StoreOp::RequestCancel(run),
            self.inner.request_cancel(run, at),
        )
        .await
    }
    async fn finish(
        &self,
        run: RunId,
        status: RunStatus,
        output: Option<Arc<str>>,
        attempt: Option<AttemptRecord>,
        now: Timestamp,
    ) -> Result<RunRecord, StoreError> {
        let op = StoreOp::Finish { run, status };
        self.around(op, self.inner.finish(run, status, output, attempt, now))
            .await
    }
    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
    ) -> Result<(), StoreError> {
        let call = self.inner.reschedule(run, run_after, ttl_deadline);
        self.around(StoreOp::Reschedule(run), call).await
    }
    async fn unfinished(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.around(StoreOp::Unfinished, self.inner.unfinished())
            .await
    }
    fn shared_between_processes(&self) -> bool {
        self.hook
            .shared_between_processes(self.inner.shared_between_processes())
    }
    async fn purge_finished(
        &self,
        retention: &Retention,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let call = self.inner.purge_finished(retention, now);
        self.around(StoreOp::PurgeFinished, call).await
    }
    async fn next_purge_at(&self, retention: &Retention) -> Result<Option<Timestamp>, StoreError> {
        self.around(StoreOp::NextPurgeAt, self.inner.next_purge_at(retention))
            .await
    }
    async fn put_env(&self, env: &EnvName, settings: EnvSettings) -> Result<(), StoreError> {
        self.around(StoreOp::PutEnv(env), self.inner.put_env(env, settings))
            .await
    }
    async fn envs(&self) -> Result<Vec<(EnvName, EnvSettings)>, StoreError> {
        self.around(StoreOp::Envs, self.inner.envs()).await
    }
    async fn create_env(&self, env: &EnvName, settings: EnvSettings) -> Result<bool, StoreError> {
        self.around(
            StoreOp::CreateEnv(env),
            self.inner.create_env(env, settings),
        )
        .await
    }
    async fn put_queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: &QueueSettings,
    ) -> Result<(), StoreError> {
        let call = self.inner.put_queue_settings(env, queue, settings);
        self.around(StoreOp::PutQueueSettings(env, queue), call)
            .await
    }
    async fn queue_settings_all(
        &self,
    ) -> Result<Vec<(EnvName, QueueName, QueueSettings)>, StoreError> {
        let call = self.inner.queue_settings_all();
        self.around(StoreOp::QueueSettingsAll, call).await
    }
    async fn add_version(
        &self,
        env: &EnvName,
        def: VersionDef,
        now: Timestamp,
    ) -> Result<u32, StoreError> {
        self.around(
            StoreOp::AddVersion(env),
            self.inner.add_version(env, def, now),
        )
        .await
    }
    async fn version(&self, env: &EnvName, version: u32) -> Result<Option<VersionDef>, StoreError> {
        let op = StoreOp::Version(env, version);
        self.around(op, self.inner.version(env, version)).await
    }
    async fn promote(&self, env: &EnvName, version: u32) -> Result<(), StoreError> {
        let op = StoreOp::Promote(env, version);
        self.around(op, self.inner.promote(env, version)).await
    }
    async fn current_version(&self, env: &EnvName) -> Result<u32, StoreError> {
        let op = StoreOp::CurrentVersion(env);
        self.around(op, self.inner.current_version(env)).await
    }
    async fn versions(&self, env: &EnvName) -> Result<Vec<VersionInfo>, StoreError> {
        self.around(StoreOp::Versions(env), self.inner.versions(env))
            .await
    }
    async fn current_definition(&self, env: &EnvName) -> Result<(u32, VersionDef), StoreError> {
        let op = StoreOp::CurrentDefinition(env);
        self.around(op, self.inner.current_definition(env)).await
    }
    fn group_commits(&self) -> bool {
        self.hook.group_commits(self.inner.group_commits())
    }
    async fn schedule_cursors(&self, env: &EnvName) -> Result<Vec<ScheduleCursor>, StoreError> {
        let op = StoreOp::ScheduleCursors(env);
        self.around(op, self.inner.schedule_cursors(env)).await
    }
    async fn advance_schedule_cursor(
        &self,
        env: &EnvName,
        task: &TaskName,
        index: u32,
        from: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError> {
        let op = StoreOp::AdvanceScheduleCursor { env, task, index };
        let call = self
            .inner
            .advance_schedule_cursor(env, task, index, from, to);
        self.around(op, call).await
    }
    async fn finish_many(
        &self,
        ends: Vec<AttemptEnd>,
        now: Timestamp,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let op = StoreOp::FinishMany { ends: ends.len() };
        self.around(op, self.inner.finish_many(ends, now)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A store that answers every call with nothing and logs which method was called.
    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl Log {
        fn push(&self, what: &str) {
            self.0.lock().expect("log").push(what.to_string());
        }
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().expect("log"))
        }
    }

    struct Inner(Arc<Log>);

    fn none() -> StoreError {
        StoreError::Unavailable("test store".into())
    }

    #[async_trait]
    impl RunStore for Inner {
        async fn insert(
            &self,
            _: Vec<(RunRecord, Option<IdempotencyClaim>)>,
            _: Timestamp,
        ) -> Result<Vec<Inserted>, StoreError> {
            Err(none())
        }
        async fn remove(&self, _: RunId) -> Result<(), StoreError> {
            Err(none())
        }
        async fn get(&self, _: RunId) -> Result<Option<RunRecord>, StoreError> {
            self.0.push("inner get");
            Ok(None)
        }
        async fn list(&self, _: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
            Err(none())
        }
        async fn record_retry(
            &self,
            _: RunId,
            _: AttemptRecord,
            _: Timestamp,
        ) -> Result<(), StoreError> {
            Err(none())
        }
        fn note_start(&self, _: RunId, _: u32, _: Timestamp) {
            self.0.push("inner note_start");
        }
        fn forget_start(&self, _: RunId, _: u32) {
            self.0.push("inner forget_start");
        }
        async fn finish(
            &self,
            _: RunId,
            _: RunStatus,
            _: Option<Arc<str>>,
            _: Option<AttemptRecord>,
            _: Timestamp,
        ) -> Result<RunRecord, StoreError> {
            Err(none())
        }
        async fn reschedule(
            &self,
            _: RunId,
            _: Timestamp,
            _: Option<Timestamp>,
        ) -> Result<(), StoreError> {
            Err(none())
        }
        async fn unfinished(&self) -> Result<Vec<RunRecord>, StoreError> {
            Err(none())
        }
        async fn purge_finished(&self, _: &Retention, _: Timestamp) -> Result<u64, StoreError> {
            Err(none())
        }
        async fn next_purge_at(&self, _: &Retention) -> Result<Option<Timestamp>, StoreError> {
            Err(none())
        }
        async fn put_env(&self, _: &EnvName, _: EnvSettings) -> Result<(), StoreError> {
            Err(none())
        }
        async fn envs(&self) -> Result<Vec<(EnvName, EnvSettings)>, StoreError> {
            Err(none())
        }
        async fn add_version(
            &self,
            _: &EnvName,
            _: VersionDef,
            _: Timestamp,
        ) -> Result<u32, StoreError> {
            Err(none())
        }
        async fn version(&self, _: &EnvName, _: u32) -> Result<Option<VersionDef>, StoreError> {
            self.0.push("inner version");
            Ok(None)
        }
        async fn promote(&self, _: &EnvName, _: u32) -> Result<(), StoreError> {
            Err(none())
        }
        async fn current_version(&self, _: &EnvName) -> Result<u32, StoreError> {
            self.0.push("inner current_version");
            Ok(0)
        }
        // Overrides a default: the wrapper must call this one, not the trait default.
        async fn current_definition(&self, _: &EnvName) -> Result<(u32, VersionDef), StoreError> {
            self.0.push("inner current_definition");
            Ok((7, VersionDef::default()))
        }
        fn group_commits(&self) -> bool {
            true
        }
        fn shared_between_processes(&self) -> bool {
            true
        }
    }

    /// Logs every hook call; turns group commits off.
    struct Hook(Arc<Log>);

    #[async_trait]
    impl StoreHook for Hook {
        async fn before(&self, op: StoreOp<'_>) {
            self.0.push(&format!("before {op:?}"));
        }
        async fn after(&self, op: StoreOp<'_>) {
            self.0.push(&format!("after {op:?}"));
        }
        fn before_sync(&self, op: StoreOp<'_>) {
            self.0.push(&format!("sync {op:?}"));
        }
        fn group_commits(&self, inner: bool) -> bool {
            assert!(inner, "the inner store's answer is passed in");
            false
        }
    }

    #[test]
    fn forwards_each_call_once_between_the_hooks() {
        let log = Arc::new(Log::default());
        let store = Forward::new(Arc::new(Inner(log.clone())), Hook(log.clone()));
        let env = EnvName::new("e").expect("env name");
        let run = RunId::from_bytes([1; 16]);

        let answer = block_on(store.current_definition(&env)).expect("current_definition");
        assert_eq!(
            answer.0, 7,
            "the inner store's own current_definition answered"
        );
        let op = StoreOp::CurrentDefinition(&env);
        assert_eq!(
            log.take(),
            [
                format!("before {op:?}"),
                "inner current_definition".into(),
                format!("after {op:?}"),
            ],
            "one call to the inner override, not the default's two reads"
        );

        assert_eq!(block_on(store.get(run)).expect("get"), None);
        assert_eq!(
            log.take(),
            [
                format!("before Get({run:?})"),
                "inner get".into(),
                format!("after Get({run:?})"),
            ]
        );

        store.note_start(run, 2, Timestamp::ZERO);
        assert_eq!(
            log.take(),
            [
                format!("sync {:?}", StoreOp::NoteStart { run, attempt: 2 }),
                "inner note_start".into(),
            ]
        );
        store.forget_start(run, 2);
        assert_eq!(
            log.take(),
            [
                format!("sync {:?}", StoreOp::ForgetStart { run, attempt: 2 }),
                "inner forget_start".into(),
            ]
        );

        assert!(!store.group_commits(), "the hook decides");
        assert!(
            store.shared_between_processes(),
            "the default hook keeps it"
        );
        assert!(log.take().is_empty());
    }

    /// Polls a future that never waits (every store and hook here answers at once).
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        use std::task::{Context, Poll, Wake, Waker};
        struct Noop;
        impl Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let waker = Waker::from(Arc::new(Noop));
        let mut future = std::pin::pin!(future);
        let mut cx = Context::from_waker(&waker);
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("a test future waited"),
        }
    }
}
