//! Settings of envs, queues and tasks, and task definitions grouped into versions (SPEC §1).

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Duration;

use crate::error::InvalidInput;
use crate::lane::LaneName;
use crate::name::{QueueName, TaskName};
use crate::retry::RetryPolicy;
use crate::schedule::ScheduleDef;

/// Serde helper: a `Duration` as integer milliseconds.
pub mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes whole milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Reads whole milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Serde helper: an optional `Duration` as integer milliseconds.
pub mod opt_duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes whole milliseconds or null.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    /// Reads whole milliseconds or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// An environment's runtime settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvSettings {
    /// Concurrency limit of ordinary runs (before burst).
    pub limit: u32,
    /// Burst factor: ordinary runs may reach `floor(limit × burst)` (1 ≤ burst ≤ 10).
    pub burst: f64,
    /// Cap of fast-lane runs holding slots; `None` means the env limit.
    pub fast_lane_limit: Option<u32>,
    /// Fairness weight at claim (1..=1000).
    pub weight: u32,
    /// Refuse triggers of tasks no version defines.
    pub strict_tasks: bool,
    /// Let due runs of an empty queue key skip the queue (SPEC §3 fast path).
    pub fast_path: bool,
}

impl Default for EnvSettings {
    fn default() -> Self {
        EnvSettings {
            limit: 100,
            burst: 1.0,
            fast_lane_limit: None,
            weight: 1,
            strict_tasks: false,
            fast_path: true,
        }
    }
}

impl EnvSettings {
    /// The fast-lane limit in force.
    pub fn fast_lane_cap(&self) -> u32 {
        self.fast_lane_limit.unwrap_or(self.limit)
    }

    /// Checks the settings; errors name the field.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.limit > 1_000_000 {
            return Err(InvalidInput::new("limit", "must be at most 1000000"));
        }
        if !(1.0..=10.0).contains(&self.burst) {
            return Err(InvalidInput::new("burst", "must be between 1.0 and 10.0"));
        }
        if self.fast_lane_limit.is_some_and(|l| l > 1_000_000) {
            return Err(InvalidInput::new(
                "fast_lane_limit",
                "must be at most 1000000",
            ));
        }
        if !(1..=1000).contains(&self.weight) {
            return Err(InvalidInput::new("weight", "must be between 1 and 1000"));
        }
        Ok(())
    }
}

/// The largest accepted concurrency limit (env, queue and task-defined queue limits).
pub const MAX_LIMIT: u32 = 1_000_000;

/// A queue's runtime settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// Per-key concurrency limit; `None` means the env limit.
    pub limit: Option<u32>,
    /// Cap on runs holding slots across all keys of the queue.
    pub key_total_limit: Option<u32>,
    /// Cap on waiting (delayed + queued) runs per key.
    pub max_queued: Option<u32>,
    /// A paused queue admits nothing.
    pub paused: bool,
}

impl QueueSettings {
    /// Checks the settings; errors name the field.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.limit.is_some_and(|l| l > 1_000_000) {
            return Err(InvalidInput::new("limit", "must be at most 1000000"));
        }
        if self.key_total_limit.is_some_and(|l| l > 1_000_000) {
            return Err(InvalidInput::new(
                "key_total_limit",
                "must be at most 1000000",
            ));
        }
        if self.max_queued == Some(0) {
            return Err(InvalidInput::new("max_queued", "must be at least 1"));
        }
        Ok(())
    }
}

/// A task's definition within a version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDef {
    /// The task's name.
    pub name: TaskName,
    /// Its default queue (the task's name when unset).
    #[serde(default)]
    pub queue: Option<QueueName>,
    /// The per-key limit of its queue, applied at promotion.
    #[serde(default)]
    pub queue_limit: Option<u32>,
    /// The `key_total_limit` of its queue, applied at promotion.
    #[serde(default)]
    pub key_total_limit: Option<u32>,
    /// Its default lane (`default` when unset).
    #[serde(default)]
    pub lane: Option<LaneName>,
    /// Default TTL of its runs.
    #[serde(default, with = "opt_duration_ms")]
    pub ttl: Option<Duration>,
    /// Its retry policy.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Attempts running longer are aborted.
    #[serde(default, with = "opt_duration_ms")]
    pub max_duration: Option<Duration>,
    /// Cron schedules: the engine triggers a `scheduled` run at each tick while this
    /// definition is in the env's current version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleDef>,
}

impl TaskDef {
    /// A definition with every default.
    pub fn new(name: TaskName) -> Self {
        TaskDef {
            name,
            queue: None,
            queue_limit: None,
            key_total_limit: None,
            lane: None,
            ttl: None,
            retry: RetryPolicy::default(),
            max_duration: None,
            schedules: Vec::new(),
        }
    }

    /// The queue its runs go to by default.
    pub fn queue_name(&self) -> QueueName {
        match &self.queue {
            Some(q) => q.clone(),
            // A task name is always a valid queue name (same character class and length).
            None => QueueName::new(self.name.as_str())
                .unwrap_or_else(|_| unreachable!("task names are queue names")),
        }
    }

    /// Checks the definition; errors name the field. Queue limits are capped like
    /// [`QueueSettings`]'s (at most 1,000,000).
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.queue_limit.is_some_and(|l| l > MAX_LIMIT) {
            return Err(InvalidInput::new("queue_limit", "must be at most 1000000"));
        }
        if self.key_total_limit.is_some_and(|l| l > MAX_LIMIT) {
            return Err(InvalidInput::new(
                "key_total_limit",
                "must be at most 1000000",
            ));
        }
        if let Some(ttl) = self.ttl {
            crate::ttl::check_ttl(ttl)?;
        }
        if self.max_duration.is_some_and(|d| d.is_zero()) {
            return Err(InvalidInput::new(
                "max_duration",
                "must be greater than zero",
            ));
        }
        crate::schedule::validate_schedules(&self.schedules)?;
        self.retry.validate()
    }
}

/// A set of task definitions registered together (a deploy).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionDef {
    /// The task definitions.
    pub tasks: Vec<TaskDef>,
}

impl VersionDef {
    /// Checks every task and refuses duplicate names.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let mut seen = HashSet::new();
        for task in &self.tasks {
            if !seen.insert(task.name.as_str()) {
                return Err(InvalidInput::new(
                    "tasks",
                    format!("duplicate task name {:?}", task.name.as_str()),
                ));
            }
            task.validate()?;
        }
        Ok(())
    }

    /// The definition of `task`, if this version has one.
    pub fn task(&self, task: &TaskName) -> Option<&TaskDef> {
        self.tasks.iter().find(|t| &t.name == task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_settings_validation_names_fields() {
        assert!(EnvSettings::default().validate().is_ok());
        let cases: [(EnvSettings, &str); 3] = [
            (
                EnvSettings {
                    burst: 0.5,
                    ..Default::default()
                },
                "burst",
            ),
            (
                EnvSettings {
                    weight: 0,
                    ..Default::default()
                },
                "weight",
            ),
            (
                EnvSettings {
                    limit: 2_000_000,
                    ..Default::default()
                },
                "limit",
            ),
        ];
        for (s, field) in cases {
            assert_eq!(s.validate().expect_err(field).field, field);
        }
        assert_eq!(
            EnvSettings {
                limit: 4,
                ..Default::default()
            }
            .fast_lane_cap(),
            4
        );
        assert_eq!(
            EnvSettings {
                fast_lane_limit: Some(2),
                ..Default::default()
            }
            .fast_lane_cap(),
            2
        );
    }

    #[test]
    fn versions_refuse_duplicates_and_unknown_fields() {
        let t = TaskName::new("a").expect("valid");
        let v = VersionDef {
            tasks: vec![TaskDef::new(t.clone()), TaskDef::new(t)],
        };
        assert_eq!(v.validate().expect_err("dup").field, "tasks");
        for (field, def) in [
            ("queue_limit", r#"{"name":"a","queue_limit":1000001}"#),
            (
                "key_total_limit",
                r#"{"name":"a","key_total_limit":1000001}"#,
            ),
        ] {
            let def: TaskDef = serde_json::from_str(def).expect("parses");
            assert_eq!(def.validate().expect_err(field).field, field);
        }
        let at_cap: TaskDef =
            serde_json::from_str(r#"{"name":"a","queue_limit":1000000,"key_total_limit":1000000}"#)
                .expect("parses");
        assert!(at_cap.validate().is_ok());
        let err =
            serde_json::from_str::<TaskDef>(r#"{"name":"a","bogus":1}"#).expect_err("unknown");
        assert!(err.to_string().contains("bogus"));
        assert_eq!(
            QueueSettings {
                max_queued: Some(0),
                ..Default::default()
            }
            .validate()
            .expect_err("mq")
            .field,
            "max_queued"
        );
    }

    #[test]
    fn schedules_are_optional_round_trip_and_are_validated() {
        let plain: TaskDef = serde_json::from_str(r#"{"name":"a"}"#).expect("parse");
        assert!(plain.schedules.is_empty());
        let text = serde_json::to_string(&plain).expect("serialize");
        assert!(
            !text.contains("schedules"),
            "empty schedules are not written: {text}"
        );

        let def: TaskDef = serde_json::from_str(
            r#"{"name":"a","schedules":[{"cron":"0 * * * *"},{"cron":"30 2 * * *","timezone":"Europe/Paris"}]}"#,
        )
        .expect("parse");
        assert_eq!(def.schedules.len(), 2);
        assert_eq!(def.schedules[0].timezone, "UTC");
        assert!(def.validate().is_ok());
        let back: TaskDef =
            serde_json::from_str(&serde_json::to_string(&def).expect("serialize")).expect("parse");
        assert_eq!(back, def);

        let mut bad = def;
        bad.schedules[1].timezone = "Nowhere/Land".into();
        let version = VersionDef { tasks: vec![bad] };
        assert_eq!(
            version.validate().expect_err("bad tz").field,
            "schedules[1].timezone"
        );
    }
}
