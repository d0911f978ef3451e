-- check: the decision consume would make, counting nothing.
--
-- KEYS[1]  counter hash  {prefix}:1:{b}:c:<user>:<period>
-- KEYS[2]  previous month's counter hash; KEYS[3] the bucket's marker (see start_fresh)
-- KEYS[4]  idempotency record {prefix}:1:{b}:i:<user>:<key>  (only when the call has a key)
-- ARGV[1]  usage type (the hash field)
-- ARGV[2]  amount, a whole number > 0
-- ARGV[3]  plan override ("" = the plan stored in the hash, else the default plan)
-- ARGV[4]  default plan
-- ARGV[5]  month start, ms ("0" for lifetime); ARGV[6] allowed clock skew, ms; ARGV[7] the
--          EXPIREAT of a counter started fresh
-- ARGV[8..] plan, limit pairs for this type (-1 = unlimited)
--
-- Returns {status, used, plan, limit}: "ok" (the amount fits), "denied" (it does not),
-- "conflict" (the idempotency key names an earlier consume or track: check is another call), or
-- "hydrate" (the counter is not loaded from Postgres yet, and cannot start fresh). A check
-- records nothing under its key, so a key never seen is decided as if there were none.
local hash, field, amount = KEYS[1], ARGV[1], tonumber(ARGV[2])

if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then
  return {'conflict', 0, '', 0}
end

local got = redis.call('HMGET', hash, 'v', field, 'p')
if not got[1] then
  if not start_fresh(hash, KEYS[2], KEYS[3], ARGV[5], ARGV[6], ARGV[7]) then
    return {'hydrate', 0, '', 0}
  end
  got = redis.call('HMGET', hash, 'v', field, 'p')
end
local plan, limit = resolve_plan(got[3], ARGV[3], ARGV[4], 8)
local used = whole(got[2], hash, field)
if limit >= 0 and used + amount > limit then
  return {'denied', used, plan, limit}
end
return {'ok', used, plan, limit}
