-- Helpers shared by the reservation scripts (reserve, commit, cancel, expire). quotad prepends
-- this file, after common.lua, to each of them, so every one stays one EVALSHA.
--
-- A reservation holds an amount of one type against the limit of every level it was made at:
-- the user's counter hash of its period gets `h:<type>` (the units held by all of the user's open
-- reservations of that type), and so does the account's pool for a member. consume.lua and
-- check.lua count what is held as taken. The reservation itself is a hash in the same bucket,
-- {prefix}:1:{b}:r:<user>:<rid>:
--   t   the usage type          a   the amount held        pe  the period id ("2026-11", "life")
--   ac  the account whose pool it holds in ("" = none)     x   its expiry (ms, Redis' clock)
--   s   its state: "open", "committed", "cancelled" or "expired" (freed by its expiry; a late
--       commit or a cancel may still close it)
-- and, once closed: c the amount committed, lt "1" for a commit after the expiry, fr the units its
-- close freed, u / h and au / ah the user's and the pool's count and hold after it (what a
-- repeated commit or cancel answers again), cl when it closed (ms). An open reservation is also a
-- member "<user>:<rid>" of its bucket's sorted set {prefix}:1:{b}:rz, scored by its expiry: what
-- the sweeper reads (see expire.lua).

-- The fields of a reservation, in this order, as `reservation(key)` returns them.
local RESERVATION_FIELDS = {'t', 'a', 'pe', 'ac', 's', 'x', 'c', 'lt', 'fr', 'u', 'h', 'au', 'ah'}

-- A reservation's fields by name (see RESERVATION_FIELDS); nil when there is none.
local function reservation(key)
  local got = redis.call('HMGET', key, unpack(RESERVATION_FIELDS))
  if not got[1] then
    return nil
  end
  local r = {}
  for i, name in ipairs(RESERVATION_FIELDS) do
    r[name] = got[i]
  end
  return r
end

-- What `hash` (a counter hash, nil for none) holds of `field` and counts of it: (held, used),
-- both 0 when the hash is not loaded. A value that is not a whole number stops the script before
-- it writes (see `whole`).
local function hold_of(hash, field)
  if not hash then
    return 0, 0
  end
  local got = redis.call('HMGET', hash, 'v', 'h:' .. field, field)
  if not got[1] then
    return 0, 0
  end
  return whole(got[2], hash, 'h:' .. field), whole(got[3], hash, field)
end

-- Lowers the hold of `field` in `hash` from `held` (as read by hold_of) by `amount`, never below
-- 0; a hash that is not loaded is left alone (it held nothing: a counter loaded again from
-- Postgres starts without holds). No version bump, no dirty mark: holds are not flushed.
-- Returns the hold after it.
local function free_hold(hash, field, held, amount)
  if not hash or redis.call('HEXISTS', hash, 'v') == 0 then
    return 0
  end
  local left = math.max(held - amount, 0)
  if left == 0 then
    redis.call('HDEL', hash, 'h:' .. field)
  else
    redis.call('HSET', hash, 'h:' .. field, string.format('%d', left))
  end
  return left
end

-- Closes reservation `key`: its state, the closing fields (see the top of this file), off the
-- bucket's open set, kept `keep_ms` more for a repeated commit or cancel.
local function close_reservation(key, open, member, keep_ms, fields)
  redis.call('HSET', key, unpack(fields))
  redis.call('HSET', key, 'cl', call_now_ms)
  redis.call('ZREM', open, member)
  redis.call('PEXPIRE', key, keep_ms)
end

-- The answer of commit, cancel and expire: {status, type, amount held, committed, freed, late,
-- used, held, account used, account held, expiry, period, account, detail}.
local function settled(status, r, detail)
  r = r or {}
  return {status, r.t or '', tonumber(r.a or 0), tonumber(r.c or 0), tonumber(r.fr or 0),
    r.lt or '0', tonumber(r.u or 0), tonumber(r.h or 0), tonumber(r.au or 0), tonumber(r.ah or 0),
    tonumber(r.x or 0), r.pe or '', r.ac or '', detail or ''}
end

-- The reservation a commit or cancel closes, found the same way by both: `route_key` must hold
-- the route the caller believes (`believed`, see misrouted in common.lua) and the reservation at
-- `key` must be of `period` and `account`. Returns the reservation, or nil and the answer to give
-- instead ("hydrate", "moved" or "missing").
local function reservation_to_close(key, route_key, believed, period, account)
  local route = misrouted(route_key, believed)
  if route == false then
    return nil, settled('hydrate', nil, 'user')
  elseif route then
    return nil, settled('moved', nil, route)
  end
  local r = reservation(key)
  if not r or r.pe ~= period or r.ac ~= account then
    return nil, settled('missing')
  end
  return r
end
