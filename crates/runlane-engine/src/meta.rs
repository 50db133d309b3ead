//! The task metadata cache (SPEC §4): env settings, each env's current version and immutable
//! versions by number. Warm, a trigger reads no store for metadata.
//!
//! Two levels. The first is in this process (this module): a map behind one mutex. The second,
//! optional, is shared by every process of a deployment ([`SharedMetaCache`], Redis in the
//! distributed shape); the embedded and memory shapes have none.
//!
//! - **Promotion** ([`MetaCache::promoted`]) replaces the first level's env-current entry, then
//!   the shared entry (one atomic script, which also announces it to the other processes).
//! - **A miss** reads the shared level, else the store once
//!   ([`RunStore::current_definition`]) and back-fills: the shared env-current back-fill is a
//!   compare-and-set on its owner stamp (written only when no version owns it), and the first
//!   level keeps a read only when no promotion or announcement came in between (an epoch
//!   counter), so a back-fill that read version A never overwrites a promotion to B.
//! - **Other processes' promotions** arrive as announcements and drop the first level's
//!   env-current entry (the next trigger reads the shared level, already replaced). With a
//!   shared level, env-current entries also expire after `max_age` (the staleness bound when
//!   an announcement is missed); by-version entries are immutable and never expire here.
//! - **A cache error** (shared level unreachable) is logged and the trigger reads the store;
//!   a store error while back-filling fails only that trigger.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use runlane_core::backend::RunStore;
use runlane_core::idhash::NameBuild;
use runlane_core::metacache::{MetaAnnouncement, SharedMetaCache};
use runlane_core::{EnvName, EnvSettings, StoreError, VersionDef};
use tokio::sync::watch;

/// An env's current version and its definitions.
pub(crate) type Current = (u32, Arc<VersionDef>);

/// What this engine has heard from other processes about promotions (see
/// [`crate::Engine::meta_announcements`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaWatch {
    /// How many times the listener (re)subscribed (each dropped the env-current entries).
    pub subscribed: u64,
    /// How many promotions of other processes were applied (each dropped its env's entry).
    pub promotions: u64,
}

#[derive(Default)]
struct State {
    envs: HashMap<EnvName, EnvSettings, NameBuild>,
    current: HashMap<EnvName, (Current, Option<Instant>), NameBuild>,
    versions: HashMap<(EnvName, u32), Arc<VersionDef>, NameBuild>,
    /// Bumped by every promotion and announcement: a read that started before keeps its
    /// answer out of the cache.
    epoch: u64,
    /// Envs named by other processes' promotion announcements (possibly created after this
    /// engine read its envs): the scheduler plans them too.
    announced: std::collections::HashSet<EnvName, NameBuild>,
}

/// See the module docs.
pub(crate) struct MetaCache {
    state: Mutex<State>,
    shared: Option<Arc<dyn SharedMetaCache>>,
    /// Env-current entries older than this are read again (with a shared level only).
    max_age: Option<Duration>,
    watch: watch::Sender<MetaWatch>,
}

impl Default for MetaCache {
    fn default() -> Self {
        MetaCache::new(None, None)
    }
}

impl MetaCache {
    /// A cache with an optional shared level and an env-current staleness bound.
    pub(crate) fn new(shared: Option<Arc<dyn SharedMetaCache>>, max_age: Option<Duration>) -> Self {
        MetaCache {
            state: Mutex::new(State::default()),
            max_age: if shared.is_some() { max_age } else { None },
            shared,
            watch: watch::Sender::new(MetaWatch::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared level, if any.
    pub(crate) fn shared(&self) -> Option<&Arc<dyn SharedMetaCache>> {
        self.shared.as_ref()
    }

    /// Announcements applied so far.
    pub(crate) fn watch(&self) -> watch::Receiver<MetaWatch> {
        self.watch.subscribe()
    }

    /// Replaces the known envs.
    pub(crate) fn set_envs(&self, envs: impl IntoIterator<Item = (EnvName, EnvSettings)>) {
        let mut st = self.lock();
        for (env, settings) in envs {
            st.envs.insert(env, settings);
        }
    }

    /// Every env this cache knows of (from the store, this process's calls and other
    /// processes' announcements), by name.
    pub(crate) fn env_names(&self) -> Vec<EnvName> {
        let st = self.lock();
        let mut names: Vec<EnvName> = st.envs.keys().chain(st.announced.iter()).cloned().collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        names
    }

    /// Records an env's settings.
    pub(crate) fn put_env(&self, env: &EnvName, settings: EnvSettings) {
        self.lock().envs.insert(env.clone(), settings);
    }

    /// An env's settings; a miss re-reads the store (another process may have created it).
    pub(crate) async fn env(
        &self,
        store: &dyn RunStore,
        env: &EnvName,
    ) -> Result<Option<EnvSettings>, StoreError> {
        if let Some(s) = self.lock().envs.get(env) {
            return Ok(Some(*s));
        }
        let envs = store.envs().await?;
        let found = envs.iter().find(|(e, _)| e == env).map(|(_, s)| *s);
        self.set_envs(envs);
        Ok(found)
    }

    fn stamp(&self) -> Option<Instant> {
        self.max_age.map(|_| Instant::now())
    }

    /// The env's current version and definitions.
    pub(crate) async fn current(
        &self,
        store: &dyn RunStore,
        env: &EnvName,
    ) -> Result<Current, StoreError> {
        let epoch = {
            let st = self.lock();
            if let Some((c, at)) = st.current.get(env) {
                let fresh = match (at, self.max_age) {
                    (Some(at), Some(max)) => at.elapsed() < max,
                    _ => true,
                };
                if fresh {
                    return Ok(c.clone());
                }
            }
            st.epoch
        };
        let mut keep = true;
        let mut shared_up = false;
        if let Some(shared) = &self.shared {
            match shared.current(env).await {
                Ok(Some((number, def))) => {
                    return Ok(self.fill_current(env, epoch, (number, Arc::new(def)), true));
                }
                Ok(None) => shared_up = true,
                Err(e) => {
                    tracing::warn!(env = %env, error = %e, "task metadata cache read failed; reading the store")
                }
            }
        }
        let (number, def) = store.current_definition(env).await?;
        let current = (number, Arc::new(def));
        if let (Some(shared), true) = (&self.shared, shared_up) {
            match shared.backfill_current(env, number, &current.1).await {
                // Not written: a promotion owns the entry now; this read may be older.
                Ok(wrote) => keep = wrote,
                Err(e) => {
                    tracing::warn!(env = %env, error = %e, "task metadata cache back-fill failed")
                }
            }
        }
        Ok(self.fill_current(env, epoch, current, keep))
    }

    /// Keeps a read in the first level unless a promotion or announcement came in since it
    /// started (`epoch`); answers it either way.
    fn fill_current(&self, env: &EnvName, epoch: u64, current: Current, keep: bool) -> Current {
        if keep {
            let at = self.stamp();
            let mut st = self.lock();
            if st.epoch == epoch {
                st.current.insert(env.clone(), (current.clone(), at));
            }
        }
        current
    }

    /// A version by number (`None` when it does not exist).
    pub(crate) async fn version(
        &self,
        store: &dyn RunStore,
        env: &EnvName,
        number: u32,
    ) -> Result<Option<Arc<VersionDef>>, StoreError> {
        let key = (env.clone(), number);
        if let Some(v) = self.lock().versions.get(&key) {
            return Ok(Some(v.clone()));
        }
        let mut shared_up = false;
        if let Some(shared) = &self.shared {
            match shared.version(env, number).await {
                Ok(Some(def)) => {
                    let def = Arc::new(def);
                    self.lock().versions.insert(key, def.clone());
                    return Ok(Some(def));
                }
                Ok(None) => shared_up = true,
                Err(e) => {
                    tracing::warn!(env = %env, version = number, error = %e, "task metadata cache read failed; reading the store")
                }
            }
        }
        let Some(def) = store.version(env, number).await? else {
            return Ok(None);
        };
        let def = Arc::new(def);
        if let (Some(shared), true) = (&self.shared, shared_up) {
            if let Err(e) = shared.backfill_version(env, number, &def).await {
                tracing::warn!(env = %env, version = number, error = %e, "task metadata cache back-fill failed");
            }
        }
        self.lock().versions.insert(key, def.clone());
        Ok(Some(def))
    }

    /// Makes `number` the env's current version (after the store promoted it): here first,
    /// then in the shared level, which announces it to the other processes.
    pub(crate) async fn promoted(&self, env: &EnvName, number: u32, def: Arc<VersionDef>) {
        {
            let at = self.stamp();
            let mut st = self.lock();
            st.epoch += 1;
            st.versions.insert((env.clone(), number), def.clone());
            st.current.insert(env.clone(), ((number, def.clone()), at));
        }
        if let Some(shared) = &self.shared {
            if let Err(e) = shared.promote(env, number, &def).await {
                // Other processes keep the previous version until the shared entry's safety
                // TTL or the next promotion (ARCHITECTURE.md, task metadata cache).
                tracing::error!(env = %env, version = number, error = %e, "task metadata cache not updated at promotion");
            }
        }
    }

    /// Applies another process's announcement: drops what it makes stale.
    pub(crate) fn announced(&self, announcement: MetaAnnouncement) {
        {
            let mut st = self.lock();
            st.epoch += 1;
            match &announcement {
                MetaAnnouncement::Subscribed => st.current.clear(),
                MetaAnnouncement::Promoted { env, .. } => {
                    st.current.remove(env);
                    st.announced.insert(env.clone());
                }
            }
        }
        self.watch.send_modify(|w| match announcement {
            MetaAnnouncement::Subscribed => w.subscribed += 1,
            MetaAnnouncement::Promoted { .. } => w.promotions += 1,
        });
    }
}

impl crate::Engine {
    /// What a trigger of `task` in `env` resolves through the task metadata cache (SPEC §4):
    /// the version (`lock_to_version`, else the env's current one) and the task's definition
    /// in it (`None`: the version has no such task; a trigger then uses the defaults, or is
    /// refused in a `strict_tasks` env). Warm, it reads no store.
    pub async fn resolve_task(
        &self,
        env: &str,
        task: &str,
        lock_to_version: Option<u32>,
    ) -> Result<(u32, Option<runlane_core::TaskDef>), crate::EngineError> {
        let inner = &self.inner;
        inner.check_open()?;
        let env = EnvName::new(env)?;
        let task = runlane_core::TaskName::new(task)?;
        let store = inner.store.as_ref();
        match lock_to_version {
            Some(v) => {
                let def = inner.meta.version(store, &env, v).await?.ok_or_else(|| {
                    crate::EngineError::UnknownVersion {
                        version: v,
                        task: task.to_string(),
                    }
                })?;
                Ok((v, def.task(&task).cloned()))
            }
            None => {
                let (v, def) = inner.meta.current(store, &env).await?;
                Ok((v, def.task(&task).cloned()))
            }
        }
    }
}
