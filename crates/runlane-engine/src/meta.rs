//! The in-process task metadata cache (SPEC §4): env settings, each env's current version and
//! immutable versions by number. Warm, a trigger reads no store for metadata.
//!
//! The current-version entry is replaced as a whole at promotion; a back-fill after a miss
//! only inserts when no entry exists, so a back-fill that read an older version never
//! overwrites a newer promotion. A store error while back-filling fails only that trigger.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use runlane_core::backend::RunStore;
use runlane_core::{EnvName, EnvSettings, StoreError, VersionDef};

/// An env's current version and its definitions.
pub(crate) type Current = (u32, Arc<VersionDef>);

#[derive(Default)]
struct State {
    envs: HashMap<EnvName, EnvSettings>,
    current: HashMap<EnvName, Current>,
    versions: HashMap<(EnvName, u32), Arc<VersionDef>>,
}

/// See the module docs.
#[derive(Default)]
pub(crate) struct MetaCache {
    state: Mutex<State>,
}

impl MetaCache {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the known envs.
    pub(crate) fn set_envs(&self, envs: impl IntoIterator<Item = (EnvName, EnvSettings)>) {
        let mut st = self.lock();
        for (env, settings) in envs {
            st.envs.insert(env, settings);
        }
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

    /// The env's current version and definitions.
    pub(crate) async fn current(
        &self,
        store: &dyn RunStore,
        env: &EnvName,
    ) -> Result<Current, StoreError> {
        if let Some(c) = self.lock().current.get(env) {
            return Ok(c.clone());
        }
        let number = store.current_version(env).await?;
        let def = store.version(env, number).await?.unwrap_or_default();
        let mut st = self.lock();
        let entry = st
            .current
            .entry(env.clone())
            .or_insert_with(|| (number, Arc::new(def)));
        Ok(entry.clone())
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
        let Some(def) = store.version(env, number).await? else {
            return Ok(None);
        };
        let def = Arc::new(def);
        self.lock().versions.insert(key, def.clone());
        Ok(Some(def))
    }

    /// Makes `number` the env's current version in the cache (after the store promoted it).
    pub(crate) fn promoted(&self, env: &EnvName, number: u32, def: Arc<VersionDef>) {
        let mut st = self.lock();
        st.versions.insert((env.clone(), number), def.clone());
        st.current.insert(env.clone(), (number, def));
    }
}
