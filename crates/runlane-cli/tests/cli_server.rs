//! The CLI against a real server: `runlane serve --memory --listen 127.0.0.1:0` as a child
//! process, driven through the built `runlane` binary (env, keys, trigger, runs, queues, lanes,
//! and bad input answered with a non-zero exit naming the field).
//!
//! Routes the server does not have yet on main (runs list, cancel, reschedule, retry, queues,
//! lanes, trigger-and-wait) get their tests as they land.

mod support;

use support::Server;

#[test]
fn env_key_and_trigger_then_show_with_the_env_key() {
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
fn bad_input_exits_non_zero_naming_the_field() {
    let server = Server::start();
    let admin = server.admin();
    // The server refuses and names the field.
    let e = admin.fails(&["trigger", "t", "--env", "default", "--ttl", "0s"]);
    assert!(e.contains("invalid_input") && e.contains("ttl_ms"), "{e}");
    let e = admin.fails(&["runs", "show", "run_nothing"]);
    assert!(e.contains("not_found"), "{e}");
    let e = admin.fails(&["env", "set", "default", "--weight", "0"]);
    assert!(e.contains("weight"), "{e}");
    // The CLI refuses before sending and names the flag.
    let e = admin.fails(&["trigger", "t", "--env", "default", "--payload", "{nope"]);
    assert!(e.contains("--payload"), "{e}");
    let e = admin.fails(&["trigger", "t", "--env", "default", "--delay", "5"]);
    assert!(e.contains("--delay"), "{e}");
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
