//! The route areas; each is an `OpenApiRouter` merged into the app.

pub mod envs;
pub mod keys;
pub mod meta;
pub mod runs;
