-- commit: count what a reservation's work actually used (at most what it holds) at every level it
-- holds at, and free its hold there, in one atomic step. The count is a count like any other, as
-- a track of the amount makes it: it bumps each counter's version and marks it dirty, so the
-- flusher writes it to Postgres; its units past the limit are overage where the plan allows
-- overage (see past_limit in common.lua); it records the threshold events it crosses at the
-- user's level.
--
-- KEYS[1]  the reservation         {prefix}:1:{b}:r:<user>:<rid> (see holds.lua)
-- KEYS[2]  the user's counter hash of the reservation's period
-- KEYS[3]  dirty set               {prefix}:1:{b}:dirty
-- KEYS[4]  the user's route key    {prefix}:1:{b}:u:<user> (see misrouted in common.lua)
-- KEYS[5]  the bucket's open reservations {prefix}:1:{b}:rz
-- KEYS[6]  with a reservation held in an account's pool only: that account's counter hash of the
--          period (in this bucket: the reservation was made beside it)
-- ARGV[1]  the amount to count, a whole number from 0 to what the reservation holds
-- ARGV[2]  the period id and ARGV[3] the account ("" = none) the caller read from the
--          reservation just before (they never change; a reservation that disagrees is another)
-- ARGV[4]  the route the caller believes ("" = no account, else the account id)
-- ARGV[5]  the user's dirty-set member "<user>:<period>"; ARGV[6] the account's
--          "a:<account>:<period>" ("" without one)
-- ARGV[7]  the reservation's member of the open set, "<user>:<rid>"
-- ARGV[8]  how long the closed reservation is kept, ms
-- ARGV[9]  invalidation channel; ARGV[10] the user, announced there when the commit frees more
--          than it counts (and the account, for its pool)
-- ARGV[11] default plan; ARGV[12] the type's notify thresholds ("80,100"; "" = none; see
--          record_thresholds in common.lua)
-- ARGV[13..] plan, limit, cap triples for the reservation's type (as consume.lua takes them; none
--          when the type is no longer configured: then no overage and no threshold is recorded)
--
-- The limits are those in force now (plan, override), at the user's level and the pool's.
--
-- Returns holds.lua's `settled` answer with status:
--   "ok"         counted and freed; `late` is "1" when the reservation had expired (its hold
--                freed already, by the sweeper or by this call: detail "expired" then): the work
--                was done, so it is counted anyway, as a track would count it
--   "replay"     committed before with the same amount: the first answer, nothing done
--   "committed"  committed before with another amount (`committed`); nothing done
--   "cancelled"  cancelled before; nothing done
--   "over"       the amount is more than the reservation holds (`amount`); nothing done
--   "missing"    no such reservation (never made, closed more than ARGV[8] ago, or lost with
--                Redis' data)
--   "hydrate"    a counter is not loaded from Postgres yet (detail: "user" or "account"); nothing
--   "moved"      the user's route is not ARGV[4]; detail is what the route key holds; nothing
local rkey, hash, dirty, open = KEYS[1], KEYS[2], KEYS[3], KEYS[5]
local amount, account = tonumber(ARGV[1]), ARGV[3]
local ahash = account ~= '' and KEYS[6] or nil

local r, early = reservation_to_close(rkey, KEYS[4], ARGV[4], ARGV[2], account)
if not r then
  return early
end
if r.s == 'cancelled' then
  return settled('cancelled', r)
elseif r.s == 'committed' then
  return settled(tonumber(r.c) == amount and 'replay' or 'committed', r)
end
if amount > tonumber(r.a) then
  return settled('over', r)
end
local field = r.t
if redis.call('HEXISTS', hash, 'v') == 0 then
  return settled('hydrate', r, 'user')
end
if ahash and redis.call('HEXISTS', ahash, 'v') == 0 then
  return settled('hydrate', r, 'account')
end

-- Every read and check first; the writes after cannot fail.
local expiring = r.s == 'open' and call_now_ms >= tonumber(r.x)
local holding = r.s == 'open'
local ov_field = 'ov:' .. field
-- A level's version, dirty flag, overage, and the plan, limit and cap in force.
local function level_of(h, pick)
  local got = redis.call('HMGET', h, 'v', DIRTY, ov_field, 'p', 'o:' .. field)
  local plan, limit, _, cap = pick(got[4], got[5])
  return whole(got[1], h, 'v'), got[2], whole(got[3], h, ov_field), plan, limit, cap
end
local held, used = hold_of(hash, field)
local version, flagged, overage, plan, limit, cap = level_of(hash, function(p, o)
  return user_level(p, o, '', ARGV[11], 13, ARGV[4] ~= '')
end)
local aheld, aused, aversion, aflagged, aoverage, alimit, acap = 0, 0, 0, nil, 0, nil, nil
if ahash then
  aheld, aused = hold_of(ahash, field)
  local _
  aversion, aflagged, aoverage, _, alimit, acap = level_of(ahash, function(p, o)
    return pool_level(p, o, ARGV[11], 13)
  end)
end
if used + amount >= EXACT or aused + amount >= EXACT then
  return redis.error_reply('ERR quotad: ' .. field .. ' would pass 2^53; nothing counted')
end

local a = tonumber(r.a)
if holding then
  held = free_hold(hash, field, held, a)
  if ahash then
    aheld = free_hold(ahash, field, aheld, a)
  end
end
-- Counts the amount at one level, its units past the limit as overage (none when the type is no
-- longer configured: its limit is unknown).
local function count_in(h, cur, ver, was_flagged, member, ov, lim, c)
  if amount == 0 then
    return cur
  end
  local added = (lim and c) and past_limit(amount, cur, lim, c) or 0
  if added > 0 then
    redis.call('HSET', h, ov_field, string.format('%d', ov + added))
  end
  redis.call('HSET', h, field, string.format('%d', cur + amount), 'v', string.format('%d', ver + 1))
  if not was_flagged then
    mark_dirty(h, dirty, member)
  end
  if r.pe == 'life' then
    -- Counted in: a lifetime counter loaded with nothing lasts from now (see consume.lua).
    redis.call('PERSIST', h)
  end
  return cur + amount
end
used = count_in(hash, used, version, flagged, ARGV[5], overage, limit, cap)
if amount > 0 and ARGV[12] ~= '' and limit then
  record_thresholds(hash, field, ARGV[12], used, limit, plan)
end
if ahash then
  aused = count_in(ahash, aused, aversion, aflagged, ARGV[6], aoverage, alimit, acap)
end
-- A commit in time frees what it does not count; a late one freed nothing now that it did not
-- free as an expiry.
local late = not holding or expiring
local freed = late and 0 or a - amount
r.s, r.c, r.lt, r.fr = 'committed', amount, late and '1' or '0', freed
r.u, r.h, r.au, r.ah = used, held, aused, aheld
close_reservation(rkey, open, ARGV[7], tonumber(ARGV[8]), {'s', r.s, 'c', r.c, 'lt', r.lt,
  'fr', r.fr, 'u', r.u, 'h', r.h, 'au', r.au, 'ah', r.ah})
if holding and a > amount then
  announce(ARGV[9], ARGV[10])
  if ahash then
    announce(ARGV[9], account)
  end
end
return settled('ok', r, expiring and 'expired' or '')
