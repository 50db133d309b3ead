//! The scenario list, written once: stable ids, one-line descriptions, and the functions. The
//! [`crate::conformance_suite!`] macro expands it into one test per scenario, so a backend's
//! test file is one line; [`crate::SCENARIOS`] lists the ids for reports and docs.

/// Calls `$crate::$callback!` with `($($args)*)` followed by every scenario as
/// `(test_name, module::function, "ID", "description")`. Ids are stable: a scenario's id never
/// changes meaning; new scenarios take new ids.
#[doc(hidden)]
#[macro_export]
macro_rules! __with_scenarios {
    ($callback:ident ! ( $($args:tt)* )) => {
        $crate::$callback! { ($($args)*)
            (fp_01_fast_path_when_empty_and_open, fast_path::fp_01, "FP-01", "fast path taken when the queue key is empty and capacity is free: ready right after trigger"),
            (fp_02_slow_path_when_fast_path_off, fast_path::fp_02, "FP-02", "slow path (queued, then admitted) when the env's fast_path is off"),
            (fp_03_slow_path_behind_due_backlog, fast_path::fp_03, "FP-03", "slow path when the queue key has a due backlog; priority order kept within the key"),
            (fp_04_fast_path_past_delayed_runs, fast_path::fp_04, "FP-04", "fast path when the key only holds future-scored (delayed) runs"),
            (fp_05_slow_path_when_env_full, fast_path::fp_05, "FP-05", "slow path when the env concurrency is full"),
            (fp_06_fast_pathed_run_acked, fast_path::fp_06, "FP-06", "a fast-pathed run is acked: completed, slot released, next run admitted"),
            (fp_07_fast_pathed_run_nacked_retries, fast_path::fp_07, "FP-07", "a fast-pathed run that fails with attempts left waits again and retries"),
            (fp_08_fast_path_respects_key_limit, fast_path::fp_08, "FP-08", "the fast path respects per-key limits; other keys still fast-path"),
            (ord_01_priority_then_trigger_order, order::ord_01, "ORD-01", "runs of a key start by priority, then trigger order"),
            (ord_02_delayed_promoted_at_due_instant, order::ord_02, "ORD-02", "a delayed run is promoted at its due instant by exactly one timer wake-up"),
            (ord_03_retry_backoff_does_not_block, order::ord_03, "ORD-03", "a retry waiting for its backoff does not block due runs of its key"),
            (ord_04_idle_engine_never_wakes, order::ord_04, "ORD-04", "an idle engine never wakes; a trigger wakes the idle worker"),
            (lim_01_env_limit, limit::lim_01, "LIM-01", "the env limit is never exceeded; one release admits one run"),
            (lim_02_env_burst, limit::lim_02, "LIM-02", "the env x burst cap is floor(limit x burst)"),
            (lim_03_queue_key_limit, limit::lim_03, "LIM-03", "the per-key queue limit holds; other keys are admitted"),
            (lim_04_key_total_limit, limit::lim_04, "LIM-04", "key_total_limit caps a queue across keys, also after re-admission"),
            (lim_05_paused_queue, limit::lim_05, "LIM-05", "a paused queue admits nothing; resume admits at once"),
            (lim_06_freed_slot_admits_next, limit::lim_06, "LIM-06", "a freed slot admits the next run with no timer wake-up"),
            (lim_07_release_admits_other_queue, limit::lim_07, "LIM-07", "env limit 1, queues A and B: A's finish starts B's run"),
            (lim_08_fast_lane_limit, limit::lim_08, "LIM-08", "fast_lane runs start while the env is full, up to fast_lane_limit"),
            (lim_09_key_at_cap_never_blocks_others, limit::lim_09, "LIM-09", "a key at its cap never blocks other keys of its queue"),
            (lim_10_limit_raise_admits_at_once, limit::lim_10, "LIM-10", "raising an env or queue limit admits what now fits, at once"),
            (lane_01_filter_chain, lane::lane_01, "LANE-01", "a fast_lane filter chain only claims fast-lane runs (seed 001 step 6)"),
            (lane_02_preference_chain, lane::lane_02, "LANE-02", "manual>* claims manual first, then others oldest ready first (step 7)"),
            (lane_03_default_chain, lane::lane_03, "LANE-03", "a worker without workloops claims with manual>* and one slot (step 8)"),
            (lane_04_lane_added_later, lane::lane_04, "LANE-04", "a lane added after the worker started is reached by *"),
            (lane_05_workloop_slots, lane::lane_05, "LANE-05", "a workloop never holds more runs than its slots"),
            (lane_06_version_lock, lane::lane_06, "LANE-06", "runs locked to a version only go to workers serving it"),
            (lane_07_orphan_lane_ready_timeout, lane::lane_07, "LANE-07", "a ready run in a lane with no consumer returns to its queue after ready_timeout"),
            (lane_08_admission_wakes_other_lane, lane::lane_08, "LANE-08", "a release that admits a run in another lane wakes that lane's idle worker (its doorbell)"),
            (ver_01_promotion_moves_unlocked_triggers, version::ver_01, "VER-01", "a promotion changes the version new unlocked triggers take; locked triggers keep theirs"),
            (ver_02_versions_listed_and_shown_exactly, version::ver_02, "VER-02", "versions are listed in order with their times; show returns the definition exactly"),
            (ttl_01_expiry_while_delayed, ttl::ttl_01, "TTL-01", "a delayed run past its deadline expires in one wake-up, never admitted"),
            (ttl_02_expiry_while_queued, ttl::ttl_02, "TTL-02", "a queued run expires at its deadline, one wake-up at that instant"),
            (ttl_03_expiry_while_ready_releases_slot, ttl::ttl_03, "TTL-03", "a ready run expires releasing its slot; the waiting run starts"),
            (ttl_04_never_expires_once_leased, ttl::ttl_04, "TTL-04", "a run that held a lease never expires, also while waiting to retry"),
            (ttl_05_deadline_rule, ttl::ttl_05, "TTL-05", "ttl_deadline = max(trigger, run_after) + ttl; a reschedule recomputes it"),
            (ttl_06_zero_ttl_refused, ttl::ttl_06, "TTL-06", "a zero TTL is refused naming ttl, at trigger and in a task definition"),
            (life_01_cancel_delayed, lifecycle::life_01, "LIFE-01", "cancel of a delayed run: canceled at once, gone, never starts"),
            (life_02_cancel_queued, lifecycle::life_02, "LIFE-02", "cancel of a queued run: canceled at once, gone from its queue"),
            (life_03_cancel_ready_releases_slot, lifecycle::life_03, "LIFE-03", "cancel of a ready run releases its slot to the waiting run"),
            (life_04_cancel_executing_grace_elapses, lifecycle::life_04, "LIFE-04", "cancel of an executing run: token Cancel; after grace canceled, late completion refused"),
            (life_05_completion_within_grace_wins, lifecycle::life_05, "LIFE-05", "a completion within the cancel grace period wins: completed"),
            (life_06_cancel_finished_refused, lifecycle::life_06, "LIFE-06", "cancel of a finished run: AlreadyFinished, nothing changes"),
            (life_07_lease_loss_recovered_stale_token_refused, lifecycle::life_07, "LIFE-07", "a lost lease is recovered (crashed attempt, retry); the stale token is refused"),
            (life_08_lease_loss_exhausted_fails, lifecycle::life_08, "LIFE-08", "a lost lease with no attempts left ends failed and frees its slot"),
            (life_09_max_duration, lifecycle::life_09, "LIFE-09", "an attempt past max duration is aborted and retried; exhausted → timed_out"),
            (life_10_manual_retry, lifecycle::life_10, "LIFE-10", "manual retry makes a new run (retry_of, source manual, lane manual)"),
            (life_11_cancel_idempotent, lifecycle::life_11, "LIFE-11", "a repeated cancel changes nothing and keeps the first grace deadline"),
            (life_12_expiry_idempotent, lifecycle::life_12, "LIFE-12", "an expiry is recorded once and absorbs later ticks and cancels"),
            (life_13_ack_idempotent, lifecycle::life_13, "LIFE-13", "an ack is recorded once; a repeated terminal write or finish is refused"),
            (life_14_reschedule, lifecycle::life_14, "LIFE-14", "reschedule moves delayed or queued runs; ready or executing runs are refused"),
            (life_15_lapse_after_cancel_ends_canceled, lifecycle::life_15, "LIFE-15", "a lease lapsing after a cancel ends the run canceled, never retried"),
            (life_16_cancel_mid_backlog, lifecycle::life_16, "LIFE-16", "cancel of a run in the middle of its key's backlog: the others start in order, it never does"),
            (life_17_nul_in_an_error, lifecycle::life_17, "LIFE-17", "an attempt's error holding a NUL is kept with U+FFFD and the run retries"),
            (idem_01_hit_returns_existing_run, idempotency::idem_01, "IDEM-01", "an idempotency hit returns the existing run whatever its state or payload"),
            (idem_02_batch_duplicates_collapse, idempotency::idem_02, "IDEM-02", "idempotency duplicates inside one batch collapse onto the first"),
            (idem_03_concurrent_triggers_one_run, idempotency::idem_03, "IDEM-03", "50 concurrent triggers with one key yield exactly one run"),
            (wait_01_completed_with_output, wait::wait_01, "WAIT-01", "trigger-and-wait returns the completed run with its output"),
            (wait_02_waits_through_retries, wait::wait_02, "WAIT-02", "trigger-and-wait waits through retries"),
            (wait_03_failed_with_error, wait::wait_03, "WAIT-03", "trigger-and-wait returns a failed run with its error"),
            (wait_04_timeout_pending_run_goes_on, wait::wait_04, "WAIT-04", "a wait that times out answers Pending and the run goes on"),
            (wait_05_wait_deadlock_refused, wait::wait_05, "WAIT-05", "waiting from a handler for a run needing its slot is WaitDeadlock"),
            (wait_06_finished_run_answers_at_once, wait::wait_06, "WAIT-06", "waiting on a finished run answers at once"),
            (wait_07_canceled_and_expired_answer, wait::wait_07, "WAIT-07", "a waited-on run that is canceled or expires answers Finished"),
            (cap_01_max_queued_refused, capacity::cap_01, "CAP-01", "a trigger over max_queued is refused with QueueFull and stores nothing"),
            (cap_02_sync_fast_lane_full_refused, capacity::cap_02, "CAP-02", "a sync trigger over fast_lane_limit is refused with FastLaneFull, not queued"),
            (drain_01_stop_releases_without_attempt, capacity::drain_01, "DRAIN-01", "stop releases unfinished runs to their queue without counting an attempt"),
            (drain_02_stop_waits_for_in_flight, capacity::drain_02, "DRAIN-02", "stop stops claiming and waits for in-flight runs"),
            (drain_03_drain_keeps_a_cancel, capacity::drain_03, "DRAIN-03", "a drain releasing a cancelled executing run ends it canceled, never back to its queue"),
            (fair_01_admission_round_robin, fairness::fair_01, "FAIR-01", "admission is round-robin across an env's queues: a flood does not starve a trickle"),
            (fair_02_claim_weighted_across_envs, fairness::fair_02, "FAIR-02", "claims are shared across envs by weight"),
            (fair_03_returning_key_waits_its_turn, fairness::fair_03, "FAIR-03", "a key returning to its queue's backlog goes behind the keys already waiting"),
            (fair_04_joining_key_behind_the_last_served, fairness::fair_04, "FAIR-04", "a key joining its queue's backlog goes behind the key served just before, whatever their names"),
            (fair_05_returning_queue_waits_its_turn, fairness::fair_05, "FAIR-05", "a queue returning to its env's backlog goes behind the queues already waiting"),
            (bad_01_task_name, invalid::bad_01, "BAD-01", "empty, oversized or malformed task names are refused naming task"),
            (bad_02_ttl_and_durations, invalid::bad_02, "BAD-02", "zero ttl, zero max_duration, zero attempts are refused naming the field"),
            (bad_03_priority_range, invalid::bad_03, "BAD-03", "a priority above 2,592,000 s is refused naming priority"),
            (bad_04_unknown_lane, invalid::bad_04, "BAD-04", "an unknown or malformed lane is refused naming lane"),
            (bad_05_malformed_workloops, invalid::bad_05, "BAD-05", "a malformed workloops spec is refused naming workloops"),
            (bad_06_unknown_version, invalid::bad_06, "BAD-06", "lock_to_version of an unknown version is refused with UnknownVersion"),
            (bad_07_strict_env_unknown_task, invalid::bad_07, "BAD-07", "a strict env refuses an unknown task with UnknownTask"),
            (bad_08_trigger_fields, invalid::bad_08, "BAD-08", "unknown env, malformed env/queue, oversized key or payload are refused"),
            (bad_09_batch_item, invalid::bad_09, "BAD-09", "a batch with one bad item is refused whole, naming the item"),
            (bad_10_settings, invalid::bad_10, "BAD-10", "bad env or queue settings are refused naming the field, unchanged"),
            (bad_11_env_exists, invalid::bad_11, "BAD-11", "creating an env that exists is refused with EnvExists, its settings unchanged"),
            (bad_12_nul_in_keys, invalid::bad_12, "BAD-12", "a concurrency or idempotency key holding a NUL is refused naming the field"),
            (sched_01_tick_fires_one_scheduled_run, schedule::sched_01, "SCHED-01", "a schedule's tick fires exactly one scheduled run at the tick, armed on the clock; the next tick is armed"),
            (sched_02_missed_ticks_fire_once, schedule::sched_02, "SCHED-02", "ticks missed while nothing ran fire once, for the latest missed tick"),
            (sched_03_promotion_replans, schedule::sched_03, "SCHED-03", "a promotion re-plans: a changed pattern arms its own tick, no schedules disarm"),
            (sched_04_cursor_compare_and_set, schedule::sched_04, "SCHED-04", "schedule cursors move by compare-and-set only; one of concurrent advances wins"),
            (sched_05_bad_schedule_refused, schedule::sched_05, "SCHED-05", "a version with a bad cron or time zone is refused naming the field"),
        }
    };
}

/// Expands the scenario list into one `#[tokio::test]` per scenario.
#[doc(hidden)]
#[macro_export]
macro_rules! __emit_tests {
    (($factory:expr) $( ($name:ident, $module:ident :: $func:ident, $id:literal, $desc:literal) ),* $(,)?) => {
        $(
            #[doc = $id]
            #[doc = ": "]
            #[doc = $desc]
            #[$crate::__tokio::test(flavor = "multi_thread", worker_threads = 2, crate = "::runlane_conformance::__tokio")]
            async fn $name() {
                let factory = $factory;
                $crate::$module::$func(&factory).await;
            }
        )*
    };
}

/// Expands the scenario list into `&[(id, description)]`.
#[doc(hidden)]
#[macro_export]
macro_rules! __emit_list {
    (() $( ($name:ident, $module:ident :: $func:ident, $id:literal, $desc:literal) ),* $(,)?) => {
        &[ $( ($id, $desc) ),* ]
    };
}

/// Expands the scenario list into a `match` on the id that runs the scenario.
#[doc(hidden)]
#[macro_export]
macro_rules! __emit_dispatch {
    (($b:expr, $wanted:expr) $( ($name:ident, $module:ident :: $func:ident, $id:literal, $desc:literal) ),* $(,)?) => {
        match $wanted {
            $( $id => { $crate::$module::$func($b).await; true } )*
            _ => false,
        }
    };
}

/// Expands to one `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` per scenario,
/// named after its id (e.g. `fp_01_fast_path_when_empty_and_open`), each opening fresh
/// backends from `factory` (an expression whose type implements
/// [`Backends`](crate::Backends), evaluated once per test).
///
/// ```text
/// runlane_conformance::conformance_suite!(MemoryBackends);
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::__with_scenarios!(__emit_tests!($factory));
    };
}
