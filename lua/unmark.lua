-- unmark: after a flush, take counters off the dirty set, but only those that did not change
-- since they were read: a count that arrived during the flush keeps its member, so the next
-- flush writes it. Never loses an update, never needs a lock. A removed counter's `x:dirty` flag
-- goes in the same step (see mark_dirty in common.lua), and so does its `x:ev` flag: an unchanged
-- version means every event the hash holds was read, and written to Postgres with the totals.
--
-- KEYS[1]      dirty set  {prefix}:1:{b}:dirty
-- KEYS[2..n+1] the counter hashes flushed (all in the same bucket, so the same slot)
-- ARGV[1..n]   their dirty-set members, in the same order
-- ARGV[n+1..2n] the version written for each ("" = the hash was gone when read)
--
-- Returns how many members were removed.
local n = #KEYS - 1
local removed = 0
for i = 1, n do
  local v = redis.call('HGET', KEYS[i + 1], 'v')
  local written = ARGV[n + i]
  if (written == '' and not v) or v == written then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
    if v then
      redis.call('HDEL', KEYS[i + 1], 'x:dirty', 'x:ev')
    end
  end
end
return removed
