-- hydrate: load a counter hash from what Postgres holds, only if it is still not loaded.
--
-- KEYS[1]  counter hash  {prefix}:1:{b}:c:<user>:<period>
-- KEYS[2]  the bucket's marker {prefix}:1:{b}:since: set (if missing) to ARGV[7], the time of
--          this load (ms). From then on this bucket's counters of any month that starts later can
--          start fresh without a Postgres read (see start_fresh); a Redis that loses data loses
--          the marker with it.
-- KEYS[3]  the previous month's counter hash (month counters only): marked (see mark_successor
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
-- ARGV[10..] field, value pairs: counts by type, and metadata fields
--
-- Returns 1 if it filled the hash, 0 if another caller had loaded it already. A plan set in Redis
-- by a newer plan change (higher `pv`) is kept.
local hash = KEYS[1]
redis.call('SET', KEYS[2], ARGV[7], 'NX')
if redis.call('HEXISTS', hash, 'v') == 1 then
  return 0
end
for i = 10, #ARGV, 2 do
  redis.call('HSET', hash, ARGV[i], ARGV[i + 1])
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
elseif ARGV[2] == '0' and #ARGV < 10 then
  redis.call('EXPIRE', hash, ARGV[8])
end
if KEYS[3] then
  mark_successor(KEYS[3])
end
if ARGV[9] ~= '0' and tonumber(ARGV[7]) >= tonumber(ARGV[9]) then
  mark_successor(hash)
end
announce(ARGV[5], ARGV[6])
return 1
