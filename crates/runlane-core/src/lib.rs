//! The pure core of runlane.
//!
//! Everything here is deterministic: no I/O, no tokio, no clock reads. Time is always an
//! argument (`now: Timestamp`) and randomness an injected [`rand::RngCore`]. The backends, the
//! reference model and the engine all build on these definitions, so the rules of SPEC §2 and §3
//! are written exactly once.

pub mod admission;
pub mod backend;
pub mod chain;
pub mod columns;
pub mod error;
pub mod id;
pub mod idhash;
pub mod lane;
pub mod message;
pub mod metacache;
pub mod name;
pub mod retry;
pub mod run;
pub mod schedule;
pub mod score;
pub mod settings;
pub(crate) mod text;
pub mod time;
pub mod ttl;
pub mod workloop;

pub use admission::{admit, AdmissionInput, Blocked, Scope};
pub use chain::ClaimChain;
pub use error::{InvalidInput, QueueError, StoreError};
pub use id::{FencingToken, RunId, RunIdGenerator, WorkerId};
pub use lane::{assign_lane, LaneName};
pub use name::{EnvName, QueueName, TaskName};
pub use retry::RetryPolicy;
pub use run::{CancelReason, RunStatus, TriggerSource};
pub use schedule::{Schedule, ScheduleDef};
pub use settings::{EnvSettings, QueueSettings, TaskDef, VersionDef};
pub use time::Timestamp;
pub use workloop::{Workloop, WorkloopSpec};
