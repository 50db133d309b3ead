//! The shared (second-level) task metadata cache seam (SPEC §4).
//!
//! The engine keeps an in-process first level in front of it; in the distributed shape this
//! second level lives in Redis and is shared by every process of a deployment. Two keyspaces:
//!
//! - **env-current**: per env, the definitions of the env's current version, stamped with that
//!   version (its *owner*). Replaced as a whole, atomically, at promotion
//!   ([`SharedMetaCache::promote`]); after a miss, [`SharedMetaCache::backfill_current`] writes
//!   it only when no owner stamp is there, so a back-fill that read version A from the store
//!   never overwrites a promotion to B that landed meanwhile.
//! - **by-version**: per (env, version), the version's definitions; immutable, so any writer may
//!   fill it; a read refreshes its expiry (sliding).
//!
//! An entry is always written whole (every task of the version plus the stamp), so an entry
//! that is present and lacks a task means the version has no such task.
//!
//! A cache error never fails a trigger: the engine logs it and reads the store.

use async_trait::async_trait;
use std::sync::Arc;

use crate::name::EnvName;
use crate::settings::VersionDef;

/// Why the shared cache could not answer (unreachable, malformed entry). Never fatal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("task metadata cache unavailable: {0}")]
pub struct CacheError(pub String);

/// What a process hears about promotions made by other processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaAnnouncement {
    /// The listener is (re)subscribed: announcements sent while it was not may be lost, so
    /// whatever the first level holds for env-current must be dropped.
    Subscribed,
    /// Another process promoted `version` in `env` (the shared env-current entry already says
    /// so when this arrives).
    Promoted {
        /// The env.
        env: EnvName,
        /// The version now current.
        version: u32,
    },
}

/// Told of each [`MetaAnnouncement`]; answers `false` to stop listening (its engine is gone).
pub type MetaListener = Arc<dyn Fn(MetaAnnouncement) -> bool + Send + Sync>;

/// A second-level task metadata cache shared between processes. See the module docs.
#[async_trait]
pub trait SharedMetaCache: Send + Sync + 'static {
    /// The env's current version and its definitions, when the env-current entry is present.
    async fn current(&self, env: &EnvName) -> Result<Option<(u32, VersionDef)>, CacheError>;

    /// A version's definitions, when its by-version entry is present (refreshes its expiry).
    async fn version(&self, env: &EnvName, version: u32) -> Result<Option<VersionDef>, CacheError>;

    /// After the store promoted `version`: replaces the env-current entry atomically (owner
    /// stamp `version`; an empty version leaves no task), fills the by-version entry, and
    /// announces the promotion to every other process's listener.
    async fn promote(
        &self,
        env: &EnvName,
        version: u32,
        def: &VersionDef,
    ) -> Result<(), CacheError>;

    /// Back-fills the env-current entry after a miss with what the store answered: written
    /// only while the entry has no owner stamp (compare-and-set); answers whether it wrote.
    async fn backfill_current(
        &self,
        env: &EnvName,
        version: u32,
        def: &VersionDef,
    ) -> Result<bool, CacheError>;

    /// Back-fills the by-version entry after a miss (immutable: any writer writes the same).
    async fn backfill_version(
        &self,
        env: &EnvName,
        version: u32,
        def: &VersionDef,
    ) -> Result<(), CacheError>;

    /// Starts telling `listener` of other processes' promotions until it answers `false` or
    /// the cache is dropped. A cache without announcements never calls it.
    fn listen(&self, listener: MetaListener);
}
