-- refund: give back exactly one earlier consume or track, named by its idempotency record.
--
-- KEYS[1]  idempotency record  {prefix}:1:{b}:i:<user>:<key>
-- KEYS[2]  counter hash the record names (its period, read by the caller just before)
-- KEYS[3]  dirty set
-- ARGV[1]  period id the caller read from the record
-- ARGV[2]  dirty-set member "<user>:<period>"
-- ARGV[3]  invalidation channel; ARGV[4] the user, announced there when a refund is made
--
-- Returns {status, used, stored plan, type, amount}:
--   "ok"       given back, never below 0; used is the new total, amount what was actually given
--              back (min(the call's amount, the count before)). A counter already at 0 (lowered
--              by a release, or reloaded lower) is left alone: no version bump, no dirty mark, no
--              announcement, amount 0. Either way the record is marked refunded.
--   "missing"  no such record (never seen, or expired)
--   "refunded" the record was refunded before
--   "hydrate"  the counter is not loaded from Postgres yet; nothing done
local idem, hash, dirty = KEYS[1], KEYS[2], KEYS[3]
local rec = redis.call('HMGET', idem, 't', 'a', 'pe', 'r')
if not rec[1] or rec[3] ~= ARGV[1] then
  return {'missing', 0, '', '', 0}
end
if rec[4] == '1' then
  return {'refunded', 0, '', rec[1], tonumber(rec[2])}
end
if redis.call('HEXISTS', hash, 'v') == 0 then
  return {'hydrate', 0, '', rec[1], tonumber(rec[2])}
end
local used, given = lower(hash, rec[1], tonumber(rec[2]), dirty, ARGV[2])
redis.call('HSET', idem, 'r', 1)
if given > 0 then
  announce(ARGV[3], ARGV[4])
end
return {'ok', used, redis.call('HGET', hash, 'p') or '', rec[1], given}
