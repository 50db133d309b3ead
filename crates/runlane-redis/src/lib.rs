//! runlane-redis: the Redis queue backend (SPEC §3, §6).
//!
//! Every [`QueueBackend`](runlane_core::backend::QueueBackend) step is one call of one Redis
//! function (`dispatch.lua`, a function library loaded with `FUNCTION LOAD` at open and again
//! when the server answers that it does not know the function; called with `FCALL`), so each
//! step is atomic exactly like the memory backend's mutex-held steps. All keys of a deployment
//! share one hash tag, `{prefix}`: on Redis Cluster a deployment lives on one shard. `now` always
//! comes from the engine's clock, passed to the function as an argument; it never reads Redis's
//! clock.
//!
//! The key space carries a format version and a generation marker in `{prefix}:cfg` (format 3: a
//! due run enqueued in order is only its queue key's list entry, no per-run record). A key space
//! of format 1 or 2 is migrated in one script; one of another format is refused with an error
//! naming both versions; a key space found missing
//! (FLUSHALL, a restart without persistence) is rebuilt from the run store attached with
//! [`RedisQueue::attach_store`], keeping every run and its order.

#[cfg(test)]
mod bucket_tests;
#[cfg(test)]
mod claim_on_enqueue_tests;
mod combine;
#[cfg(test)]
mod enqueue_many_tests;
#[cfg(test)]
mod format1_tests;
#[cfg(test)]
mod format3_tests;
#[cfg(test)]
mod function_tests;
#[cfg(test)]
mod key_state_tests;
mod meta;
#[cfg(test)]
mod parked_offer_tests;
mod queue;
mod record;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tidy_tests;
#[cfg(test)]
mod ttl_bucket_tests;

pub use meta::{RedisMetaCache, RedisMetaConfig, STAMP_FIELD};
pub use queue::{
    Delivery, RedisConfig, RedisHealth, RedisOpenError, RedisQueue, FAILPOINT_VAR, KEYSPACE_FORMAT,
    MID_REBUILD,
};
