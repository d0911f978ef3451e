-- release: lower a lifetime counter (a stored thing was deleted), never below 0.
--
-- KEYS[1]  counter hash  {prefix}:1:{b}:c:<user>:life
-- KEYS[2]  dirty set
-- ARGV[1]  usage type (the hash field)
-- ARGV[2]  amount, a whole number > 0
-- ARGV[3]  dirty-set member "<user>:life"
-- ARGV[4]  invalidation channel; ARGV[5] the user, announced there
--
-- Returns {status, used, stored plan, released}: "ok" with the new total and what was actually
-- lowered (min(amount, the count before); 0 = the counter was at 0 already, and then nothing is
-- written, bumped, marked or announced), or "hydrate" (the counter is not loaded from Postgres
-- yet; nothing done).
local hash = KEYS[1]
if redis.call('HEXISTS', hash, 'v') == 0 then
  return {'hydrate', 0, '', 0}
end
local used, given = lower(hash, ARGV[1], tonumber(ARGV[2]), KEYS[2], ARGV[3])
if given > 0 then
  announce(ARGV[4], ARGV[5])
end
return {'ok', used, redis.call('HGET', hash, 'p') or '', given}
