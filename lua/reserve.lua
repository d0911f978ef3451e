-- reserve: hold an amount of a type against the limit of every level (the user, and the user's
-- account when they have one) for a while, in one atomic step: it fits only where used + held +
-- amount stays within the limit, exactly as a consume of it would, and nothing is counted yet.
--
-- KEYS[1]  the user's counter hash {prefix}:1:{b}:c:<user>:<period>
-- KEYS[2]  the user's previous month's counter hash; KEYS[3] the bucket's marker (see start_fresh)
-- KEYS[4]  the user's route key    {prefix}:1:{b}:u:<user> (see misrouted in common.lua)
-- KEYS[5]  the reservation         {prefix}:1:{b}:r:<user>:<rid> (see holds.lua)
-- KEYS[6]  the bucket's open reservations {prefix}:1:{b}:rz (see holds.lua)
-- KEYS[7], KEYS[8]  with an account only: the account's counter hash
--          {prefix}:1:{b}:a:<account>:<period> and its previous month's
-- `{b}` is the bucket of the account's id for a member, of the user's id otherwise: every key is
-- in one slot.
-- ARGV[1]  usage type (the hash field)
-- ARGV[2]  amount, a whole number > 0
-- ARGV[3]  how long the hold lasts, ms (Redis' clock)
-- ARGV[4]  period id
-- ARGV[5]  default plan
-- ARGV[6]  month start, ms ("0" for lifetime); ARGV[7] allowed clock skew, ms; ARGV[8] the
--          EXPIREAT of a counter started fresh (see start_fresh)
-- ARGV[9]  the account the caller believes the user is a member of ("" = none): the route
-- ARGV[10] the reservation's member of the open set, "<user>:<rid>"
-- ARGV[11] how long the reservation's record outlives its expiry, ms: a late commit, or a
--          repeated commit or cancel, finds it until then
-- ARGV[12..] plan, limit pairs for this type (-1 = unlimited)
--
-- Returns consume.lua's fourteen fields (status, used, plan, limit, period, detail, limited_by,
-- source, account_used, account_plan, account_limit, account_source, held, account_held), `held`
-- being what is held after the call, with status:
--   "ok"        held at every level; detail is the expiry (ms, Redis' clock)
--   "denied"    used + held + amount passes the limit at level `limited_by`; nothing held
--   "replay"    the reservation exists already for this type and amount (the same call, sent
--               again after a lost reply); detail its expiry; nothing more held
--   "conflict"  the reservation exists for another type or amount; nothing done
--   "hydrate"   a counter is not loaded from Postgres yet ("user", "account" or both); nothing done
--   "moved"     the user's route is not ARGV[9]; detail is what the route key holds; nothing done
local hash, rkey, open = KEYS[1], KEYS[5], KEYS[6]
local account = ARGV[9]
local ahash = account ~= '' and KEYS[7] or nil
local field, amount, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local function answer(status, used, plan, limit, detail, limited_by, source, aused, aplan, alimit,
    asource, held, aheld)
  return {status, used or 0, plan or '', limit or 0, ARGV[4], detail or '', limited_by or '',
    source or '', aused or 0, aplan or '', alimit or -1, asource or '', held or 0, aheld or 0}
end

local route = misrouted(KEYS[4], account)
if route == false then
  return answer('hydrate', 0, '', 0, 'user')
elseif route then
  return answer('moved', 0, '', 0, route)
end

local earlier = reservation(rkey)
if earlier and (earlier.t ~= field or tonumber(earlier.a) ~= amount or earlier.ac ~= account) then
  return answer('conflict')
end

local over, hold = 'o:' .. field, 'h:' .. field
local missing = {}
local got = read_counter(hash, KEYS[2], KEYS[3], ARGV[6], ARGV[7], ARGV[8], 'v', field, 'p', over,
  hold)
if not got then
  missing[#missing + 1] = 'user'
end
local ag
if ahash then
  ag = read_counter(ahash, KEYS[8], KEYS[3], ARGV[6], ARGV[7], ARGV[8], 'v', field, 'p', over,
    hold)
  if not ag then
    missing[#missing + 1] = 'account'
  end
end
if #missing > 0 then
  return answer('hydrate', 0, '', 0, table.concat(missing, ' '))
end

whole(got[1], hash, 'v')
local plan, limit, source = user_level(got[3], got[4], '', ARGV[5], 12, ahash ~= nil)
local used, held = whole(got[2], hash, field), whole(got[5], hash, hold)
local aplan, alimit, asource, aused, aheld
if ahash then
  whole(ag[1], ahash, 'v')
  aplan, alimit, asource = pool_level(ag[3], ag[4], ARGV[5], 12)
  aused, aheld = whole(ag[2], ahash, field), whole(ag[5], ahash, hold)
end
if earlier then
  return answer('replay', used, plan, limit, earlier.x, '', source, aused, aplan, alimit, asource,
    held, aheld)
end
if used + held + amount >= EXACT or (ahash and aused + aheld + amount >= EXACT) then
  return redis.error_reply('ERR quotad: ' .. hold .. ' would pass 2^53; nothing held')
end
local refused = refusing_level(amount, used + held, limit, aused and aused + aheld, alimit)
if refused then
  return answer('denied', used, plan, limit, '', refused, source, aused, aplan, alimit, asource,
    held, aheld)
end

-- Writes, none of which can fail now.
local expiry = call_now_ms + ttl
local keep = ttl + tonumber(ARGV[11])
local function hold_in(h, cur)
  redis.call('HSET', h, hold, string.format('%d', cur + amount))
  -- A lifetime counter loaded with nothing expires unless something is counted in it (see
  -- hydrate.lua): it must outlive the hold, or the hold would vanish with it.
  local left = redis.call('PTTL', h)
  if left > 0 and left < keep then
    redis.call('PEXPIRE', h, keep)
  end
end
hold_in(hash, held)
held = held + amount
if ahash then
  hold_in(ahash, aheld)
  aheld = aheld + amount
end
redis.call('HSET', rkey, 't', field, 'a', amount, 'pe', ARGV[4], 'ac', account, 's', 'open', 'x',
  expiry)
redis.call('PEXPIRE', rkey, keep)
redis.call('ZADD', open, expiry, ARGV[10])
return answer('ok', used, plan, limit, expiry, '', source, aused, aplan, alimit, asource, held,
  aheld)
