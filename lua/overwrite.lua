-- overwrite: replace a loaded counter's counts with Postgres' when Postgres holds a newer version
-- (reconcile --repair, when Redis is the older side). Never overwrites a version that is as new.
--
-- KEYS[1]  counter hash  {prefix}:1:{b}:c:<user>:<period>
-- ARGV[1]  Postgres' version
-- ARGV[2]  invalidation channel; ARGV[3] the user, announced there when it overwrites
-- ARGV[4..] field, value pairs: every count (0 for a type Postgres lacks) and metadata field
--
-- Returns 1 if it overwrote, 0 if Redis was as new or newer (or not loaded).
local cur = redis.call('HGET', KEYS[1], 'v')
if not cur or tonumber(cur) >= tonumber(ARGV[1]) then
  return 0
end
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'v', ARGV[1])
announce(ARGV[2], ARGV[3])
return 1
