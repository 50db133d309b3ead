//! Cron schedules of tasks: a task definition may carry schedules, and the engine triggers a
//! run with source `scheduled` at each of their ticks.
//!
//! A schedule is a cron pattern read in an IANA time zone (`UTC` by default). Patterns have
//! five fields (minute precision) or six with a leading seconds field; `@daily`-style
//! nicknames are accepted. This module is pure: it parses definitions and answers "which tick
//! comes after this instant"; the engine owns the timers and the store the cursors.
//!
//! # Daylight saving time
//!
//! Ticks are computed on the zone's wall clock, and two wall-clock oddities have one answer
//! each:
//!
//! - **A local time that does not exist** (inside the spring-forward gap, `02:30` in
//!   `America/New_York` on 2026-03-08) fires once, at the end of the gap (`03:00` local, the
//!   first instant after it). Patterns that step through the gap (`*/15 * * * *`) simply have
//!   no ticks inside it.
//! - **A local time that happens twice** (fall back, `01:30` in `America/New_York` on
//!   2026-11-01) fires once, at its first occurrence (daylight time), for patterns with a fixed
//!   second, minute and hour. Patterns with a wildcard or step in those fields tick on both
//!   passes of the repeated hour, since each pass is real elapsed time.
//!
//! Both are croner's behaviour, pinned by the tests below.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::error::InvalidInput;
use crate::time::Timestamp;

/// The time zone of a schedule that names none.
pub const DEFAULT_TIMEZONE: &str = "UTC";

/// The most schedules one task may carry.
pub const SCHEDULES_MAX: usize = 16;

/// The longest accepted cron pattern, in bytes.
pub const CRON_MAX_LEN: usize = 256;

/// One schedule of a task: a cron pattern read in a time zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDef {
    /// The cron pattern: five fields (`30 2 * * *`), six with leading seconds, or a nickname
    /// (`@hourly`).
    pub cron: String,
    /// The IANA time zone the pattern is read in (`Europe/Paris`); `UTC` when unset.
    #[serde(default = "default_timezone")]
    pub timezone: String,
}

fn default_timezone() -> String {
    DEFAULT_TIMEZONE.to_owned()
}

impl ScheduleDef {
    /// A schedule in UTC.
    pub fn new(cron: impl Into<String>) -> Self {
        ScheduleDef {
            cron: cron.into(),
            timezone: default_timezone(),
        }
    }

    /// The same schedule read in another time zone.
    pub fn in_timezone(mut self, timezone: impl Into<String>) -> Self {
        self.timezone = timezone.into();
        self
    }

    /// Parses the pattern and the time zone.
    pub fn parse(&self) -> Result<Schedule, ScheduleError> {
        if self.cron.len() > CRON_MAX_LEN {
            return Err(ScheduleError::Cron(format!(
                "must be at most {CRON_MAX_LEN} bytes"
            )));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(&self.cron)
            .map_err(|e| ScheduleError::Cron(lowercase_reason(&e.to_string())))?;
        let zone = Tz::from_str(&self.timezone)
            .map_err(|_| ScheduleError::TimeZone(self.timezone.clone()))?;
        Ok(Schedule { cron, zone })
    }
}

/// croner's messages start with a capital and end with a period; ours do neither.
fn lowercase_reason(message: &str) -> String {
    let trimmed = message.trim().trim_end_matches('.');
    let mut chars = trimmed.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::from("invalid pattern"),
    }
}

/// Why a schedule definition was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The cron pattern does not parse.
    #[error("invalid cron pattern: {0}")]
    Cron(String),
    /// The time zone is not an IANA zone name.
    #[error("unknown time zone {0:?}")]
    TimeZone(String),
}

/// The field names of the first [`SCHEDULES_MAX`] schedules (errors name fields with
/// `&'static str`).
macro_rules! schedule_fields {
    ($($i:literal)*) => {
        [$((concat!("schedules[", $i, "].cron"), concat!("schedules[", $i, "].timezone"))),*]
    };
}
const SCHEDULE_FIELDS: [(&str, &str); SCHEDULES_MAX] =
    schedule_fields!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);

/// Checks a task's schedules; an error names the field (`schedules[1].timezone`).
pub fn validate_schedules(schedules: &[ScheduleDef]) -> Result<(), InvalidInput> {
    if schedules.len() > SCHEDULES_MAX {
        return Err(InvalidInput::new(
            "schedules",
            format!("a task has at most {SCHEDULES_MAX} schedules"),
        ));
    }
    for (def, (cron_field, zone_field)) in schedules.iter().zip(SCHEDULE_FIELDS) {
        match def.parse() {
            Ok(_) => {}
            Err(ScheduleError::Cron(reason)) => return Err(InvalidInput::new(cron_field, reason)),
            Err(ScheduleError::TimeZone(zone)) => {
                return Err(InvalidInput::new(
                    zone_field,
                    format!("unknown time zone {zone:?} (use an IANA name such as Europe/Paris)"),
                ))
            }
        }
    }
    Ok(())
}

/// A parsed schedule, ready to compute ticks.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    zone: Tz,
}

/// How far [`Schedule::latest_between`] walks forward from the backward search's answer.
const LATEST_WALK_MAX: usize = 8;

impl Schedule {
    /// The first tick strictly after `after`, or `None` when the pattern never matches again
    /// (or only beyond what dates can express).
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        // Ticks fall on whole seconds, so the first tick after `after` is the first one after
        // its whole second; croner then never sees a fraction.
        let start = to_zoned(whole_second(after), self.zone)?;
        let tick = self.cron.find_next_occurrence(&start, false).ok()?;
        from_zoned(&tick)
    }

    /// The latest tick in `(after, until]`, or `None` when there is none. This is the one tick
    /// that fires for a stretch of missed ticks.
    pub fn latest_between(&self, after: Timestamp, until: Timestamp) -> Option<Timestamp> {
        let first = self.next_after(after)?;
        if first > until {
            return None;
        }
        let mut latest = first;
        // The backward search finds the latest tick at once; it is taken only when the forward
        // rule agrees it is a tick (around a DST change the two directions may differ).
        let back = to_zoned(whole_second(until), self.zone)
            .and_then(|at| self.cron.find_previous_occurrence(&at, true).ok())
            .and_then(|at| from_zoned(&at));
        if let Some(back) = back {
            let one_second_before = back.saturating_sub(Duration::from_secs(1));
            if back > first && self.next_after(one_second_before) == Some(back) {
                latest = back;
            }
        }
        for _ in 0..LATEST_WALK_MAX {
            match self.next_after(latest) {
                Some(next) if next <= until => latest = next,
                _ => break,
            }
        }
        Some(latest)
    }
}

/// The first tick of `def` strictly after `after`; `None` for an invalid definition or a
/// pattern that never matches again.
pub fn next_tick(def: &ScheduleDef, after: Timestamp) -> Option<Timestamp> {
    def.parse().ok()?.next_after(after)
}

fn whole_second(at: Timestamp) -> Timestamp {
    Timestamp(at.as_millis() / 1000 * 1000)
}

fn to_zoned(at: Timestamp, zone: Tz) -> Option<DateTime<Tz>> {
    let ms = i64::try_from(at.as_millis()).ok()?;
    Some(DateTime::<Utc>::from_timestamp_millis(ms)?.with_timezone(&zone))
}

fn from_zoned(at: &DateTime<Tz>) -> Option<Timestamp> {
    u64::try_from(at.timestamp_millis()).ok().map(Timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    /// A UTC instant as a timestamp.
    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Timestamp {
        let at = NaiveDate::from_ymd_opt(y, mo, d)
            .and_then(|date| date.and_hms_opt(h, mi, s))
            .expect("valid date")
            .and_utc();
        Timestamp(u64::try_from(at.timestamp_millis()).expect("after the epoch"))
    }

    fn new_york(cron: &str) -> Schedule {
        ScheduleDef::new(cron)
            .in_timezone("America/New_York")
            .parse()
            .expect("valid schedule")
    }

    /// Every tick in `(after, until]`.
    fn ticks(schedule: &Schedule, after: Timestamp, until: Timestamp) -> Vec<Timestamp> {
        let mut out = Vec::new();
        let mut at = after;
        while let Some(next) = schedule.next_after(at).filter(|t| *t <= until) {
            out.push(next);
            at = next;
        }
        out
    }

    #[test]
    fn normal_days_tick_at_local_time() {
        let s = new_york("30 2 * * *");
        // Winter (EST, UTC−5) and summer (EDT, UTC−4).
        assert_eq!(
            s.next_after(utc(2026, 1, 10, 0, 0, 0)),
            Some(utc(2026, 1, 10, 7, 30, 0))
        );
        assert_eq!(
            s.next_after(utc(2026, 7, 10, 0, 0, 0)),
            Some(utc(2026, 7, 10, 6, 30, 0))
        );
        // Strictly after: a tick instant itself gives the next day's tick.
        assert_eq!(
            s.next_after(utc(2026, 7, 10, 6, 30, 0)),
            Some(utc(2026, 7, 11, 6, 30, 0))
        );
        // A fraction of a second before the tick still finds it.
        let just_before = utc(2026, 7, 10, 6, 30, 0).saturating_sub(Duration::from_millis(1));
        assert_eq!(s.next_after(just_before), Some(utc(2026, 7, 10, 6, 30, 0)));
        // UTC by default.
        let def = ScheduleDef::new("0 12 * * *");
        assert_eq!(def.timezone, "UTC");
        assert_eq!(
            next_tick(&def, utc(2026, 5, 1, 12, 0, 0)),
            Some(utc(2026, 5, 2, 12, 0, 0))
        );
        // Six fields: seconds first.
        let every_ten_seconds = ScheduleDef::new("*/10 * * * * *");
        assert_eq!(
            next_tick(&every_ten_seconds, utc(2026, 5, 1, 12, 0, 3)),
            Some(utc(2026, 5, 1, 12, 0, 10))
        );
    }

    #[test]
    fn spring_forward_gap_fires_once_at_the_end_of_the_gap() {
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist.
        let s = new_york("30 2 * * *");
        let fired = ticks(&s, utc(2026, 3, 7, 12, 0, 0), utc(2026, 3, 9, 12, 0, 0));
        assert_eq!(
            fired,
            vec![
                utc(2026, 3, 8, 7, 0, 0),  // 03:00 EDT, the end of the gap
                utc(2026, 3, 9, 6, 30, 0), // 02:30 EDT the next day
            ]
        );
        // The day before is an ordinary EST tick.
        assert_eq!(
            s.next_after(utc(2026, 3, 7, 0, 0, 0)),
            Some(utc(2026, 3, 7, 7, 30, 0))
        );
    }

    #[test]
    fn fall_back_repeated_time_fires_once_at_its_first_occurrence() {
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:00–01:59 happens twice.
        let repeated = new_york("30 1 * * *");
        let fired = ticks(
            &repeated,
            utc(2026, 11, 1, 0, 0, 0),
            utc(2026, 11, 2, 0, 0, 0),
        );
        assert_eq!(fired, vec![utc(2026, 11, 1, 5, 30, 0)], "01:30 EDT only");
        // 02:30 happens once that day (EST).
        let s = new_york("30 2 * * *");
        let fired = ticks(&s, utc(2026, 10, 31, 12, 0, 0), utc(2026, 11, 2, 12, 0, 0));
        assert_eq!(
            fired,
            vec![utc(2026, 11, 1, 7, 30, 0), utc(2026, 11, 2, 7, 30, 0)]
        );
        // A wildcard pattern ticks on both passes: each is real elapsed time.
        let hourly = new_york("0 * * * *");
        let fired = ticks(
            &hourly,
            utc(2026, 11, 1, 4, 30, 0),
            utc(2026, 11, 1, 7, 30, 0),
        );
        assert_eq!(
            fired,
            vec![
                utc(2026, 11, 1, 5, 0, 0), // 01:00 EDT
                utc(2026, 11, 1, 6, 0, 0), // 01:00 EST
                utc(2026, 11, 1, 7, 0, 0), // 02:00 EST
            ]
        );
    }

    #[test]
    fn latest_between_picks_the_one_missed_tick_to_fire() {
        let s = new_york("30 2 * * *");
        // Down from Jan 10 to Jan 14 noon: four ticks missed, the latest is Jan 14.
        assert_eq!(
            s.latest_between(utc(2026, 1, 10, 7, 30, 0), utc(2026, 1, 14, 12, 0, 0)),
            Some(utc(2026, 1, 14, 7, 30, 0))
        );
        // The until bound is inclusive, the after bound exclusive.
        assert_eq!(
            s.latest_between(utc(2026, 1, 10, 7, 30, 0), utc(2026, 1, 11, 7, 30, 0)),
            Some(utc(2026, 1, 11, 7, 30, 0))
        );
        assert_eq!(
            s.latest_between(utc(2026, 1, 10, 7, 30, 0), utc(2026, 1, 11, 7, 29, 59)),
            None
        );
        // Across the gap and the repeated hour, the answer agrees with the forward rule.
        assert_eq!(
            s.latest_between(utc(2026, 3, 7, 12, 0, 0), utc(2026, 3, 8, 8, 0, 0)),
            Some(utc(2026, 3, 8, 7, 0, 0))
        );
        let repeated = new_york("30 1 * * *");
        assert_eq!(
            repeated.latest_between(utc(2026, 10, 31, 12, 0, 0), utc(2026, 11, 1, 6, 45, 0)),
            Some(utc(2026, 11, 1, 5, 30, 0)),
            "the second 01:30 is not a tick"
        );
        // Every second, a day missed: still one answer, the latest.
        let every_second = ScheduleDef::new("* * * * * *").parse().expect("valid");
        assert_eq!(
            every_second.latest_between(utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 2, 0, 0, 0)),
            Some(utc(2026, 1, 2, 0, 0, 0))
        );
    }

    #[test]
    fn bad_cron_and_bad_time_zone_name_the_field() {
        let bad_cron = [ScheduleDef::new("0 0 * *"), ScheduleDef::new("61 * * * *")];
        for def in bad_cron {
            let err = validate_schedules(std::slice::from_ref(&def)).expect_err(&def.cron);
            assert_eq!(err.field, "schedules[0].cron", "{def:?}");
            assert!(next_tick(&def, Timestamp(0)).is_none());
        }
        let defs = [
            ScheduleDef::new("0 * * * *"),
            ScheduleDef::new("0 * * * *").in_timezone("Mars/Olympus_Mons"),
        ];
        let err = validate_schedules(&defs).expect_err("tz");
        assert_eq!(err.field, "schedules[1].timezone");
        assert!(err.reason.contains("Mars/Olympus_Mons"), "{}", err.reason);
        assert!(matches!(
            defs[1].parse(),
            Err(ScheduleError::TimeZone(zone)) if zone == "Mars/Olympus_Mons"
        ));
        let long = ScheduleDef::new("*".repeat(CRON_MAX_LEN + 1));
        assert_eq!(
            validate_schedules(&[long]).expect_err("long").field,
            "schedules[0].cron"
        );
        let many = vec![ScheduleDef::new("@hourly"); SCHEDULES_MAX + 1];
        assert_eq!(
            validate_schedules(&many).expect_err("many").field,
            "schedules"
        );
        assert!(validate_schedules(&many[..SCHEDULES_MAX]).is_ok());
        assert_eq!(SCHEDULE_FIELDS[15].1, "schedules[15].timezone");
    }

    #[test]
    fn definitions_refuse_unknown_fields_and_default_the_zone() {
        let def: ScheduleDef = serde_json::from_str(r#"{"cron":"@daily"}"#).expect("parse");
        assert_eq!(def, ScheduleDef::new("@daily"));
        let err = serde_json::from_str::<ScheduleDef>(r#"{"cron":"@daily","tz":"UTC"}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("tz"), "{err}");
    }
}
