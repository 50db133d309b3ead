#!lua name=__RUNLANE_LIBRARY__
-- runlane dispatch library: every QueueBackend step as one atomic function call (SPEC §3).
--
-- A Redis function library (`FUNCTION LOAD`; the client fills in its name and the function's,
-- both derived from a hash of this source): the helpers below are created once, when the
-- library loads, not at every call as a script's would be; each call (`FCALL`) sets the
-- per-call values (`setup`) and runs its operation (`OPS`).
--
-- KEYS[1] is the deployment's key base `{prefix}`; every key this library touches starts with
-- it, so all of them hash to one slot (one shard on Redis Cluster).
-- ARGV[1] = operation, ARGV[2] = now (ms, from the engine clock), ARGV[3] = ready_timeout (ms),
-- ARGV[4] = format version expected by the client, ARGV[5] = generation expected ("" = any),
-- ARGV[6..] = the operation's arguments. The answer is one MessagePack blob:
-- { code, moved = {id, status, ...}, lanes = {...}, deadline (-1 = none), extra... }.
--
-- Key-space format 3. A due run enqueued in order (the common case) is only its compact message,
-- the entry of its key's FIFO list (`{p}:kl:…`): no record, no id index while it waits there.
-- Every other run (delayed, in a key's zset, ready, leased) is one compact record (MessagePack
-- array) in the hashes `{p}:run:<bucket>`; zsets and lanes hold its 16-byte run id. TTL buckets
-- hold the id and 2 bytes of the deadline's milliseconds, and for a list-resident run where to
-- find it (its key's interned id and its append number in the key's list).

-- Per call (set by `setup`): the arguments, the key base and what derives from them.
local KEYS, ARGV, P, op, now, ready_timeout, FORMAT, GEN
local STRIDE = 1000000
local Z = '\0'

-- `t[k]`, a table created (and kept in `t`) on first use.
local function subtable(t, k)
  local v = t[k]
  if not v then
    v = {}
    t[k] = v
  end
  return v
end

local K_CFG
-- Run records live in 4,096 small hashes chosen by the low 12 bits of the run id (its counter
-- bits), so each stays listpack-encoded (about 25 records at 100,000 runs).
local RUN_BUCKETS = 4096
-- The bucket key names of the current key base, built once each (a number's conversion to a
-- string costs a `sprintf`); emptied by `setup` when the key base changes.
local run_keys = {}
local function k_run(id)
  local hi, lo = string.byte(id, 15, 16)
  local b = (hi % 16) * 256 + lo
  local key = run_keys[b]
  if not key then
    key = P .. ':run:' .. b
    run_keys[b] = key
  end
  return key
end
local K_ENVS
local K_LANES
local K_CONS
local K_DELAYED
-- Format 1 kept TTL deadlines in this zset (one member per run); `init` moves them to buckets.
local K_TTL
local K_LEASE
local K_ATT
local K_CXL

local function k_env(e) return P .. ':e:' .. e end
local function k_qs(e) return P .. ':qs:' .. e end
local function k_q(e, q) return P .. ':q:' .. e .. Z .. q end
local function k_k(e, q, k) return P .. ':k:' .. e .. Z .. q .. Z .. k end
local function k_kq(e, q, k) return P .. ':kq:' .. e .. Z .. q .. Z .. k end
local function k_kl(e, q, k) return P .. ':kl:' .. e .. Z .. q .. Z .. k end
-- The ids of a key's list entries removed out of order (tombstones), dropped at the list head.
local function k_kt(e, q, k) return P .. ':kt:' .. e .. Z .. q .. Z .. k end
-- Interned key ids (`{p}:k:….id`) → `env \0 queue \0 key`, for TTL bucket entries of list-resident runs.
local K_KN
local K_OFFERS
local function k_bq(e) return P .. ':bq:' .. e end
local function k_bk(e, q) return P .. ':bk:' .. e .. Z .. q end
local function k_l(l) return P .. ':l:' .. l end
local function k_lp(l) return P .. ':lp:' .. l end
local function k_le(l) return P .. ':le:' .. l end
local function k_lr(l, e) return P .. ':lr:' .. l .. Z .. e end

-- TTL deadlines (format 2) in per-second buckets instead of a zset member per run:
-- `{p}:tb:<s>` is a list of 18-byte entries (run id, then the deadline's milliseconds within
-- second `s` as 2 bytes) of the runs whose deadline falls in second `s` (ms // 1000),
-- `{p}:tbz` a zset of the buckets scored by the earliest deadline they may hold (kept with
-- `ZADD LT`, so never later than the earliest live one), `{p}:tbn` per bucket `s` its live count
-- and, as `s`..'t', the deadline last appended (or `u` once an append broke deadline order).
-- An entry is live while its run still waits with exactly that deadline; a run that stops
-- waiting only decrements its bucket's count (no `LREM`); a bucket whose count
-- reaches zero is deleted whole. Expiry is exact to the millisecond: the sweep pops the due runs
-- from the head of a bucket in deadline order (the common case: TTL = trigger + a constant); a
-- bucket out of order is taken whole once and its remaining runs go back sorted.
local K_TBZ
local K_TBN
local function k_tb(s) return P .. ':tb:' .. s end
local function ttl_bucket(deadline) return string.format('%d', math.floor(deadline / 1000)) end

-- `loc`: for a list-resident run, where its list entry is (`listed_loc`), else nil.
local function ttl_add(id, deadline, loc)
  local s = ttl_bucket(deadline)
  local off = deadline - tonumber(s) * 1000
  redis.call('RPUSH', k_tb(s), id .. string.char(math.floor(off / 256), off % 256) .. (loc or ''))
  redis.call('HINCRBY', K_TBN, s, 1)
  local tail = redis.call('HGET', K_TBN, s .. 't')
  if tail ~= 'u' and (not tail or tonumber(tail) <= deadline) then
    redis.call('HSET', K_TBN, s .. 't', string.format('%d', deadline))
  else
    redis.call('HSET', K_TBN, s .. 't', 'u')
  end
  redis.call('ZADD', K_TBZ, 'LT', deadline, s)
end

local function ttl_forget(s)
  redis.call('HDEL', K_TBN, s, s .. 't')
  redis.call('DEL', k_tb(s))
  redis.call('ZREM', K_TBZ, s)
end

-- Record fields.
local F_ENV, F_QUEUE, F_KEY, F_LANE, F_PRIO, F_AFTER, F_TTL, F_ATTEMPT, F_LOCKED, F_EVER, F_MAXDUR =
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
-- Field 13 is unused since format 3 (format 2 marked a run once appended to its key's list).
local F_PLACE, F_LISTED, F_SEQ, F_RAT = 12, 13, 14, 15
local F_TOKEN, F_WORKER, F_LDUR, F_LDL, F_ADL, F_CRA, F_CDL, F_LAPSED = 16, 17, 18, 19, 20, 21, 22, 23
local NFIELDS = 23

-- Bytewise string order (Lua's `<` follows the locale).
local function lt(a, b)
  local la, lb = #a, #b
  local n = la
  if lb < n then n = lb end
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return la < lb
end

local function sorted(list)
  table.sort(list, lt)
  return list
end

local function load(id)
  local raw = redis.call('HGET', k_run(id), id)
  if not raw then return nil end
  return cmsgpack.unpack(raw)
end

-- `{p}:rb` holds every record bucket that may hold records (a bucket joins it with its first
-- record and stays), so a snapshot reads only those. A bucket that empties stays a member: a
-- run's end is one `HDEL`, no `HLEN` to find out whether its bucket emptied (older processes
-- removed an empty bucket; reading an empty one costs a snapshot nothing).
local K_RB
local function del_run(id)
  redis.call('HDEL', k_run(id), id)
end

local function score_of(r)
  return r[F_AFTER] - r[F_PRIO]
end

-- Stores a record: the score is derived (never stored) and trailing absent fields are dropped,
-- so a pending run's record stops at its place.
-- The record is packed in place (no copy): absent fields up to the last one set are `false`,
-- the trailing ones are cleared (nil and false read the same everywhere).
local function save(id, r)
  local n = 0
  for i = NFIELDS, 1, -1 do
    local v = r[i]
    if v ~= nil and v ~= false then
      n = i
      break
    end
  end
  for i = 1, n do
    if r[i] == nil then r[i] = false end
  end
  for i = n + 1, NFIELDS do
    if r[i] ~= nil then r[i] = nil end
  end
  local packed = cmsgpack.pack(r)
  if redis.call('HSET', k_run(id), id, packed) == 1 then
    local hi, lo = string.byte(id, 15, 16)
    redis.call('SADD', K_RB, (hi % 16) * 256 + lo)
  end
  return packed
end

local function num(v)
  if not v then return 0 end
  return tonumber(v)
end

-- Messages (format 3) -----------------------------------------------------------------------

-- A list-resident run's list entry: message version, flags, the 16-byte run id, `run_after`
-- (6 bytes, ms), then only the facts that differ from the common case, in flag order: TTL
-- deadline (6), priority (6, ms), attempt (4, when not 1), locked version (4), max duration (6,
-- ms), lane (2-byte length + name, when not `default`); flag 32 = ever leased. Env, queue and
-- key are those of the list it sits in.
local MSG_VERSION = 3
local DEFAULT_LANE = 'default'
local M_TTL, M_PRIO, M_ATT, M_LOCK, M_MAXD, M_EVER, M_LANE = 1, 2, 4, 8, 16, 32, 64

local function has(flags, bitv) return math.floor(flags / bitv) % 2 == 1 end

local function msg_pack(id, r)
  local flags, tail = 0, {}
  local function add(bitv, fmt, v)
    flags = flags + bitv
    tail[#tail + 1] = struct.pack(fmt, v)
  end
  if r[F_TTL] then add(M_TTL, '>I6', r[F_TTL]) end
  if r[F_PRIO] ~= 0 then add(M_PRIO, '>I6', r[F_PRIO]) end
  if r[F_ATTEMPT] ~= 1 then add(M_ATT, '>I4', r[F_ATTEMPT]) end
  if r[F_LOCKED] then add(M_LOCK, '>I4', r[F_LOCKED]) end
  if r[F_MAXDUR] then add(M_MAXD, '>I6', r[F_MAXDUR]) end
  if r[F_EVER] then flags = flags + M_EVER end
  if r[F_LANE] ~= DEFAULT_LANE then
    add(M_LANE, '>I2', #r[F_LANE])
    tail[#tail + 1] = r[F_LANE]
  end
  return string.char(MSG_VERSION, flags) .. id .. struct.pack('>I6', r[F_AFTER]) .. table.concat(tail)
end

-- The id of a list entry.
local function msg_id(m) return string.sub(m, 3, 18) end

-- A list entry of key (e, q, k) as its run id and a record (place `Q`, list-resident).
local function msg_unpack(m, e, q, k)
  local flags = string.byte(m, 2)
  local after, pos = struct.unpack('>I6', m, 19)
  local r = { e, q, k, DEFAULT_LANE, 0, after, false, 1, false, false, false, 'Q' }
  if flags ~= 0 then
    if has(flags, M_TTL) then r[F_TTL], pos = struct.unpack('>I6', m, pos) end
    if has(flags, M_PRIO) then r[F_PRIO], pos = struct.unpack('>I6', m, pos) end
    if has(flags, M_ATT) then r[F_ATTEMPT], pos = struct.unpack('>I4', m, pos) end
    if has(flags, M_LOCK) then r[F_LOCKED], pos = struct.unpack('>I4', m, pos) end
    if has(flags, M_MAXD) then r[F_MAXDUR], pos = struct.unpack('>I6', m, pos) end
    if has(flags, M_EVER) then r[F_EVER] = true end
    if has(flags, M_LANE) then
      local n
      n, pos = struct.unpack('>I2', m, pos)
      r[F_LANE] = string.sub(m, pos, pos + n - 1)
    end
  end
  return msg_id(m), r
end

-- Big-endian unsigned integers of 1..6 bytes (the location part of a TTL bucket entry).
local function be_pack(v)
  local out = ''
  repeat
    out = string.char(v % 256) .. out
    v = math.floor(v / 256)
  until v == 0
  return out
end
local function be_unpack(str, from, n)
  local v = 0
  for i = from, from + n - 1 do v = v * 256 + string.byte(str, i) end
  return v
end

-- Where a list-resident run's entry is, as the suffix of its TTL bucket entry: one byte of
-- lengths, the key's interned id, the run's append number in the key's list (`lseq`).
local function listed_loc(kid, seq)
  local a, b = be_pack(kid), be_pack(seq)
  return string.char(#a * 16 + #b) .. a .. b
end

-- Splits `env \0 queue \0 key` (the key may hold NULs; env and queue names do not).
local function split_key(ekq)
  local i = string.find(ekq, Z, 1, true)
  local j = string.find(ekq, Z, i + 1, true)
  return string.sub(ekq, 1, i - 1), string.sub(ekq, i + 1, j - 1), string.sub(ekq, j + 1)
end

-- The list entry of a list-resident run from its location (key id, append number): its key,
-- its record (place `Q`) and its index in the list, or nil when it is no longer there (popped
-- at the head, the list emptied, or a tombstone).
local kn_cache = {}
local function listed_at(id, kid, seq)
  local ekq = kn_cache[kid]
  if ekq == nil then
    ekq = redis.call('HGET', K_KN, kid) or false
    kn_cache[kid] = ekq
  end
  if not ekq then return nil end
  local e, q, k = split_key(ekq)
  local kl = k_kl(e, q, k)
  local len = redis.call('LLEN', kl)
  if len == 0 then return nil end
  -- Entries are only appended (numbered by `lseq`) and popped at the head, so the head is
  -- number lseq - len + 1.
  local idx = seq - (num(redis.call('HGET', k_k(e, q, k), 'lseq')) - len + 1)
  if idx < 0 then return nil end
  local m = redis.call('LINDEX', kl, idx)
  if not m or msg_id(m) ~= id then return nil end
  if redis.call('SISMEMBER', k_kt(e, q, k), id) == 1 then return nil end
  local _, r = msg_unpack(m, e, q, k)
  return r
end

-- The run of a TTL bucket entry, its deadline, whether the entry is live (its run still waits,
-- never leased, with exactly that deadline) and the entry's location suffix.
local function ttl_entry(e, s)
  local id = string.sub(e, 1, 16)
  local hi, lo = string.byte(e, 17, 18)
  local deadline = tonumber(s) * 1000 + hi * 256 + lo
  local loc = string.sub(e, 19)
  local r = load(id)
  if not r and #loc > 0 then
    local h = string.byte(loc, 1)
    local la, lb = math.floor(h / 16), h % 16
    r = listed_at(id, be_unpack(loc, 2, la), be_unpack(loc, 2 + la, lb))
  end
  return id, r, deadline, r and r[F_TTL] == deadline and not r[F_EVER], loc
end

-- Rewrites bucket `s` with its live entries (but run `gone`'s) in deadline order.
local function ttl_resort(s, gone)
  local entries = redis.call('LRANGE', k_tb(s), 0, -1)
  ttl_forget(s)
  local seen, live = {}, {}
  for _, e in ipairs(entries) do
    local id, _, deadline, ok, loc = ttl_entry(e, s)
    if ok and id ~= gone and not seen[id] then
      seen[id] = true
      live[#live + 1] = { deadline, id, loc }
    end
  end
  table.sort(live, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return lt(a[2], b[2])
  end)
  for _, x in ipairs(live) do ttl_add(x[2], x[1], x[3]) end
end

-- Run `id` (deadline `deadline`) leaves its bucket. When it held the bucket's earliest deadline
-- the bucket is scored again exactly: a sorted bucket drops the dead entries at its head (each
-- entry is dropped once), an unsorted one is rewritten sorted.
local function ttl_drop(id, deadline)
  local s = ttl_bucket(deadline)
  if redis.call('HINCRBY', K_TBN, s, -1) <= 0 then
    ttl_forget(s)
    return
  end
  if tonumber(redis.call('ZSCORE', K_TBZ, s)) ~= deadline then return end
  if redis.call('HGET', K_TBN, s .. 't') == 'u' then
    ttl_resort(s, id)
    return
  end
  local kb = k_tb(s)
  while true do
    local e = redis.call('LINDEX', kb, 0)
    if not e then
      ttl_forget(s)
      return
    end
    local eid, _, d, live = ttl_entry(e, s)
    if live and eid ~= id then
      redis.call('ZADD', K_TBZ, d, s)
      return
    end
    redis.call('LPOP', kb)
  end
end

local function status_of(r)
  local p = r[F_PLACE]
  if p == 'd' then return 'delayed' elseif p == 'q' or p == 'Q' then return 'queued'
  elseif p == 'r' then return 'ready' else return 'executing' end
end

local fx_moved, fx_lanes, fx_rung = {}, {}, {}
-- The runs this call made ready, up to one more than `HINT_MAX` (more than that: no hint),
-- and the lane of each.
local fx_ready, fx_ready_lane = {}, {}
-- The parked offers this call's enqueue took: { consumer, seq, { { id, record, handed }, ... } }
-- each, and the lanes of the runs they leased (a set).
local fx_deliver, fx_deliver_lanes = {}, {}
local HINT_MAX = 4
local function moved(id, status)
  fx_moved[#fx_moved + 1] = id
  fx_moved[#fx_moved + 1] = status
end
-- Run `id` became ready on `lane`: the lane rings, naming the run while few did (see `bell`).
local function ring_ready(lane, id)
  if not fx_rung[lane] then
    fx_rung[lane] = true
    fx_lanes[#fx_lanes + 1] = lane
  end
  if #fx_ready <= HINT_MAX then
    fx_ready[#fx_ready + 1] = id
    fx_ready_lane[#fx_ready] = lane
  end
end

-- Consumers -------------------------------------------------------------------------------

local consumer_cache = nil
local function chains()
  if not consumer_cache then consumer_cache = redis.call('HVALS', K_CONS) end
  return consumer_cache
end
local function covers(chain, lane)
  if string.sub(chain, 1, 1) == 'P' then return true end
  return string.find(chain .. '>', '>' .. lane .. '>', 1, true) ~= nil
end
local function consumers_of(lane)
  local n = 0
  for _, c in ipairs(chains()) do
    if covers(c, lane) then n = n + 1 end
  end
  return n
end

-- Slots -----------------------------------------------------------------------------------

-- Counters never go below zero: `decr(key, field, n)` is `n` times "minus one when positive"
-- (one `HINCRBY`; a result below zero is put back to zero). Answers the new value.
local function decr(key, field, n)
  local v = redis.call('HINCRBY', key, field, -(n or 1))
  if v < 0 then
    redis.call('HINCRBY', key, field, -v)
    v = 0
  end
  return v
end

local function decr_floor(key, field)
  decr(key, field, 1)
end

-- `decr` of a queue key's hash `kk`: a counter brought to zero is removed (a missing field
-- reads as zero), and Redis drops the hash with its last field, so a key whose runs have all
-- ended (a user id as the key) leaves nothing behind.
local function decr_key(kk, field, n)
  if decr(kk, field, n) == 0 then redis.call('HDEL', kk, field) end
end

-- Whether an env exists, asked of Redis once per call.
local env_known = {}
local function env_exists(e)
  local v = env_known[e]
  if v == nil then
    v = redis.call('EXISTS', k_env(e)) == 1
    env_known[e] = v
  end
  return v
end

-- Batch mode (`enqueue_many`, while every run of the call goes the fast path): the env,
-- lane, key and queue hashes a placement reads are read once per call and kept in `bm` with
-- the call's own changes; the running counters, the lanes' ready counts and the ready sequence
-- are written once each, at the end (`bm_flush`), and a set member is added once. Nothing else
-- reads or writes those fields in between: any other placement flushes first and runs
-- without it. `bm` is nil outside a batch, where every helper is the plain command.
local bm = nil

local function bm_hash(key)
  local h = bm.hashes[key]
  if not h then
    h = {}
    bm.hashes[key] = h
  end
  return h
end

-- `HMGET key fields...`
local function hm(key, ...)
  if not bm then return redis.call('HMGET', key, ...) end
  local h = bm_hash(key)
  local fields = { ... }
  local missing = {}
  for _, f in ipairs(fields) do
    if h[f] == nil then missing[#missing + 1] = f end
  end
  if #missing > 0 then
    local got = redis.call('HMGET', key, unpack(missing))
    for i, f in ipairs(missing) do h[f] = got[i] end
  end
  local out = {}
  for i, f in ipairs(fields) do out[i] = h[f] end
  return out
end

-- `HINCRBY key field n`
local function hincr(key, field, n)
  if not bm then return redis.call('HINCRBY', key, field, n) end
  local h = bm_hash(key)
  if h[field] == nil then h[field] = redis.call('HGET', key, field) end
  local v = num(h[field]) + n
  h[field] = v
  local d = bm.deltas[key]
  if not d then
    d = {}
    bm.deltas[key] = d
    bm.order[#bm.order + 1] = key
  end
  if d[field] == nil then d[#d + 1] = field end
  d[field] = (d[field] or 0) + n
  return v
end

-- `SADD key member`
local function sadd(key, member)
  if bm then
    local k = key .. Z .. member
    if bm.sets[k] then return end
    bm.sets[k] = true
  end
  redis.call('SADD', key, member)
end

local function bm_start()
  bm = { hashes = {}, deltas = {}, order = {}, sets = {} }
end

-- Writes what the batch kept and leaves batch mode.
local function bm_flush()
  if not bm then return end
  for _, key in ipairs(bm.order) do
    local d = bm.deltas[key]
    for _, field in ipairs(d) do
      if d[field] ~= 0 then redis.call('HINCRBY', key, field, d[field]) end
    end
  end
  bm = nil
end

-- `listed_queue`: the run's queue is already in the env's queue set (it was queued there).
local function take_slots(r, listed_queue)
  local e = r[F_ENV]
  if not env_exists(e) then return end
  if r[F_LANE] == 'fast_lane' then
    hincr(k_env(e), 'flrun', 1)
  else
    hincr(k_env(e), 'run', 1)
  end
  if not listed_queue then sadd(k_qs(e), r[F_QUEUE]) end
  hincr(k_q(e, r[F_QUEUE]), 'run', 1)
  hincr(k_k(e, r[F_QUEUE], r[F_KEY]), 'run', 1)
end

-- Slot releases of one call, applied together by `flush_releases` (one `HINCRBY` per counter
-- touched instead of one per run and counter). Counted per key and env counter field (`run`,
-- or `flrun` for the fast lane) as the runs end; the queue and env counters are summed from
-- those at the flush.
-- `rel_by[field][env][queue][key]` = { env, queue, key, field, count }, `rel_order` the same
-- entries in the order the runs first touched them.
local rel_order, rel_by = {}, {}
local function release_slots_later(r)
  local e, q, k = r[F_ENV], r[F_QUEUE], r[F_KEY]
  local field = 'run'
  if r[F_LANE] == 'fast_lane' then field = 'flrun' end
  local tq = subtable(subtable(subtable(rel_by, field), e), q)
  local x = tq[k]
  if x then
    x[5] = x[5] + 1
  else
    x = { e, q, k, field, 1 }
    tq[k] = x
    rel_order[#rel_order + 1] = x
  end
end

local function flush_releases()
  -- Each counter once, in the order the runs first touched it: env, queue, key per run.
  local order, count = {}, {}
  local function add(key, field, e, n, is_key)
    local id = key .. Z .. field
    local c = count[id]
    if c == nil then
      order[#order + 1] = { key, field, e, id, is_key }
      count[id] = n
    else
      count[id] = c + n
    end
  end
  for _, x in ipairs(rel_order) do
    local e, q, n = x[1], x[2], x[5]
    add(k_env(e), x[4], e, n, false)
    add(k_q(e, q), 'run', e, n, false)
    add(k_k(e, q, x[3]), 'run', e, n, true)
  end
  for _, kf in ipairs(order) do
    if env_exists(kf[3]) then (kf[5] and decr_key or decr)(kf[1], kf[2], count[kf[4]]) end
  end
  rel_order, rel_by = {}, {}
end

local function release_slots(r)
  release_slots_later(r)
  flush_releases()
end

-- Admission (runlane_core::admission::admit) -----------------------------------------------

-- `E` = env hash's elim, ecap, flcap, run, flrun; `Q` = queue hash's lim, ktl, paused, run;
-- `krun` = the key's running count.
local function admission_of(E, Q, krun, lane)
  if not E[1] then return 'env' end
  if Q[3] == '1' then return 'paused' end
  local elim = tonumber(E[1])
  local kcap = elim
  if Q[1] then kcap = math.min(tonumber(Q[1]), elim) end
  if num(krun) >= kcap then return 'key' end
  if Q[2] and num(Q[4]) >= tonumber(Q[2]) then return 'total' end
  if lane == 'fast_lane' then
    if num(E[5]) >= tonumber(E[3]) then return 'fast_lane' end
  elseif num(E[4]) >= tonumber(E[2]) then
    return 'env'
  end
  return nil
end

-- Placement -------------------------------------------------------------------------------

-- A due run enqueued after everything appended to its key's FIFO list before (score, then id;
-- the common case: due runs arrive in time order) waits there as its message only (place `Q`,
-- no record). Every other queued run (out of order, a priority that jumps ahead, a retry, a
-- released, rescheduled, promoted or returned run) waits in its key's zset (`kq`, place `q`)
-- with its record. A list entry whose run left any other way than from the head is a
-- tombstone: its id is in the key's tombstone set `kt`, skipped and dropped when it reaches the
-- head; `qd` counts live queued runs only. The key hash keeps `lts`/`lti` (score and id of the
-- last append) and `lseq` (appends so far) for as long as the list lives, so its appends sort
-- strictly increasing and are numbered in order (`key_left` drops them with the list).

local function count_queued(e, q, k, kk)
  -- A key with live queued runs is already in its queue's backlog set, its queue in the env's
  -- backlog set and queue set: only the first queued run of a key adds them, and stamps the
  -- key behind every key served so far (the last serve number, plus one: serve numbers are
  -- even); a queue joining its env's backlog is stamped so too.
  if redis.call('HINCRBY', kk, 'qd', 1) == 1 then
    local stamp = num(redis.call('HGET', K_CFG, 'serve')) + 1
    redis.call('HSET', kk, 'served', stamp)
    redis.call('SADD', k_bk(e, q), k)
    if redis.call('SADD', k_bq(e), q) == 1 then redis.call('HSET', k_q(e, q), 'served', stamp) end
    redis.call('SADD', k_qs(e), q)
  end
  redis.call('HINCRBY', k_q(e, q), 'qd', 1)
end

-- Whether a run with score `sc` and id `id` sorts after the key's last append (`tail` = the key
-- hash's `lts`, `lti`).
local function after_tail(sc, id, tail)
  if not tail[1] then return true end
  local lts = tonumber(tail[1])
  return sc > lts or (sc == lts and lt(tail[2], id))
end

-- Appends a fresh due run to its key's list as its message (no record). `kid` = the key hash's
-- `id` (interned key id) as read by the caller, nil when not set yet.
local function append_listed(id, r, kid)
  local e, q, k = r[F_ENV], r[F_QUEUE], r[F_KEY]
  local kk = k_k(e, q, k)
  r[F_PLACE] = 'Q'
  redis.call('RPUSH', k_kl(e, q, k), msg_pack(id, r))
  local seq = redis.call('HINCRBY', kk, 'lseq', 1)
  redis.call('HSET', kk, 'lts', score_of(r), 'lti', id)
  if r[F_TTL] and not r[F_EVER] then
    if not kid then
      kid = redis.call('HINCRBY', K_CFG, 'kseq', 1)
      redis.call('HSET', kk, 'id', kid)
      redis.call('HSET', K_KN, kid, e .. Z .. q .. Z .. k)
    end
    ttl_add(id, r[F_TTL], listed_loc(tonumber(kid), seq))
  end
  count_queued(e, q, k, kk)
end

-- A record-bearing run waits in its key's zset.
local function push_queued(id, r)
  local e, q, k = r[F_ENV], r[F_QUEUE], r[F_KEY]
  redis.call('ZADD', k_kq(e, q, k), score_of(r), id)
  r[F_PLACE] = 'q'
  count_queued(e, q, k, k_k(e, q, k))
  save(id, r)
end

-- What a key's hash `kk` keeps only while the key is in its queue's backlog: the queued count,
-- the serve stamp (a key joining again is stamped then), the list's append bookkeeping and the
-- key's interned id with its `{p}:kn` entry (a TTL entry naming it finds no list: stale, as it
-- is). What is left is the key's running and delayed counts, gone with their last run.
local function drop_backlog_fields(kk)
  local kid = redis.call('HGET', kk, 'id')
  if kid then redis.call('HDEL', K_KN, kid) end
  redis.call('HDEL', kk, 'qd', 'served', 'lseq', 'lts', 'lti', 'id')
end

-- A key left its queue's backlog (no live queued run): its list (whatever it still holds is
-- tombstones), its tombstone set and its backlog fields go.
local function key_left(e, q, k, kk)
  redis.call('DEL', k_kl(e, q, k), k_kt(e, q, k))
  drop_backlog_fields(kk)
  redis.call('SREM', k_bk(e, q), k)
end

-- Answers whether the key still has backlog, and whether its queue does. A list-resident run
-- (place `Q`) must be live in its list: popped when at the head (`at_head`: the caller knows it
-- is, as `key_head` answered it), else made a tombstone.
local function pull_queued(id, r, at_head)
  local e, q, k = r[F_ENV], r[F_QUEUE], r[F_KEY]
  local kk = k_k(e, q, k)
  local removed = false
  if r[F_PLACE] == 'Q' then
    local kl = k_kl(e, q, k)
    local head = at_head or redis.call('LINDEX', kl, 0)
    if at_head or (head and msg_id(head) == id) then
      redis.call('LPOP', kl)
    else
      redis.call('SADD', k_kt(e, q, k), id)
    end
    removed = true
  elseif redis.call('ZREM', k_kq(e, q, k), id) == 1 then
    removed = true
  end
  local qd
  if removed then
    decr_floor(k_q(e, q), 'qd')
    qd = decr(kk, 'qd')
  else
    qd = num(redis.call('HGET', kk, 'qd'))
  end
  if qd > 0 then return true, true end
  key_left(e, q, k, kk)
  if redis.call('SCARD', k_bk(e, q)) == 0 then
    redis.call('SREM', k_bq(e), q)
    return false, false
  end
  return false, true
end

-- Within an admission pass, a key's list is read in pages and the entries the pass takes from
-- its head are removed at the pass's end: `memo` (the pass's entry for the key) holds the page
-- (`page`, list index of its first entry `pfrom`, whether the list ends in it `eof`), the
-- entries taken so far (`popped`) and the next page's size (1, 2, 4 … 64: a key the pass
-- admits from once reads one entry). Nothing is added to a list during a pass.
local popped_lists = {}

-- The entry at the head of the list as the pass sees it, or nil.
local function list_peek(kl, memo)
  local popped = memo.popped or 0
  local page = memo.page
  if page then
    local m = page[popped - memo.pfrom + 1]
    if m then return m end
    if memo.eof then return nil end
  end
  local n = memo.fetch or 1
  memo.fetch = math.min(n * 2, 64)
  page = redis.call('LRANGE', kl, popped, popped + n - 1)
  memo.page, memo.pfrom, memo.eof = page, popped, #page < n
  return page[1]
end

-- Takes the head entry (removed from Redis by `flush_list_pops` at the end of the pass).
local function list_pop(kl, memo)
  if not memo.popped or memo.popped == 0 then
    memo.popped = 0
    memo.kl_popped = kl
    popped_lists[#popped_lists + 1] = memo
  end
  memo.popped = memo.popped + 1
end

-- Removes the entries the pass took from the head of each list (`gone`: the list was deleted).
local function flush_list_pops()
  for _, memo in ipairs(popped_lists) do
    if not memo.gone then redis.call('LTRIM', memo.kl_popped, memo.popped, -1) end
  end
  popped_lists = {}
end

-- The first live entry of a key's list (tombstones at the head are dropped): id and record.
-- `memo` (the admission pass's entry for the key) also keeps whether the key has a tombstone
-- set across the pass: a pass only takes runs out of a key, so no tombstone appears meanwhile
-- (one that went is no harm: its `SREM` answers 0).
local function list_head(e, q, k, memo)
  local kl, kt = memo.kl, memo.kt
  if not kl then
    kl, kt = k_kl(e, q, k), k_kt(e, q, k)
    memo.kl, memo.kt = kl, kt
  end
  local tombs = memo.tombs
  while true do
    local m = list_peek(kl, memo)
    if not m then return nil, nil end
    local id = msg_id(m)
    if tombs == nil then
      tombs = redis.call('EXISTS', kt) == 1
      memo.tombs = tombs
    end
    if not (tombs and redis.call('SREM', kt, id) == 1) then
      local _, r = msg_unpack(m, e, q, k)
      return id, r
    end
    list_pop(kl, memo)
  end
end

-- The first queued run of a key by (score, run id): the first live list entry or the zset's
-- first member, whichever sorts first. `memo` keeps, across the admission pass, that the
-- key's zset is empty once it was found so (nothing joins it during a pass).
local function key_head(e, q, k, memo)
  local lid, lr = list_head(e, q, k, memo)
  if memo.kq_empty then return lid, lr end
  local z = redis.call('ZRANGE', k_kq(e, q, k), 0, 0, 'WITHSCORES')
  if not z[1] then memo.kq_empty = true end
  if z[1] then
    if lid then
      local ls, zs = score_of(lr), tonumber(z[2])
      if ls < zs or (ls == zs and lt(lid, z[1])) then return lid, lr end
    end
    return z[1], load(z[1])
  end
  return lid, lr
end

-- A list-resident run of key (e, q, k) with score `sc`: its record (place `Q`) while it is
-- live in the list, else nil. The list is in (score, id) order, tombstones included: a binary
-- search of `LINDEX`es.
local function list_find(id, e, q, k, sc)
  local kl = k_kl(e, q, k)
  local lo, hi = 0, redis.call('LLEN', kl) - 1
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    local m = redis.call('LINDEX', kl, mid)
    if not m then return nil end
    local mid_id, r = msg_unpack(m, e, q, k)
    if mid_id == id then
      if redis.call('SISMEMBER', k_kt(e, q, k), id) == 1 then return nil end
      return r
    end
    local ms = score_of(r)
    if ms < sc or (ms == sc and lt(mid_id, id)) then lo = mid + 1 else hi = mid - 1 end
  end
  return nil
end

-- A list-resident run of key (e, q, k) found by reading the key's whole list.
local function list_scan_key(id, e, q, k)
  for _, m in ipairs(redis.call('LRANGE', k_kl(e, q, k), 0, -1)) do
    if msg_id(m) == id and redis.call('SISMEMBER', k_kt(e, q, k), id) == 0 then
      local _, r = msg_unpack(m, e, q, k)
      return r
    end
  end
  return nil
end

-- A list-resident run found without its key (tools and tests: every backlog list is read).
local function list_scan(id)
  for _, e in ipairs(redis.call('SMEMBERS', K_ENVS)) do
    for _, q in ipairs(redis.call('SMEMBERS', k_bq(e))) do
      for _, k in ipairs(redis.call('SMEMBERS', k_bk(e, q))) do
        local r = list_scan_key(id, e, q, k)
        if r then return r end
      end
    end
  end
  return nil
end

-- A waiting or leased run: its record, else its live list entry, found from its key and score
-- when the caller gave them (`at` = { env, queue, key, score }), else by reading every list.
local function find(id, at)
  local r = load(id)
  if r then return r end
  if at then return list_find(id, at[1], at[2], at[3], at[4]) end
  return list_scan(id)
end

local function push_delayed(id, r)
  r[F_PLACE] = 'd'
  local e, q, k = r[F_ENV], r[F_QUEUE], r[F_KEY]
  redis.call('ZADD', K_DELAYED, r[F_AFTER], id)
  redis.call('SADD', k_qs(e), q)
  redis.call('HINCRBY', k_k(e, q, k), 'del', 1)
  redis.call('HINCRBY', k_q(e, q), 'del', 1)
  save(id, r)
end

local function pull_delayed(id, r)
  if redis.call('ZREM', K_DELAYED, id) == 1 then
    decr_key(k_k(r[F_ENV], r[F_QUEUE], r[F_KEY]), 'del', 1)
    decr_floor(k_q(r[F_ENV], r[F_QUEUE]), 'del')
  end
end

-- `listed_queue`: the run's queue is known to be in the env's queue set.
local function push_ready(id, r, listed_queue)
  local seq = hincr(K_CFG, 'seq', 1)
  r[F_PLACE] = 'r'
  r[F_SEQ] = seq
  r[F_RAT] = now
  take_slots(r, listed_queue)
  -- The lane is known (in `{p}:lanes`): enqueue checked it and lanes are never removed.
  local lane, e = r[F_LANE], r[F_ENV]
  redis.call('ZADD', k_lr(lane, e), seq, id)
  sadd(k_le(lane), e)
  hincr(k_l(lane), 'count', 1)
  save(id, r)
  ring_ready(lane, id)
end

local function pull_ready(id, r)
  local lane, e = r[F_LANE], r[F_ENV]
  local lr = k_lr(lane, e)
  if redis.call('ZREM', lr, id) == 1 then decr_floor(k_l(lane), 'count') end
  if redis.call('ZCARD', lr) == 0 then redis.call('SREM', k_le(lane), e) end
  release_slots(r)
end

-- Lease deadlines to drop, removed together by `flush_lease_drops` (one `ZREM` per call).
local lease_drops = {}
-- The parked offers hash as this call's `offer_alone` read it (nil: not read); `take_offers`
-- takes it instead of reading the hash again: nothing writes the hash between the two (an
-- enqueue looks at parked offers only when it carries no claim, and so has no twin to drop).
local offers_read = nil
-- `cmd key member...` over `members`, a few hundred at a time (Lua's `unpack` limit).
local function many(cmd, key, members)
  for i = 1, #members, 500 do
    redis.call(cmd, key, unpack(members, i, math.min(i + 499, #members)))
  end
end

local function flush_lease_drops()
  if #lease_drops > 0 then
    many('ZREM', K_LEASE, lease_drops)
    lease_drops = {}
  end
end

-- A run is in the attempt (cancel) deadline zset only while its record holds that deadline.
local function drop_lease_deadlines(id, r)
  lease_drops[#lease_drops + 1] = id
  if r[F_ADL] then redis.call('ZREM', K_ATT, id) end
  if r[F_CDL] then redis.call('ZREM', K_CXL, id) end
end

-- `swept`: the run's TTL bucket was already taken by the sweep.
local function unplace_waiting(id, r, swept)
  local p = r[F_PLACE]
  if p == 'd' then pull_delayed(id, r)
  elseif p == 'q' or p == 'Q' then pull_queued(id, r)
  elseif p == 'r' then pull_ready(id, r) end
  if r[F_TTL] and not r[F_EVER] and not swept then ttl_drop(id, r[F_TTL]) end
end

local function clear_lease(r)
  for i = F_TOKEN, F_LAPSED do r[i] = false end
end

-- Bytewise order of (served, name) pairs: least recently served first, then name.
local function served_order(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return lt(a[2], b[2])
end

-- The admission pass for one env (docs/dispatch.md): every key with backlog in serving order
-- (least recently served queue, then name, then least recently served key, then name); the
-- first whose head run is admissible wins, is admitted and becomes the most recently served
-- (its queue moves behind every other queue, the key behind its queue's other keys); repeated
-- until nothing fits. The order is read once per pass and kept up to date in place. Admission
-- only gets stricter within a pass (running counts only grow, no run joins a key), so a key
-- whose head is not admissible is skipped for the rest of the pass.
local function admit_env(e)
  local bq = redis.call('SMEMBERS', k_bq(e))
  if #bq == 0 then return end
  local E = redis.call('HMGET', k_env(e), 'elim', 'ecap', 'flcap', 'run', 'flrun')
  if not E[1] then return end
  local ecap, flcap = num(E[2]), num(E[3])
  E[4], E[5] = num(E[4]), num(E[5])
  -- Nothing fits when both the env row and the fast-lane row are full: skip the scan.
  if E[4] >= ecap and E[5] >= flcap then return end
  local orphaned = {}
  local function lane_orphaned(lane)
    local v = orphaned[lane]
    if v == nil then
      v = redis.call('HGET', k_l(lane), 'orph') == '1'
      orphaned[lane] = v
    end
    return v
  end
  -- queues[i] = { served, name, keys, settings }, keys[j] = { served, name, run, dead }; a
  -- queue's keys are read when the pass first reaches it.
  local queues = {}
  for _, q in ipairs(bq) do
    queues[#queues + 1] = { num(redis.call('HGET', k_q(e, q), 'served')), q }
  end
  table.sort(queues, served_order)
  local function keys_of(Qe)
    if not Qe[3] then
      local keys = {}
      for _, k in ipairs(redis.call('SMEMBERS', k_bk(e, Qe[2]))) do
        keys[#keys + 1] = { num(redis.call('HGET', k_k(e, Qe[2], k), 'served')), k }
      end
      table.sort(keys, served_order)
      Qe[3] = keys
    end
    return Qe[3]
  end
  -- What the pass changes is counted here and written once at its end: the running counts of
  -- the env, queues and keys (exact: each was read before the pass admitted from it), the
  -- queued counts, the ready seq counter, the ready zsets, lane sets and lane counts. Nothing
  -- in the pass reads them back from Redis. Records are written as runs are admitted.
  local served_q, served_k, served_n = {}, {}, 0
  local seq_base, nready = nil, 0
  local ready_lanes, ready_add = {}, {}
  local env_run0, env_flrun0 = E[4], E[5]
  while E[4] < ecap or E[5] < flcap do
    local qi, ki, id, r = nil, nil, nil, nil
    for i, Qe in ipairs(queues) do
      local q = Qe[2]
      for j, Ke in ipairs(keys_of(Qe)) do
        if not Ke[4] then
          local k = Ke[2]
          local head, hr = key_head(e, q, k, Ke)
          local ok = false
          if head and hr and not lane_orphaned(hr[F_LANE]) then
            if not Qe[4] then Qe[4] = redis.call('HMGET', k_q(e, q), 'lim', 'ktl', 'paused', 'run') end
            if not Ke[3] then
              local KR = redis.call('HMGET', k_k(e, q, k), 'run', 'qd')
              Ke[3], Ke.qd = num(KR[1]), num(KR[2])
            end
            ok = admission_of(E, Qe[4], Ke[3], hr[F_LANE]) == nil
          end
          if ok then
            qi, ki, id, r = i, j, head, hr
            break
          end
          Ke[4] = true
        end
      end
      if qi then break end
    end
    if not qi then break end
    local Qe = queues[qi]
    local Ke = Qe[3][ki]
    local q, k = Qe[2], Ke[2]
    -- The run leaves its key (as `pull_queued` at the head): the queued counts of the key and
    -- queue are written at the end of the pass.
    if r[F_PLACE] == 'Q' then
      list_pop(Ke.kl, Ke)
    else
      redis.call('ZREM', k_kq(e, q, k), id)
    end
    Qe.qd_taken = (Qe.qd_taken or 0) + 1
    Ke.qd = math.max(Ke.qd - 1, 0)
    local still_queued, queue_left = true, true
    if Ke.qd == 0 then
      still_queued = false
      Ke.gone = true
      key_left(e, q, k, k_k(e, q, k))
      if redis.call('SCARD', k_bk(e, q)) == 0 then
        redis.call('SREM', k_bq(e), q)
        queue_left = false
      end
    end
    served_n = served_n + 1
    served_q[q] = Qe
    Qe[5] = served_n
    if not Ke.served_no then served_k[#served_k + 1] = { q, Ke } end
    Ke.served_no = served_n
    -- The run becomes ready (as `push_ready`): its seq follows the counter's value.
    if not seq_base then seq_base = num(redis.call('HGET', K_CFG, 'seq')) end
    nready = nready + 1
    local seq = seq_base + nready
    r[F_PLACE] = 'r'
    r[F_SEQ] = seq
    r[F_RAT] = now
    local lane = r[F_LANE]
    local adds = ready_add[lane]
    if not adds then
      adds = {}
      ready_add[lane] = adds
      ready_lanes[#ready_lanes + 1] = lane
    end
    adds[#adds + 1] = seq
    adds[#adds + 1] = id
    save(id, r)
    ring_ready(lane, id)
    moved(id, 'ready')
    -- What `take_slots` counts.
    if lane == 'fast_lane' then E[5] = E[5] + 1 else E[4] = E[4] + 1 end
    Qe[4][4] = num(Qe[4][4]) + 1
    Ke[3] = Ke[3] + 1
    -- The most recently served queue and key go last.
    table.remove(Qe[3], ki)
    if still_queued then Qe[3][#Qe[3] + 1] = Ke end
    table.remove(queues, qi)
    if queue_left then queues[#queues + 1] = Qe end
  end
  flush_list_pops()
  if served_n > 0 then
    redis.call('HINCRBY', K_CFG, 'seq', nready)
    for _, lane in ipairs(ready_lanes) do
      local adds = ready_add[lane]
      many('ZADD', k_lr(lane, e), adds)
      redis.call('SADD', k_le(lane), e)
      redis.call('HINCRBY', k_l(lane), 'count', #adds / 2)
    end
    if E[4] ~= env_run0 then redis.call('HSET', k_env(e), 'run', E[4]) end
    if E[5] ~= env_flrun0 then redis.call('HSET', k_env(e), 'flrun', E[5]) end
    -- The pass served `served_n` times: serve numbers (even, docs/dispatch.md) top -
    -- 2 served_n + 2 .. top, in order.
    local base = redis.call('HINCRBY', K_CFG, 'serve', 2 * served_n) - 2 * served_n
    for q, Qe in pairs(served_q) do
      local kq = k_q(e, q)
      redis.call('HSET', kq, 'served', base + 2 * Qe[5], 'run', Qe[4][4])
      decr(kq, 'qd', Qe.qd_taken)
      Qe.qd_taken = 0
    end
    for _, x in ipairs(served_k) do
      local Ke = x[2]
      local kk = k_k(e, x[1], Ke[2])
      if Ke.gone then
        redis.call('HSET', kk, 'run', Ke[3])
      else
        redis.call('HSET', kk, 'served', base + 2 * Ke.served_no, 'run', Ke[3], 'qd', Ke.qd)
      end
    end
  end
end

local function admit_all()
  for _, e in ipairs(sorted(redis.call('SMEMBERS', K_ENVS))) do admit_env(e) end
end

local function zfirst(key)
  local v = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if v[2] then return tonumber(v[2]) end
  return nil
end

-- The earliest ready timeout of a lane without consumers. A wildcard consumer covers every
-- lane: then there is none (no lane is read).
local function orphan_deadline()
  for _, c in ipairs(chains()) do
    if string.sub(c, 1, 1) == 'P' then return nil end
  end
  local best = nil
  for _, lane in ipairs(redis.call('SMEMBERS', K_LANES)) do
    local L = consumers_of(lane) == 0 and redis.call('HMGET', k_l(lane), 'count', 'os')
    if L and num(L[1]) > 0 then
      local os = num(L[2])
      for _, e in ipairs(redis.call('SMEMBERS', k_le(lane))) do
        local head = redis.call('ZRANGE', k_lr(lane, e), 0, 0)[1]
        if head then
          local r = load(head)
          if r and r[F_PLACE] == 'r' then
            local d = math.max(r[F_RAT], os) + ready_timeout
            if best == nil or d < best then best = d end
          end
        end
      end
    end
  end
  return best
end

local function next_deadline()
  local best = zfirst(K_LEASE)
  local keys = { K_TBZ }
  -- Delayed runs, attempt deadlines and cancel grace periods are often none at all: one
  -- `EXISTS` instead of three reads then.
  if redis.call('EXISTS', K_DELAYED, K_ATT, K_CXL) > 0 then
    keys = { K_DELAYED, K_TBZ, K_ATT, K_CXL }
  end
  for _, key in ipairs(keys) do
    local v = zfirst(key)
    if v and (best == nil or v < best) then best = v end
  end
  local o = orphan_deadline()
  if o and (best == nil or o < best) then best = o end
  return best or -1
end

-- Doorbells (`{p}:db:<lane>`, `{p}:db:*`): streams of at most one entry that workloops of other
-- processes block on (`XREAD BLOCK` on a dedicated connection per claim chain). Every call that
-- made lanes ready adds an entry to each of their bells and one to the `*` bell (read by
-- wildcard chains; its `l` field names the lanes). A reader remembers the last id it saw, so an
-- entry added after it is never missed; `MAXLEN 1` keeps a bell one stream node (≤ 4.7 KB)
-- whatever the number of runs. `id` is the entry id (default `*`).
-- A call that made at most `HINT_MAX` runs ready names them in an `h` field (their 16-byte
-- ids, concatenated; a lane's bell names its lane's runs, the `*` bell all of them): a process
-- whose workloops wait reads those runs from the store while its claim is on the way
-- (readers that do not know the field skip it).
-- A call whose enqueue leased runs for parked offers (see `take_offers`) delivers them in an
-- `o` field: on the `*` bell and on the bell of each lane it leased runs of, which is rung for
-- that even when nothing stayed ready there. Every entry rings its lanes: a bell keeps one
-- entry, so an entry that rang nothing could hide an older one no reader has read yet.
local function bell(name, id, field, value, hint, delivery)
  local args = { 'XADD', P .. ':db:' .. name, 'MAXLEN', '1', id or '*', field, value }
  if hint then
    args[#args + 1] = 'h'
    args[#args + 1] = hint
  end
  if delivery then
    args[#args + 1] = 'o'
    args[#args + 1] = delivery
  end
  redis.call(unpack(args))
end

local function ring_bells()
  if #fx_lanes == 0 and #fx_deliver == 0 then return end
  local hinted = #fx_ready > 0 and #fx_ready <= HINT_MAX
  local delivery = #fx_deliver > 0 and cmsgpack.pack(fx_deliver) or nil
  local lanes, rung = {}, {}
  for _, lane in ipairs(fx_lanes) do
    lanes[#lanes + 1] = lane
    rung[lane] = true
  end
  local only = {}
  for lane in pairs(fx_deliver_lanes) do
    if not rung[lane] then only[#only + 1] = lane end
  end
  for _, lane in ipairs(sorted(only)) do lanes[#lanes + 1] = lane end
  for _, lane in ipairs(lanes) do
    local hint = nil
    if hinted then
      local ids = {}
      for i, id in ipairs(fx_ready) do
        if fx_ready_lane[i] == lane then ids[#ids + 1] = id end
      end
      if #ids > 0 then hint = table.concat(ids) end
    end
    bell(lane, nil, 'r', '1', hint, fx_deliver_lanes[lane] and delivery or nil)
  end
  bell('*', nil, 'l', table.concat(lanes, ','), hinted and table.concat(fx_ready) or nil,
    delivery)
end

-- After a rebuild: every lane's bell and the `*` bell, with an id after the server's clock (a
-- reader whose last id is from before the key space was lost, even in the same millisecond,
-- sees it). A bell whose last id is already later (the clock went back) takes the next id.
local function ring_all_bells()
  local t = redis.call('TIME')
  local id = string.format('%d-*', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + 1)
  local lanes = redis.call('SMEMBERS', K_LANES)
  table.sort(lanes)
  local function at(name, field, value)
    local added = redis.pcall('XADD', P .. ':db:' .. name, 'MAXLEN', '1', id, field, value)
    if type(added) == 'table' and added.err then bell(name, nil, field, value) end
  end
  for _, lane in ipairs(lanes) do at(lane, 'r', '1') end
  at('*', 'l', table.concat(lanes, ','))
end

local function answer(code, ...)
  flush_lease_drops()
  ring_bells()
  local out = { code, fx_moved, fx_lanes, next_deadline() }
  for _, v in ipairs({ ... }) do out[#out + 1] = v end
  return cmsgpack.pack(out)
end

local function fail(code, ...)
  flush_lease_drops()
  -- Lanes a refused call made ready (e.g. `register_consumer`'s admissions) still ring.
  ring_bells()
  local out = { code, {}, {}, -1 }
  for _, v in ipairs({ ... }) do out[#out + 1] = v end
  return cmsgpack.pack(out)
end

local function place_waiting(id, r, kind)
  local delayed = r[F_AFTER] > now
  if r[F_TTL] and not r[F_EVER] then ttl_add(id, r[F_TTL]) end
  if delayed then push_delayed(id, r) else push_queued(id, r) end
  if kind == 'release' then moved(id, 'queued')
  elseif delayed then moved(id, 'delayed')
  else moved(id, 'queued') end
end

-- A leased run, or an error code. A run without a record was never leased under any token
-- still valid; telling a list-resident run (stale token) from a gone one (not found) reads the
-- backlog lists, which only calls with a lost lease pay.
local function leased(id, token, allow_lapsed)
  local r = load(id)
  if not r then
    if list_scan(id) then return nil, 'stale' end
    return nil, 'not_found'
  end
  if r[F_PLACE] == 'l' and r[F_TOKEN] == token and (allow_lapsed or not r[F_LAPSED]) then
    return r, nil
  end
  return nil, 'stale'
end

-- `later`: the slots are released by the caller's `flush_releases`.
local function end_lease(id, r, later)
  drop_lease_deadlines(id, r)
  if not r[F_LAPSED] then
    if later then release_slots_later(r) else release_slots(r) end
  end
  clear_lease(r)
  r[F_PLACE] = 'q'
end

-- The key base the key names were built for.
local setup_base = nil

-- Per call: the arguments, the keys derived from the key base, and fresh effects and caches.
local function setup(keys, args)
  KEYS, ARGV = keys, args
  P = keys[1]
  op = args[1]
  now = tonumber(args[2])
  ready_timeout = tonumber(args[3])
  FORMAT = args[4]
  GEN = args[5]
  -- The key names derive from the key base only: built again when it changes.
  if P ~= setup_base then
    setup_base = P
    K_CFG = P .. ':cfg'
    K_ENVS = P .. ':envs'
    K_LANES = P .. ':lanes'
    K_CONS = P .. ':cons'
    K_DELAYED = P .. ':delayed'
    K_TTL = P .. ':ttl'
    K_LEASE = P .. ':lease'
    K_ATT = P .. ':att'
    K_CXL = P .. ':cxl'
    K_TBZ = P .. ':tbz'
    K_TBN = P .. ':tbn'
    K_RB = P .. ':rb'
    K_KN = P .. ':kn'
    K_OFFERS = P .. ':of'
    run_keys = {}
  end
  kn_cache = {}
  popped_lists = {}
  fx_moved, fx_lanes, fx_rung = {}, {}, {}
  fx_ready, fx_ready_lane = {}, {}
  fx_deliver, fx_deliver_lanes = {}, {}
  consumer_cache = nil
  env_known = {}
  rel_order, rel_by = {}, {}
  lease_drops = {}
  offers_read = nil
  -- A call that failed half-way (a script error) must not leave its batch to the next one.
  bm = nil
end

local OPS = {}

-- Start: configuration and generation checks -------------------------------------------------

-- Format 2 → 3: every key list held run ids whose records said `Q` (live) or not (tombstones).
-- Each list is rewritten with its live runs' messages in the same order (their records
-- deleted, appends numbered from 1), tombstones dropped; then the TTL bucket entries of those
-- runs get their location. Counters (`qd`, bucket counts) do not change.
local function migrate_2_to_3()
  local where = {}
  for _, e in ipairs(redis.call('SMEMBERS', K_ENVS)) do
    for _, q in ipairs(redis.call('SMEMBERS', k_bq(e))) do
      for _, k in ipairs(redis.call('SMEMBERS', k_bk(e, q))) do
        local kl, kk = k_kl(e, q, k), k_k(e, q, k)
        local ids = redis.call('LRANGE', kl, 0, -1)
        redis.call('DEL', kl)
        local seq, kid = 0, redis.call('HGET', kk, 'id')
        for _, id in ipairs(ids) do
          local r = load(id)
          if r and r[F_PLACE] == 'Q' then
            seq = seq + 1
            redis.call('RPUSH', kl, msg_pack(id, r))
            del_run(id)
            if r[F_TTL] and not r[F_EVER] then
              if not kid then
                kid = redis.call('HINCRBY', K_CFG, 'kseq', 1)
                redis.call('HSET', kk, 'id', kid)
                redis.call('HSET', K_KN, kid, e .. Z .. q .. Z .. k)
              end
              where[id] = listed_loc(tonumber(kid), seq)
            end
          end
        end
        redis.call('HSET', kk, 'lseq', seq)
      end
    end
  end
  for _, s in ipairs(redis.call('ZRANGE', K_TBZ, 0, -1)) do
    local kb = k_tb(s)
    local entries = redis.call('LRANGE', kb, 0, -1)
    redis.call('DEL', kb)
    for _, ent in ipairs(entries) do
      redis.call('RPUSH', kb, ent .. (where[string.sub(ent, 1, 16)] or ''))
    end
  end
end

-- ARGV[6] = a fresh generation, ARGV[7] = '1' when the caller rebuilds a lost key space (the
-- key space then stays marked `reb` until `rebuilt`: other callers get `lost` and wait for the
-- rebuild instead of seeing half of it), ARGV[8..] = the built-in lanes.
OPS['init'] = function()
  local cfg = redis.call('HMGET', K_CFG, 'fmt', 'gen', 'reb')
  if cfg[1] == '1' and FORMAT == '3' then
    -- Format 1 differs from format 2 only in its TTL index (one zset member per run): move it
    -- to buckets, then on to format 3.
    local all = redis.call('ZRANGE', K_TTL, 0, -1, 'WITHSCORES')
    for i = 1, #all, 2 do ttl_add(all[i], tonumber(all[i + 1])) end
    redis.call('DEL', K_TTL)
    redis.call('HSET', K_CFG, 'fmt', '2')
    cfg[1] = '2'
  end
  if cfg[1] == '2' and FORMAT == '3' then
    migrate_2_to_3()
    redis.call('HSET', K_CFG, 'fmt', FORMAT)
    cfg[1] = FORMAT
  end
  if cfg[1] and cfg[1] ~= FORMAT then return fail('format', cfg[1]) end
  if not cfg[1] then
    local gen = ARGV[6]
    redis.call('HSET', K_CFG, 'fmt', FORMAT, 'gen', gen, 'token', 0, 'seq', 0, 'serve', 0, 'cseq', 0,
      'tidy', 1)
    if ARGV[7] == '1' then redis.call('HSET', K_CFG, 'reb', '1') end
    for i = 8, #ARGV do
      redis.call('SADD', K_LANES, ARGV[i])
      redis.call('HSETNX', k_l(ARGV[i]), 'count', 0)
    end
    return fail('ok', gen, 1, 0)
  end
  local rebuilding = 0
  if cfg[3] then rebuilding = 1 end
  return fail('ok', cfg[2], 0, rebuilding)
end

local function check()
  local cfg = redis.call('HMGET', K_CFG, 'fmt', 'gen', 'reb')
  if not cfg[1] then return fail('lost') end
  if cfg[1] ~= FORMAT then return fail('format', cfg[1]) end
  if GEN == 'rebuild' then
    if op == 'rebuilt' then
      redis.call('HDEL', K_CFG, 'reb')
      ring_all_bells()
      return fail('ok')
    end
  else
    if cfg[3] then return fail('lost') end
    if GEN ~= '' and cfg[2] ~= GEN then return fail('generation', cfg[2]) end
  end
end

-- Operations ------------------------------------------------------------------------------

OPS['put_env'] = function()
  local e = ARGV[6]
  redis.call('HSET', k_env(e), 'elim', ARGV[7], 'ecap', ARGV[8], 'flcap', ARGV[9], 'weight', ARGV[10],
    'fp', ARGV[11])
  redis.call('SADD', K_ENVS, e)
  admit_env(e)
  return answer('ok')
end

OPS['put_queue'] = function()
  local e, q = ARGV[6], ARGV[7]
  if redis.call('EXISTS', k_env(e)) == 0 then return fail('unknown_env') end
  local key = k_q(e, q)
  local names = { 'lim', 'ktl', 'maxq' }
  for i, name in ipairs(names) do
    local v = ARGV[7 + i]
    if v == '' then redis.call('HDEL', key, name) else redis.call('HSET', key, name, v) end
  end
  redis.call('HSET', key, 'paused', ARGV[11])
  redis.call('SADD', k_qs(e), q)
  admit_env(e)
  return answer('ok')
end

OPS['queue_settings'] = function()
  local e, q = ARGV[6], ARGV[7]
  if redis.call('EXISTS', k_env(e)) == 0 then return fail('unknown_env') end
  local s = redis.call('HMGET', k_q(e, q), 'lim', 'ktl', 'maxq', 'paused')
  return fail('ok', s[1] or '', s[2] or '', s[3] or '', s[4] or '0')
end

OPS['add_lane'] = function()
  redis.call('SADD', K_LANES, ARGV[6])
  redis.call('HSETNX', k_l(ARGV[6]), 'count', 0)
  return fail('ok')
end

-- Queue key hashes (ARGV[6..], names from a SCAN of `{p}:k:*`) left by a library that kept a
-- key's state after its runs ended (`RedisQueue::tidy_key_state`): a hash whose key has no
-- queued run loses its backlog fields and zero counters and goes with its last field; a key
-- with queued runs is left alone. Answers how many hashes were tidied.
OPS['tidy_keys'] = function()
  local prefix = P .. ':k:'
  local n = 0
  for i = 6, #ARGV do
    local kk = ARGV[i]
    if string.sub(kk, 1, #prefix) == prefix and num(redis.call('HGET', kk, 'qd')) == 0 then
      drop_backlog_fields(kk)
      for _, f in ipairs({ 'run', 'del' }) do
        if num(redis.call('HGET', kk, f)) == 0 then redis.call('HDEL', kk, f) end
      end
      n = n + 1
    end
  end
  return fail('ok', n)
end

OPS['has_lane'] = function()
  return fail('ok', redis.call('SISMEMBER', K_LANES, ARGV[6]))
end

OPS['lanes'] = function()
  local out = {}
  for _, lane in ipairs(redis.call('SMEMBERS', K_LANES)) do
    local L = redis.call('HMGET', k_l(lane), 'count', 'os')
    local count = num(L[1])
    local consumers = consumers_of(lane)
    local orphan = -1
    if consumers == 0 and count > 0 then
      local oldest = nil
      for _, e in ipairs(redis.call('SMEMBERS', k_le(lane))) do
        local head = redis.call('ZRANGE', k_lr(lane, e), 0, 0)[1]
        local r = head and load(head)
        if r and r[F_PLACE] == 'r' and (oldest == nil or r[F_RAT] < oldest) then oldest = r[F_RAT] end
      end
      orphan = math.max(num(L[2]), oldest or 0)
    end
    out[#out + 1] = { lane, count, consumers, orphan }
  end
  return fail('ok', out)
end

OPS['queues'] = function()
  local e = ARGV[6]
  if redis.call('EXISTS', k_env(e)) == 0 then return fail('unknown_env') end
  local out = {}
  for _, q in ipairs(redis.call('SMEMBERS', k_qs(e))) do
    local s = redis.call('HMGET', k_q(e, q), 'lim', 'ktl', 'maxq', 'paused', 'del', 'qd', 'run')
    out[#out + 1] = { q, s[1] or '', s[2] or '', s[3] or '', s[4] or '0', num(s[5]), num(s[6]), num(s[7]) }
  end
  return fail('ok', out)
end

OPS['env_usage'] = function()
  local e = ARGV[6]
  if redis.call('EXISTS', k_env(e)) == 0 then return fail('unknown_env') end
  local s = redis.call('HMGET', k_env(e), 'run', 'flrun')
  return fail('ok', num(s[1]), num(s[2]))
end

local function placed(p)
  if p == 'd' then return 'delayed' elseif p == 'q' or p == 'Q' then return 'queued' end
  return 'ready'
end

-- Makes run `r`'s record a lease: token `token` of `worker` for `lease_ms` until `deadline`,
-- ever leased, no ready state, no cancel; answers its attempt deadline (false: none).
local function lease_fields(r, token, worker, lease_ms, deadline)
  local adl = false
  if r[F_MAXDUR] then adl = now + r[F_MAXDUR] end
  r[F_EVER] = true
  r[F_PLACE] = 'l'
  r[F_SEQ] = false
  r[F_RAT] = false
  r[F_TOKEN] = token
  r[F_WORKER] = worker
  r[F_LDUR] = lease_ms
  r[F_LDL] = deadline
  r[F_ADL] = adl
  r[F_CRA] = false
  r[F_CDL] = false
  r[F_LAPSED] = false
  return adl
end

-- A lane's ready count, read once per `counts` (a table its caller keeps for one step).
local function lane_count(counts, lane)
  local v = counts[lane]
  if v == nil then
    v = num(redis.call('HGET', k_l(lane), 'count'))
    counts[lane] = v
  end
  return v
end

-- Whether no lane `chain` covers has a ready run. `counts` holds what this check read so far
-- (each lane's ready count by name, read once; the caller puts in those it read already; and
-- at [1] the lane set once a wildcard chain read it): a chain that names its lanes reads only
-- those (a named lane that does not exist has none), a wildcard chain every lane.
local function idle_lanes(chain, counts)
  if string.sub(chain, 1, 1) == 'P' then
    counts[1] = counts[1] or redis.call('SMEMBERS', K_LANES)
    for _, lane in ipairs(counts[1]) do
      if lane_count(counts, lane) > 0 then return false end
    end
  else
    for lane in string.gmatch(string.sub(chain, 2), '[^>]+') do
      if lane_count(counts, lane) > 0 then return false end
    end
  end
  return true
end

-- Whether a claim from `A[from]` (worker, chain, max, lease ms, env version pairs up to #A)
-- serves run `r`: a free slot, its lane covered, its env served at a version it may run on.
local function serves(A, from, r)
  local chain, max = A[from + 1], tonumber(A[from + 2])
  if not max or max < 1 or not covers(chain, r[F_LANE]) then return false end
  local e, version = r[F_ENV], nil
  for i = from + 4, #A, 2 do
    if A[i] == e then version = tonumber(A[i + 1]) end
  end
  return version ~= nil and not (r[F_LOCKED] and r[F_LOCKED] ~= version)
end

-- Whether `claim_runs(A, from, #A, 0)` made right after run `r` is placed ready would lease
-- that run and nothing else: the claim serves it and no lane it covers has a ready run (so the
-- run is its one candidate, whatever the lanes' order). `counts`: see `idle_lanes`.
local function leases_alone(A, from, r, counts)
  return serves(A, from, r) and idle_lanes(A[from + 1], counts)
end

-- The parked offer (its consumer, and its entry unpacked) whose claim `take_offers` would
-- make lease run `r` alone once `r` is placed ready: the offers are looked at in
-- `take_offers`'s order, the first live one that serves the run takes it, and every live one
-- before it that covers the run's lane must lease nothing then (none covers a lane with a
-- ready run). Nil when no offer would take the run, or when which one would, or what else it
-- would take, depends on other ready runs. `counts`: see `idle_lanes`.
local function offer_alone(r, counts)
  local all = redis.call('HGETALL', K_OFFERS)
  offers_read = all
  for i = 1, #all, 2 do
    local o = cmsgpack.unpack(all[i + 1])
    local args = o[3]
    local until_ms = o[2]
    if until_ms == false then until_ms = o[5] end
    local live = type(until_ms) == 'number' and type(args) == 'table' and until_ms > now
    if live and o[2] ~= false and covers(args[2], r[F_LANE]) then
      if not idle_lanes(args[2], counts) then return nil end
      if serves(args, 1, r) then return all[i], o end
    end
  end
  return nil
end

-- Leases run `id` (record `r`, due and admitted, not placed yet) as `push_ready` then
-- `claim_runs(A, from, …)` would when `leases_alone` holds, without writing the run to its
-- ready set and reading it back: its slots, the ready sequence counter, the lane's fairness
-- state, the fencing counter, the lease record and deadlines are left exactly as the two
-- steps leave them (the ready set, the lane's ready count and its env set end where they
-- started). No TTL entry is written: the claim would drop it again (the two steps can leave
-- it in its bucket's list, dead, move the bucket's last-append marker or rewrite the bucket;
-- what the buckets say of live runs, and so every expiry, is the same). `vtime` and `weight`:
-- the lane's virtual time and the env's weight fields as the enqueue read them (nothing
-- changes them before this). Answers the claim's answer for it: { { id, record } }, and
-- { token }.
local function lease_placed(A, from, id, r, listed_queue, vtime, weight)
  local worker, lease_ms = A[from], tonumber(A[from + 3])
  local e, lane = r[F_ENV], r[F_LANE]
  hincr(K_CFG, 'seq', 1)
  take_slots(r, listed_queue)
  vtime = num(vtime)
  local eff = math.max(num(redis.call('HGET', k_lp(lane), e)), vtime)
  weight = math.max(num(weight), 1)
  redis.call('HSET', k_l(lane), 'vtime', eff)
  redis.call('HSET', k_lp(lane), e, eff + math.floor(STRIDE / weight))
  local token = redis.call('HINCRBY', K_CFG, 'token', 1)
  local deadline = now + lease_ms
  local adl = lease_fields(r, token, worker, lease_ms, deadline)
  redis.call('ZADD', K_LEASE, deadline, id)
  if adl then redis.call('ZADD', K_ATT, adl, id) end
  return { { id, save(id, r) } }, { token }
end

-- One run's enqueue: `packed` is its record (place unset), `why` says why it is enqueued: '0' a
-- trigger (refused over its key's `max_queued`), '1' a sync trigger (also refuses a fast-lane
-- run that does not fit), 'a' a run already accepted (recovery, reconciler, rebuild: neither
-- refusal applies). Answers 'ok' and the placement, or a refusal code (and its value), having
-- changed nothing then. `claim` (optional): an idle in-process worker's claim arguments
-- (`claim_runs(claim, 11, …)`, made right after this placement); `offers`: without one, whether
-- parked offers lease in this call (`take_offers`, after this placement). When the claim, or
-- the parked offer that would lease first, would lease this run alone, the run is leased here
-- directly: the third answer is then { leased = the claim's answer, tokens = its tokens,
-- consumer = the parked offer's consumer, entry = its entry } (no consumer: the claim's).
local function enqueue_one(id, packed, why, claim, offers)
  local existing = load(id)
  if existing then return 'ok', placed(existing[F_PLACE]) end
  local r = cmsgpack.unpack(packed)
  local e, q, k, lane = r[F_ENV], r[F_QUEUE], r[F_KEY], r[F_LANE]
  -- One read per hash: the env (exists when it has a limit), the lane (a known lane always has
  -- a ready count), the key and the queue.
  local E = hm(k_env(e), 'elim', 'ecap', 'flcap', 'run', 'flrun', 'fp', 'weight')
  if not E[1] then return 'unknown_env' end
  env_known[e] = true
  local L = hm(k_l(lane), 'count', 'orph', 'vtime')
  if not L[1] and redis.call('SISMEMBER', K_LANES, lane) == 0 then return 'unknown_lane' end
  local K = hm(k_k(e, q, k), 'qd', 'del', 'run', 'lts', 'lti', 'id')
  local delayed = r[F_AFTER] > now
  local in_order = not delayed and after_tail(score_of(r), id, { K[4], K[5] })
  -- Idempotent by run id. A list-resident run has no record: a fresh run (first attempt, never
  -- leased) keeps the facts it was enqueued with, so one sorting after the key's last append
  -- cannot be in the list and one that does not is found by the binary search. A run enqueued
  -- again with other facts (recovery: the next attempt of a run that was executing) is looked
  -- for in its key's whole list (rare: recovery and the reconciler only).
  if num(K[1]) > 0 then
    local found = false
    if r[F_EVER] or r[F_ATTEMPT] ~= 1 then
      found = list_scan_key(id, e, q, k) ~= nil
    elseif not delayed and not in_order then
      found = list_find(id, e, q, k, score_of(r)) ~= nil
    end
    if found then return 'ok', 'queued' end
  end
  local Q = hm(k_q(e, q), 'lim', 'ktl', 'paused', 'run', 'maxq')
  local fast_path_on = E[6] == '1'
  local backlog = num(K[1])
  local waiting = backlog + num(K[2])
  local max_queued = Q[5]
  local orphaned = L[2] == '1'
  local blocked = admission_of(E, Q, K[3], lane)
  local fast = (not delayed) and fast_path_on and backlog == 0 and (not orphaned) and blocked == nil
  if not fast and why ~= 'a' and max_queued and waiting >= tonumber(max_queued) then
    return 'queue_full', tonumber(max_queued)
  end
  if not delayed and not fast and why == '1' and blocked == 'fast_lane' then
    return 'fast_lane_full'
  end
  local listed = not delayed and not fast and in_order
  local direct, taker, offer = false, nil, nil
  if fast and (claim ~= nil or offers) then
    -- The run's own lane: its ready count was read above.
    local counts = { [lane] = num(L[1]) }
    if claim ~= nil then
      direct = leases_alone(claim, 11, r, counts)
    else
      taker, offer = offer_alone(r, counts)
      direct = taker ~= nil
    end
  end
  -- Only the fast path keeps a batch's state; any other placement writes it out first.
  if not fast then bm_flush() end
  if r[F_TTL] and not r[F_EVER] and not listed and not direct then ttl_add(id, r[F_TTL]) end
  local placement, leases
  if delayed then
    push_delayed(id, r)
    moved(id, 'delayed')
    placement = 'delayed'
  elseif fast then
    -- A queue hash with a running count or a pause flag belongs to a queue of the env's set
    -- (absent fields read as false).
    local listed_queue = (Q[3] or Q[4]) and true or false
    if direct then
      local A, from = claim, 11
      if taker then A, from = offer[3], 1 end
      local leased, tokens = lease_placed(A, from, id, r, listed_queue, L[3], E[7])
      leases = { leased = leased, tokens = tokens, consumer = taker, entry = offer }
    else
      push_ready(id, r, listed_queue)
    end
    moved(id, 'ready')
    placement = 'ready'
  else
    if listed then append_listed(id, r, K[6]) else push_queued(id, r) end
    moved(id, 'queued')
    if not fast_path_on then admit_env(e) end
    placement = 'queued'
  end
  return 'ok', placement, leases
end

local claim_runs

-- Parked offers (`{p}:of`, field = consumer): an idle workloop's claim, left here by its empty
-- claim so that an enqueue of any process leases for it in the enqueue's own step (as a
-- trigger of the workloop's process does with its in-process offer), and delivers the leases
-- on the bells. A parked offer is { seq, deadline, claim arguments }; one an enqueue took is
-- { seq, false, claim arguments, { id, token, ... } (its leases), their lease deadline } until
-- the workloop withdraws it: it then gets in its claim's answer the leases it did not hear of.
-- A parked offer past its deadline (its process died or lost Redis) is never taken; the
-- workloop parks a new one before then. Entries past their deadline (a parked one's, or a
-- taken one's leases') are deleted by the next enqueue that looks at the offers.

-- Takes the consumer's entry out; answers the leases of a taken one still held under their
-- token, unless the workloop heard of them (`heard`: it got offer `seq` delivered).
local function withdraw_offer(consumer, seq, heard)
  local raw = redis.call('HGET', K_OFFERS, consumer)
  if not raw then return {} end
  redis.call('HDEL', K_OFFERS, consumer)
  local o = cmsgpack.unpack(raw)
  if o[2] ~= false or (heard and o[1] == seq) or type(o[4]) ~= 'table' then return {} end
  local out = {}
  local t = o[4]
  for i = 1, #t, 2 do
    local id = t[i]
    local r = load(id)
    if r and r[F_PLACE] == 'l' and r[F_TOKEN] == t[i + 1] and not r[F_LAPSED] then
      out[#out + 1] = { id, redis.call('HGET', k_run(id), id) }
    end
  end
  return out
end

-- Whether the carried claim of the in-process offer `seq` of `consumer` may lease: not when
-- an enqueue of another process took the parked twin already (it used the same slots); and
-- whether the parked twin, not taken, is to be deleted (once the enqueue placed its run).
local function own_offer(consumer, seq)
  local raw = redis.call('HGET', K_OFFERS, consumer)
  if not raw then return true, false end
  local o = cmsgpack.unpack(raw)
  if o[1] ~= seq then return true, false end
  if o[2] == false then return false, false end
  return true, true
end

-- Leases the ready runs of this call's lanes for parked offers that cover them (one claim per
-- offer, as the workloop's own next claim would be), while any stays ready. `handed_id`'s
-- delivery carries `handed` (what its worker needs, from the trigger), so the workloop need
-- not read the run. `pre` (optional): a run the enqueue leased as it placed it, for the offer
-- that would have taken it (`enqueue_one`'s third answer): that offer takes those leases, and
-- no other offer leases (nothing was left ready). Answers the runs leased (a set).
local function take_offers(handed_id, handed, pre)
  local took = {}
  if #fx_lanes == 0 and not pre then return took end
  local all = offers_read or redis.call('HGETALL', K_OFFERS)
  offers_read = nil
  local left = #fx_lanes
  -- The offer `consumer` (entry `o`, its claim `args`) takes `leased` (and `tokens`).
  local function deliver(consumer, o, args, leased, tokens)
    local held, runs = {}, {}
    for j, l in ipairs(leased) do
      local id = l[1]
      took[id] = true
      held[#held + 1] = id
      held[#held + 1] = tokens[j]
      runs[#runs + 1] = { id, l[2], id == handed_id and handed or false }
      fx_deliver_lanes[cmsgpack.unpack(l[2])[F_LANE]] = true
    end
    redis.call('HSET', K_OFFERS, consumer,
      cmsgpack.pack({ o[1], false, args, held, now + tonumber(args[4]) }))
    fx_deliver[#fx_deliver + 1] = { tonumber(consumer), o[1], runs }
  end
  for i = 1, #all, 2 do
    local consumer, o = all[i], cmsgpack.unpack(all[i + 1])
    local args = o[3]
    -- A parked offer's deadline, or a taken one's leases' (an entry of another shape: gone).
    local until_ms = o[2]
    if until_ms == false then until_ms = o[5] end
    if type(until_ms) ~= 'number' or type(args) ~= 'table' or until_ms <= now then
      redis.call('HDEL', K_OFFERS, consumer)
    elseif pre and consumer == pre.consumer then
      deliver(consumer, o, args, pre.leased, pre.tokens)
    elseif o[2] ~= false and left > 0 then
      local wanted = false
      for _, lane in ipairs(fx_lanes) do
        if covers(args[2], lane) then wanted = true end
      end
      if wanted then
        local leased, tokens = claim_runs(args, 1, #args, 0)
        if #leased > 0 then
          deliver(consumer, o, args, leased, tokens)
          left = 0
          for _, lane in ipairs(fx_lanes) do
            if num(redis.call('HGET', k_l(lane), 'count')) > 0 then left = left + 1 end
          end
        end
      end
    end
  end
  return took
end

-- After the enqueue's claims: a lane they left without a ready run rings no doorbell (nobody
-- could claim there), nor does a run they took count in the bells' hint (one past the limit
-- stays so).
local function drop_taken(took)
  local keep = {}
  for _, lane in ipairs(fx_lanes) do
    if num(redis.call('HGET', k_l(lane), 'count')) > 0 then keep[#keep + 1] = lane end
  end
  fx_lanes = keep
  if #fx_ready <= HINT_MAX then
    local ready, lanes = {}, {}
    for i, id in ipairs(fx_ready) do
      if not took[id] then
        ready[#ready + 1] = id
        lanes[#ready] = fx_ready_lane[i]
      end
    end
    fx_ready, fx_ready_lane = ready, lanes
  end
end

OPS['enqueue'] = function()
  -- ARGV[6] = id, ARGV[7] = packed record (place unset), ARGV[8] = why ('0'/'1'/'a'),
  -- ARGV[9] = whether parked offers may lease in this call ('' not) and what a worker needs of
  -- the run ('!' when not sent), ARGV[10] = the in-process
  -- offer the next arguments come from ('consumer seq', or ''), then optionally an idle
  -- worker's claim as `claim`'s arguments (ARGV[11] = worker, ...): made in the same step once
  -- the run is placed, exactly as that worker's next claim would be, and answered after the
  -- placement. Parked offers of other workloops then take what stays ready.
  local claim, consumer, parked = nil, nil, false
  if #ARGV >= 14 then
    local seq
    consumer, seq = string.match(ARGV[10], '^(%d+) (%d+)$')
    local may = true
    if consumer then may, parked = own_offer(consumer, tonumber(seq)) end
    if may then claim = ARGV end
  end
  local sent = ARGV[9]
  local offers = sent ~= nil and sent ~= ''
  local code, v, direct = enqueue_one(ARGV[6], ARGV[7], ARGV[8], claim, offers)
  if code ~= 'ok' then
    if v ~= nil then return fail(code, v) end
    return fail(code)
  end
  local leased = {}
  if parked then redis.call('HDEL', K_OFFERS, consumer) end
  if direct and not direct.consumer then
    -- Leased as it was placed: it never was ready, so no lane rang for it.
    leased = direct.leased
  elseif claim then
    leased = claim_runs(ARGV, 11, #ARGV, 0)
    local took = {}
    for _, l in ipairs(leased) do took[l[1]] = true end
    if #leased > 0 then drop_taken(took) end
  end
  if offers then
    local pre = direct and direct.consumer and direct or nil
    local remote = take_offers(ARGV[6], sent ~= '!' and sent or false, pre)
    if next(remote) then
      drop_taken(remote)
      -- A run leased here for a parked offer moved on to executing (its worker publishes
      -- that; the caller must not publish a `ready` that could follow the worker's events).
      for i = 2, #fx_moved, 2 do
        if remote[fx_moved[i - 1]] then fx_moved[i] = 'executing' end
      end
    end
  end
  if #ARGV >= 14 then return answer('ok', v, leased) end
  return answer('ok', v)
end

-- Many enqueues in one call, each as 'enqueue' (in order): ARGV[6..] = (id, packed record,
-- why) triples. Answers per run { code, value or false }; the effects are the call's.
OPS['enqueue_many'] = function()
  local out = {}
  -- A run that fails the call (a script error) leaves the runs placed before it as one
  -- enqueue per run would: what the batch kept is written before the error goes on.
  local ok, err = pcall(function()
    for i = 6, #ARGV, 3 do
      if not bm then bm_start() end
      local code, v = enqueue_one(ARGV[i], ARGV[i + 1], ARGV[i + 2])
      out[#out + 1] = { code, v or false }
    end
  end)
  bm_flush()
  if not ok then error(err, 0) end
  return answer('ok', out)
end

-- Takes up to `max` (less `fewer`) ready runs out of `chain`'s lanes for `worker` and leases
-- them; answers { id, record } per leased run, and their tokens. A[from] = worker, then chain,
-- max, lease ms, then env, version pairs up to `to` (A: the call's ARGV, or a parked offer's
-- claim). (Declared before `enqueue`, which claims with it.)
claim_runs = function(A, from, to, fewer)
  local worker, chain, max, lease_ms = A[from], A[from + 1], tonumber(A[from + 2]) - fewer,
    tonumber(A[from + 3])
  local served = {}
  for i = from + 4, to, 2 do served[A[i]] = tonumber(A[i + 1]) end
  local wildcard = string.sub(chain, 1, 1) == 'P'
  local named = {}
  local is_named = {}
  for lane in string.gmatch(string.sub(chain, 2), '[^>]+') do
    named[#named + 1] = lane
    is_named[lane] = true
  end
  -- Nothing but this claim changes the ready sets while it runs, so everything it reads is read
  -- once and kept up to date here; the claimed runs leave their ready zsets, and the lane
  -- counters, fairness state and fencing counter are written, once at the end.
  local lanes = sorted(redis.call('SMEMBERS', K_LANES))
  local known = {}
  for _, lane in ipairs(lanes) do known[lane] = true end
  -- cursors[lane][env] = the cursor over that ready zset; cursors[1..] = the same cursors in
  -- the order they were made.
  local lane_envs, cursors, counts, taken, vtimes, passes, weights = {}, {}, {}, {}, {}, {}, {}
  local dirty = {}
  -- The claimed runs: ids and records (parallel arrays: no table per pick).
  local pick_ids, pick_recs, npicks = {}, {}, 0
  local function envs_of(lane)
    local v = lane_envs[lane]
    if not v then
      v = sorted(redis.call('SMEMBERS', k_le(lane)))
      lane_envs[lane] = v
    end
    return v
  end
  local function count_of(lane)
    return math.max(lane_count(counts, lane) - (taken[lane] or 0), 0)
  end
  local function pass_of(lane, e)
    local lp = subtable(passes, lane)
    local v = lp[e]
    if v == nil then
      v = num(redis.call('HGET', k_lp(lane), e))
      lp[e] = v
    end
    return v
  end
  -- The first eligible ready run of a lane and env not taken yet: a cursor over the ready zset
  -- (pages of the runs still wanted, up to 64; runs locked to another version are skipped).
  -- Answers the cursor, its head run being `c.ids[c.pos]` (seq `c.seqs[c.pos]`, record
  -- `c.recs[c.pos]`), or nil.
  local function head_of(lane, e, version)
    local lc = subtable(cursors, lane)
    local c = lc[e]
    if not c then
      c = { ids = {}, seqs = {}, pos = 1, from = 0, eof = false, lane = lane, env = e, took = {},
        key = k_lr(lane, e) }
      lc[e] = c
      cursors[#cursors + 1] = c
    end
    local key = c.key
    while true do
      if c.pos > #c.ids then
        if c.eof then return nil end
        local n = math.max(math.min(max - npicks, 64), 1)
        local page = redis.call('ZRANGE', key, c.from, c.from + n - 1, 'WITHSCORES')
        c.ids, c.seqs, c.recs, c.pos = {}, {}, {}, 1
        for i = 1, #page, 2 do
          c.ids[#c.ids + 1] = page[i]
          c.seqs[#c.seqs + 1] = tonumber(page[i + 1])
        end
        c.from = c.from + #c.ids
        if #c.ids < n then c.eof = true end
        if #c.ids == 0 then return nil end
      end
      local id = c.ids[c.pos]
      local r = c.recs[c.pos]
      if r == nil then
        r = load(id) or false
        c.recs[c.pos] = r
      end
      if r and (not r[F_LOCKED] or r[F_LOCKED] == version) then return c end
      c.pos = c.pos + 1
    end
  end
  -- The cursors of a lane's served envs that have an eligible ready run (in a list kept per
  -- lane and refilled at each call), and their count.
  local lane_cands = {}
  local function first_eligible(lane)
    local out = subtable(lane_cands, lane)
    local n = 0
    for _, e in ipairs(envs_of(lane)) do
      local version = served[e]
      if version then
        local c = head_of(lane, e, version)
        if c then
          n = n + 1
          out[n] = c
        end
      end
    end
    for i = #out, n + 1, -1 do out[i] = nil end
    return out, n
  end
  while npicks < max do
    local pick_lane, cands, ncands = nil, nil, 0
    for _, lane in ipairs(named) do
      if known[lane] then
        local c, n = first_eligible(lane)
        if n > 0 then
          pick_lane, cands, ncands = lane, c, n
          break
        end
      end
    end
    if not pick_lane and wildcard then
      local best_seq = nil
      for _, lane in ipairs(lanes) do
        if not is_named[lane] and count_of(lane) > 0 then
          local c, n = first_eligible(lane)
          local min = nil
          for i = 1, n do
            local x = c[i].seqs[c[i].pos]
            if min == nil or x < min then min = x end
          end
          if min and (best_seq == nil or min < best_seq) then
            best_seq, pick_lane, cands, ncands = min, lane, c, n
          end
        end
      end
    end
    if not pick_lane then break end
    local vtime = vtimes[pick_lane]
    if vtime == nil then vtime = num(redis.call('HGET', k_l(pick_lane), 'vtime')) end
    -- The env of least effective pass (then name) among the candidates.
    local cur, eff = nil, nil
    for i = 1, ncands do
      local c = cands[i]
      local ce = math.max(pass_of(pick_lane, c.env), vtime)
      if cur == nil or ce < eff or (ce == eff and lt(c.env, cur.env)) then cur, eff = c, ce end
    end
    local e, id, r = cur.env, cur.ids[cur.pos], cur.recs[cur.pos]
    local weight = weights[e]
    if weight == nil then
      weight = math.max(num(redis.call('HGET', k_env(e), 'weight')), 1)
      weights[e] = weight
    end
    vtimes[pick_lane] = eff
    passes[pick_lane][e] = eff + math.floor(STRIDE / weight)
    dirty[pick_lane] = dirty[pick_lane] or {}
    dirty[pick_lane][e] = true
    cur.took[#cur.took + 1] = id
    cur.pos = cur.pos + 1
    taken[pick_lane] = (taken[pick_lane] or 0) + 1
    npicks = npicks + 1
    pick_ids[npicks], pick_recs[npicks] = id, r
  end
  -- The claimed runs leave their ready zsets (an env whose zset empties leaves the lane).
  for _, c in ipairs(cursors) do
    local key = c.key
    if #c.took > 0 then
      many('ZREM', key, c.took)
      if redis.call('ZCARD', key) == 0 then redis.call('SREM', k_le(c.lane), c.env) end
    end
  end
  for lane, vtime in pairs(vtimes) do
    redis.call('HSET', k_l(lane), 'vtime', vtime)
    local args = {}
    for e in pairs(dirty[lane]) do
      args[#args + 1] = e
      args[#args + 1] = passes[lane][e]
    end
    redis.call('HSET', k_lp(lane), unpack(args))
    decr(k_l(lane), 'count', taken[lane])
  end
  local out, tokens = {}, {}
  if npicks > 0 then
    local token = redis.call('HINCRBY', K_CFG, 'token', npicks) - npicks
    local deadline = now + lease_ms
    local leases, attempts = {}, {}
    for i = 1, npicks do
      local id, r = pick_ids[i], pick_recs[i]
      token = token + 1
      local was_leased = r[F_EVER]
      local adl = lease_fields(r, token, worker, lease_ms, deadline)
      if r[F_TTL] and not was_leased then ttl_drop(id, r[F_TTL]) end
      leases[#leases + 1] = deadline
      leases[#leases + 1] = id
      if adl then
        attempts[#attempts + 1] = adl
        attempts[#attempts + 1] = id
      end
      out[#out + 1] = { id, save(id, r) }
      tokens[#tokens + 1] = token
    end
    many('ZADD', K_LEASE, leases)
    if #attempts > 0 then many('ZADD', K_ATT, attempts) end
  end
  return out, tokens
end

OPS['claim'] = function()
  -- ARGV[6] = the workloop's parked offer steps ('' for none, else 'consumer withdraw heard
  -- park deadline': the seq of the offer to take back ('-' none) and whether its delivery was
  -- heard ('1'), the seq of an offer to park when nothing is leased ('-' none) and its
  -- deadline), ARGV[7] = worker, ARGV[8] = chain, ARGV[9] = max, ARGV[10] = lease ms,
  -- ARGV[11..] = env, version pairs. A withdrawn offer's unheard leases come first.
  local consumer, w, heard, park, deadline =
    string.match(ARGV[6], '^(%d+) (%S+) (%S+) (%S+) (%S+)$')
  local out = {}
  if consumer and w ~= '-' then out = withdraw_offer(consumer, tonumber(w), heard == '1') end
  local leased = claim_runs(ARGV, 7, #ARGV, #out)
  for _, l in ipairs(leased) do out[#out + 1] = l end
  if consumer and park ~= '-' and #out == 0 then
    local args = {}
    for i = 7, #ARGV do args[#args + 1] = ARGV[i] end
    redis.call('HSET', K_OFFERS, consumer, cmsgpack.pack({ tonumber(park), tonumber(deadline), args }))
  end
  return fail('ok', out)
end

OPS['heartbeat'] = function()
  local out = {}
  local leases = {}
  for i = 6, #ARGV, 2 do
    local id, token = ARGV[i], tonumber(ARGV[i + 1])
    local r = load(id)
    if r and r[F_PLACE] == 'l' and r[F_TOKEN] == token and not r[F_LAPSED] then
      -- Never shortened: a heartbeat that ran late (held by a client through a reconnect,
      -- its `now` older than an earlier heartbeat's) leaves the later deadline.
      local ldl = now + r[F_LDUR]
      if ldl > r[F_LDL] then
        r[F_LDL] = ldl
        leases[#leases + 1] = ldl
        leases[#leases + 1] = id
        save(id, r)
      end
      if r[F_CRA] then out[#out + 1] = 'cancel' else out[#out + 1] = 'alive' end
    else
      out[#out + 1] = 'lost'
    end
  end
  if #leases > 0 then many('ZADD', K_LEASE, leases) end
  return fail('ok', out)
end

OPS['check_lease'] = function()
  local _, err = leased(ARGV[6], tonumber(ARGV[7]), false)
  return fail(err or 'ok')
end

OPS['finish'] = function()
  local id = ARGV[6]
  local r, err = leased(id, tonumber(ARGV[7]), true)
  if err then return fail(err) end
  end_lease(id, r)
  del_run(id)
  admit_env(r[F_ENV])
  return answer('ok')
end

-- Many finishes in one call: ARGV pairs (id, token), each as 'finish' above, in order;
-- answers one code per run ('ok', 'not_found', 'stale'). The envs whose slots were released
-- are admitted once each at the end (an admission pass admits as many runs as now fit), in
-- the order they first ended a run.
OPS['finish_many'] = function()
  local out = {}
  local envs, seen = {}, {}
  for i = 6, #ARGV, 2 do
    local id = ARGV[i]
    local r, err = leased(id, tonumber(ARGV[i + 1]), true)
    if err then
      out[#out + 1] = err
    else
      -- As `end_lease`, without clearing the lease fields of a record deleted at once.
      drop_lease_deadlines(id, r)
      if not r[F_LAPSED] then release_slots_later(r) end
      del_run(id)
      local e = r[F_ENV]
      if not seen[e] then
        seen[e] = true
        envs[#envs + 1] = e
      end
      out[#out + 1] = 'ok'
    end
  end
  flush_releases()
  for _, e in ipairs(envs) do admit_env(e) end
  return answer('ok', out)
end

-- Many lease checks in one call: ARGV pairs (id, token), each as 'check_lease'.
OPS['check_leases'] = function()
  local out = {}
  for i = 6, #ARGV, 2 do
    local _, err = leased(ARGV[i], tonumber(ARGV[i + 1]), false)
    out[#out + 1] = err or 'ok'
  end
  return fail('ok', out)
end

OPS['retry'] = function()
  local id = ARGV[6]
  local r, err = leased(id, tonumber(ARGV[7]), true)
  if err then return fail(err) end
  end_lease(id, r)
  r[F_ATTEMPT] = r[F_ATTEMPT] + 1
  r[F_AFTER] = tonumber(ARGV[8])
  place_waiting(id, r, 'retry')
  admit_env(r[F_ENV])
  return answer('ok')
end

OPS['release'] = function()
  local id = ARGV[6]
  local r, err = leased(id, tonumber(ARGV[7]), false)
  if err then return fail(err) end
  -- A cancelled run never goes back to its queue: the engine ends it canceled.
  if r[F_CRA] then return fail('cancel_requested') end
  end_lease(id, r)
  push_queued(id, r)
  moved(id, 'queued')
  admit_env(r[F_ENV])
  return answer('ok')
end

-- Where a run waits, as the caller's dispatch facts tell (ARGV[i..i+3] = env, queue, key,
-- score), or nil when not given.
local function at_args(i)
  if ARGV[i] == nil or ARGV[i] == '' then return nil end
  return { ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]) }
end

-- A run's record as stored (`live`, `snapshot`): the record bytes, or a list-resident run's
-- message as a record.
local function stored(id, r)
  if r[F_PLACE] == 'Q' then return cmsgpack.pack(r) end
  return redis.call('HGET', k_run(id), id)
end

-- ARGV[8..11] = where the run waits (optional, see `at_args`).
OPS['cancel'] = function()
  local id, grace = ARGV[6], tonumber(ARGV[7])
  local r = find(id, at_args(8))
  if not r then return fail('not_found') end
  if r[F_PLACE] == 'l' then
    if r[F_CDL] then return fail('requested', r[F_TOKEN], r[F_CDL], 0) end
    local gd = now + grace
    r[F_CRA] = now
    r[F_CDL] = gd
    if not r[F_LAPSED] then redis.call('ZADD', K_CXL, gd, id) end
    save(id, r)
    return fail('requested', r[F_TOKEN], gd, 1)
  end
  local status = status_of(r)
  local listed = r[F_PLACE] == 'Q'
  unplace_waiting(id, r)
  if not listed then del_run(id) end
  if status == 'ready' then admit_env(r[F_ENV]) end
  return answer('removed', status)
end

-- ARGV[9..12] = where the run waits (optional, see `at_args`).
OPS['reschedule'] = function()
  local id = ARGV[6]
  local r = find(id, at_args(9))
  if not r then return fail('not_found') end
  local status = status_of(r)
  if status ~= 'delayed' and status ~= 'queued' then return fail('wrong_state', status) end
  unplace_waiting(id, r)
  r[F_AFTER] = tonumber(ARGV[7])
  if ARGV[8] == '' then r[F_TTL] = false else r[F_TTL] = tonumber(ARGV[8]) end
  place_waiting(id, r, 'reschedule')
  admit_env(r[F_ENV])
  return answer('ok')
end

OPS['tick'] = function()
  local expired, lapsed, timed_out, cancel_elapsed, returned = {}, {}, {}, {}, {}
  -- 1. Delayed runs that came due.
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now)) do
    local r = load(id)
    if not r then
      redis.call('ZREM', K_DELAYED, id)
    else
      pull_delayed(id, r)
      push_queued(id, r)
      moved(id, 'queued')
    end
  end
  -- 2. TTL expiry of waiting runs that never held a lease, from every bucket that may hold a
  -- passed deadline. An entry counts only while its run still waits with that deadline (stale
  -- entries of runs claimed, canceled or rescheduled are dropped as they are met).
  for _, s in ipairs(redis.call('ZRANGEBYSCORE', K_TBZ, '-inf', now)) do
    local kb = k_tb(s)
    if redis.call('HGET', K_TBN, s .. 't') == 'u' then
      -- Out of deadline order: taken whole; the runs not yet due go back sorted.
      local entries = redis.call('LRANGE', kb, 0, -1)
      ttl_forget(s)
      local seen, later = {}, {}
      for _, e in ipairs(entries) do
        local id, r, _, live = ttl_entry(e, s)
        if live and not seen[id] then
          seen[id] = true
          if r[F_TTL] <= now then
            unplace_waiting(id, r, true)
            if r[F_PLACE] ~= 'Q' then del_run(id) end
            expired[#expired + 1] = { id, cmsgpack.pack(r) }
          else
            later[#later + 1] = { r[F_TTL], id, string.sub(e, 19) }
          end
        end
      end
      table.sort(later, function(a, b)
        if a[1] ~= b[1] then return a[1] < b[1] end
        return lt(a[2], b[2])
      end)
      for _, x in ipairs(later) do ttl_add(x[2], x[1], x[3]) end
    else
      -- In deadline order: the due runs are at the head.
      while true do
        local e = redis.call('LINDEX', kb, 0)
        if not e then
          ttl_forget(s)
          break
        end
        local id, r, deadline, live = ttl_entry(e, s)
        if live and deadline > now then
          redis.call('ZADD', K_TBZ, deadline, s)
          break
        end
        redis.call('LPOP', kb)
        if live then
          unplace_waiting(id, r)
          if r[F_PLACE] ~= 'Q' then del_run(id) end
          expired[#expired + 1] = { id, cmsgpack.pack(r) }
        end
      end
    end
  end
  -- Each report of steps 3 to 5 moves its deadline one lease duration on, so a report the
  -- engine did not act on (the process that heard it died first) comes again; acting on it
  -- ends the lease, and its deadlines with it.
  -- 3. Lapsed leases (slots released the first time only).
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_LEASE, '-inf', now)) do
    local r = load(id)
    if r and r[F_PLACE] == 'l' then
      if not r[F_LAPSED] then
        r[F_LAPSED] = true
        redis.call('ZREM', K_ATT, id)
        redis.call('ZREM', K_CXL, id)
        release_slots(r)
      end
      r[F_LDL] = now + r[F_LDUR]
      redis.call('ZADD', K_LEASE, r[F_LDL], id)
      save(id, r)
      lapsed[#lapsed + 1] = { id, cmsgpack.pack(r) }
    else
      redis.call('ZREM', K_LEASE, id)
    end
  end
  -- 4. Attempts past their max duration; 5. cancel grace periods that ended.
  for _, step in ipairs({ { K_ATT, timed_out, F_ADL }, { K_CXL, cancel_elapsed, F_CDL } }) do
    local key, list, field = step[1], step[2], step[3]
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', now)) do
      local r = load(id)
      if r and r[F_PLACE] == 'l' then
        r[field] = now + r[F_LDUR]
        redis.call('ZADD', key, r[field], id)
        save(id, r)
        list[#list + 1] = { id, r[F_TOKEN] }
      else
        redis.call('ZREM', key, id)
      end
    end
  end
  -- 6. Ready runs in lanes with no consumer for ready_timeout, in run id order.
  local due = {}
  for _, lane in ipairs(redis.call('SMEMBERS', K_LANES)) do
    local L = redis.call('HMGET', k_l(lane), 'count', 'os')
    if num(L[1]) > 0 and consumers_of(lane) == 0 then
      local os = num(L[2])
      for _, e in ipairs(redis.call('SMEMBERS', k_le(lane))) do
        for _, id in ipairs(redis.call('ZRANGE', k_lr(lane, e), 0, -1)) do
          local r = load(id)
          if r and r[F_PLACE] == 'r' and math.max(r[F_RAT], os) + ready_timeout <= now then
            due[#due + 1] = id
          end
        end
      end
    end
  end
  sorted(due)
  for _, id in ipairs(due) do
    local r = load(id)
    if r then
      pull_ready(id, r)
      r[F_SEQ] = false
      r[F_RAT] = false
      push_queued(id, r)
      moved(id, 'queued')
      returned[#returned + 1] = id
      redis.call('HSET', k_l(r[F_LANE]), 'orph', '1')
    end
  end
  -- 7. Admission for every env.
  admit_all()
  return answer('ok', expired, lapsed, timed_out, cancel_elapsed, returned)
end

-- ARGV[6] = 'arm' when the caller is the deployment's timer owner re-arming its timer: the
-- deadline it will sleep until is kept in `{p}:cfg.tarm`, read by `announce`.
OPS['next_deadline'] = function()
  if ARGV[6] == 'arm' then
    local d = next_deadline()
    if d < 0 then redis.call('HDEL', K_CFG, 'tarm') else redis.call('HSET', K_CFG, 'tarm', d) end
  end
  return answer('ok')
end

-- ARGV[6] = a deadline (ms) a call of another process created. Answers 1 when the timer owner
-- must hear of it (earlier than `tarm`, or no `tarm`), recording it as `tarm`, else 0.
OPS['announce'] = function()
  local d = tonumber(ARGV[6])
  local t = redis.call('HGET', K_CFG, 'tarm')
  if t and d >= tonumber(t) then return fail('ok', 0) end
  redis.call('HSET', K_CFG, 'tarm', d)
  return fail('ok', 1)
end

-- ARGV[7..10] = where the run waits (optional, see `at_args`), or '-' for its record only.
OPS['live'] = function()
  local id = ARGV[6]
  local raw = redis.call('HGET', k_run(id), id)
  if raw then return fail('ok', { id, raw }) end
  -- '-': the caller asks for a run held by id only.
  if ARGV[7] == '-' then return fail('ok', {}) end
  local r = find(id, at_args(7))
  if not r then return fail('ok', {}) end
  return fail('ok', { id, stored(id, r) })
end

-- Every record, then every live list entry of every key with backlog.
OPS['snapshot'] = function()
  local all = {}
  for _, b in ipairs(redis.call('SMEMBERS', K_RB)) do
    local part = redis.call('HGETALL', P .. ':run:' .. b)
    for i = 1, #part do all[#all + 1] = part[i] end
  end
  for _, e in ipairs(redis.call('SMEMBERS', K_ENVS)) do
    for _, q in ipairs(redis.call('SMEMBERS', k_bq(e))) do
      for _, k in ipairs(redis.call('SMEMBERS', k_bk(e, q))) do
        local tombs = {}
        for _, t in ipairs(redis.call('SMEMBERS', k_kt(e, q, k))) do tombs[t] = true end
        for _, m in ipairs(redis.call('LRANGE', k_kl(e, q, k), 0, -1)) do
          local id, r = msg_unpack(m, e, q, k)
          if not tombs[id] then
            all[#all + 1] = id
            all[#all + 1] = cmsgpack.pack(r)
          end
        end
      end
    end
  end
  return fail('ok', all)
end

OPS['register_consumer'] = function()
  local chain = ARGV[6]
  local id = redis.call('HINCRBY', K_CFG, 'cseq', 1)
  redis.call('HSET', K_CONS, id, chain)
  consumer_cache = nil
  for _, lane in ipairs(redis.call('SMEMBERS', K_LANES)) do
    if covers(chain, lane) then redis.call('HSET', k_l(lane), 'os', 0, 'orph', '0') end
  end
  admit_all()
  return fail('ok', id)
end

-- A consumer put back under its id (a rebuild, or its process finding a key space another
-- process rebuilt): once it is new here, the lanes it covers are no longer orphaned.
OPS['restore_consumer'] = function()
  local chain = ARGV[7]
  local added = redis.call('HSET', K_CONS, ARGV[6], chain)
  if num(redis.call('HGET', K_CFG, 'cseq')) < tonumber(ARGV[6]) then
    redis.call('HSET', K_CFG, 'cseq', ARGV[6])
  end
  if added == 1 then
    consumer_cache = nil
    for _, lane in ipairs(redis.call('SMEMBERS', K_LANES)) do
      if covers(chain, lane) then redis.call('HSET', k_l(lane), 'os', 0, 'orph', '0') end
    end
    admit_all()
  end
  return fail('ok')
end

OPS['unregister_consumer'] = function()
  local id = ARGV[6]
  -- A parked offer goes; leases an enqueue made for it lapse and are recovered.
  redis.call('HDEL', K_OFFERS, id)
  local chain = redis.call('HGET', K_CONS, id)
  if chain then
    redis.call('HDEL', K_CONS, id)
    consumer_cache = nil
    for _, lane in ipairs(redis.call('SMEMBERS', K_LANES)) do
      if covers(chain, lane) and consumers_of(lane) == 0 then
        redis.call('HSET', k_l(lane), 'os', now)
      end
    end
  end
  return answer('ok')
end

-- The library's one function: `FCALL <name> 1 {prefix} op now ready_timeout format generation ...`.
local function dispatch(keys, args)
  setup(keys, args)
  if op == 'init' then return OPS['init']() end
  local refused = check()
  if refused ~= nil then return refused end
  local run = OPS[op]
  if run then
    local answered = run()
    if answered ~= nil then return answered end
  end
  return fail('unknown_op', op)
end

redis.register_function('__RUNLANE_FUNCTION__', dispatch)
