-- cancel: free all that a reservation holds, at every level, counting nothing, in one atomic step.
--
-- KEYS and ARGV as commit.lua's, without the amount: ARGV[1] is unused ("0"), as are the plan
-- and threshold arguments (ARGV[11..]), so both scripts take the same arguments.
--
-- Returns holds.lua's `settled` answer with status:
--   "ok"         freed (`freed`: what it held, or 0 when its expiry had freed it already);
--                cancelled from now on
--   "replay"     cancelled before: the first answer, nothing done
--   "committed"  committed before (`committed`); nothing done
--   "missing", "hydrate", "moved" as for commit ("hydrate" never: a hold lives only in a loaded
--                counter, so an unloaded one has nothing to free)
local rkey, hash, open = KEYS[1], KEYS[2], KEYS[5]
local account = ARGV[3]
local ahash = account ~= '' and KEYS[6] or nil

local r, early = reservation_to_close(rkey, KEYS[4], ARGV[4], ARGV[2], account)
if not r then
  return early
end
if r.s == 'cancelled' then
  return settled('replay', r)
elseif r.s == 'committed' then
  return settled('committed', r)
end

local field, a = r.t, tonumber(r.a)
local held, used = hold_of(hash, field)
local aheld, aused = hold_of(ahash, field)
local freed = 0
if r.s == 'open' then
  held = free_hold(hash, field, held, a)
  aheld = free_hold(ahash, field, aheld, a)
  freed = a
end
r.s, r.fr, r.u, r.h, r.au, r.ah = 'cancelled', freed, used, held, aused, aheld
close_reservation(rkey, open, ARGV[7], tonumber(ARGV[8]), {'s', r.s, 'fr', r.fr, 'u', r.u,
  'h', r.h, 'au', r.au, 'ah', r.ah})
if freed > 0 then
  announce(ARGV[9], ARGV[10])
  if ahash then
    announce(ARGV[9], account)
  end
end
return settled('ok', r)
