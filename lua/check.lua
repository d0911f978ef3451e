-- check: the decision consume would make, at every level, counting nothing.
--
-- KEYS[1]  the user's counter hash {prefix}:1:{b}:c:<user>:<period>
-- KEYS[2]  the user's previous month's counter hash; KEYS[3] the bucket's marker (see start_fresh)
-- KEYS[4]  the user's route key    {prefix}:1:{b}:u:<user> (see misrouted in common.lua)
-- KEYS[5], KEYS[6]  with an account only: the account's counter hash and its previous month's
-- KEYS[last] idempotency record {prefix}:1:{b}:i:<user>:<key>  (only when the call has a key)
-- ARGV[1]  usage type (the hash field)
-- ARGV[2]  amount, a whole number > 0
-- ARGV[3]  plan override ("" = the plan stored in the hash, else the default plan)
-- ARGV[4]  default plan
-- ARGV[5]  month start, ms ("0" for lifetime); ARGV[6] allowed clock skew, ms; ARGV[7] the
--          EXPIREAT of a counter started fresh
-- ARGV[8]  the account the caller believes the user is a member of ("" = none): the route
-- ARGV[9..] plan, limit, cap triples for this type (as consume.lua takes them)
--
-- Returns what consume.lua returns (the same twenty fields, period ""; `added` is the overage
-- the amount would add if consumed now), with status "ok" (the amount fits at every level, within
-- limit + cap beside what open reservations hold), "denied" (it does not, at level
-- `limited_by`), "conflict" (the
-- idempotency key names an earlier consume or track: check is another call), "hydrate" or
-- "moved" (as for consume). A check records nothing under its key, so a key never seen is
-- decided as if there were none.
local hash, field, amount = KEYS[1], ARGV[1], tonumber(ARGV[2])
local account = ARGV[8]
local ahash = account ~= '' and KEYS[5] or nil
local idem = KEYS[ahash and 7 or 5]

local function answer(status, used, plan, limit, detail, limited_by, source, aused, aplan, alimit,
    asource, cap, overage, added, acap, aoverage, aadded, held, aheld)
  return {status, used or 0, plan or '', limit or 0, '', detail or '', limited_by or '',
    source or '', aused or 0, aplan or '', alimit or -1, asource or '', cap or 0, overage or 0,
    added or 0, acap or 0, aoverage or 0, aadded or 0, held or 0, aheld or 0}
end

local route = misrouted(KEYS[4], account)
if route == false then
  return answer('hydrate', 0, '', 0, 'user')
elseif route then
  return answer('moved', 0, '', 0, route)
end
if idem and redis.call('EXISTS', idem) == 1 then
  return answer('conflict')
end

local over, ov_field, hold = 'o:' .. field, 'ov:' .. field, 'h:' .. field
local got, ag, missing = read_levels(hash, KEYS[2], ahash, KEYS[6], KEYS[3], ARGV[5], ARGV[6],
  ARGV[7], 'v', field, 'p', over, ov_field, hold)
if missing then
  return answer('hydrate', 0, '', 0, missing)
end

local plan, limit, source, cap = user_level(got[3], got[4], ARGV[3], ARGV[4], 9, ahash ~= nil)
local used = whole(got[2], hash, field)
local overage = whole(got[5], hash, ov_field)
local held = whole(got[6], hash, hold)
local aplan, alimit, asource, aused, acap, aoverage, aadded, aheld
if ahash then
  aplan, alimit, asource, acap = pool_level(ag[3], ag[4], ARGV[4], 9)
  aused = whole(ag[2], ahash, field)
  aoverage = whole(ag[5], ahash, ov_field)
  aheld = whole(ag[6], ahash, hold)
end
local refused = refusing_level(amount, used + held, limit, cap, aused and aused + aheld, alimit,
  acap)
if refused then
  return answer('denied', used, plan, limit, '', refused, source, aused, aplan, alimit, asource,
    cap, overage, 0, acap, aoverage, 0, held, aheld)
end
if ahash then
  aadded = past_limit(amount, aused, alimit, acap)
end
return answer('ok', used, plan, limit, '', '', source, aused, aplan, alimit, asource, cap, overage,
  past_limit(amount, used, limit, cap), acap, aoverage, aadded, held, aheld)
