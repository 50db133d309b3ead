//! The commands that talk to a runlane server: `trigger`, `runs`, `queues`, `schedules`,
//! `lanes`, `env`, `versions`.
//!
//! Each prints a table for humans, or with `--json` the server's JSON unchanged (one document
//! per line), and fails with the server's error (code, message, field) and a non-zero exit.

pub mod env;
pub mod lane;
pub mod queue;
pub mod run;
pub mod schedule;
pub mod trigger;
pub mod version;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::client::{self, Client};

/// Where the server is and which key to use; shared by every client command.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// The server's address.
    #[arg(
        long,
        env = "RUNLANE_SERVER",
        default_value = client::DEFAULT_SERVER,
        global = true
    )]
    pub server: String,
    /// The API key (`rl_…`).
    #[arg(
        long = "key",
        visible_alias = "api-key",
        env = "RUNLANE_KEY",
        hide_env_values = true,
        global = true
    )]
    pub key: Option<String>,
    /// Print the server's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Connection {
    /// A client of this server.
    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(&self.server, self.key.clone())?)
    }
}

/// Prints the server's JSON (`--json`) or the human rendering.
pub fn emit(json: bool, raw: &Value, human: impl FnOnce() -> String) {
    if json {
        println!("{raw}");
    } else {
        print!("{}", human());
    }
}

/// An instant in milliseconds since the epoch as RFC 3339 (UTC, seconds), or `-`.
pub fn instant(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        None => "-".to_string(),
    }
}

/// Milliseconds since the epoch now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, client::millis)
}

/// A JSON value as JSON on one line (strings quoted), shortened to `max` characters, or `-`.
pub fn json_cell(v: &Value, max: usize) -> String {
    match v {
        Value::Null => "-".to_string(),
        other => shorten(other.to_string(), max),
    }
}

/// A JSON value on one line, a string as its text, shortened to `max` characters, or `-`.
pub fn short_json(v: &Value, max: usize) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => shorten(s.replace('\n', " "), max),
        other => shorten(other.to_string(), max),
    }
}

fn shorten(s: String, max: usize) -> String {
    if s.chars().count() > max {
        let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_rfc3339() {
        assert_eq!(instant(Some(0)), "1970-01-01T00:00:00Z");
        assert_eq!(instant(Some(1_700_000_000_123)), "2023-11-14T22:13:20Z");
        assert_eq!(instant(None), "-");
    }

    #[test]
    fn json_cells_are_short() {
        assert_eq!(short_json(&Value::Null, 10), "-");
        assert_eq!(short_json(&serde_json::json!("a\nb"), 10), "a b");
        assert_eq!(json_cell(&serde_json::json!("x"), 10), "\"x\"");
        assert_eq!(json_cell(&Value::Null, 10), "-");
        assert_eq!(
            short_json(&serde_json::json!({"k": "vvvvvvvv"}), 8),
            "{\"k\":\"v…"
        );
    }
}
