//! Lanes: named ready-lists that workers claim from, and the rule that picks a run's lane.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::LazyLock;

use crate::error::InvalidInput;
use crate::name::check;
use crate::run::TriggerSource;
use crate::text::NameText;

/// A lane's name: `[A-Za-z0-9_]+`, at most 64 bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LaneName(NameText);

fn lane_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl LaneName {
    /// The default lane of every task that names none.
    pub const DEFAULT: &'static str = "default";
    /// The lane of sync triggers (trigger-and-wait).
    pub const FAST_LANE: &'static str = "fast_lane";
    /// The lane of manual triggers and manual retries.
    pub const MANUAL: &'static str = "manual";
    /// The lanes every engine starts with.
    pub const BUILT_IN: [&'static str; 3] = [Self::DEFAULT, Self::FAST_LANE, Self::MANUAL];

    /// Validates a lane name; `field` names the input it came from.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, InvalidInput> {
        check(field, value, 64, lane_char, "A-Z a-z 0-9 _")?;
        Ok(LaneName(NameText::new(value)))
    }

    /// Validates a lane name given as the `lane` field.
    pub fn new(value: &str) -> Result<Self, InvalidInput> {
        Self::parse("lane", value)
    }

    /// The `default` lane.
    pub fn default_lane() -> Self {
        static LANE: LazyLock<LaneName> =
            LazyLock::new(|| LaneName(NameText::new(LaneName::DEFAULT)));
        LANE.clone()
    }

    /// The `fast_lane` lane.
    pub fn fast_lane() -> Self {
        static LANE: LazyLock<LaneName> =
            LazyLock::new(|| LaneName(NameText::new(LaneName::FAST_LANE)));
        LANE.clone()
    }

    /// The `manual` lane.
    pub fn manual() -> Self {
        static LANE: LazyLock<LaneName> =
            LazyLock::new(|| LaneName(NameText::new(LaneName::MANUAL)));
        LANE.clone()
    }

    /// Whether this is `fast_lane`, whose runs skip the env row of admission.
    pub fn is_fast_lane(&self) -> bool {
        self.0.as_str() == Self::FAST_LANE
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for LaneName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl fmt::Debug for LaneName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.as_str())
    }
}

impl Serialize for LaneName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for LaneName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LaneName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// The lane a run goes to (SPEC §3): an explicit lane (the caller checks it exists); else sync
/// triggers → `fast_lane`; manual triggers and manual retries → `manual`; else the task's
/// default lane, else `default`.
pub fn assign_lane(
    explicit: Option<&LaneName>,
    source: TriggerSource,
    task_default: Option<&LaneName>,
) -> LaneName {
    if let Some(lane) = explicit {
        return lane.clone();
    }
    match source {
        TriggerSource::Sync => LaneName::fast_lane(),
        TriggerSource::Manual => LaneName::manual(),
        TriggerSource::Standard | TriggerSource::Scheduled => {
            task_default.cloned().unwrap_or_else(LaneName::default_lane)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_assignment_follows_the_rule() {
        let custom = LaneName::new("reports").expect("valid");
        let explicit = LaneName::new("gpu").expect("valid");
        let cases = [
            (Some(&explicit), TriggerSource::Sync, Some(&custom), "gpu"),
            (None, TriggerSource::Sync, Some(&custom), "fast_lane"),
            (None, TriggerSource::Manual, Some(&custom), "manual"),
            (None, TriggerSource::Standard, Some(&custom), "reports"),
            (None, TriggerSource::Scheduled, None, "default"),
            (None, TriggerSource::Standard, None, "default"),
        ];
        for (explicit, source, task, want) in cases {
            assert_eq!(assign_lane(explicit, source, task).as_str(), want);
        }
    }

    #[test]
    fn lane_names_are_validated() {
        assert!(LaneName::new("fast_lane").expect("valid").is_fast_lane());
        for bad in ["", "a-b", "a>b", "*", "sp ace"] {
            assert_eq!(LaneName::new(bad).expect_err(bad).field, "lane");
        }
    }
}
