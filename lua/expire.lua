-- expire: the sweeper's step for one reservation listed in its bucket's open set: once its expiry
-- has passed (Redis' clock), free what it holds at every level, in one atomic step, and mark it
-- expired. Safe to run by several daemons at once, and again: only an open, due reservation
-- changes.
--
-- KEYS[1]  the reservation         {prefix}:1:{b}:r:<user>:<rid>
-- KEYS[2]  the user's counter hash of the reservation's period
-- KEYS[3]  the user's route key    {prefix}:1:{b}:u:<user>
-- KEYS[4]  the bucket's open reservations {prefix}:1:{b}:rz
-- KEYS[5]  with a reservation held in an account's pool only: that account's counter hash of the
--          period
-- ARGV[1]  the reservation's member of the open set, "<user>:<rid>"
-- ARGV[2]  the period id and ARGV[3] the account ("" = none) the caller read from the
--          reservation just before
-- ARGV[4]  how long the expired reservation is kept, ms (a late commit finds it until then)
-- ARGV[5]  invalidation channel; ARGV[6] the user, announced there when a hold is freed (and the
--          account, for its pool)
--
-- The user's counter is freed only where it lives: after a membership change moved the user's
-- counters to another bucket (the route key reads ">…"), their copy here is gone, and the copy
-- there was made without holds (see move_in.lua). The pool's hold is freed where it was made.
--
-- Returns holds.lua's `settled` answer with status "expired" (freed now), "not_due" (its expiry
-- has not passed; nothing done) or "gone" (not open: closed, missing, or another reservation;
-- taken off the open set).
local rkey, hash, open = KEYS[1], KEYS[2], KEYS[4]
local account = ARGV[3]
local ahash = account ~= '' and KEYS[5] or nil
local r = reservation(rkey)
if not r or r.s ~= 'open' or r.pe ~= ARGV[2] or r.ac ~= account then
  redis.call('ZREM', open, ARGV[1])
  return settled('gone', r)
end
if call_now_ms < tonumber(r.x) then
  return settled('not_due', r)
end
local field, a = r.t, tonumber(r.a)
local route = redis.call('GET', KEYS[3])
local here = not route or string.sub(route, 1, 1) ~= '>'
local held, used = 0, 0
if here then
  held, used = hold_of(hash, field)
end
local aheld, aused = hold_of(ahash, field)
if here then
  held = free_hold(hash, field, held, a)
end
aheld = free_hold(ahash, field, aheld, a)
r.s, r.fr, r.u, r.h, r.au, r.ah = 'expired', a, used, held, aused, aheld
close_reservation(rkey, open, ARGV[1], tonumber(ARGV[4]), {'s', r.s, 'fr', r.fr, 'u', r.u,
  'h', r.h, 'au', r.au, 'ah', r.ah})
announce(ARGV[5], ARGV[6])
if ahash then
  announce(ARGV[5], account)
end
return settled('expired', r)
