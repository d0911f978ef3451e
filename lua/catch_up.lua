-- catch_up: raise a counter that is older than Postgres' row to it. The flusher calls it when
-- Postgres refused a total because it holds a higher version (or the same version with another
-- count): this Redis went back in time (restored from an older dump, or a failover to a replica
-- that lagged). Without it Redis would hand back quota already spent, and Postgres would refuse
-- its flushes until the version caught up, then take a smaller total.
--
-- KEYS[1]  counter hash  {prefix}:1:{b}:c:<user>:<period>
-- KEYS[2]  dirty set     {prefix}:1:{b}:dirty
-- ARGV[1]  Postgres' version (the highest of the user's rows for the period)
-- ARGV[2]  dirty-set member "<user>:<period>"
-- ARGV[3]  invalidation channel; ARGV[4] the user, announced there when it changes the counter
-- ARGV[5..] Postgres' field, value pairs: counts by type, `ov:<type>` overage, `m:<type>:<name>`
--          sums and `s:<type>:<name>` text values
--
-- Each count, overage and sum becomes the larger of Redis' and Postgres'; a text value Redis lacks
-- is taken from Postgres; `v` goes past both versions, so the next flush is accepted; the counter
-- is marked dirty. Counts made here since the restore and before this repair are kept only as far
-- as they exceed Postgres' (max, not sum: Redis cannot tell them from the ones the dump had).
-- Returns 1 if it changed the counter, 0 if Redis is as new as Postgres (another flusher's
-- ordinary race, or a repair done already) or the counter is not loaded (it loads from Postgres).
local hash = KEYS[1]
local cur = redis.call('HGET', hash, 'v')
if not cur then
  return 0
end
cur = tonumber(cur)
local pg = tonumber(ARGV[1])
local older = cur < pg
if not older and cur == pg then
  -- The same version with other counts: the two histories parted.
  for i = 5, #ARGV, 2 do
    if not string.find(ARGV[i], ':', 1, true)
        and tonumber(redis.call('HGET', hash, ARGV[i]) or '0') ~= tonumber(ARGV[i + 1]) then
      older = true
      break
    end
  end
end
if not older then
  return 0
end

-- A metadata name new to the counter counts towards its type's `n:` like any other.
local function add_name(name)
  if redis.call('HEXISTS', hash, 'm:' .. name) == 0 and redis.call('HEXISTS', hash, 's:' .. name) == 0 then
    local ty = string.match(name, '^([^:]*):')
    redis.call('HINCRBY', hash, 'n:' .. ty, 1)
  end
end

for i = 5, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  local kind = string.sub(field, 1, 2)
  if kind == 's:' then
    local name = string.sub(field, 3)
    if redis.call('HEXISTS', hash, 'm:' .. name) == 0 and redis.call('HEXISTS', hash, field) == 0 then
      add_name(name)
      redis.call('HSET', hash, field, value)
    end
  elseif kind == 'm:' then
    local have = redis.call('HGET', hash, field)
    if not have then
      add_name(string.sub(field, 3))
      redis.call('HSET', hash, field, value)
    elseif tonumber(have) < tonumber(value) then
      redis.call('HSET', hash, field, value)
    end
  elseif tonumber(redis.call('HGET', hash, field) or '0') < tonumber(value) then
    redis.call('HSET', hash, field, value)
  end
end
redis.call('HSET', hash, 'v', math.max(cur, pg) + 1)
mark_dirty(hash, KEYS[2], ARGV[2])
announce(ARGV[3], ARGV[4])
return 1
