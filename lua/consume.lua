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
-- ARGV[14 + 3n ..]  plan, limit pairs for this type (-1 = unlimited)
--
-- Returns {status, used, plan, limit, period}:
--   "ok"         counted; used is the new total
--   "denied"     consume only: the amount does not fit; nothing counted, nothing remembered
--   "replay"     the idempotency key was answered before: the stored answer, nothing counted
--   "conflict"   the idempotency key was used before for another mode, type or amount
--   "meta_limit" the call's metadata would take the counter past ARGV[9] names; nothing counted
--   "hydrate"    the counter is not loaded from Postgres yet, and cannot start fresh; nothing done
local hash, dirty, idem = KEYS[1], KEYS[2], KEYS[5]
local mode, field, amount = ARGV[1], ARGV[2], tonumber(ARGV[3])

if idem then
  local seen = redis.call('HMGET', idem, 'k', 't', 'a', 'u', 'pl', 'l', 'pe')
  if seen[1] then
    if seen[1] ~= mode or seen[2] ~= field or tonumber(seen[3]) ~= amount then
      return {'conflict', 0, '', 0, ''}
    end
    return {'replay', tonumber(seen[4]), seen[5], tonumber(seen[6]), seen[7]}
  end
end

if redis.call('HEXISTS', hash, 'v') == 0
    and not start_fresh(hash, KEYS[3], KEYS[4], ARGV[10], ARGV[11], ARGV[12]) then
  return {'hydrate', 0, '', 0, ''}
end

local nmeta = tonumber(ARGV[13])
local first_meta, last_meta = 14, 13 + 3 * nmeta
local plan, limit = resolve_plan(hash, ARGV[5], ARGV[6], last_meta + 1)
local used = tonumber(redis.call('HGET', hash, field) or '0')

if mode == 'consume' and limit >= 0 and used + amount > limit then
  return {'denied', used, plan, limit, ARGV[8]}
end

-- Metadata names are bounded per counter, so a caller cannot grow a hash (and its Postgres row)
-- without end. Checked before any write: a refused call changes nothing.
local fresh = 0
for i = first_meta, last_meta, 3 do
  local name = field .. ':' .. ARGV[i + 1]
  if redis.call('HEXISTS', hash, 'm:' .. name) == 0 and redis.call('HEXISTS', hash, 's:' .. name) == 0 then
    fresh = fresh + 1
  end
end
if fresh > 0 then
  local have = tonumber(redis.call('HGET', hash, 'n:' .. field) or '0')
  if have + fresh > tonumber(ARGV[9]) then
    return {'meta_limit', used, plan, limit, ARGV[8]}
  end
  redis.call('HINCRBY', hash, 'n:' .. field, fresh)
end

used = redis.call('HINCRBY', hash, field, amount)
redis.call('HINCRBY', hash, 'v', 1)
for i = first_meta, last_meta, 3 do
  if ARGV[i] == 'n' then
    redis.call('HINCRBYFLOAT', hash, 'm:' .. field .. ':' .. ARGV[i + 1], ARGV[i + 2])
  else
    redis.call('HSET', hash, 's:' .. field .. ':' .. ARGV[i + 1], ARGV[i + 2])
  end
end
mark_dirty(dirty, ARGV[4])

if idem then
  redis.call('HSET', idem, 'k', mode, 't', field, 'a', amount, 'u', used, 'pl', plan, 'l', limit,
    'pe', ARGV[8], 'r', 0)
  redis.call('EXPIRE', idem, tonumber(ARGV[7]))
end
return {'ok', used, plan, limit, ARGV[8]}
