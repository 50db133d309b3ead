#!/usr/bin/env python3
"""Mutation check: plant each deliberate bug, run the tests named to catch it, restore.

Usage: python3 scripts/mutants.py [MUTANT_ID ...]

Each mutant is a textual replacement in one source file. A mutant is *caught* when at least one
of its named test invocations fails. The file is always restored, even on Ctrl-C. Prints a
Markdown table: mutant, what it breaks, the tests run, caught or MISSED.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUEUE = "crates/runlane-memory/src/queue.rs"
ENGINE = "crates/runlane-engine/src/engine.rs"
LUA = "crates/runlane-redis/src/dispatch.lua"

CONFORMANCE = ["cargo", "test", "-q", "-p", "runlane", "--test", "conformance_memory", "--"]
# The Redis mutants (R*) run the same scenarios against the Redis backend (needs a Redis server:
# RUNLANE_REDIS_URL, default redis://127.0.0.1:6379).
CONFORMANCE_REDIS = ["cargo", "test", "-q", "-p", "runlane", "--test", "conformance_redis_memory", "--"]
CLAIM_ON_ENQUEUE_REDIS = ["cargo", "test", "-q", "-p", "runlane-redis", "--lib", "claim_on_enqueue"]
CLAIM_ON_ENQUEUE = ["cargo", "test", "-q", "-p", "runlane", "--test", "distributed_claim_on_enqueue"]
HEARTBEAT = ["cargo", "test", "-q", "-p", "runlane", "--test", "heartbeat"]
PARKED_REDIS = ["cargo", "test", "-q", "-p", "runlane-redis", "--lib", "parked_offer"]
BELLS = ["cargo", "test", "-q", "-p", "runlane", "--test", "distributed_bells", "--"]
PROPTEST = ["cargo", "test", "-q", "-p", "runlane-conformance", "--test", "model_vs_memory",
            "model_and_memory_backend_agree_after_every_step"]

MUTANTS = [
    {
        "id": "M1",
        "bug": "no promotion on ack",
        "file": QUEUE,
        "old": "            self.runs.remove(&run);\n            self.admit_env(&d.env, now, effects);",
        "new": "            self.runs.remove(&run);",
        "tests": [CONFORMANCE + ["lim_07"], CONFORMANCE + ["lim_06"], PROPTEST],
    },
    {
        "id": "M2",
        "bug": "env limit off by one",
        "file": QUEUE,
        "old": "env_running: env.running,",
        "new": "env_running: env.running.saturating_sub(1),",
        "all": True,
        "tests": [CONFORMANCE + ["lim_01"], PROPTEST],
    },
    {
        "id": "M3",
        "bug": "fencing check skipped",
        "file": QUEUE,
        "old": "Place::Leased(l) if l.token == token && (allow_lapsed || !l.lapsed) => Ok(entry),",
        "new": "Place::Leased(l) if allow_lapsed || !l.lapsed => Ok(entry),",
        "tests": [CONFORMANCE + ["life_07"], PROPTEST],
    },
    {
        "id": "M4",
        "bug": "fast path ignoring due backlog",
        "file": QUEUE,
        "old": "let fast = !delayed && fast_path_on && !backlog && !orphaned && admission.is_ok();",
        "new": "let fast = !delayed && fast_path_on && !orphaned && admission.is_ok();",
        "tests": [CONFORMANCE + ["fp_03"], PROPTEST],
    },
    {
        "id": "M5",
        "bug": "TTL expiry not releasing the slot",
        "file": QUEUE,
        "old": "            let d = entry.dispatch.clone();\n            st.unplace_waiting(run);\n            st.ttl.remove(&(at, run));",
        "new": "            let d = entry.dispatch.clone();\n            let was_ready = matches!(entry.place, Place::Ready { .. });\n            st.unplace_waiting(run);\n            if was_ready {\n                st.take_slots(&d);\n            }\n            st.ttl.remove(&(at, run));",
        "tests": [CONFORMANCE + ["ttl_03"], PROPTEST],
    },
    {
        "id": "M6",
        "bug": "a lost wake-up (admissions do not ring the lane doorbell)",
        "file": ENGINE,
        "old": "        for lane in &effects.ready_lanes {\n            self.bells.ring(lane);\n        }",
        "new": "        let _ = &effects.ready_lanes;",
        "tests": [CONFORMANCE + ["ord_02"], CONFORMANCE + ["lim_07"], CONFORMANCE + ["lane_08"]],
    },
    {
        "id": "M7",
        "bug": "promotion only within the same queue",
        "file": QUEUE,
        # The admission pass after a finish only looks at the finished run's own queue.
        "old": "            self.runs.remove(&run);\n            self.admit_env(&d.env, now, effects);",
        "new": "            self.runs.remove(&run);\n            self.only_queue = Some(d.queue.clone());\n            self.admit_env(&d.env, now, effects);\n            self.only_queue = None;",
        "extra": [
            ("    consumer_seq: u64,\n}", "    consumer_seq: u64,\n    only_queue: Option<QueueName>,\n}"),
            ("                consumer_seq: 0,\n", "                consumer_seq: 0,\n                only_queue: None,\n"),
            ("            for qname in &env.backlog_queues {\n",
             "            for qname in env.backlog_queues.iter().filter(|q| self.only_queue.as_ref().is_none_or(|o| o == *q)) {\n"),
        ],
        "tests": [CONFORMANCE + ["lim_07"], CONFORMANCE + ["fair_01"], PROPTEST],
    },
    # The same bugs planted in the Redis dispatch script.
    {
        "id": "R1",
        "bug": "no promotion on ack (Redis)",
        "file": LUA,
        "old": "  end_lease(id, r)\n  del_run(id)\n  admit_env(r[F_ENV])",
        "new": "  end_lease(id, r)\n  del_run(id)",
        "tests": [CONFORMANCE_REDIS + ["lim_07"], CONFORMANCE_REDIS + ["lim_06"]],
    },
    {
        "id": "R2",
        "bug": "env limit off by one (Redis)",
        "file": LUA,
        "old": "  elseif num(E[4]) >= tonumber(E[2]) then",
        "new": "  elseif num(E[4]) > tonumber(E[2]) then",
        "tests": [CONFORMANCE_REDIS + ["lim_01"]],
    },
    {
        "id": "R3",
        "bug": "fencing check skipped (Redis)",
        "file": LUA,
        "old": "if r[F_PLACE] == 'l' and r[F_TOKEN] == token and (allow_lapsed or not r[F_LAPSED]) then",
        "new": "if r[F_PLACE] == 'l' and (allow_lapsed or not r[F_LAPSED]) then",
        "tests": [CONFORMANCE_REDIS + ["life_07"]],
    },
    {
        "id": "R4",
        "bug": "fast path ignoring due backlog (Redis)",
        "file": LUA,
        "old": "fast_path_on and backlog == 0 and",
        "new": "fast_path_on and",
        "tests": [CONFORMANCE_REDIS + ["fp_03"]],
    },
    {
        "id": "R5",
        "bug": "TTL expiry not releasing the slot (Redis)",
        "file": LUA,
        "old": "        if live then\n          unplace_waiting(id, r)\n          if r[F_PLACE] ~= 'Q' then del_run(id) end",
        "new": "        if live then\n          local was = r[F_PLACE]\n          unplace_waiting(id, r)\n          if was == 'r' then take_slots(r) end\n          if r[F_PLACE] ~= 'Q' then del_run(id) end",
        "tests": [CONFORMANCE_REDIS + ["ttl_03"]],
    },
    {
        "id": "R6",
        "bug": "a claimed run keeps its TTL deadline (Redis)",
        "file": LUA,
        # The claim no longer drops the run's TTL bucket entry, and the sweep no longer checks
        # that an entry's run never held a lease: a claimed run with a TTL expires.
        "old": "      if r[F_TTL] and not was_leased then ttl_drop(id, r[F_TTL]) end\n",
        "new": "",
        "extra": [("return id, r, deadline, r and r[F_TTL] == deadline and not r[F_EVER], loc",
                   "return id, r, deadline, r and r[F_TTL] == deadline, loc")],
        "tests": [CONFORMANCE_REDIS + ["ttl_04"]],
    },
    # Key-space format 3: a run removed out of order from its key's list is a tombstone.
    {
        "id": "R7",
        "bug": "tombstones ignored at the list head: a canceled queued run is admitted (Redis)",
        "file": LUA,
        "old": "    if not (tombs and redis.call('SREM', kt, id) == 1) then",
        "new": "    if true then",
        "tests": [CONFORMANCE_REDIS + ["life_16"], CONFORMANCE_REDIS + ["life_02"]],
    },
    # Claim on enqueue: the claim an enqueue carries for an idle workloop.
    {
        "id": "R8",
        "bug": "an enqueue drops the claim it carries (Redis)",
        "file": LUA,
        "old": "      leased = claim_runs(ARGV, 11, #ARGV, 0)",
        "new": "      leased = {}",
        "tests": [CLAIM_ON_ENQUEUE_REDIS, CLAIM_ON_ENQUEUE],
    },
    {
        "id": "R9",
        "bug": "the carried claim loses its last served env (Redis)",
        "file": LUA,
        "old": "      leased = claim_runs(ARGV, 11, #ARGV, 0)",
        "new": "      leased = claim_runs(ARGV, 11, #ARGV - 2, 0)",
        "tests": [CLAIM_ON_ENQUEUE_REDIS],
    },
    {
        "id": "R10",
        "bug": "a lane the carried claim emptied still rings its doorbells (Redis)",
        "file": LUA,
        "old": "if num(redis.call('HGET', k_l(lane), 'count')) > 0 then keep[#keep + 1] = lane end",
        "new": "keep[#keep + 1] = lane",
        "tests": [CLAIM_ON_ENQUEUE_REDIS, CLAIM_ON_ENQUEUE],
    },
    {
        "id": "R11",
        "bug": "a heartbeat that ran late shortens its lease (Redis)",
        "file": LUA,
        "old": "if ldl > r[F_LDL] then",
        "new": "if ldl > 0 then",
        "tests": [HEARTBEAT],
    },
    {
        "id": "R12",
        "bug": "a bell names a run its call's carried claim took (Redis)",
        "file": LUA,
        "old": "      if not took[id] then",
        "new": "      if true then",
        "tests": [CLAIM_ON_ENQUEUE_REDIS],
    },
    {
        "id": "R13",
        "bug": "a lane's bell names the runs of other lanes (Redis)",
        "file": LUA,
        "old": "        if fx_ready_lane[i] == lane then ids[#ids + 1] = id end",
        "new": "        ids[#ids + 1] = id",
        "tests": [CLAIM_ON_ENQUEUE_REDIS],
    },
    {
        "id": "M8",
        "bug": "a read ahead kept past its run's start (engine)",
        "file": "crates/runlane-engine/src/handover.rs",
        "old": "        if st.runs.get(&run).is_some_and(|(_, ahead)| *ahead) {",
        "new": "        if false {",
        "tests": [["cargo", "test", "-q", "-p", "runlane-engine", "--lib", "handover"]],
    },
    {
        "id": "P1",
        "bug": "a withdrawn offer answers leases its workloop heard of (Redis)",
        "file": LUA,
        "old": "  if o[2] ~= false or (heard and o[1] == seq) or type(o[4]) ~= 'table' then return {} end",
        "new": "  if o[2] ~= false or type(o[4]) ~= 'table' then return {} end",
        "tests": [PARKED_REDIS],
    },
    {
        "id": "P2",
        "bug": "a withdrawn offer answers a run no longer held under its lease (Redis)",
        "file": LUA,
        "old": "    if r and r[F_PLACE] == 'l' and r[F_TOKEN] == t[i + 1] and not r[F_LAPSED] then",
        "new": "    if r then",
        "tests": [PARKED_REDIS],
    },
    {
        "id": "P3",
        "bug": "a carried claim leases although another enqueue took its parked twin (Redis)",
        "file": LUA,
        "old": "  if o[2] == false then return false end",
        "new": "  if false then return false end",
        "tests": [PARKED_REDIS],
    },
    {
        "id": "P4",
        "bug": "an offer past its deadline is taken, a dead process's entry kept (Redis)",
        "file": LUA,
        "old": "    if type(until_ms) ~= 'number' or type(args) ~= 'table' or until_ms <= now then",
        "new": "    if type(until_ms) ~= 'number' or type(args) ~= 'table' then",
        "tests": [PARKED_REDIS],
    },
    {
        "id": "P9",
        "bug": "a withdrawn offer answers a lapsed lease (Redis)",
        "file": LUA,
        "old": "    if r and r[F_PLACE] == 'l' and r[F_TOKEN] == t[i + 1] and not r[F_LAPSED] then",
        "new": "    if r and r[F_PLACE] == 'l' and r[F_TOKEN] == t[i + 1] then",
        "tests": [PARKED_REDIS],
    },
    {
        "id": "P10",
        "bug": "a failed claim forgets which delivery was heard (engine)",
        "file": "crates/runlane-engine/src/worker.rs",
        "old": "        (None, Some(before), _) => Some(before),",
        "new": "        (None, Some(_), Some(seq)) => Some((seq, false)),\n        (None, Some(before), None) => Some(before),",
        "tests": [["cargo", "test", "-q", "-p", "runlane-engine", "--lib", "parked_after"]],
    },
    {
        "id": "P5",
        "bug": "runs leased for parked offers still ring their lanes (Redis)",
        "file": LUA,
        "old": "      drop_taken(remote)\n      -- A run leased here for a parked offer",
        "new": "      -- A run leased here for a parked offer",
        "tests": [PARKED_REDIS],
    },
    {
        "id": "P11",
        "bug": "a run leased for a parked offer is reported ready (its trigger publishes a late `ready`) (Redis)",
        "file": LUA,
        "old": "        if remote[fx_moved[i - 1]] then fx_moved[i] = 'executing' end",
        "new": "        if false then fx_moved[i] = 'executing' end",
        "tests": [PARKED_REDIS],
    },
    {
        "id": "P6",
        "bug": "a delivery is not handed to the engine (bell reader)",
        "file": "crates/runlane-distributed/src/bells.rs",
        "old": "                        engine.offer_delivered((d.consumer, d.seq), d.runs);",
        "new": "                        let _ = d;",
        "tests": [BELLS + ["starts_a_run_the_trigger"]],
    },
    {
        "id": "P7",
        "bug": "a heard delivery is withdrawn as unheard (engine)",
        "file": "crates/runlane-engine/src/worker.rs",
        "old": "parked = parked.map(|(s, _)| (s, true));",
        "new": "parked = parked.map(|(s, _)| (s, false));",
        "tests": [BELLS + ["a_delivered_lease_runs_once"]],
    },
    {
        "id": "P8",
        "bug": "a trigger does not send what the worker needs (engine)",
        "file": "crates/runlane-engine/src/trigger.rs",
        "old": "            Some(handed.encode().unwrap_or_default())",
        "new": "            Some(Vec::new())",
        "tests": [BELLS + ["starts_a_run_the_trigger"]],
    },
    {
        "id": "W1",
        "bug": "a workloop ends without waiting for the read of its last claim's runs (they start after the drain)",
        "file": "crates/runlane-engine/src/worker.rs",
        "old": "    if let Some(previous) = loading.take() {\n        let _ = previous.await;\n    }\n    if let Some(last) = parked {",
        "new": "    drop(loading.take());\n    if let Some(last) = parked {",
        "tests": [["cargo", "test", "-q", "-p", "runlane-engine", "--test", "held_read"]],
    },
    {
        "id": "W2",
        "bug": "a distributed queue without doorbell readers parks offers (their leases wait for a refresh)",
        "file": "crates/runlane-distributed/src/queue.rs",
        "old": "        self.bells.is_some()",
        "new": "        true",
        "tests": [["cargo", "test", "-q", "-p", "runlane", "--test", "conformance_distributed", "--", "a_queue_without_doorbell_readers_parks_no_offers"]],
    },
    {
        "id": "K1",
        "bug": "a key joining its queue's backlog keeps its old stamp (memory): a returning key jumps ahead",
        "file": QUEUE,
        "old": "                ks.last_served = self.serve_counter + 1;\n",
        "new": "",
        "tests": [CONFORMANCE + ["fair_03"], CONFORMANCE + ["fair_04"], PROPTEST],
    },
    {
        "id": "K2",
        "bug": "a queue joining its env's backlog keeps its old stamp (memory)",
        "file": QUEUE,
        "old": "                queue.last_served = self.serve_counter + 1;\n",
        "new": "",
        "tests": [CONFORMANCE + ["fair_05"], PROPTEST],
    },
    {
        "id": "K3",
        "bug": "a key joining its queue's backlog keeps its old stamp (Redis)",
        "file": LUA,
        "old": "    redis.call('HSET', kk, 'served', stamp)\n",
        "new": "",
        "tests": [CONFORMANCE_REDIS + ["fair_03"], CONFORMANCE_REDIS + ["fair_04"]],
    },
    {
        "id": "K4",
        "bug": "a key leaving the backlog keeps its stamp and list bookkeeping in Redis (memory that only grows)",
        "file": LUA,
        "old": "  drop_backlog_fields(kk)\n  redis.call('SREM', k_bk(e, q), k)",
        "new": "  redis.call('SREM', k_bk(e, q), k)",
        "tests": [["cargo", "test", "-q", "-p", "runlane-redis", "--lib", "key_state"]],
    },
    {
        "id": "K5",
        "bug": "an idle key state is kept in memory (memory that only grows)",
        "file": QUEUE,
        "old": "        self.queued.is_empty() && self.delayed == 0 && self.running == 0\n",
        "new": "        self.queued.is_empty() && self.delayed == 0 && self.running == 0 && self.last_served == 0\n",
        "tests": [["cargo", "test", "-q", "-p", "runlane-memory", "--lib", "a_key_leaves_no_state"], PROPTEST],
    },
    {
        "id": "W3",
        "bug": "a workloop keeps parking offers after its process's doorbell readers ended (leases for it wait on unread bells)",
        "file": "crates/runlane-engine/src/worker.rs",
        "old": "let park = parks && engine.queue.hears_deliveries();",
        "new": "let park = parks;",
        "tests": [["cargo", "test", "-q", "-p", "runlane", "--test", "distributed_bells", "--", "a_process_whose_bell_readers_ended_parks_no_more_offers"]],
    },
    {
        "id": "W4",
        "bug": "a workloop deaf to other processes waits only for bells, which never come, instead of claiming at each refresh",
        "file": "crates/runlane-engine/src/worker.rs",
        "old": "refresh: twin.is_some() || deaf,",
        "new": "refresh: twin.is_some(),",
        "tests": [["cargo", "test", "-q", "-p", "runlane", "--test", "distributed_bells", "--", "a_process_whose_bell_readers_ended_parks_no_more_offers"]],
    },
    {
        "id": "W5",
        "bug": "a process whose doorbell readers ended stops leasing for other processes' parked offers in its triggers",
        "file": "crates/runlane-engine/src/trigger.rs",
        "old": "let sent = if inner.queue.parks_offers() && inner.queue.claims_on_enqueue_now() {",
        "new": "let sent = if inner.queue.hears_deliveries() && inner.queue.parks_offers() && inner.queue.claims_on_enqueue_now() {",
        "tests": [["cargo", "test", "-q", "-p", "runlane", "--test", "distributed_bells", "--", "a_process_whose_bell_readers_ended_parks_no_more_offers"]],
    },
]


def run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc.returncode


def apply(m, text):
    if m["old"] not in text:
        raise SystemExit(f"{m['id']}: pattern not found in {m['file']}")
    out = text.replace(m["old"], m["new"]) if m.get("all") else text.replace(m["old"], m["new"], 1)
    for old, new in m.get("extra", []):
        if old not in out:
            raise SystemExit(f"{m['id']}: extra pattern not found in {m['file']}")
        out = out.replace(old, new, 1)
    return out


def main():
    wanted = set(sys.argv[1:])
    rows = []
    for m in MUTANTS:
        if wanted and m["id"] not in wanted:
            continue
        path = ROOT / m["file"]
        original = path.read_text()
        try:
            path.write_text(apply(m, original))
            caught_by = []
            for cmd in m["tests"]:
                name = cmd[-1] if cmd[-1] != "--" else "?"
                if run(cmd) != 0:
                    caught_by.append(name)
            verdict = "caught" if caught_by else "MISSED"
            rows.append((m["id"], m["bug"], ", ".join(c[-1] for c in m["tests"]), ", ".join(caught_by) or "-", verdict))
            print(f"{m['id']}: {verdict} by {caught_by}", file=sys.stderr, flush=True)
        finally:
            path.write_text(original)
    print("| mutant | planted bug | tests run | failing tests | verdict |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0 if all(r[4] == "caught" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
