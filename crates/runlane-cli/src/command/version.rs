//! `runlane versions register|list|show|promote`: an env's versions of its task definitions.
//!
//! `register` sends a JSON file (or stdin with `--file -`) as the body of
//! `POST /v1/envs/{env}/versions`: `{"tasks": [...]}`; the server checks it and names the field
//! at fault.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use super::{emit, instant, Connection};
use crate::client::Version;
use crate::table::{pairs, Table};

/// `runlane versions …`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Command {
    /// Registers a version from a JSON file (`{"tasks": [...]}`; `-` reads stdin).
    Register {
        /// The env.
        #[arg(long, env = "RUNLANE_ENV")]
        env: String,
        /// The definition file, or `-` for stdin.
        #[arg(long)]
        file: PathBuf,
        /// Also make it current (admin keys only).
        #[arg(long)]
        promote: bool,
    },
    /// Lists an env's versions; `*` marks the current one.
    List {
        /// The env.
        #[arg(long, env = "RUNLANE_ENV")]
        env: String,
    },
    /// Shows one version and its task definitions.
    Show {
        /// The version number.
        version: u32,
        /// The env.
        #[arg(long, env = "RUNLANE_ENV")]
        env: String,
    },
    /// Makes a version current (admin).
    Promote {
        /// The version number.
        version: u32,
        /// The env.
        #[arg(long, env = "RUNLANE_ENV")]
        env: String,
    },
}

/// The request body: the file's JSON object, with `promote: true` when asked.
fn body(text: &str, source: &str, promote: bool) -> anyhow::Result<Value> {
    let mut body: Value =
        serde_json::from_str(text).with_context(|| format!("{source} is not JSON"))?;
    let Some(object) = body.as_object_mut() else {
        anyhow::bail!("{source} must hold a JSON object like {{\"tasks\": [...]}}");
    };
    if promote {
        object.insert("promote".into(), Value::Bool(true));
    }
    Ok(body)
}

fn read(file: &Path) -> anyhow::Result<(String, String)> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
        return Ok((text, "stdin".into()));
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    Ok((text, file.display().to_string()))
}

/// A task field as a cell: strings bare, numbers and others as JSON, null as `-`.
fn cell(task: &Value, field: &str) -> String {
    match &task[field] {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A duration field in milliseconds as `1m 30s`, or `-`.
fn duration(task: &Value, field: &str) -> String {
    match task[field].as_u64() {
        Some(ms) => humantime::format_duration(Duration::from_millis(ms)).to_string(),
        None => "-".into(),
    }
}

fn task_names(v: &Version) -> String {
    let names: Vec<String> = v.tasks.iter().map(|t| cell(t, "name")).collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

fn show(v: &Version) -> String {
    let mut out = pairs(&[
        ("version", v.version.to_string()),
        ("current", v.current.to_string()),
        ("created", instant(v.created_at_ms)),
        ("tasks", v.tasks.len().to_string()),
    ]);
    if v.tasks.is_empty() {
        return out;
    }
    out.push('\n');
    let mut t = Table::new(&[
        "NAME",
        "QUEUE",
        "LANE",
        "QUEUE_LIMIT",
        "KEY_TOTAL_LIMIT",
        "TTL",
        "ATTEMPTS",
        "MAX_DURATION",
    ]);
    for task in &v.tasks {
        let queue = match &task["queue"] {
            Value::Null => cell(task, "name"),
            q => q.as_str().map_or_else(|| q.to_string(), str::to_string),
        };
        let lane = match &task["lane"] {
            Value::Null => "default".into(),
            _ => cell(task, "lane"),
        };
        t.row(vec![
            cell(task, "name"),
            queue,
            lane,
            cell(task, "queue_limit"),
            cell(task, "key_total_limit"),
            duration(task, "ttl"),
            cell(&task["retry"], "attempts_max"),
            duration(task, "max_duration"),
        ]);
    }
    out.push_str(&t.render());
    out
}

/// Runs `runlane versions …`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    let json = args.conn.json;
    match args.command {
        Command::Register { env, file, promote } => {
            let (text, source) = read(&file)?;
            let body = body(&text, &source, promote)?;
            let reply = client.register_version(&env, &body).await?;
            emit(json, &reply.raw, || {
                let r = &reply.value;
                if r.promoted {
                    format!(
                        "version {} of env {env} registered and current\n",
                        r.version
                    )
                } else {
                    format!("version {} of env {env} registered\n", r.version)
                }
            });
        }
        Command::List { env } => {
            let reply = client.list_versions(&env).await?;
            emit(json, &reply.raw, || {
                let mut t = Table::new(&["VERSION", "CURRENT", "CREATED", "TASKS"]);
                for v in &reply.value.versions {
                    t.row(vec![
                        v.version.to_string(),
                        if v.current { "*".into() } else { String::new() },
                        instant(v.created_at_ms),
                        task_names(v),
                    ]);
                }
                let mut out = t.render();
                if reply.value.current == 0 {
                    out.push_str("current: 0 (the implicit empty version)\n");
                }
                out
            });
        }
        Command::Show { version, env } => {
            let reply = client.get_version(&env, version).await?;
            emit(json, &reply.raw, || show(&reply.value));
        }
        Command::Promote { version, env } => {
            let reply = client.promote_version(&env, version).await?;
            emit(json, &reply.raw, || {
                format!("version {} of env {env} is current\n", reply.value.current)
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_body_is_the_file_with_promote_when_asked() {
        let text = r#"{"tasks":[{"name":"a"}]}"#;
        assert_eq!(
            body(text, "f", false).expect("body"),
            json!({"tasks": [{"name": "a"}]})
        );
        assert_eq!(
            body(text, "f", true).expect("body"),
            json!({"tasks": [{"name": "a"}], "promote": true})
        );
        let e = body("[1]", "f.json", false).expect_err("not an object");
        assert!(e.to_string().contains("f.json"), "{e}");
        let e = body("{", "f.json", false).expect_err("not JSON");
        assert!(e.to_string().contains("f.json"), "{e}");
    }

    #[test]
    fn show_renders_defaults_and_durations() {
        let v = Version {
            version: 2,
            created_at_ms: Some(0),
            current: true,
            tasks: vec![
                json!({"name": "email", "queue": null, "lane": null, "ttl": 90000,
                "queue_limit": 4, "key_total_limit": null, "max_duration": null,
                "retry": {"attempts_max": 3}}),
            ],
        };
        let text = show(&v);
        assert!(text.contains("1970-01-01T00:00:00Z"), "{text}");
        let row = text
            .lines()
            .find(|l| l.starts_with("email"))
            .expect("a task row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            ["email", "email", "default", "4", "-", "1m", "30s", "3", "-"]
        );
    }
}
