//! `/v1/envs/{env}/schedules`: the cron schedules of an env's current version, each with its
//! next tick and the last tick fired.

use axum::extract::{Path, State};
use axum::Json;
use runlane::ScheduleInfo;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// One schedule of a task.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Schedule {
    /// The task it triggers.
    pub task: String,
    /// Its position in the task's `schedules`.
    pub index: u32,
    /// The cron pattern.
    pub cron: String,
    /// The IANA time zone the pattern is read in.
    pub timezone: String,
    /// The first tick after now (ms since the epoch); null when the pattern never matches
    /// again.
    pub next_tick_ms: Option<u64>,
    /// The last tick fired (ms since the epoch), or null.
    pub last_tick_ms: Option<u64>,
}

impl From<ScheduleInfo> for Schedule {
    fn from(s: ScheduleInfo) -> Self {
        Schedule {
            task: s.task.to_string(),
            index: s.index,
            cron: s.cron,
            timezone: s.timezone,
            next_tick_ms: s.next_tick.map(|t| t.as_millis()),
            last_tick_ms: s.last_tick.map(|t| t.as_millis()),
        }
    }
}

/// `GET /v1/envs/{env}/schedules`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScheduleList {
    /// The schedules of the env's current version, by task then index.
    pub schedules: Vec<Schedule>,
}

/// The routes of this area.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_schedules))
}

/// An env's schedules (admin, or an env key of `env`).
#[utoipa::path(get, path = "/v1/envs/{env}/schedules", tag = "schedules",
    params(("env" = String, Path, description = "The env")),
    responses((status = 200, body = ScheduleList), (status = "4XX", body = ErrorBody)))]
async fn list_schedules(
    State(state): State<AppState>,
    caller: Caller,
    Path(env): Path<String>,
) -> Result<Json<ScheduleList>, ApiError> {
    caller.require_env(&env)?;
    let schedules = state.engine().schedules(&env).await?;
    Ok(Json(ScheduleList {
        schedules: schedules.into_iter().map(Schedule::from).collect(),
    }))
}
