//! The route areas; each is an `OpenApiRouter` merged into the app.

pub mod admin;
pub mod envs;
pub mod events;
pub mod keys;
pub mod meta;
pub mod runs;
pub mod schedules;
pub mod versions;
pub mod workers;
