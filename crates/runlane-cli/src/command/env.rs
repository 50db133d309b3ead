//! `runlane env create|list|show|set|keys|create-key|rotate|revoke`: envs and API keys.

use serde_json::{json, Map, Value};

use super::{emit, instant, Connection};
use crate::client::{Env, Key};
use crate::table::{opt, pairs, Table};

/// `runlane env …`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Command {
    /// Creates an env (admin).
    Create {
        /// The env's name.
        name: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// Lists the envs the key can see.
    List,
    /// Shows an env's settings.
    Show {
        /// The env.
        name: String,
    },
    /// Changes an env's settings (admin).
    Set {
        /// The env.
        name: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// Lists API keys (admin; the secrets are never shown again).
    Keys,
    /// Creates an API key and prints its secret once (admin).
    CreateKey {
        /// `admin`, `env` or `worker`.
        #[arg(long, value_parser = ["admin", "env", "worker"])]
        role: String,
        /// An env the key may use (repeat for several; none for an admin key).
        #[arg(long = "env", value_name = "ENV")]
        envs: Vec<String>,
        /// A label to recognise the key by.
        #[arg(long)]
        label: Option<String>,
    },
    /// Makes a new key with the same role and envs and revokes the old one (admin).
    Rotate {
        /// The key's id.
        id: String,
    },
    /// Revokes a key (admin).
    Revoke {
        /// The key's id.
        id: String,
    },
}

/// Env settings; only those given are sent.
#[derive(clap::Args, Debug, Clone, Default)]
struct Settings {
    /// Concurrency limit of ordinary runs.
    #[arg(long)]
    limit: Option<u32>,
    /// Burst factor (1.0 to 10.0).
    #[arg(long)]
    burst: Option<f64>,
    /// Cap of fast-lane runs holding slots.
    #[arg(long)]
    fast_lane_limit: Option<u32>,
    /// Fairness weight (1 to 1000).
    #[arg(long)]
    weight: Option<u32>,
    /// Refuse triggers of tasks no version defines.
    #[arg(long)]
    strict_tasks: Option<bool>,
    /// Let due runs of an empty queue key skip the queue.
    #[arg(long)]
    fast_path: Option<bool>,
}

impl Settings {
    fn into_map(self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("limit", self.limit.map(Value::from));
        put("burst", self.burst.map(Value::from));
        put("fast_lane_limit", self.fast_lane_limit.map(Value::from));
        put("weight", self.weight.map(Value::from));
        put("strict_tasks", self.strict_tasks.map(Value::from));
        put("fast_path", self.fast_path.map(Value::from));
        m
    }
}

fn env_pairs(e: &Env) -> String {
    pairs(&[
        ("name", e.name.clone()),
        ("limit", opt(e.limit)),
        ("burst", opt(e.burst)),
        ("fast_lane_limit", opt(e.fast_lane_limit)),
        ("weight", opt(e.weight)),
        ("strict_tasks", opt(e.strict_tasks)),
        ("fast_path", opt(e.fast_path)),
    ])
}

fn key_pairs(k: &Key) -> String {
    let mut p = vec![
        ("id", k.id.clone()),
        ("role", k.role.clone()),
        ("envs", k.envs.join(",")),
        ("label", opt(k.label.as_deref())),
        ("created", instant(k.created_at_ms)),
    ];
    if k.revoked_at_ms.is_some() {
        p.push(("revoked", instant(k.revoked_at_ms)));
    }
    if let Some(secret) = &k.key {
        p.push(("key", secret.clone()));
    }
    let mut out = pairs(&p);
    if k.key.is_some() {
        out.push_str("(the key is shown only now: keep it)\n");
    }
    out
}

/// Runs `runlane env …`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    let json = args.conn.json;
    match args.command {
        Command::Create { name, settings } => {
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            body.extend(settings.into_map());
            let reply = client.create_env(&Value::Object(body)).await?;
            emit(json, &reply.raw, || env_pairs(&reply.value));
        }
        Command::List => {
            let reply = client.list_envs().await?;
            emit(json, &reply.raw, || {
                let mut t = Table::new(&[
                    "NAME",
                    "LIMIT",
                    "BURST",
                    "FAST_LANE_LIMIT",
                    "WEIGHT",
                    "STRICT_TASKS",
                    "FAST_PATH",
                ]);
                for e in &reply.value.envs {
                    t.row(vec![
                        e.name.clone(),
                        opt(e.limit),
                        opt(e.burst),
                        opt(e.fast_lane_limit),
                        opt(e.weight),
                        opt(e.strict_tasks),
                        opt(e.fast_path),
                    ]);
                }
                t.render()
            });
        }
        Command::Show { name } => {
            let reply = client.get_env(&name).await?;
            emit(json, &reply.raw, || env_pairs(&reply.value));
        }
        Command::Set { name, settings } => {
            let m = settings.into_map();
            if m.is_empty() {
                anyhow::bail!(
                    "nothing to set: give --limit, --burst, --fast-lane-limit, --weight, \
                     --strict-tasks or --fast-path"
                );
            }
            let reply = client.set_env(&name, &Value::Object(m)).await?;
            emit(json, &reply.raw, || env_pairs(&reply.value));
        }
        Command::Keys => {
            let reply = client.list_keys().await?;
            emit(json, &reply.raw, || {
                let mut t = Table::new(&["ID", "ROLE", "ENVS", "LABEL", "CREATED", "REVOKED"]);
                for k in &reply.value.keys {
                    t.row(vec![
                        k.id.clone(),
                        k.role.clone(),
                        k.envs.join(","),
                        opt(k.label.as_deref()),
                        instant(k.created_at_ms),
                        instant(k.revoked_at_ms),
                    ]);
                }
                t.render()
            });
        }
        Command::CreateKey { role, envs, label } => {
            let mut body = json!({ "role": role, "envs": envs });
            if let Some(l) = label {
                body["label"] = json!(l);
            }
            let reply = client.create_key(&body).await?;
            emit(json, &reply.raw, || key_pairs(&reply.value));
        }
        Command::Rotate { id } => {
            let reply = client.rotate_key(&id).await?;
            emit(json, &reply.raw, || key_pairs(&reply.value));
        }
        Command::Revoke { id } => {
            let reply = client.revoke_key(&id).await?;
            emit(json, &reply.raw, || key_pairs(&reply.value));
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
    fn only_given_settings_are_sent() {
        let t = T::try_parse_from(["env", "set", "prod", "--limit=10", "--strict-tasks=true"])
            .expect("parses");
        let Command::Set { settings, .. } = t.args.command else {
            panic!("not set")
        };
        assert_eq!(
            Value::Object(settings.into_map()),
            json!({"limit": 10, "strict_tasks": true})
        );
    }

    #[test]
    fn create_key_takes_a_known_role() {
        assert!(T::try_parse_from(["env", "create-key", "--role=root"]).is_err());
        let t = T::try_parse_from(["env", "create-key", "--role=env", "--env=a", "--env=b"])
            .expect("parses");
        let Command::CreateKey { envs, .. } = t.args.command else {
            panic!("not create-key")
        };
        assert_eq!(envs, ["a", "b"]);
    }

    #[test]
    fn a_new_key_is_shown_once_with_a_warning() {
        let k = Key {
            id: "k1".into(),
            key: Some("rl_secret".into()),
            role: "env".into(),
            envs: vec!["prod".into()],
            ..Key::default()
        };
        let out = key_pairs(&k);
        assert!(out.contains("key      rl_secret"), "{out}");
        assert!(
            out.ends_with("(the key is shown only now: keep it)\n"),
            "{out}"
        );
    }
}
