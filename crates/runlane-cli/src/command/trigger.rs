//! `runlane trigger TASK --payload JSON [...]`: one run, optionally waiting for its end.

use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Map, Value};

use super::{emit, short_json};
use crate::client::{self, Client};
use crate::duration;
use crate::table::pairs;

/// Arguments of `runlane trigger`.
///
/// `--key` is the run's queue key here; the API key is `--api-key` (or RUNLANE_KEY).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The task to run.
    pub task: String,
    /// The payload as JSON; `@FILE` reads a file, `-` reads standard input.
    #[arg(long)]
    pub payload: Option<String>,
    /// The env to trigger in.
    #[arg(long, env = "RUNLANE_ENV")]
    pub env: String,
    /// The queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// The queue key (concurrency and ordering scope inside the queue).
    #[arg(long)]
    pub key: Option<String>,
    /// The lane.
    #[arg(long)]
    pub lane: Option<String>,
    /// Priority: how far ahead of its due time the run sorts (e.g. 5s, 10m).
    #[arg(long, value_parser = duration::parse)]
    pub priority: Option<Duration>,
    /// Delay before the run is due (e.g. 500ms, 2m).
    #[arg(long, value_parser = duration::parse)]
    pub delay: Option<Duration>,
    /// Time to live: expire if not started within it.
    #[arg(long, value_parser = duration::parse)]
    pub ttl: Option<Duration>,
    /// Idempotency key: a second trigger with it returns the first run.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Attempts at most, the first included (1: no retry); the task's policy otherwise.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: Option<u32>,
    /// The version the run is locked to.
    #[arg(long)]
    pub version: Option<u32>,
    /// Wait for the run to finish (through the fast lane), at most this long (default 30s).
    /// Exit code 0 when it completed, 1 when it failed, was cancelled or expired, 2 on timeout.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "30s",
          value_parser = duration::parse)]
    pub wait: Option<Duration>,
    /// The server's address.
    #[arg(long, env = "RUNLANE_SERVER", default_value = client::DEFAULT_SERVER)]
    pub server: String,
    /// The API key (`rl_…`).
    #[arg(long, env = "RUNLANE_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Reads `--payload`: JSON text, `@FILE` or `-` (standard input).
pub fn read_payload(arg: &str) -> anyhow::Result<Value> {
    let text = if arg == "-" {
        std::io::read_to_string(std::io::stdin()).context("--payload: reading standard input")?
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("--payload: reading {path}"))?
    } else {
        arg.to_string()
    };
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--payload: not JSON: {e}"))
}

/// The `Trigger` body from the arguments.
pub fn body(args: &Args) -> anyhow::Result<Value> {
    let mut m = Map::new();
    m.insert("task".into(), json!(args.task));
    if let Some(p) = &args.payload {
        m.insert("payload".into(), read_payload(p)?);
    }
    let strings = [
        ("queue", &args.queue),
        ("key", &args.key),
        ("lane", &args.lane),
        ("idempotency_key", &args.idempotency_key),
    ];
    for (field, v) in strings {
        if let Some(v) = v {
            m.insert(field.into(), json!(v));
        }
    }
    if let Some(n) = args.max_attempts {
        m.insert("retry".into(), json!({ "max_attempts": n }));
    }
    if let Some(v) = args.version {
        m.insert("version".into(), json!(v));
    }
    let durations = [
        ("priority_ms", args.priority),
        ("delay_ms", args.delay),
        ("ttl_ms", args.ttl),
    ];
    for (field, d) in durations {
        if let Some(d) = d {
            m.insert(field.into(), json!(client::millis(d)));
        }
    }
    if let Some(w) = args.wait {
        m.insert("timeout_ms".into(), json!(client::millis(w)));
    }
    Ok(Value::Object(m))
}

/// Runs `runlane trigger`; the exit code.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let body = body(&args)?;
    let client = Client::new(&args.server, args.api_key.clone())?;
    if let Some(wait) = args.wait {
        let reply = client.trigger_and_wait(&args.env, &body, wait).await?;
        let w = &reply.value;
        emit(args.json, &reply.raw, || {
            let mut p = vec![("run_id", w.run_id.clone()), ("status", w.status.clone())];
            if let Some(o) = &w.output {
                p.push(("output", short_json(o, 2000)));
            }
            if let Some(e) = &w.error {
                p.push(("error", short_json(e, 2000)));
            }
            if reply.status == 202 {
                p.push((
                    "note",
                    "still running after the wait; the run goes on".into(),
                ));
            }
            pairs(&p)
        });
        return Ok(if reply.status == 202 {
            2
        } else if w.status == "completed" {
            0
        } else {
            1
        });
    }
    let reply = client.trigger(&args.env, &body).await?;
    let t = &reply.value;
    emit(args.json, &reply.raw, || {
        pairs(&[
            ("run_id", t.run_id.clone()),
            ("status", t.status.clone()),
            ("idempotent_hit", t.idempotent_hit.to_string()),
        ])
    });
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        let mut v = vec!["trigger"];
        v.extend_from_slice(argv);
        T::try_parse_from(v).map(|t| t.args)
    }

    #[test]
    fn every_option_lands_in_the_body() {
        let args = parse(&[
            "email",
            "--env=prod",
            "--payload",
            r#"{"to":"a@b"}"#,
            "--queue=mail",
            "--key=user-1",
            "--lane=bulk",
            "--priority=5s",
            "--delay=500ms",
            "--ttl=2m",
            "--idempotency-key=k1",
            "--version=3",
            "--max-attempts=2",
        ])
        .expect("parses");
        assert_eq!(
            body(&args).expect("body"),
            json!({"task": "email", "payload": {"to": "a@b"}, "queue": "mail", "key": "user-1",
                   "lane": "bulk", "priority_ms": 5000, "delay_ms": 500, "ttl_ms": 120000,
                   "idempotency_key": "k1", "version": 3, "retry": {"max_attempts": 2}})
        );
        assert_eq!(args.wait, None);
    }

    #[test]
    fn wait_has_a_default_and_takes_a_duration() {
        let a = parse(&["t", "--env=e", "--wait"]).expect("parses");
        assert_eq!(a.wait, Some(Duration::from_secs(30)));
        assert_eq!(body(&a).expect("body")["timeout_ms"], json!(30000));
        let a = parse(&["t", "--env=e", "--wait=5s"]).expect("parses");
        assert_eq!(a.wait, Some(Duration::from_secs(5)));
    }

    #[test]
    fn bad_input_names_the_flag() {
        let e = parse(&["t", "--env=e", "--ttl=5"]).expect_err("refused");
        assert!(e.to_string().contains("--ttl"), "{e}");
        let a = parse(&["t", "--env=e", "--payload={nope"]).expect("parses");
        let e = body(&a).expect_err("refused");
        assert!(e.to_string().starts_with("--payload: not JSON"), "{e}");
    }
}
