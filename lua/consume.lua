-- consume / track: check the limit and count, in one atomic step.
--
-- KEYS[1]  counter hash        {prefix}:1:{b}:c:<user>:<period>
-- KEYS[2]  dirty set           {prefix}:1:{b}:dirty
-- KEYS[3]  previous month's counter hash (for a fresh start; see start_fresh)
-- KEYS[4]  the bucket's marker {prefix}:1:{b}:since
-- KEYS[5]  idempotency record  {prefix}:1:{b}:i:<user>:<key>   (only when the call has a key)
-- ARGV[1]  mode: "consume" enforces the limit; "track" counts regardless
-- ARGV[2]  usage type (the hash field)
-- ARGV[3]  amount, a whole number > 0
-- ARGV[4]  dirty-set member "<user>:<period>"
-- ARGV[5]  plan override ("" = the plan stored in the hash, else the default plan)
-- ARGV[6]  default plan
-- ARGV[7]  idempotency record lifetime, seconds
-- ARGV[8]  period id, kept in the idempotency record so a refund finds the right counter
-- ARGV[9]  most metadata names one counter may collect
-- ARGV[10] month start, ms ("0" for lifetime); ARGV[11] allowed clock skew, ms; ARGV[12] the
--          EXPIREAT of a counter started fresh (see start_fresh)
-- ARGV[13] n: metadata entries that follow, as n triples kind ("n" number | "s" text), name, value
--          (numbers are finite, as Rust's f64 Display writes them)
-- ARGV[14 + 3n ..]  plan, limit pairs for this type (-1 = unlimited)
--
-- Returns {status, used, plan, limit, period, detail}:
--   "ok"         counted; used is the new total
--   "denied"     consume only: the amount does not fit; nothing counted, nothing remembered
--   "replay"     the idempotency key was answered before: the stored answer, nothing counted
--   "conflict"   the idempotency key was used before for another mode, type or amount
--   "refunded"   the idempotency key names a call that was refunded: nothing counted (a retry of
--                a refunded call must not count for free under the old answer, nor count again)
--   "meta_limit" the call's metadata would take the counter past ARGV[9] names; nothing counted
--   "meta_sum"   the sum of numeric metadata `detail` would not be a finite number (beyond
--                ±1.8e308); nothing counted
--   "hydrate"    the counter is not loaded from Postgres yet, and cannot start fresh; nothing done
-- detail is "" except for "meta_sum".
--
-- Order: every read and every check that can refuse comes first; the writes that follow cannot
-- fail, so a call either changes nothing or counts, bumps `v`, writes its metadata, marks the
-- counter dirty (if it is not yet) and stores its idempotency record, all together. (A fresh start, which writes,
-- is the one exception: it only creates the empty counter a check would create too.)
--
-- A stored count, `v` or `n:<type>` that is not a whole number is corrupt data: the script stops
-- with an error reply before writing. A stored `m:<type>:<name>` sum that is not a finite number
-- (corrupt data too; quotad never writes one) is dropped: the sum starts again from this call's
-- value, so one bad field cannot stop a user's counting; the script logs it (Redis log, warning).
-- Sums are written with HSET of '%.17g' (a double's full precision), never HINCRBYFLOAT, whose
-- refusal of an infinite result would come after the count was written.
local hash, dirty, idem = KEYS[1], KEYS[2], KEYS[5]
local mode, field, amount = ARGV[1], ARGV[2], tonumber(ARGV[3])

if idem then
  local seen = redis.call('HMGET', idem, 'k', 't', 'a', 'u', 'pl', 'l', 'pe', 'r')
  if seen[1] then
    if seen[1] ~= mode or seen[2] ~= field or tonumber(seen[3]) ~= amount then
      return {'conflict', 0, '', 0, '', ''}
    end
    if seen[8] == '1' then
      return {'refunded', 0, '', 0, seen[7], ''}
    end
    return {'replay', tonumber(seen[4]), seen[5], tonumber(seen[6]), seen[7], ''}
  end
end

-- Everything the decision reads, in one call: version, count, dirty flag, stored plan.
local got = redis.call('HMGET', hash, 'v', field, DIRTY, 'p')
if not got[1] then
  if not start_fresh(hash, KEYS[3], KEYS[4], ARGV[10], ARGV[11], ARGV[12]) then
    return {'hydrate', 0, '', 0, '', ''}
  end
  got = redis.call('HMGET', hash, 'v', field, DIRTY, 'p')
end
local version = whole(got[1], hash, 'v') -- a corrupt version stops the script here, before any write

local nmeta = tonumber(ARGV[13])
local first_meta, last_meta = 14, 13 + 3 * nmeta
local plan, limit = resolve_plan(got[4], ARGV[5], ARGV[6], last_meta + 1)
local used = whole(got[2], hash, field)
if used + amount >= EXACT then
  return redis.error_reply('ERR quotad: ' .. field .. ' of ' .. hash .. ' would pass 2^53; nothing counted')
end

if mode == 'consume' and limit >= 0 and used + amount > limit then
  return {'denied', used, plan, limit, ARGV[8], ''}
end

-- Metadata names are bounded per counter, so a caller cannot grow a hash (and its Postgres row)
-- without end; numeric sums must stay finite. Both are checked before any write.
local fresh = 0
local sums = {}
for i = first_meta, last_meta, 3 do
  local name = field .. ':' .. ARGV[i + 1]
  if ARGV[i] == 'n' then
    local raw = redis.call('HGET', hash, 'm:' .. name)
    local cur = raw and tonumber(raw)
    if raw and not (cur and cur == cur and cur ~= math.huge and cur ~= -math.huge) then
      redis.log(redis.LOG_WARNING, 'quotad: ' .. hash .. ' m:' .. name .. ' holds ' .. raw
        .. ', not a number; the sum starts again')
      cur = 0
    end
    local sum = (cur or 0) + tonumber(ARGV[i + 2])
    if sum ~= sum or sum == math.huge or sum == -math.huge then
      return {'meta_sum', used, plan, limit, ARGV[8], ARGV[i + 1]}
    end
    sums[#sums + 1] = {'m:' .. name, string.format('%.17g', sum)}
    if not raw and redis.call('HEXISTS', hash, 's:' .. name) == 0 then
      fresh = fresh + 1
    end
  elseif redis.call('HEXISTS', hash, 'm:' .. name) == 0 and redis.call('HEXISTS', hash, 's:' .. name) == 0 then
    fresh = fresh + 1
  end
end
if fresh > 0 and stored_count(hash, 'n:' .. field) + fresh > tonumber(ARGV[9]) then
  return {'meta_limit', used, plan, limit, ARGV[8], ''}
end

-- Writes, none of which can fail now.
if fresh > 0 then
  redis.call('HINCRBY', hash, 'n:' .. field, fresh)
end
-- Count and version in one write ('%d': whole numbers, never a float's exponent form); the
-- dirty mark only on the first change since the counter's last flush (see mark_dirty).
used = used + amount
local count, next_version = string.format('%d', used), string.format('%d', version + 1)
if got[3] then
  redis.call('HSET', hash, field, count, 'v', next_version)
else
  redis.call('HSET', hash, field, count, 'v', next_version, DIRTY, 1)
  redis.call('ZADD', dirty, 'NX', call_now_ms, ARGV[4])
end
for _, kv in ipairs(sums) do
  redis.call('HSET', hash, kv[1], kv[2])
end
for i = first_meta, last_meta, 3 do
  if ARGV[i] == 's' then
    redis.call('HSET', hash, 's:' .. field .. ':' .. ARGV[i + 1], ARGV[i + 2])
  end
end
if ARGV[10] == '0' then
  -- A lifetime counter loaded with nothing in Postgres expires unless something is counted in
  -- it (see hydrate.lua); this count makes it last.
  redis.call('PERSIST', hash)
end

if idem then
  redis.call('HSET', idem, 'k', mode, 't', field, 'a', amount, 'u', used, 'pl', plan, 'l', limit,
    'pe', ARGV[8], 'r', 0)
  redis.call('EXPIRE', idem, tonumber(ARGV[7]))
end
return {'ok', used, plan, limit, ARGV[8], ''}
