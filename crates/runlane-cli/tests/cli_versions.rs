//! `runlane versions register|list|show|promote` against a real server (a `runlane serve`
//! child process; the distributed shape in this process): register from a file and from
//! stdin, list, show, promote, which version triggers take, and refusals naming the field.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};
use support::{Cli, Server};

/// Runs `runlane ARGS --json` with `input` on stdin; it must succeed; its JSON.
fn json_with_stdin(cli: &Cli, args: &[&str], input: &str) -> Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_runlane"))
        .args(args)
        .arg("--json")
        .env_remove("RUNLANE_ENV")
        .env("RUNLANE_SERVER", &cli.server)
        .env("RUNLANE_KEY", &cli.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the runlane binary runs");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .expect("stdin written");
    let out = child.wait_with_output().expect("runlane ends");
    assert!(
        out.status.success(),
        "runlane {args:?} failed: {}",
        support::text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// A file of this test process, removed on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A file holding `text` (removed when the first answer is dropped) and its path.
fn text_file(name: &str, text: &str) -> (TempFile, String) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "runlane-cli-versions-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, text).expect("file written");
    let shown = path.display().to_string();
    (TempFile(path), shown)
}

/// A definition file holding `body`.
fn file(name: &str, body: &Value) -> (TempFile, String) {
    text_file(name, &body.to_string())
}

/// (version, queue) of a triggered run.
fn placed(cli: &Cli, args: &[&str]) -> (u64, String) {
    let t = cli.json(args);
    let run = cli.json(&["runs", "show", t["run_id"].as_str().expect("run_id")]);
    (
        run["version"].as_u64().expect("version"),
        run["queue"].as_str().expect("queue").to_string(),
    )
}

fn workflow(server: Server) {
    let admin = server.admin();
    admin.ok(&["env", "create", "shop"]);

    let v1 = json!({"tasks": [{"name": "email", "queue": "mail", "ttl": 90000,
        "queue_limit": 4}]});
    let (_dir, v1_path) = file("v1.json", &v1);
    let reg = admin.json(&["versions", "register", "--env", "shop", "--file", &v1_path]);
    assert_eq!(reg, json!({"version": 1, "promoted": false}));
    let human = admin.ok(&["versions", "register", "--env", "shop", "--file", &v1_path]);
    assert_eq!(human, "version 2 of env shop registered\n");

    let v3 = r#"{"tasks": [{"name": "email", "queue": "mail3"}]}"#;
    let reg = json_with_stdin(
        &admin,
        &[
            "versions",
            "register",
            "--env",
            "shop",
            "--file",
            "-",
            "--promote",
        ],
        v3,
    );
    assert_eq!(reg, json!({"version": 3, "promoted": true}));

    let list = admin.json(&["versions", "list", "--env", "shop"]);
    assert_eq!(list["current"], 3, "{list}");
    let numbers: Vec<u64> = list["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["version"].as_u64().expect("number"))
        .collect();
    assert_eq!(numbers, [1, 2, 3]);
    let table = admin.ok(&["versions", "list", "--env", "shop"]);
    let mut lines = table.lines();
    assert!(
        lines.next().expect("a header").starts_with("VERSION"),
        "{table}"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert_eq!(rows[2][0], "3");
    assert_eq!(rows[2][1], "*", "the current version is marked: {table}");
    assert_eq!(rows[0].last(), Some(&"email"), "{table}");

    let shown = admin.json(&["versions", "show", "--env", "shop", "1"]);
    assert_eq!(shown["version"], 1);
    assert_eq!(shown["current"], false);
    let task = &shown["tasks"][0];
    assert_eq!(
        (
            &task["name"],
            &task["queue"],
            &task["ttl"],
            &task["queue_limit"]
        ),
        (&json!("email"), &json!("mail"), &json!(90000), &json!(4))
    );
    let human = admin.ok(&["versions", "show", "--env", "shop", "1"]);
    assert!(human.contains("NAME") && human.contains("mail"), "{human}");
    assert!(human.contains("1m 30s"), "{human}");

    // Unlocked triggers take the current version; locked ones keep theirs.
    let trig = ["trigger", "email", "--env", "shop", "--delay", "1h"];
    assert_eq!(placed(&admin, &trig), (3, "mail3".into()));
    let mut locked = trig.to_vec();
    locked.extend(["--version", "1"]);
    assert_eq!(placed(&admin, &locked), (1, "mail".into()));

    let promoted = admin.ok(&["versions", "promote", "--env", "shop", "1"]);
    assert_eq!(promoted, "version 1 of env shop is current\n");
    assert_eq!(
        admin.json(&["versions", "list", "--env", "shop"])["current"],
        1
    );
    assert_eq!(placed(&admin, &trig), (1, "mail".into()));
    let queues = admin.json(&["queues", "list", "--env", "shop"]);
    let mail = queues["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == "mail")
        .expect("the mail queue")
        .clone();
    assert_eq!(mail["limit"], 4, "the promotion set v1's queue limit");
}

#[test]
fn register_list_show_promote_on_the_memory_backend() {
    workflow(Server::start());
}

#[test]
fn register_list_show_promote_on_the_embedded_backend() {
    workflow(Server::start_embedded("versions"));
}

#[test]
fn register_list_show_promote_on_the_distributed_backend() {
    if let Some(server) = Server::start_distributed("versions") {
        workflow(server);
    }
}

#[test]
fn refusals_exit_non_zero_naming_the_field_and_store_nothing() {
    let server = Server::start();
    let admin = server.admin();
    let (_d1, dup) = file(
        "dup.json",
        &json!({"tasks": [{"name": "a"}, {"name": "a"}]}),
    );
    let e = admin.fails(&["versions", "register", "--env", "default", "--file", &dup]);
    assert!(
        e.contains("invalid_input") && e.contains("field: tasks"),
        "{e}"
    );
    let (_d2, unknown) = file(
        "unknown.json",
        &json!({"tasks": [{"name": "a", "colour": "red"}]}),
    );
    let e = admin.fails(&[
        "versions", "register", "--env", "default", "--file", &unknown,
    ]);
    assert!(
        e.contains("unknown_field") && e.contains("tasks[0].colour"),
        "{e}"
    );
    let (_d3, retry) = file(
        "retry.json",
        &json!({"tasks": [{"name": "a", "retry": {"min": 9000, "max": 1}}]}),
    );
    let e = admin.fails(&["versions", "register", "--env", "default", "--file", &retry]);
    assert!(e.contains("tasks[0].retry.min"), "{e}");
    let (_d4, not_json) = text_file("broken.json", "{tasks");
    let e = admin.fails(&[
        "versions", "register", "--env", "default", "--file", &not_json,
    ]);
    assert!(e.contains("broken.json") && e.contains("not JSON"), "{e}");
    let e = admin.fails(&[
        "versions",
        "register",
        "--env",
        "default",
        "--file",
        "/nonexistent/v.json",
    ]);
    assert!(e.contains("/nonexistent/v.json"), "{e}");
    let e = admin.fails(&["versions", "show", "--env", "default", "4"]);
    assert!(e.contains("not_found"), "{e}");
    let e = admin.fails(&["versions", "promote", "--env", "default", "4"]);
    assert!(e.contains("not_found"), "{e}");
    let e = admin.fails(&["versions", "list", "--env", "ghost"]);
    assert!(e.contains("not_found"), "{e}");

    // A worker key registers but may not promote.
    let key = admin.json(&["env", "create-key", "--role", "worker", "--env", "default"]);
    let worker = server.with_key(key["key"].as_str().expect("secret"));
    let (_d5, ok) = file("ok.json", &json!({"tasks": [{"name": "a"}]}));
    let e = worker.fails(&[
        "versions",
        "register",
        "--env",
        "default",
        "--file",
        &ok,
        "--promote",
    ]);
    assert!(e.contains("forbidden") && e.contains("promote"), "{e}");
    assert_eq!(
        worker.json(&["versions", "register", "--env", "default", "--file", &ok])["version"],
        1
    );
    let e = worker.fails(&["versions", "promote", "--env", "default", "1"]);
    assert!(e.contains("forbidden"), "{e}");

    let list = admin.json(&["versions", "list", "--env", "default"]);
    assert_eq!(list["current"], 0, "{list}");
    assert_eq!(
        list["versions"].as_array().expect("versions").len(),
        1,
        "only the worker's plain registration was stored: {list}"
    );
}

#[test]
fn versions_help() {
    for args in [
        &["versions", "--help"][..],
        &["versions", "register", "--help"],
        &["versions", "show", "--help"],
    ] {
        let out = support::runlane(args, &[]);
        assert!(out.status.success(), "{args:?}");
        assert!(
            support::text(&out.stdout).contains("Usage: runlane"),
            "{args:?}"
        );
    }
}
