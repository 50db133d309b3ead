//! `runlane runs list|show|cancel|retry|reschedule`.

use std::time::Duration;

use super::{emit, instant, json_cell, short_json, Connection};
use crate::client::{Run, Triggered};
use crate::duration;
use crate::table::{opt, pairs, Table};

/// `runlane runs …`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Command {
    /// Lists an env's runs in creation order, with filters.
    List(Box<ListArgs>),
    /// Shows one run.
    Show {
        /// Run id.
        id: String,
    },
    /// Cancels a run that has not finished.
    Cancel {
        /// Run id.
        id: String,
    },
    /// Triggers a finished run again (a new run with the same task and payload).
    Retry {
        /// Run id.
        id: String,
    },
    /// Moves a delayed run's due time to now + DELAY.
    Reschedule {
        /// Run id.
        id: String,
        /// The new delay from now (e.g. 30s).
        #[arg(long, value_parser = duration::parse)]
        delay: Duration,
    },
}

/// Filters of `runs list`.
#[derive(clap::Args, Debug, Clone)]
struct ListArgs {
    /// The env.
    #[arg(long, env = "RUNLANE_ENV")]
    env: String,
    /// Only runs in this status (delayed, queued, ready, executing, completed, failed, …).
    #[arg(long)]
    status: Option<String>,
    /// Only this task.
    #[arg(long)]
    task: Option<String>,
    /// Only this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only this lane.
    #[arg(long)]
    lane: Option<String>,
    /// Only runs from this source.
    #[arg(long)]
    source: Option<String>,
    /// Only this version.
    #[arg(long)]
    version: Option<u32>,
    /// Only runs created in the last DURATION (e.g. 10m).
    #[arg(long, value_parser = duration::parse)]
    since: Option<Duration>,
    /// Only runs created at or after this instant (ms since the epoch).
    #[arg(long)]
    from_ms: Option<u64>,
    /// Only runs created before this instant (ms since the epoch).
    #[arg(long)]
    to_ms: Option<u64>,
    /// The page after this cursor (from a previous list).
    #[arg(long)]
    cursor: Option<String>,
    /// Runs per page (at most 1000).
    #[arg(long)]
    limit: Option<u32>,
}

impl ListArgs {
    fn query(&self, now_ms: u64) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        let strings = [
            ("status", &self.status),
            ("task", &self.task),
            ("queue", &self.queue),
            ("lane", &self.lane),
            ("source", &self.source),
            ("cursor", &self.cursor),
        ];
        for (k, v) in strings {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        }
        let from = match (self.from_ms, self.since) {
            (Some(f), _) => Some(f),
            (None, Some(s)) => Some(now_ms.saturating_sub(crate::client::millis(s))),
            (None, None) => None,
        };
        if let Some(f) = from {
            q.push(("from_ms", f.to_string()));
        }
        if let Some(v) = self.version {
            q.push(("version", v.to_string()));
        }
        if let Some(t) = self.to_ms {
            q.push(("to_ms", t.to_string()));
        }
        if let Some(l) = self.limit {
            q.push(("limit", l.to_string()));
        }
        q
    }
}

/// The runs as a table.
pub fn runs_table(runs: &[Run]) -> String {
    let mut t = Table::new(&[
        "ID", "TASK", "STATUS", "QUEUE", "KEY", "LANE", "ATTEMPT", "CREATED",
    ]);
    for r in runs {
        t.row(vec![
            r.id.clone(),
            r.task.clone(),
            r.status.clone(),
            opt(r.queue.as_deref()),
            opt(r.key.as_deref().filter(|k| !k.is_empty())),
            opt(r.lane.as_deref()),
            opt(r.attempt),
            instant(r.created_at_ms),
        ]);
    }
    t.render()
}

/// One run as aligned pairs.
pub fn run_pairs(r: &Run) -> String {
    pairs(&[
        ("id", r.id.clone()),
        ("env", r.env.clone()),
        ("task", r.task.clone()),
        ("status", r.status.clone()),
        ("attempt", opt(r.attempt)),
        ("queue", opt(r.queue.as_deref())),
        ("key", opt(r.key.as_deref().filter(|k| !k.is_empty()))),
        ("lane", opt(r.lane.as_deref())),
        ("source", opt(r.source.as_deref())),
        ("version", opt(r.version)),
        ("retry_of", opt(r.retry_of.as_deref())),
        (
            "priority",
            opt(r
                .priority_ms
                .map(|p| duration::format(Duration::from_millis(p)))),
        ),
        (
            "ttl",
            opt(r.ttl_ms.map(|p| duration::format(Duration::from_millis(p)))),
        ),
        ("created", instant(r.created_at_ms)),
        ("run_at", instant(r.run_at_ms)),
        ("started", instant(r.started_at_ms)),
        ("finished", instant(r.finished_at_ms)),
        ("payload", json_cell(&r.payload, 2000)),
        ("output", json_cell(&r.output, 2000)),
        ("error", short_json(&r.error, 2000)),
    ])
}

fn triggered_pairs(t: &Triggered) -> String {
    pairs(&[
        ("run_id", t.run_id.clone()),
        ("status", t.status.clone()),
        ("idempotent_hit", t.idempotent_hit.to_string()),
    ])
}

/// Runs `runlane runs …`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    let json = args.conn.json;
    match args.command {
        Command::List(list) => {
            let reply = client
                .list_runs(&list.env, &list.query(super::now_ms()))
                .await?;
            emit(json, &reply.raw, || {
                let mut out = runs_table(&reply.value.runs);
                if let Some(c) = &reply.value.next_cursor {
                    out.push_str(&format!("(more: --cursor {c})\n"));
                }
                out
            });
        }
        Command::Show { id } => {
            let reply = client.get_run(&id).await?;
            emit(json, &reply.raw, || run_pairs(&reply.value));
        }
        Command::Cancel { id } => {
            let reply = client.cancel_run(&id).await?;
            emit(json, &reply.raw, || run_pairs(&reply.value));
        }
        Command::Retry { id } => {
            let reply = client.retry_run(&id).await?;
            emit(json, &reply.raw, || triggered_pairs(&reply.value));
        }
        Command::Reschedule { id, delay } => {
            let reply = client.reschedule_run(&id, delay).await?;
            emit(json, &reply.raw, || run_pairs(&reply.value));
        }
    }
    Ok(())
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

    #[test]
    fn list_filters_become_the_query() {
        let t = T::try_parse_from([
            "runs",
            "list",
            "--env=e",
            "--status=failed",
            "--task=email",
            "--since=10s",
            "--limit=5",
            "--json",
        ])
        .expect("parses");
        assert!(t.args.conn.json);
        let Command::List(list) = t.args.command else {
            panic!("not list")
        };
        assert_eq!(
            list.query(60_000),
            vec![
                ("status", "failed".to_string()),
                ("task", "email".to_string()),
                ("from_ms", "50000".to_string()),
                ("limit", "5".to_string()),
            ]
        );
    }

    #[test]
    fn reschedule_needs_a_delay_with_a_unit() {
        assert!(T::try_parse_from(["runs", "reschedule", "r1"]).is_err());
        let e = T::try_parse_from(["runs", "reschedule", "r1", "--delay=30"]).expect_err("refused");
        assert!(e.to_string().contains("--delay"), "{e}");
        assert!(T::try_parse_from(["runs", "reschedule", "r1", "--delay=30s"]).is_ok());
    }

    #[test]
    fn a_run_renders_as_a_row() {
        let r = Run {
            id: "run_1".into(),
            task: "email".into(),
            status: "queued".into(),
            queue: Some("mail".into()),
            attempt: Some(1),
            created_at_ms: Some(0),
            ..Run::default()
        };
        assert_eq!(
            runs_table(&[r]),
            "ID     TASK   STATUS  QUEUE  KEY  LANE  ATTEMPT  CREATED\n\
             run_1  email  queued  mail   -    -     1        1970-01-01T00:00:00Z\n"
        );
    }
}
