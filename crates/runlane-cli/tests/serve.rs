//! `runlane serve` as a process: it prints its address, answers, takes its settings from a
//! `--config` file under flags, and stops cleanly on SIGTERM and SIGINT.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Starts `runlane serve ARGS` and answers the child and the address it printed. The
/// caller waits for the child ([`wait_exit`]).
#[allow(clippy::zombie_processes)]
fn start(args: &[&str]) -> (Child, String, BufReader<std::process::ChildStderr>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_runlane"))
        .arg("serve")
        .args(args)
        .env("RUNLANE_ADMIN_KEY", "rl_cli_test_admin")
        .env_remove("RUNLANE_SERVE_REDIS")
        .env_remove("RUNLANE_SERVE_POSTGRES")
        .env_remove("RUNLANE_LISTEN")
        .env_remove("RUNLANE_SERVE_REDIS_PREFIX")
        .env_remove("RUNLANE_SERVE_POSTGRES_SCHEMA")
        .env_remove("RUNLANE_SERVE_META_CACHE_REDIS")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("runlane serve starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = stderr.read_line(&mut line).expect("stderr read");
        assert!(n > 0, "runlane serve exited before serving");
        if let Some(rest) = line.trim().strip_prefix("runlane: serving http://") {
            let addr = rest.split_whitespace().next().expect("address").to_string();
            return (child, addr, stderr);
        }
    }
}

/// A plain HTTP/1.1 GET; answers the status line and the body.
fn get(addr: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer rl_cli_test_admin\r\nConnection: close\r\n\r\n"
    )
    .expect("request written");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response read");
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill -{sig}");
}

/// Waits for the child to exit (bounded) and answers whether it exited 0.
fn wait_exit(mut child: Child) -> bool {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait().map(|s| s.success()));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(status) => status.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("runlane serve did not stop within 30 s");
        }
    }
}

#[test]
fn serve_memory_answers_and_stops_on_sigterm() {
    let (child, addr, mut stderr) = start(&["--memory", "--listen", "127.0.0.1:0"]);
    let (status, body) = get(&addr, "/health");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("\"shape\":\"memory\""), "{body}");
    let (status, body) = get(&addr, "/v1/envs");
    assert!(status.contains("200"), "{status} {body}");
    signal(&child, "TERM");
    assert!(wait_exit(child), "exit 0 after SIGTERM");
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).expect("stderr");
    assert!(rest.contains("runlane: stopped"), "{rest}");
}

#[test]
fn serve_embedded_from_a_config_file_and_stops_on_sigint() {
    let dir = std::env::temp_dir().join(format!("runlane-cli-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("runlane.toml");
    let data = dir.join("data");
    std::fs::write(
        &config,
        format!(
            "backend = \"embedded\"\ndata = {:?}\nlisten = \"127.0.0.1:1\"\n",
            data.display().to_string()
        ),
    )
    .expect("config written");
    // The flag wins over the file's listen address.
    let config_arg = config.display().to_string();
    let (child, addr, _stderr) = start(&["--config", &config_arg, "--listen", "127.0.0.1:0"]);
    let (status, body) = get(&addr, "/health");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("\"shape\":\"embedded\""), "{body}");
    assert!(data.join("runs.db").exists(), "the file's data dir is used");
    assert!(data.join("keys.db").exists(), "keys live in the data dir");
    signal(&child, "INT");
    assert!(wait_exit(child), "exit 0 after SIGINT");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_refuses_a_bad_config_file() {
    let dir = std::env::temp_dir().join(format!("runlane-cli-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("bad.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\ncolour = \"red\"\n").expect("written");
    let out = Command::new(env!("CARGO_BIN_EXE_runlane"))
        .args(["serve", "--memory", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("colour"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_memory_wins_over_a_data_dir_from_the_environment() {
    let dir = std::env::temp_dir().join(format!("runlane-cli-envdata-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_runlane"))
        .args(["serve", "--memory", "--listen", "127.0.0.1:0"])
        .env("RUNLANE_DATA", &dir)
        .env("RUNLANE_ADMIN_KEY", "rl_cli_test_admin")
        .env_remove("RUNLANE_SERVE_REDIS")
        .env_remove("RUNLANE_SERVE_POSTGRES")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("a line");
    assert!(line.contains("(memory)"), "{line}");
    assert!(!dir.exists(), "no data dir made for a memory server");
    signal(&child, "TERM");
    assert!(wait_exit(child));
}

#[test]
fn serve_refuses_redis_without_postgres() {
    let out = Command::new(env!("CARGO_BIN_EXE_runlane"))
        .args(["serve", "--redis", "redis://127.0.0.1:6379"])
        .env_remove("RUNLANE_SERVE_POSTGRES")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("go together"), "{err}");
}

#[test]
fn serve_distributed_keeps_to_its_redis_prefix_and_postgres_schema() {
    let redis_url =
        std::env::var("RUNLANE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let pg_url = std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("rl_cli_serve_{}", std::process::id());
    let (child, addr, _stderr) = start(&[
        "--redis",
        &redis_url,
        "--postgres",
        &pg_url,
        "--redis-prefix",
        &name,
        "--postgres-schema",
        &name,
        "--meta-cache-redis",
        &redis_url,
        "--listen",
        "127.0.0.1:0",
    ]);
    let (status, body) = get(&addr, "/health");
    signal(&child, "TERM");
    assert!(wait_exit(child));
    assert!(status.contains("200"), "{status}: {body}");
    assert!(body.contains("distributed"), "{body}");
    // The key space and the schema are the ones named, and nothing else was needed.
    let client = redis::Client::open(redis_url.as_str()).expect("redis url");
    let mut conn = client.get_connection().expect("redis answers");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{name}*"))
        .query(&mut conn)
        .expect("keys");
    let psql = |sql: &str| {
        Command::new("psql")
            .args([pg_url.as_str(), "-tAc", sql])
            .output()
            .expect("psql runs")
    };
    let schema = psql(&format!(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{name}'"
    ));
    // Clean up before asserting, so a failure leaves nothing behind.
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("del");
    }
    psql(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"));
    assert!(!keys.is_empty(), "no Redis key under the prefix {name}");
    let tables: u32 = String::from_utf8_lossy(&schema.stdout)
        .trim()
        .parse()
        .expect("a count");
    assert!(tables > 0, "no table in the schema {name}");
}

#[test]
fn serve_refuses_a_prefix_without_the_distributed_backend() {
    let out = Command::new(env!("CARGO_BIN_EXE_runlane"))
        .args(["serve", "--memory", "--redis-prefix", "x"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("distributed backend only"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_runlane"))
        .args([
            "serve",
            "--memory",
            "--meta-cache-redis",
            "redis://127.0.0.1:6379",
        ])
        .env_remove("RUNLANE_SERVE_REDIS")
        .env_remove("RUNLANE_SERVE_POSTGRES")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--meta-cache-redis"), "{err}");
}
