-- touch: bump a counter's version and mark it dirty without changing any count, so the next
-- flush writes it over whatever Postgres holds (reconcile --repair, when Redis is the newer side).
--
-- KEYS[1]  counter hash  {prefix}:1:{b}:c:<user>:<period>
-- KEYS[2]  dirty set     {prefix}:1:{b}:dirty
-- ARGV[1]  dirty-set member "<user>:<period>"
--
-- Returns the new version, or 0 if the hash is not loaded (nothing done).
if redis.call('HEXISTS', KEYS[1], 'v') == 0 then
  return 0
end
local v = redis.call('HINCRBY', KEYS[1], 'v', 1)
mark_dirty(KEYS[1], KEYS[2], ARGV[1])
return v
