//! `/metrics` in the Prometheus text format (0.0.4), written directly: the engine's counters
//! (this process since start) and gauges read at scrape time (queue depth, running vs limit,
//! lanes and orphan lanes).

use std::fmt::Write as _;

use runlane::START_LATENCY_BUCKETS_MS;

use crate::error::ApiError;
use crate::state::AppState;

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Text(String);

impl Text {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn line(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        let _ = writeln!(self.0, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// Renders the metrics text.
pub async fn render(state: &AppState) -> Result<String, ApiError> {
    let engine = state.engine();
    let m = engine.metrics();
    let mut t = Text(String::new());
    t.one(
        "runlane_triggered_total",
        "counter",
        "Runs triggered (new runs).",
        m.triggered,
    );
    t.one(
        "runlane_triggered_ready_total",
        "counter",
        "Runs admitted straight into their lane at trigger (fast path share = this / runlane_triggered_total).",
        m.triggered_ready,
    );
    t.one(
        "runlane_idempotent_hits_total",
        "counter",
        "Triggers answered with an existing run.",
        m.idempotent_hits,
    );
    t.one(
        "runlane_claimed_total",
        "counter",
        "Leases granted.",
        m.claimed,
    );
    t.one(
        "runlane_retries_total",
        "counter",
        "Retries scheduled.",
        m.retries,
    );
    t.one(
        "runlane_expired_total",
        "counter",
        "Runs expired before any lease (TTL).",
        m.expired,
    );
    t.one(
        "runlane_lease_losses_total",
        "counter",
        "Leases that lapsed.",
        m.lease_losses,
    );
    t.one(
        "runlane_timed_out_total",
        "counter",
        "Attempts past their max duration.",
        m.timed_out,
    );

    t.one(
        "runlane_claimed_on_enqueue_total",
        "counter",
        "Leases granted inside a trigger's enqueue to an idle workloop of this process.",
        m.claimed_on_enqueue,
    );
    t.one(
        "runlane_claimed_delivered_total",
        "counter",
        "Leases another process's enqueue made for an idle workloop's parked offer here.",
        m.claimed_delivered,
    );
    t.one(
        "runlane_read_ahead_total",
        "counter",
        "Runs whose read ahead of their claim was sent (another process's doorbell named them).",
        m.read_ahead,
    );
    t.one(
        "runlane_read_ahead_used_total",
        "counter",
        "Claimed runs started from a read ahead (no read after the claim).",
        m.read_ahead_used,
    );
    t.one(
        "runlane_schedule_ticks_fired_total",
        "counter",
        "Schedule ticks this process fired (each a new run with source scheduled).",
        m.schedule_ticks_fired,
    );
    t.one(
        "runlane_schedule_ticks_refused_total",
        "counter",
        "Schedule ticks skipped because their trigger was refused.",
        m.schedule_ticks_refused,
    );

    let name = "runlane_start_latency_seconds";
    t.head(
        name,
        "histogram",
        "Due (trigger or run_at) to claimed, first attempts.",
    );
    let mut cumulative = 0u64;
    for (i, bound) in START_LATENCY_BUCKETS_MS.iter().enumerate() {
        cumulative += m.start_latency_counts.get(i).copied().unwrap_or(0);
        let le = format!("{}", *bound as f64 / 1000.0);
        t.line(&format!("{name}_bucket"), &[("le", &le)], cumulative);
    }
    cumulative += m
        .start_latency_counts
        .get(START_LATENCY_BUCKETS_MS.len())
        .copied()
        .unwrap_or(0);
    t.line(&format!("{name}_bucket"), &[("le", "+Inf")], cumulative);
    let _ = writeln!(t.0, "{name}_sum {}", m.start_latency_sum_ms as f64 / 1000.0);
    let _ = writeln!(t.0, "{name}_count {cumulative}");

    let envs = engine.envs().await?;
    t.head("runlane_env_limit", "gauge", "An env's concurrency limit.");
    for (env, s) in &envs {
        t.line("runlane_env_limit", &[("env", env.as_str())], s.limit);
    }
    let mut queues = Vec::new();
    for (env, _) in &envs {
        for q in engine.queues(env.as_str()).await? {
            queues.push(q);
        }
    }
    t.head(
        "runlane_env_running",
        "gauge",
        "Runs of an env holding slots (ready and executing).",
    );
    for (env, _) in &envs {
        let running: u64 = queues
            .iter()
            .filter(|q| &q.env == env)
            .map(|q| q.running)
            .sum();
        t.line("runlane_env_running", &[("env", env.as_str())], running);
    }
    for (metric, help) in [
        ("runlane_queue_delayed", "Delayed runs of a queue."),
        (
            "runlane_queue_queued",
            "Queued runs of a queue (waiting for admission).",
        ),
        ("runlane_queue_running", "Runs of a queue holding slots."),
        (
            "runlane_queue_limit",
            "A queue's per-key limit (absent: the env limit).",
        ),
        ("runlane_queue_paused", "1 when a queue is paused."),
    ] {
        t.head(metric, "gauge", help);
        for q in &queues {
            let labels = [("env", q.env.as_str()), ("queue", q.name.as_str())];
            let value = match metric {
                "runlane_queue_delayed" => Some(q.delayed),
                "runlane_queue_queued" => Some(q.queued),
                "runlane_queue_running" => Some(q.running),
                "runlane_queue_limit" => q.settings.limit.map(u64::from),
                _ => Some(u64::from(q.settings.paused)),
            };
            if let Some(v) = value {
                t.line(metric, &labels, v);
            }
        }
    }

    let lanes = engine.lanes().await?;
    t.head(
        "runlane_lane_ready",
        "gauge",
        "Ready runs waiting in a lane.",
    );
    for l in &lanes {
        t.line("runlane_lane_ready", &[("lane", l.name.as_str())], l.ready);
    }
    t.head(
        "runlane_lane_consumers",
        "gauge",
        "Consumers whose chain covers a lane.",
    );
    for l in &lanes {
        t.line(
            "runlane_lane_consumers",
            &[("lane", l.name.as_str())],
            l.consumers,
        );
    }
    let orphans = lanes.iter().filter(|l| l.orphan_since.is_some()).count();
    t.one(
        "runlane_orphan_lanes",
        "gauge",
        "Lanes holding ready runs with no consumer.",
        orphans,
    );
    Ok(t.0)
}
