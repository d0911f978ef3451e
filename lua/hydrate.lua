-- hydrate: load a counter hash from what Postgres holds, only if it is still not loaded.
--
-- KEYS[1]  counter hash  {prefix}:1:{b}:c:<user>:<period>
-- KEYS[2]  the bucket's marker {prefix}:1:{b}:since: set (if missing) to ARGV[7], the time of
--          this load (ms). From then on this bucket's counters of any month that starts later can
--          start fresh without a Postgres read (see start_fresh); a Redis that loses data loses
--          the marker with it.
-- KEYS[3]  the owner's route key {prefix}:1:{b}:u:<id> (see misrouted in common.lua; an
--          account's is never set)
-- KEYS[4]  the previous month's counter hash (month counters only): marked (see mark_successor
--          in common.lua) so this month, once loaded, can never start fresh after a loss of its
--          own hash
-- ARGV[1]  EXPIREAT, unix seconds (0 = never: lifetime counters)
-- ARGV[2]  version: the highest version Postgres holds for this user and period (0 if none)
-- ARGV[3]  the user's plan in Postgres ("" = none stored)
-- ARGV[4]  that plan's version in user_plans (0 if none)
-- ARGV[5]  invalidation channel; ARGV[6] the user, announced there when the hash is filled (a
--          counter loaded again may hold less than the one Redis lost)
-- ARGV[7]  now, ms (the daemon's clock)
-- ARGV[8]  seconds a lifetime counter loaded with nothing (version 0, no fields) is kept: a read
--          of a user Postgres does not know must not leave a hash that never expires. The first
--          count into it (consume.lua) makes it last (PERSIST).
-- ARGV[9]  the instant (ms) from which the next month's counter may exist: the month's end less
--          the clock skew allowed between replicas ("0" for lifetime). A month loaded at or after
--          it gets its own successor mark at once: its next month may have been created (and
--          lost) already, so that one must not start fresh either.
-- ARGV[10] the route the caller believes ("" = no account, else the account id; "" for an
--          account's own counters)
-- ARGV[11] where Postgres' account_members places the owner's counters: "=<route>" (in this
--          bucket, under that route: "" or the account id) or "><where>" (elsewhere: "home" or the
--          account id); "=" for an account's own counters
-- ARGV[12] the version of the owner's limit overrides in Postgres (0 = none)
-- ARGV[13..] field, value pairs: counts by type, metadata fields, `o:<type>` overrides
--
-- The hash is filled only where the owner's counters live. When the route key is set, it decides
-- (as for every script); when it is missing (a Redis that lost its data lost the routes too),
-- Postgres does, and the route key is written back from it.
--
-- Returns 1 if it filled the hash, 0 if another caller had loaded it already, or {"moved", route}
-- when the counters do not live here (nothing filled). A plan set in Redis by a newer plan change
-- (higher `pv`), and overrides set by a newer override change (higher `x:ov`), are kept.
local hash = KEYS[1]
local believed = ARGV[10]
local route = redis.call('GET', KEYS[3])
if not route then
  local placed = ARGV[11]
  if string.sub(placed, 1, 1) == '>' then
    redis.call('SET', KEYS[3], placed)
    return {'moved', placed}
  end
  route = string.sub(placed, 2)
  if route ~= '' then
    redis.call('SET', KEYS[3], route)
  end
end
if route ~= believed then
  return {'moved', route}
end
redis.call('SET', KEYS[2], ARGV[7], 'NX')
if redis.call('HEXISTS', hash, 'v') == 1 then
  return 0
end
local newer_overrides = tonumber(redis.call('HGET', hash, 'x:ov') or '0') < tonumber(ARGV[12])
if newer_overrides then
  for _, f in ipairs(redis.call('HKEYS', hash)) do
    if string.sub(f, 1, 2) == 'o:' then
      redis.call('HDEL', hash, f)
    end
  end
  redis.call('HSET', hash, 'x:ov', ARGV[12])
end
for i = 13, #ARGV, 2 do
  if string.sub(ARGV[i], 1, 2) ~= 'o:' or newer_overrides then
    redis.call('HSET', hash, ARGV[i], ARGV[i + 1])
  end
end
redis.call('HSET', hash, 'v', ARGV[2])
if ARGV[3] ~= '' then
  local pv = tonumber(redis.call('HGET', hash, 'pv') or '-1')
  if pv < tonumber(ARGV[4]) then
    redis.call('HSET', hash, 'p', ARGV[3], 'pv', ARGV[4])
  end
end
if ARGV[1] ~= '0' then
  redis.call('EXPIREAT', hash, ARGV[1])
elseif ARGV[2] == '0' and #ARGV < 13 then
  redis.call('EXPIRE', hash, ARGV[8])
end
if KEYS[4] then
  mark_successor(KEYS[4])
end
if ARGV[9] ~= '0' and tonumber(ARGV[7]) >= tonumber(ARGV[9]) then
  mark_successor(hash)
end
announce(ARGV[5], ARGV[6])
return 1
