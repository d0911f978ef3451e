-- check: the decision consume would make, counting nothing.
--
-- KEYS[1]  counter hash  {prefix}:1:{b}:c:<user>:<period>
-- ARGV[1]  usage type (the hash field)
-- ARGV[2]  amount, a whole number > 0
-- ARGV[3]  plan override ("" = the plan stored in the hash, else the default plan)
-- ARGV[4]  default plan
-- ARGV[5..] plan, limit pairs for this type (-1 = unlimited)
--
-- Returns {status, used, plan, limit}: "ok" (the amount fits), "denied" (it does not), or
-- "hydrate" (the counter is not loaded from Postgres yet).
local hash, field, amount = KEYS[1], ARGV[1], tonumber(ARGV[2])

if redis.call('HEXISTS', hash, 'v') == 0 then
  return {'hydrate', 0, '', 0}
end
local plan, limit = resolve_plan(hash, ARGV[3], ARGV[4], 5)
local used = tonumber(redis.call('HGET', hash, field) or '0')
if limit >= 0 and used + amount > limit then
  return {'denied', used, plan, limit}
end
return {'ok', used, plan, limit}
