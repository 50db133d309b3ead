//! `runlane queues list|set|pause|resume`.

use serde_json::{Map, Value};

use super::{emit, Connection};
use crate::client::Queue;
use crate::table::{opt, Table};

/// `runlane queues …`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Command {
    /// Lists an env's queues with depth, running runs and limits.
    List {
        /// The env.
        #[arg(long, env = "RUNLANE_ENV")]
        env: String,
    },
    /// Changes a queue's limits (`none` clears one).
    Set(SetArgs),
    /// Pauses a queue: it admits nothing until resumed.
    Pause {
        /// The queue.
        queue: String,
        /// The env.
        #[arg(long, env = "RUNLANE_ENV")]
        env: String,
    },
    /// Resumes a paused queue.
    Resume {
        /// The queue.
        queue: String,
        /// The env.
        #[arg(long, env = "RUNLANE_ENV")]
        env: String,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct SetArgs {
    /// The queue.
    queue: String,
    /// The env.
    #[arg(long, env = "RUNLANE_ENV")]
    env: String,
    /// Per-key concurrency limit, or `none`.
    #[arg(long, value_parser = limit)]
    limit: Option<Limit>,
    /// Limit of running runs across all keys, or `none`.
    #[arg(long, value_parser = limit)]
    key_total_limit: Option<Limit>,
    /// Cap of waiting (delayed and queued) runs per key, or `none`.
    #[arg(long, value_parser = limit)]
    max_queued: Option<Limit>,
}

/// A number, or `none` to clear the setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit(pub Option<u64>);

/// Parses a [`Limit`].
pub fn limit(s: &str) -> Result<Limit, String> {
    if s == "none" {
        return Ok(Limit(None));
    }
    s.parse::<u64>()
        .map(|n| Limit(Some(n)))
        .map_err(|_| format!("{s:?} is not a whole number or `none`"))
}

impl SetArgs {
    fn body(&self) -> anyhow::Result<Value> {
        let mut m = Map::new();
        for (field, v) in [
            ("limit", self.limit),
            ("key_total_limit", self.key_total_limit),
            ("max_queued", self.max_queued),
        ] {
            if let Some(Limit(v)) = v {
                m.insert(field.into(), v.map_or(Value::Null, Value::from));
            }
        }
        if m.is_empty() {
            anyhow::bail!("nothing to set: give --limit, --key-total-limit or --max-queued");
        }
        Ok(Value::Object(m))
    }
}

fn queues_table(queues: &[Queue]) -> String {
    let mut t = Table::new(&[
        "NAME",
        "DELAYED",
        "QUEUED",
        "RUNNING",
        "LIMIT",
        "KEY_TOTAL_LIMIT",
        "MAX_QUEUED",
        "PAUSED",
    ]);
    for q in queues {
        t.row(vec![
            q.name.clone(),
            opt(q.delayed),
            opt(q.queued),
            opt(q.running),
            opt(q.limit),
            opt(q.key_total_limit),
            opt(q.max_queued),
            opt(q.paused),
        ]);
    }
    t.render()
}

/// Runs `runlane queues …`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    let json = args.conn.json;
    match args.command {
        Command::List { env } => {
            let reply = client.list_queues(&env).await?;
            emit(json, &reply.raw, || queues_table(&reply.value.queues));
        }
        Command::Set(set) => {
            let body = set.body()?;
            let reply = client.set_queue(&set.env, &set.queue, &body).await?;
            emit(json, &reply.raw, || {
                queues_table(std::slice::from_ref(&reply.value))
            });
        }
        Command::Pause { queue, env } => {
            let reply = client.pause_queue(&env, &queue, true).await?;
            emit(json, &reply.raw, || {
                queues_table(std::slice::from_ref(&reply.value))
            });
        }
        Command::Resume { queue, env } => {
            let reply = client.pause_queue(&env, &queue, false).await?;
            emit(json, &reply.raw, || {
                queues_table(std::slice::from_ref(&reply.value))
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn set_sends_numbers_and_nulls() {
        let t = T::try_parse_from([
            "queues",
            "set",
            "mail",
            "--env=e",
            "--limit=5",
            "--max-queued=none",
        ])
        .expect("parses");
        let Command::Set(set) = t.args.command else {
            panic!("not set")
        };
        assert_eq!(
            set.body().expect("body"),
            json!({"limit": 5, "max_queued": null})
        );
    }

    #[test]
    fn set_refuses_nothing_and_nonsense() {
        let t = T::try_parse_from(["queues", "set", "mail", "--env=e"]).expect("parses");
        let Command::Set(set) = t.args.command else {
            panic!("not set")
        };
        assert!(set.body().is_err());
        let e = T::try_parse_from(["queues", "set", "mail", "--env=e", "--limit=-1"])
            .expect_err("refused");
        assert!(e.to_string().contains("--limit"), "{e}");
    }
}
