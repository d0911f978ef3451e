-- move_done: the last step of moving a user's counters: forwards the old bucket to the new one,
-- and removes the counters and idempotency records left there.
--
-- KEYS[1]        the user's route key in the old bucket
-- KEYS[2]        dirty set there
-- KEYS[3..2+n]   the user's counter hashes there, in move_out's order
-- KEYS[3+n]      the user's idempotency index there
-- KEYS[4+n..]    the idempotency records moved
-- ARGV[1]        the forward: ">" followed by "home" or the new account's id
-- ARGV[2..1+n]   the dirty-set members of KEYS[3..2+n]
--
-- Only while the route is ">moving" (set by move_out): returns 1 when it forwarded, 0 when the
-- route was something else already (nothing done).
if redis.call('GET', KEYS[1]) ~= '>moving' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
local n = #ARGV - 1
for i = 3, 2 + n do
  redis.call('DEL', KEYS[i])
  redis.call('ZREM', KEYS[2], ARGV[i - 1])
end
for i = 3 + n, #KEYS do
  redis.call('DEL', KEYS[i])
end
return 1
