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
