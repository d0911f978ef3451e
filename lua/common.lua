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
do
  local t = redis.call('TIME')
  local late = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - call_deadline
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
-- latest other metadata, as JSON text) and `n:<type>` (how many metadata names the type has). A hash without `v` has not been loaded from Postgres yet: every script
-- that reads or writes counts answers "hydrate" for it and changes nothing.

-- The plan in force and its limit for one type. `override` wins when not empty; else the stored
-- plan; a plan no longer configured falls back to `default`. ARGV[first..] are plan, limit pairs
-- (limit -1 = unlimited).
local function resolve_plan(hash, override, default, first)
  local plan = override
  if plan == '' then
    plan = redis.call('HGET', hash, 'p') or default
  end
  local default_limit = nil
  for i = first, #ARGV, 2 do
    if ARGV[i] == plan then
      return plan, tonumber(ARGV[i + 1])
    end
    if ARGV[i] == default then
      default_limit = tonumber(ARGV[i + 1])
    end
  end
  return default, default_limit
end

-- Marks a counter as changed since its last flush. The dirty set is a sorted set scored by the
-- Redis server's time (ms) of the first unflushed change: the flusher takes the oldest first, and
-- the score tells how far behind Postgres is. NX keeps the first time.
local function mark_dirty(dirty, member)
  local t = redis.call('TIME')
  redis.call('ZADD', dirty, 'NX', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), member)
end

-- Lowers a count by `amount`, never below 0, and records the change like any other: version bump
-- and dirty mark in the same step. Returns the new count.
local function lower(hash, field, amount, dirty, member)
  local used = tonumber(redis.call('HGET', hash, field) or '0')
  local new = used - amount
  if new < 0 then
    new = 0
  end
  redis.call('HSET', hash, field, new)
  redis.call('HINCRBY', hash, 'v', 1)
  mark_dirty(dirty, member)
  return new
end

-- Tells every replica that `user`'s counts may have gone down or their limits up, so their
-- near-caches forget the user's refusals. Part of the same atomic step as the change itself.
local function announce(channel, user)
  redis.call('PUBLISH', channel, user)
end

-- Starts a missing month counter at zero without asking Postgres, when this Redis provably lost
-- nothing Postgres could hold for it:
--   * the bucket's marker (`{b}:since`, the time in ms when a load from Postgres first set it) is
--     older than the month's start by more than `margin` ms (the clock skew allowed between
--     replicas). Any data loss (restart without persistence, FLUSHALL) takes the
--     marker with it, so every counter of this month was made in this Redis, and a missing one
--     was never counted anywhere;
--   * the user's previous-month counter is loaded, so the plan is known: its `p`/`pv`, or a newer
--     plan change already written into this hash.
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
  if redis.call('HEXISTS', prev, 'v') == 0 then
    return false
  end
  local plan = redis.call('HMGET', prev, 'p', 'pv')
  if plan[1] then
    local cur = tonumber(redis.call('HGET', hash, 'pv') or '-1')
    if cur < tonumber(plan[2]) then
      redis.call('HSET', hash, 'p', plan[1], 'pv', plan[2])
    end
  end
  redis.call('HSET', hash, 'v', 0)
  redis.call('EXPIREAT', hash, expire_at)
  return true
end
