//! The CLI against a real server: `runlane serve --memory --listen 127.0.0.1:0` as a child
//! process, driven through the built `runlane` binary (env, keys, trigger, runs, queues, lanes,
//! schedules, and bad input answered with a non-zero exit naming the field).

mod support;

use serde_json::Value;
use support::Server;

#[test]
fn env_key_and_trigger_then_show_and_list_with_the_env_key() {
    let server = Server::start();
    let admin = server.admin();
    admin.ok(&["env", "create", "shop", "--limit", "7"]);
    let env = admin.json(&["env", "show", "shop"]);
    assert_eq!(env["limit"], 7);

    let key = admin.json(&["env", "create-key", "--role", "env", "--env", "shop"]);
    let secret = key["key"].as_str().expect("the secret is shown once");
    assert!(secret.starts_with("rl_"), "{key}");
    let shop = server.with_key(secret);

    let triggered = shop.json(&[
        "trigger",
        "email",
        "--env",
        "shop",
        "--payload",
        r#"{"to":"a@example.com"}"#,
        "--queue",
        "mail",
        "--delay",
        "1h",
    ]);
    let id = triggered["run_id"].as_str().expect("a run id").to_string();
    assert_eq!(triggered["status"], "delayed");
    assert_eq!(triggered["idempotent_hit"], false);

    let run = shop.json(&["runs", "show", &id]);
    assert_eq!(run["task"], "email");
    assert_eq!(run["queue"], "mail");
    assert_eq!(run["payload"]["to"], "a@example.com");

    let page = shop.json(&["runs", "list", "--env", "shop", "--task", "email"]);
    let ids: Vec<&str> = page["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()]);

    // The human table names the run and its status.
    let table = shop.ok(&["runs", "list", "--env", "shop"]);
    let mut lines = table.lines();
    assert!(lines.next().expect("a header").starts_with("ID"), "{table}");
    let row = lines.next().expect("a row");
    assert!(row.contains(&id) && row.contains("delayed"), "{table}");

    // The env key cannot make keys.
    let refused = shop.fails(&["env", "create-key", "--role", "admin"]);
    assert!(refused.contains("forbidden"), "{refused}");
}

#[test]
fn idempotency_key_returns_the_first_run() {
    let server = Server::start();
    let admin = server.admin();
    let args = [
        "trigger",
        "t",
        "--env",
        "default",
        "--delay",
        "1h",
        "--idempotency-key",
        "once",
    ];
    let first = admin.json(&args);
    let second = admin.json(&args);
    assert_eq!(first["run_id"], second["run_id"]);
    assert_eq!(second["idempotent_hit"], true);
}

#[test]
fn cancel_reschedule_and_retry() {
    cancel_reschedule_retry(Server::start());
}

#[test]
fn cancel_reschedule_and_retry_on_the_embedded_backend() {
    cancel_reschedule_retry(Server::start_embedded("runs"));
}

#[test]
fn cancel_reschedule_and_retry_on_the_distributed_backend() {
    if let Some(server) = Server::start_distributed("runs") {
        cancel_reschedule_retry(server);
    }
}

fn cancel_reschedule_retry(server: Server) {
    let admin = server.admin();
    let delayed = admin.json(&["trigger", "t", "--env", "default", "--delay", "1h"]);
    let id = delayed["run_id"].as_str().expect("a run id").to_string();

    let moved = admin.json(&["runs", "reschedule", &id, "--delay", "2h"]);
    assert_eq!(moved["status"], "delayed");
    let run_at = moved["run_at_ms"].as_u64().expect("run_at_ms");
    let created = moved["created_at_ms"].as_u64().expect("created_at_ms");
    assert!(run_at >= created + 2 * 3_600_000 - 60_000, "{moved}");

    let cancelled = admin.json(&["runs", "cancel", &id]);
    assert_eq!(cancelled["status"], "canceled");
    let again = admin.fails(&["runs", "cancel", &id]);
    assert!(again.contains("already_finished"), "{again}");

    let retried = admin.json(&["runs", "retry", &id]);
    let new_id = retried["run_id"].as_str().expect("a new run id");
    assert_ne!(new_id, id);
    let new_run = admin.json(&["runs", "show", new_id]);
    assert_eq!(new_run["retry_of"], Value::String(id.clone()));
    assert_eq!(new_run["task"], "t");
}

#[test]
fn queues_pause_resume_and_set() {
    let server = Server::start();
    let admin = server.admin();
    admin.json(&[
        "trigger", "t", "--env", "default", "--queue", "mail", "--delay", "1h",
    ]);
    let paused = admin.json(&["queues", "pause", "mail", "--env", "default"]);
    assert_eq!(paused["paused"], true);
    let list = admin.json(&["queues", "list", "--env", "default"]);
    let mail = list["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == "mail")
        .expect("the mail queue is listed")
        .clone();
    assert_eq!(mail["paused"], true);
    assert_eq!(mail["delayed"], 1);
    let resumed = admin.json(&["queues", "resume", "mail", "--env", "default"]);
    assert_eq!(resumed["paused"], false);

    let set = admin.json(&[
        "queues",
        "set",
        "mail",
        "--env",
        "default",
        "--limit",
        "3",
        "--max-queued",
        "10",
    ]);
    assert_eq!(set["limit"], 3);
    assert_eq!(set["max_queued"], 10);
    let cleared = admin.json(&[
        "queues", "set", "mail", "--env", "default", "--limit", "none",
    ]);
    assert_eq!(cleared["limit"], Value::Null);
    assert_eq!(cleared["max_queued"], 10);
    let table = admin.ok(&["queues", "list", "--env", "default"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("mail"), "{table}");
}

#[test]
fn lanes_add_and_list() {
    let server = Server::start();
    let admin = server.admin();
    admin.ok(&["lanes", "add", "bulk"]);
    let lanes = admin.json(&["lanes", "list"]);
    assert!(
        lanes["lanes"]
            .as_array()
            .expect("lanes")
            .iter()
            .any(|l| l["name"] == "bulk"),
        "{lanes}"
    );
    let again = admin.fails(&["lanes", "add", "bulk"]);
    assert!(again.contains("conflict"), "{again}");
}

#[test]
fn env_set_keys_rotate_and_revoke() {
    let server = Server::start();
    let admin = server.admin();
    admin.ok(&["env", "create", "a"]);
    let env = admin.json(&["env", "set", "a", "--weight", "5", "--strict-tasks", "true"]);
    assert_eq!(env["weight"], 5);
    assert_eq!(env["strict_tasks"], true);

    let made = admin.json(&[
        "env",
        "create-key",
        "--role",
        "env",
        "--env",
        "a",
        "--label",
        "ci",
    ]);
    let id = made["id"].as_str().expect("key id").to_string();
    let keys = admin.json(&["env", "keys"]);
    assert!(
        keys["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .any(|k| k["id"] == id.as_str() && k["label"] == "ci" && k.get("key").is_none()),
        "the list names the key without its secret: {keys}"
    );

    let rotated = admin.json(&["env", "rotate", &id]);
    let new_secret = rotated["key"].as_str().expect("the new secret");
    let old = server.with_key(made["key"].as_str().expect("old secret"));
    let refused = old.fails(&["env", "show", "a"]);
    assert!(refused.contains("unauthorized"), "{refused}");
    let new = server.with_key(new_secret);
    assert_eq!(new.json(&["env", "show", "a"])["name"], "a");

    let new_id = rotated["id"].as_str().expect("new key id");
    let revoked = admin.json(&["env", "revoke", new_id]);
    assert!(revoked["revoked_at_ms"].is_u64(), "{revoked}");
    let refused = new.fails(&["env", "show", "a"]);
    assert!(refused.contains("unauthorized"), "{refused}");
}

#[test]
fn trigger_wait_without_a_worker_times_out_with_exit_code_2() {
    let server = Server::start();
    let admin = server.admin();
    let out = admin.run(&["trigger", "t", "--env", "default", "--wait=300ms", "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", support::text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(answer["run_id"].is_string(), "{answer}");
    assert_ne!(answer["status"], "completed");
}

#[test]
fn bad_input_exits_non_zero_naming_the_field() {
    let server = Server::start();
    let admin = server.admin();
    // The server refuses and names the field.
    let e = admin.fails(&["trigger", "t", "--env", "default", "--ttl", "0s"]);
    assert!(e.contains("invalid_input") && e.contains("ttl_ms"), "{e}");
    let e = admin.fails(&["trigger", "t", "--env", "default", "--lane", "nowhere"]);
    assert!(e.contains("unknown_lane"), "{e}");
    let e = admin.fails(&["runs", "show", "run_nothing"]);
    assert!(e.contains("not_found"), "{e}");
    let e = admin.fails(&["env", "set", "default", "--weight", "0"]);
    assert!(e.contains("weight"), "{e}");
    // The CLI refuses before sending and names the flag.
    let e = admin.fails(&["trigger", "t", "--env", "default", "--payload", "{nope"]);
    assert!(e.contains("--payload"), "{e}");
    let e = admin.fails(&["trigger", "t", "--env", "default", "--delay", "5"]);
    assert!(e.contains("--delay"), "{e}");
    // Nothing was triggered by any of it.
    let page = admin.json(&["runs", "list", "--env", "default"]);
    assert_eq!(page["runs"], serde_json::json!([]), "{page}");
    // No key at all.
    let e = server.with_key("").fails(&["env", "list"]);
    assert!(e.contains("unauthorized"), "{e}");
}

#[test]
fn help_everywhere() {
    for args in [
        &["trigger", "--help"][..],
        &["runs", "--help"],
        &["runs", "list", "--help"],
        &["queues", "set", "--help"],
        &["lanes", "--help"],
        &["schedules", "list", "--help"],
        &["env", "create-key", "--help"],
        &["worker", "--help"],
    ] {
        let out = support::runlane(args, &[]);
        assert!(out.status.success(), "{args:?}");
        assert!(
            support::text(&out.stdout).contains("Usage: runlane"),
            "{args:?}"
        );
    }
}

#[test]
fn schedules_list_shows_the_next_tick_of_each() {
    // The versions routes are not the CLI's: the version is registered with an embedded engine
    // on the data directory before the server opens it.
    let dir = std::env::temp_dir().join(format!("runlane-cli-schedules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let def: runlane::core::VersionDef = serde_json::from_value(serde_json::json!({"tasks": [
        {"name": "yearly", "schedules": [
            {"cron": "0 0 1 1 *"},
            {"cron": "30 2 1 7 *", "timezone": "America/New_York"}
        ]},
        {"name": "plain"}
    ]}))
    .expect("a version definition");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let engine = runlane::embedded(dir.join("runs.db"))
            .await
            .expect("the embedded engine opens");
        let version = engine
            .register_version("default", def)
            .await
            .expect("register");
        engine.promote("default", version).await.expect("promote");
        engine.shutdown().await;
    });
    drop(rt);

    let server = Server::start_on_data(dir);
    let admin = server.admin();
    let list = admin.json(&["schedules", "list", "--env", "default"]);
    let now = runlane::core::Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_millis() as u64,
    );
    let rows = list["schedules"].as_array().expect("schedules");
    assert_eq!(rows.len(), 2, "{list}");
    for (row, (cron, zone)) in rows
        .iter()
        .zip([("0 0 1 1 *", "UTC"), ("30 2 1 7 *", "America/New_York")])
    {
        assert_eq!(
            (row["task"].as_str(), row["cron"].as_str()),
            (Some("yearly"), Some(cron))
        );
        assert_eq!(row["timezone"], zone);
        let def = runlane::core::ScheduleDef::new(cron).in_timezone(zone);
        let next = runlane::core::schedule::next_tick(&def, now).expect("a next tick");
        assert_eq!(row["next_tick_ms"], next.as_millis(), "{row}");
        assert_eq!(row["last_tick_ms"], Value::Null);
    }

    let table = admin.ok(&["schedules", "list", "--env", "default"]);
    let mut lines = table.lines();
    let header = lines.next().expect("a header");
    assert!(
        header.starts_with("TASK") && header.contains("NEXT_TICK"),
        "{table}"
    );
    let first = lines.next().expect("a row");
    assert!(
        first.contains("yearly") && first.contains("-01-01T00:00:00Z"),
        "the next tick as RFC 3339: {table}"
    );
    assert!(first.trim_end().ends_with('-'), "no last tick yet: {table}");

    let out = admin.run(&["schedules", "list", "--env", "nowhere"]);
    assert!(!out.status.success(), "an unknown env fails");
}
