-- refund: give back exactly one earlier consume or track, named by its idempotency record, at
-- every level it counted at.
--
-- KEYS[1]  idempotency record  {prefix}:1:{b}:i:<user>:<key>
-- KEYS[2]  the user's counter hash the record names (its period, read by the caller just before)
-- KEYS[3]  dirty set
-- KEYS[4]  the user's route key (see misrouted in common.lua)
-- KEYS[5]  with an account only: the account's counter hash of that period
-- ARGV[1]  period id the caller read from the record
-- ARGV[2]  the user's dirty-set member "<user>:<period>"
-- ARGV[3]  invalidation channel; ARGV[4] the user, announced there when a refund is made (and
--          the account, when its pool got something back)
-- ARGV[5]  the account the caller believes the user is a member of ("" = none): the route
-- ARGV[6]  the account's dirty-set member "a:<account>:<period>" ("" without an account)
--
-- The account's pool is given back too when the record says the call counted in it (field `ac`)
-- and the user is still a member of that account; a call counted under another account (the user
-- moved since) is given back at the user's level only: that account's pool is in another slot.
--
-- Returns {status, used, stored plan, type, amount, account_used, account_given, detail, overage,
--          account_overage}:
--   "ok"       given back, never below 0; used is the user's new total, amount what was actually
--              given back (min(the call's amount, the count before)), likewise account_used and
--              account_given for the account, and detail "pool" (0, 0 and "" when it was not
--              given back there: no account, or the call counted in another). What is given back
--              comes off the period's overage first (see lower in common.lua); overage and
--              account_overage are the overage after. A counter
--              already at 0 is left alone (no version bump, no dirty mark). Either way the record
--              is marked refunded.
--   "missing"  no such record (never seen, or expired)
--   "refunded" the record was refunded before
--   "hydrate"  a counter is not loaded from Postgres yet (detail: "user" or "account"); nothing done
--   "moved"    the route is not ARGV[5]; detail is what the route key holds; nothing done
local idem, hash, dirty = KEYS[1], KEYS[2], KEYS[3]
local account = ARGV[5]
local ahash = account ~= '' and KEYS[5] or nil
local route = misrouted(KEYS[4], account)
if route == false then
  return {'hydrate', 0, '', '', 0, 0, 0, 'user', 0, 0}
elseif route then
  return {'moved', 0, '', '', 0, 0, 0, route, 0, 0}
end
local rec = redis.call('HMGET', idem, 't', 'a', 'pe', 'r', 'ac')
if not rec[1] or rec[3] ~= ARGV[1] then
  return {'missing', 0, '', '', 0, 0, 0, '', 0, 0}
end
if rec[4] == '1' then
  return {'refunded', 0, '', rec[1], tonumber(rec[2]), 0, 0, '', 0, 0}
end
if redis.call('HEXISTS', hash, 'v') == 0 then
  return {'hydrate', 0, '', rec[1], tonumber(rec[2]), 0, 0, 'user', 0, 0}
end
local in_pool = ahash and rec[5] == account
if in_pool and redis.call('HEXISTS', ahash, 'v') == 0 then
  return {'hydrate', 0, '', rec[1], tonumber(rec[2]), 0, 0, 'account', 0, 0}
end
local used, given, overage = lower(hash, rec[1], tonumber(rec[2]), dirty, ARGV[2])
local aused, agiven, aoverage = 0, 0, 0
if in_pool then
  aused, agiven, aoverage = lower(ahash, rec[1], tonumber(rec[2]), dirty, ARGV[6])
end
redis.call('HSET', idem, 'r', 1)
if given > 0 or agiven > 0 then
  announce(ARGV[3], ARGV[4])
end
if agiven > 0 then
  announce(ARGV[3], account)
end
return {'ok', used, redis.call('HGET', hash, 'p') or '', rec[1], given, aused, agiven,
  in_pool and 'pool' or '', overage, aoverage}
