//! `runlane bench` through the built binary: the JSON line of a latency run in each topology
//! (same process, a child worker process, through the server with `runlane worker`), throughput
//! through the server, and a clear refusal of a topology the backend cannot have. The figures
//! themselves are not asserted (timing belongs to the bench, not to tests), only that they are
//! real samples.
//!
//! The separate-process topology needs Redis (`RUNLANE_REDIS_URL`) and PostgreSQL
//! (`RUNLANE_DATABASE_URL`).

use std::process::Command;

use serde_json::Value;

fn runlane(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runlane"))
        .args(args)
        .output()
        .expect("run the runlane binary")
}

fn line(output: &std::process::Output) -> Value {
    assert!(
        output.status.success(),
        "runlane failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let last = text.lines().last().expect("a result line");
    serde_json::from_str(last).expect("the result line is JSON")
}

fn assert_samples(line: &Value, runs: u64) {
    assert_eq!(line["scenario"], "latency");
    assert_eq!(line["runs"], runs);
    let p50 = line["p50_us"].as_u64().expect("p50_us");
    let p95 = line["p95_us"].as_u64().expect("p95_us");
    let p99 = line["p99_us"].as_u64().expect("p99_us");
    assert!(p50 > 0, "a start cannot take 0 µs: {line}");
    assert!(p50 <= p95 && p95 <= p99, "percentiles out of order: {line}");
    assert_eq!(line["git_revision"].as_str().map(str::len), Some(7));
}

#[test]
fn latency_same_process_on_memory_prints_one_line_with_its_settings() {
    let line = line(&runlane(&[
        "bench",
        "latency",
        "--backend",
        "memory",
        "--runs",
        "20",
        "--slots",
        "2",
    ]));
    assert_samples(&line, 20);
    assert_eq!(line["backend"], "memory");
    assert_eq!(line["topology"], "same-process");
    assert_eq!(line["gap_ms"], 0);
    #[cfg(target_os = "linux")]
    assert_eq!(
        line["huge_pages"], false,
        "the binary turns them off: {line}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn runlane_thp_1_keeps_huge_pages_and_the_line_says_so() {
    let output = Command::new(env!("CARGO_BIN_EXE_runlane"))
        .args(["bench", "latency", "--backend", "memory", "--runs", "10"])
        .env("RUNLANE_THP", "1")
        .output()
        .expect("run the runlane binary");
    let line = line(&output);
    assert_samples(&line, 10);
    assert_eq!(line["huge_pages"], true, "{line}");
}

#[test]
fn latency_separate_process_runs_the_worker_in_a_child_process() {
    let line = line(&runlane(&[
        "bench",
        "latency",
        "--backend",
        "distributed",
        "--topology",
        "separate-process",
        "--runs",
        "20",
        "--slots",
        "2",
    ]));
    assert_samples(&line, 20);
    assert_eq!(line["backend"], "distributed");
    assert_eq!(line["topology"], "separate-process");
    assert_eq!(line["durability"], "strict");
    // 20 measured runs and the warm-up (at least 10), each inserted once.
    assert!(line["store_rows_inserted"].as_u64().expect("rows") >= 30);
}

#[test]
fn distributed_throughput_says_where_the_time_went() {
    let line = line(&runlane(&[
        "bench",
        "throughput",
        "--backend",
        "distributed",
        "--phase",
        "concurrent",
        "--runs",
        "300",
        "--slots",
        "4",
        "--producers",
        "8",
    ]));
    assert_eq!(line["runs"], 300);
    let number = |field: &str| {
        line[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field}: {line}"))
    };
    // Every run was inserted and enqueued; the workloop claimed at least once.
    assert!(number("store_commits") > 0 && number("redis_enqueue_calls") > 0);
    assert!(number("redis_claim_calls") > 0);
    // Mean times of round trips to PostgreSQL and Redis: never nothing.
    for field in [
        "store_commit_us_mean",
        "redis_enqueue_us_mean",
        "redis_claim_us_mean",
    ] {
        assert!(number(field) > 0, "{field}: {line}");
    }
}

#[test]
fn separate_process_on_a_one_process_backend_is_refused_naming_the_flag() {
    let output = runlane(&[
        "bench",
        "latency",
        "--backend",
        "embedded",
        "--topology",
        "separate-process",
        "--runs",
        "5",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--backend distributed"),
        "the error names the flag: {stderr}"
    );
    assert!(output.stdout.is_empty(), "no result line for a refused run");
}

#[test]
fn latency_through_the_server_runs_each_run_in_a_runlane_worker_command() {
    let line = line(&runlane(&[
        "bench",
        "latency",
        "--backend",
        "memory",
        "--topology",
        "server",
        "--runs",
        "20",
        "--slots",
        "2",
    ]));
    assert_samples(&line, 20);
    assert_eq!(line["topology"], "server");
    assert_eq!(line["worker"], "runlane worker --exec 'date +%s%N'");
}

#[test]
fn throughput_through_the_server_drains_every_run_with_runlane_worker_slots() {
    for phase in ["drain_only", "concurrent"] {
        let line = line(&runlane(&[
            "bench",
            "throughput",
            "--backend",
            "embedded",
            "--topology",
            "server",
            "--phase",
            phase,
            "--runs",
            "40",
            "--slots",
            "4",
        ]));
        assert_eq!(line["scenario"], "throughput");
        assert_eq!(line["topology"], "server");
        assert_eq!(line["phase"], phase);
        assert_eq!(line["runs"], 40);
        assert!(
            line["runs_per_s"].as_u64().expect("runs_per_s") > 0,
            "{line}"
        );
    }
}

/// Every line of `output`, parsed.
/// Each command fails, its error naming the option.
fn assert_refused_naming(cases: &[(Vec<&str>, &str)]) {
    for (args, named) in cases {
        let output = runlane(args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}

fn lines(output: &std::process::Output) -> Vec<Value> {
    assert!(
        output.status.success(),
        "runlane failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

fn assert_resolve(line: &Value, backend: &str, level: &str) {
    assert_eq!(line["scenario"], "resolve");
    assert_eq!(line["backend"], backend);
    assert_eq!(line["level"], level);
    assert_eq!(line["runs"], 50);
    for path in ["warm", "store"] {
        let p = |q: &str| {
            line[format!("{path}_{q}_us")]
                .as_f64()
                .unwrap_or_else(|| panic!("{path}_{q}_us in {line}"))
        };
        assert!(p("p50") > 0.0, "a resolution cannot take 0 µs: {line}");
        assert!(
            p("p50") <= p("p95") && p("p95") <= p("p99"),
            "out of order: {line}"
        );
    }
    assert!(line["ratio_p50"].as_f64().is_some_and(|r| r > 0.0));
    assert_eq!(line["git_revision"].as_str().map(str::len), Some(7));
}

#[test]
fn resolve_prints_a_line_per_cache_level() {
    let embedded = lines(&runlane(&[
        "bench",
        "resolve",
        "--backend",
        "embedded",
        "--runs",
        "50",
    ]));
    assert_eq!(embedded.len(), 1);
    assert_resolve(&embedded[0], "embedded", "in_process");
    let distributed = lines(&runlane(&[
        "bench",
        "resolve",
        "--backend",
        "distributed",
        "--runs",
        "50",
    ]));
    assert_eq!(distributed.len(), 2);
    assert_resolve(&distributed[0], "distributed", "in_process");
    assert_resolve(&distributed[1], "distributed", "shared");
}

#[test]
fn fsync_prints_a_line_per_gap_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().to_str().expect("a UTF-8 path");
    let lines = lines(&runlane(&[
        "bench",
        "fsync",
        "--dir",
        path,
        "--writes",
        "20",
        "--gaps-us",
        "0,500",
    ]));
    assert_eq!(lines.len(), 2, "one line per gap: {lines:?}");
    for (line, gap) in lines.iter().zip([0, 500]) {
        assert_eq!(line["scenario"], "fsync");
        assert_eq!(line["gap_us"], gap);
        assert_eq!(line["writes"], 20);
        assert_eq!(line["write_bytes"], 8192);
        let p50 = line["p50_us"].as_u64().expect("p50_us");
        let p99 = line["p99_us"].as_u64().expect("p99_us");
        assert!(p50 <= p99, "percentiles out of order: {line}");
        assert_eq!(line["git_revision"].as_str().map(str::len), Some(7));
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read the directory")
        .collect();
    assert!(left.is_empty(), "the probe file was left behind: {left:?}");
}

#[test]
fn fsync_refuses_a_missing_directory_and_bad_gaps_naming_the_option() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let missing = dir.path().join("absent");
    let missing = missing.to_str().expect("a UTF-8 path");
    assert_refused_naming(&[
        (
            vec!["bench", "fsync", "--dir", missing, "--writes", "5"],
            "--dir",
        ),
        (vec!["bench", "fsync", "--gaps-us", "1,x"], "--gaps-us"),
        (vec!["bench", "fsync", "--writes", "0"], "--writes"),
        (vec!["bench", "fsync", "--writes", "10000001"], "--writes"),
    ]);
    assert!(!dir.path().join("absent").exists(), "nothing was created");
}

#[test]
fn cache_prints_a_line_per_gap_and_refuses_bad_settings_naming_the_option() {
    let lines = lines(&runlane(&[
        "bench",
        "cache",
        "--kib",
        "8",
        "--walks",
        "20",
        "--gaps-us",
        "0,300",
    ]));
    assert_eq!(lines.len(), 2, "one line per gap: {lines:?}");
    for (line, gap) in lines.iter().zip([0, 300]) {
        assert_eq!(line["scenario"], "cache");
        assert_eq!(line["gap_us"], gap);
        assert_eq!(line["kib"], 8);
        assert_eq!(line["lines"], 128);
        assert_eq!(line["walks"], 20);
        let p50 = line["p50_ns"].as_u64().expect("p50_ns");
        let p99 = line["p99_ns"].as_u64().expect("p99_ns");
        assert!(0 < p50 && p50 <= p99, "percentiles out of order: {line}");
        assert!(line["ns_per_line_p50"].as_f64().expect("ns_per_line_p50") > 0.0);
    }
    assert_refused_naming(&[
        (vec!["bench", "cache", "--kib", "0"], "--kib"),
        (vec!["bench", "cache", "--kib", "1048577"], "--kib"),
        (vec!["bench", "cache", "--walks", "0"], "--walks"),
        (vec!["bench", "cache", "--walks", "4294967295"], "--walks"),
        (vec!["bench", "cache", "--gaps-us", "1,x"], "--gaps-us"),
    ]);
}
