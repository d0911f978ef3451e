-- reserve: hold an amount of a type against the limit of every level (the user, and the user's
-- account when they have one) for a while, in one atomic step: it fits only where used + held +
-- amount stays within what a consume may take (the limit plus the plan's overage cap), exactly as
-- a consume of it would, and nothing is counted yet.
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
-- ARGV[12..] plan, limit, cap triples for this type (as consume.lua takes them)
--
-- Returns consume.lua's twenty fields (status, used, plan, limit, period, detail, limited_by,
-- source, account_used, account_plan, account_limit, account_source, cap, overage, added,
-- account_cap, account_overage, account_added, held, account_held): `added` is 0 (nothing is
-- counted), `held` what is held after the call; with status:
--   "ok"        held at every level; detail is the expiry (ms, Redis' clock)
--   "denied"    used + held + amount passes limit + cap at level `limited_by`; nothing held
--   "replay"    the reservation exists already for this type and amount (the same call, sent
--               again after a lost reply); detail its expiry; nothing more held
--   "conflict"  the reservation exists for another type or amount; nothing done
--   "hydrate"   a counter is not loaded from Postgres yet ("user", "account" or both); nothing done
--   "moved"     the user's route is not ARGV[9]; detail is what the route key holds; nothing done
local hash, rkey, open = KEYS[1], KEYS[5], KEYS[6]
local account = ARGV[9]
local ahash = account ~= '' and KEYS[7] or nil
local field, amount, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

-- Each level: {used, plan, limit, source, cap, overage, held}.
local function answer(status, detail, limited_by, u, a)
  u, a = u or {}, a or {}
  return {status, u[1] or 0, u[2] or '', u[3] or 0, ARGV[4], detail or '', limited_by or '',
    u[4] or '', a[1] or 0, a[2] or '', a[3] or -1, a[4] or '', u[5] or 0, u[6] or 0, 0, a[5] or 0,
    a[6] or 0, 0, u[7] or 0, a[7] or 0}
end

local route = misrouted(KEYS[4], account)
if route == false then
  return answer('hydrate', 'user')
elseif route then
  return answer('moved', route)
end

local earlier = reservation(rkey)
if earlier and (earlier.t ~= field or tonumber(earlier.a) ~= amount or earlier.ac ~= account) then
  return answer('conflict')
end

local over, hold, ov_field = 'o:' .. field, 'h:' .. field, 'ov:' .. field
local got, ag, missing = read_levels(hash, KEYS[2], ahash, KEYS[8], KEYS[3], ARGV[6], ARGV[7],
  ARGV[8], 'v', field, 'p', over, hold, ov_field)
if missing then
  return answer('hydrate', missing)
end

-- Each level as answer() takes it.
local function level(h, g, plan, limit, source, cap)
  whole(g[1], h, 'v')
  return {whole(g[2], h, field), plan, limit, source, cap, whole(g[6], h, ov_field),
    whole(g[5], h, hold)}
end
local u = level(hash, got, user_level(got[3], got[4], '', ARGV[5], 12, ahash ~= nil))
local a
if ahash then
  a = level(ahash, ag, pool_level(ag[3], ag[4], ARGV[5], 12))
end
if earlier then
  return answer('replay', earlier.x, '', u, a)
end
if u[1] + u[7] + amount >= EXACT or (a and a[1] + a[7] + amount >= EXACT) then
  return redis.error_reply('ERR quotad: ' .. hold .. ' would pass 2^53; nothing held')
end
-- What is used and what is held already are both taken.
local refused = refusing_level(amount, u[1] + u[7], u[3], u[5], a and a[1] + a[7], a and a[3],
  a and a[5])
if refused then
  return answer('denied', '', refused, u, a)
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
hold_in(hash, u[7])
u[7] = u[7] + amount
if a then
  hold_in(ahash, a[7])
  a[7] = a[7] + amount
end
redis.call('HSET', rkey, 't', field, 'a', amount, 'pe', ARGV[4], 'ac', account, 's', 'open', 'x',
  expiry)
redis.call('PEXPIRE', rkey, keep)
redis.call('ZADD', open, expiry, ARGV[10])
return answer('ok', expiry, '', u, a)
