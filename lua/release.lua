-- release: lower a lifetime counter (a stored thing was deleted), never below 0, at the user's
-- level and, for a member of an account, in the account's pool too.
--
-- KEYS[1]  the user's counter hash {prefix}:1:{b}:c:<user>:life
-- KEYS[2]  dirty set
-- KEYS[3]  the user's route key (see misrouted in common.lua)
-- KEYS[4]  with an account only: the account's counter hash {prefix}:1:{b}:a:<account>:life
-- ARGV[1]  usage type (the hash field)
-- ARGV[2]  amount, a whole number > 0
-- ARGV[3]  the user's dirty-set member "<user>:life"
-- ARGV[4]  invalidation channel; ARGV[5] the user, announced there (and the account, when its
--          pool was lowered)
-- ARGV[6]  the account the caller believes the user is a member of ("" = none): the route
-- ARGV[7]  the account's dirty-set member "a:<account>:life" ("" without an account)
--
-- Returns {status, used, stored plan, released, account_used, account_released, detail, overage,
-- account_overage}: "ok" with the new totals and what was actually lowered at each level
-- (min(amount, the count before); 0 = that counter was at 0 already, and then nothing is written
-- there), lowering the overage first (see lower in common.lua) and giving the overage after;
-- "hydrate" (a counter is not loaded from Postgres yet; detail "user" or "account"; nothing done)
-- or "moved" (detail: what the route key holds; nothing done).
local hash = KEYS[1]
local account = ARGV[6]
local ahash = account ~= '' and KEYS[4] or nil
local route = misrouted(KEYS[3], account)
if route == false then
  return {'hydrate', 0, '', 0, 0, 0, 'user', 0, 0}
elseif route then
  return {'moved', 0, '', 0, 0, 0, route, 0, 0}
end
if redis.call('HEXISTS', hash, 'v') == 0 then
  return {'hydrate', 0, '', 0, 0, 0, 'user', 0, 0}
end
if ahash and redis.call('HEXISTS', ahash, 'v') == 0 then
  return {'hydrate', 0, '', 0, 0, 0, 'account', 0, 0}
end
local used, given, overage = lower(hash, ARGV[1], tonumber(ARGV[2]), KEYS[2], ARGV[3])
local aused, agiven, aoverage = 0, 0, 0
if ahash then
  aused, agiven, aoverage = lower(ahash, ARGV[1], tonumber(ARGV[2]), KEYS[2], ARGV[7])
end
if given > 0 or agiven > 0 then
  announce(ARGV[4], ARGV[5])
end
if agiven > 0 then
  announce(ARGV[4], account)
end
return {'ok', used, redis.call('HGET', hash, 'p') or '', given, aused, agiven, '', overage,
  aoverage}
