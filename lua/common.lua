-- Every call carries its deadline (ms, in Redis' clock) as its last argument; it is taken off
-- ARGV here, so no script's own arguments move. A script that Redis runs past its deadline (it
-- was queued while Redis hung: SIGSTOP, a long fork, a slow command ahead of it) does nothing
-- and answers EXPIRED: quotad has already answered the call as failed, and a failed call must
-- not count later. quotad waits a little longer than this deadline for the answer (see
-- `RedisStore::arm`), so a script that ran in time has its reply read.
local call_deadline = tonumber(table.remove(ARGV))
if not call_deadline then
  return redis.error_reply('ERR quotad script called without its deadline argument')
end
-- Redis' time (ms) when the script started: read once, for the deadline and the dirty mark.
local call_now_ms
do
  local t = redis.call('TIME')
  call_now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local late = call_now_ms - call_deadline
  if late > 0 then
    return redis.error_reply('EXPIRED ran ' .. late .. ' ms after the call\'s deadline; nothing done')
  end
end

-- Helpers shared by the counting scripts. quotad prepends this file to each of them when it loads
-- them, so every script stays one EVALSHA and one atomic step.
--
-- A counter hash holds one field per usage type (its count), `v` (the version: it grows on every
-- change, so Postgres can refuse an older total), `p`/`pv` (the user's plan and its version in
-- Postgres' user_plans), `m:<type>:<name>` / `s:<type>:<name>` (summed numeric metadata and
-- latest other metadata, as JSON text), `n:<type>` (how many metadata names the type has),
-- `o:<type>` and `x:ov` (the owner's limit overrides and their version in Postgres'
-- limit_overrides; see set_limits.lua), `ov:<type>` (the period's overage: units counted past the
-- limit in force at each count, where the plan allows overage; see past_limit), `h:<type>` (units
-- held by open reservations; see reserve.lua and holds.lua), `x:dirty` (set exactly while the
-- counter is in its bucket's dirty set; see mark_dirty), `e:<type>:<percent>` (a threshold event,
-- see record_thresholds) and `x:ev` (set while an event is not yet written to Postgres). An
-- account's counter hash has the same fields (its plan from account_plans), without metadata. A
-- hash
-- without `v` has not been loaded from Postgres yet: every script that reads or writes counts
-- answers "hydrate" for it and changes nothing.

-- The plan in force, its limit and its overage cap for one type. `override` wins when not empty;
-- else `stored` (the hash's `p`, nil when it has none); a plan no longer configured falls back to
-- `default`. ARGV[first..last] (`last` = #ARGV when not given) are plan, limit, cap triples (limit
-- -1 = unlimited; cap: units allowed past the limit, 0 = none, -1 = no cap: a soft limit).
local function resolve_plan(stored, override, default, first, last)
  local plan = override
  if plan == '' then
    plan = stored or default
  end
  local default_limit, default_cap = nil, 0
  for i = first, last or #ARGV, 3 do
    if ARGV[i] == plan then
      return plan, tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    end
    if ARGV[i] == default then
      default_limit, default_cap = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    end
  end
  return default, default_limit, default_cap
end

-- Marks a counter as changed since its last flush. The dirty set is a sorted set scored by the
-- Redis server's time (ms) of the first unflushed change: the flusher takes the oldest first, and
-- the score tells how far behind Postgres is. NX keeps the first time.
--
-- The hash's DIRTY field mirrors membership: every script that adds the member sets it, and
-- unmark.lua clears it in the step that removes the member. So the counting script, which reads
-- the hash anyway, marks only a counter's first change after a flush and skips the ZADD on every
-- other call. (Only a dirty set deleted by hand can leave a flag without its member: `quotad
-- reconcile` reports the drift that follows, and `--repair` marks the counter again.)
local DIRTY = 'x:dirty'
local function mark_dirty(hash, dirty, member)
  redis.call('ZADD', dirty, 'NX', call_now_ms, member)
  redis.call('HSET', hash, DIRTY, 1)
end

-- A count, `v` or `n:<type>` as stored (`raw`, nil when missing = 0). A value that is not a whole
-- number, or is beyond 2^53 (where a script's numbers stop being exact), can only be corrupt data
-- (a hand edit): the script stops with an error reply before it writes anything, instead of
-- counting on top of it.
local EXACT = 9007199254740992
local function whole(raw, hash, field)
  if not raw then
    return 0
  end
  local n = tonumber(raw)
  if not n or n ~= math.floor(n) or n >= EXACT or n <= -EXACT then
    error({err = 'quotad: field ' .. field .. ' of ' .. hash .. ' holds ' .. raw
      .. ', not a whole number within ±2^53'})
  end
  return n
end

-- `whole` of a field read from `hash`.
local function stored_count(hash, field)
  return whole(redis.call('HGET', hash, field), hash, field)
end

-- Lowers a count by `amount`, never below 0, and records the change like any other: version bump
-- and dirty mark in the same step. What is given back comes off the period's overage
-- (`ov:<type>`) first: units past the limit are the last counted, and a refunded or released unit
-- must not stay billed. A counter already at 0 is left as it is: no version bump, no dirty mark
-- (nothing changed, so nothing needs flushing or announcing). Returns the new count, how much was
-- actually given back (min(amount, the count before)) and the overage after. A count that is not
-- a whole number (corrupt data) is refused before anything is written.
local function lower(hash, field, amount, dirty, member)
  local used = stored_count(hash, field)
  local ov_field = 'ov:' .. field
  local overage = stored_count(hash, ov_field)
  local given = math.min(amount, used)
  if given <= 0 then
    return used, 0, overage
  end
  stored_count(hash, 'v') -- a corrupt version stops the script here, before any write
  local new = used - given
  redis.call('HSET', hash, field, new)
  if overage > 0 then
    overage = math.max(0, overage - given)
    redis.call('HSET', hash, ov_field, overage)
  end
  redis.call('HINCRBY', hash, 'v', 1)
  mark_dirty(hash, dirty, member)
  return new, given, overage
end

-- Tells every replica that `user`'s counts may have gone down or their limits up, so their
-- near-caches forget the user's refusals. Part of the same atomic step as the change itself.
local function announce(channel, user)
  redis.call('PUBLISH', channel, user)
end

-- The field a month's counter hash gets once the next month's counter has been created in this
-- Redis (started fresh or loaded from Postgres). From then on that next month can never start
-- fresh again: if its hash goes missing alone (a DEL, an eviction, a lagging replica) it may have
-- counted and flushed already, so it must be loaded from Postgres. The ':' keeps the flusher and
-- reconcile from taking it for a usage type.
local SUCCESSOR = 'x:next'

-- Marks `prev` (a month's counter hash, if this Redis holds it loaded) as having a successor.
-- Called for the previous month by every script that creates a month's counter, and by hydrate
-- for a month it loads after that month ended (its successor may exist, or have existed).
local function mark_successor(prev)
  if redis.call('HEXISTS', prev, 'v') == 1 then
    redis.call('HSET', prev, SUCCESSOR, 1)
  end
end

-- Starts a missing month counter at zero without asking Postgres, when this Redis provably lost
-- nothing Postgres could hold for it:
--   * the bucket's marker (`{b}:since`, the time in ms when a load from Postgres first set it) is
--     older than the month's start by more than `margin` ms (the clock skew allowed between
--     replicas). Any data loss (restart without persistence, FLUSHALL) takes the
--     marker with it, so every counter of this month was made in this Redis, and a missing one
--     was never counted anywhere;
--   * the user's previous-month counter is loaded, so the plan is known: its `p`/`pv`, or a newer
--     plan change already written into this hash;
--   * this month's counter was never created before: the previous month's hash carries no
--     SUCCESSOR mark. A counter lost on its own (the marker and last month's hash survived) is
--     loaded from Postgres instead of restarting at 0 below the total Postgres already holds.
-- `month_start` is the month's first instant in ms ("0" for lifetime counters, which never start
-- fresh). Returns true if it started the counter; the caller then counts as usual.
local function start_fresh(hash, prev, marker, month_start, margin, expire_at)
  if month_start == '0' then
    return false
  end
  local since = redis.call('GET', marker)
  if not since or tonumber(since) >= tonumber(month_start) - tonumber(margin) then
    return false
  end
  local plan = redis.call('HMGET', prev, 'v', 'p', 'pv', SUCCESSOR)
  if not plan[1] or plan[4] then
    return false
  end
  if plan[2] then
    local cur = tonumber(redis.call('HGET', hash, 'pv') or '-1')
    if cur < tonumber(plan[3]) then
      redis.call('HSET', hash, 'p', plan[2], 'pv', plan[3])
    end
  end
  redis.call('HSET', hash, 'v', 0)
  redis.call('EXPIREAT', hash, expire_at)
  redis.call('HSET', prev, SUCCESSOR, 1)
  return true
end

-- Where a user's counters live. A user without an account counts in the bucket of their own id;
-- a member of an account counts in the bucket of the account's id, beside the account's pool, so
-- one script can check and count both. Each bucket may hold a route key per user
-- (`{b}:u:<user>`, see `store::keys`):
--   missing      the user's counters are here and the user has no account (their own bucket)
--   "<account>"  the user's counters are here, and the user is a member of that account
--   ">moving"    the counters are being moved away from here (a membership change under way)
--   "><where>"   the counters moved away: to the bucket of account <where>, or ">home"
-- Every script that reads or writes a user's counters is told what the caller believes the route
-- to be ("" for none, else the account id) and does nothing but answer 'moved' with the actual
-- value when they differ; the caller then follows it. So a replica with an outdated idea of a
-- user's account never counts in the wrong place, and never bypasses an account's pool.
-- Returns nil when the route is as believed, else what the route key holds ("" when missing);
-- false when it is missing where the caller believes an account: a Redis that lost its data lost
-- its routes too, and only Postgres can say (the caller loads the user's counter, and
-- hydrate.lua writes the route back from Postgres, or forwards).
local function misrouted(route_key, believed)
  local r = redis.call('GET', route_key)
  if (r or '') == believed then
    return nil
  end
  if not r then
    return false
  end
  return r
end

-- The limit in force at one level for `field`: the customer's override (`o:<type>`: a limit, or
-- -1 for unlimited; written by set_limits.lua) wins over the plan's (`plan_limit`).
-- Returns the limit and where it comes from: 'override' or 'plan'.
local function level_limit(override, plan_limit)
  if override then
    return tonumber(override), 'override'
  end
  return plan_limit, 'plan'
end

-- The fields `...` (HMGET's names, `v` first) of a counter hash a decision reads, after starting
-- it fresh if it may (see start_fresh); nil when it must be loaded from Postgres first.
local function read_counter(hash, prev, marker, month_start, margin, expire_at, ...)
  local got = redis.call('HMGET', hash, ...)
  if not got[1] then
    if not start_fresh(hash, prev, marker, month_start, margin, expire_at) then
      return nil
    end
    got = redis.call('HMGET', hash, ...)
  end
  return got
end

-- `read_counter` of the user's counter hash and, for a member (`ahash` not nil), the account's
-- pool: (got, account's got), or nil, nil and which must be loaded from Postgres first ("user",
-- "account" or "user account"), as the decision scripts answer "hydrate".
local function read_levels(hash, prev, ahash, aprev, marker, month_start, margin, expire_at, ...)
  local got = read_counter(hash, prev, marker, month_start, margin, expire_at, ...)
  local ag = ahash and read_counter(ahash, aprev, marker, month_start, margin, expire_at, ...)
  local missing = {}
  if not got then
    missing[#missing + 1] = 'user'
  end
  if ahash and not ag then
    missing[#missing + 1] = 'account'
  end
  if #missing > 0 then
    return nil, nil, table.concat(missing, ' ')
  end
  return got, ag
end

-- The user's level of a decision: plan, limit (-1 = unlimited), where the limit comes from, and
-- the overage cap (see resolve_plan). `stored` is the hash's plan, `override` its `o:<type>`,
-- `sent` the plan sent with the call ("" = none), `first` where the plan, limit, cap triples
-- start in ARGV (up to `last`, see resolve_plan). A member of an account (`pooled`) with no plan of their own, no override and
-- none sent has no limit of their own: the pool alone decides ('account'). The plan's overage
-- applies on top of the limit in force, an override's too: an override changes how much is
-- included, not whether the plan sells use past it.
local function user_level(stored, override, sent, default, first, pooled, last)
  local plan, plan_limit, cap = resolve_plan(stored, sent, default, first, last)
  if pooled and not override and not stored and sent == '' then
    return plan, -1, 'account', 0
  end
  local limit, source = level_limit(override, plan_limit)
  return plan, limit, source, cap
end

-- An account's pool: plan (its stored one, else the default), limit, where it comes from, and
-- the overage cap.
local function pool_level(stored, override, default, first, last)
  local plan, plan_limit, cap = resolve_plan(stored, '', default, first, last)
  local limit, source = level_limit(override, plan_limit)
  return plan, limit, source, cap
end

-- Whether `amount` more fits at a level: within the limit, or past it by no more than the
-- overage cap (-1: no cap, a soft limit).
local function fits(amount, used, limit, cap)
  return limit < 0 or cap < 0 or used + amount <= limit + cap
end

-- The level at which `amount` more does not fit: 'user' (checked first), 'account' (with a pool:
-- `aused` not nil), or nil when it fits at every level.
local function refusing_level(amount, used, limit, cap, aused, alimit, acap)
  if not fits(amount, used, limit, cap) then
    return 'user'
  end
  if aused and not fits(amount, aused, alimit, acap) then
    return 'account'
  end
  return nil
end

-- Threshold events. A type's `notify` list gives thresholds in percent of the limit. The count
-- that first takes a user's counter to or past a threshold (ceil(percent × limit / 100)) under a
-- limit records one event in the counter hash, in the same step as the count:
-- `e:<type>:<percent>` = "<limit> <used> <plan> <ms>" (the limit it fired under, the count it
-- reached, the plan, and Redis' time), and `x:ev` = 1, which tells the flusher the hash holds an
-- event Postgres does not have yet (it writes the events with the totals, in one transaction,
-- and unmark.lua clears `x:ev` with the dirty mark). The field stays for the rest of the period,
-- so the threshold does not fire again under the same limit: a refund that takes the counter
-- back under it and a count that crosses it again record nothing. A limit that changes (a new
-- plan, an override) arms the thresholds again under the new limit. A new period is a new hash:
-- everything is armed again. Unlimited and zero limits record nothing. Only counts that are made
-- reach here: a refused consume, a replay and a check record nothing.
local EVENT_PENDING = 'x:ev'
local function record_thresholds(hash, field, list, used, limit, plan)
  if limit <= 0 then
    return
  end
  local limit_text = string.format('%d', limit)
  for pct in string.gmatch(list, '%d+') do
    if used * 100 >= tonumber(pct) * limit then
      local name = 'e:' .. field .. ':' .. pct
      local mark = redis.call('HGET', hash, name)
      if not mark or string.match(mark, '^%d+') ~= limit_text then
        redis.call('HSET', hash, name,
          limit_text .. ' ' .. string.format('%d', used) .. ' ' .. plan .. ' ' .. call_now_ms,
          EVENT_PENDING, 1)
      end
    else
      -- Ascending: the thresholds after this one are not reached either.
      return
    end
  end
end

-- The units of `amount`, counted on top of `used`, that fall past `limit`: the overage this
-- count adds at a level whose plan allows overage (cap not 0). 0 without a limit, and for a hard
-- limit (track counts past it regardless, but the plan sells no overage there).
local function past_limit(amount, used, limit, cap)
  if limit < 0 or cap == 0 then
    return 0
  end
  return math.max(0, used + amount - math.max(used, limit))
end
