-- set_plan: put a user's new plan into their live counter hashes, so the very next request on
-- any replica counts under it. Postgres (user_plans) is written first and its row version comes
-- along: an older plan change that arrives late never overwrites a newer one.
--
-- KEYS[1..n]  the user's counter hashes in force now (current month, lifetime)
-- KEYS[n+1..]  the months next to the current one (previous and next): written only if they
--              exist. Another replica (or this one a moment later) may already count in next
--              month's hash while this one's clock is still before midnight, and last month's
--              hash is where a fresh start takes the plan from.
-- ARGV[1]     plan name
-- ARGV[2]     plan version (user_plans.version)
-- ARGV[3]     invalidation channel; ARGV[4] the user, announced there
-- ARGV[5]     n
-- ARGV[6..5+n] EXPIREAT of each key in force now, unix seconds (0 = never)
--
-- Returns how many hashes took the plan. A hash in force now that did not exist yet is created
-- with the plan only; without `v` it is still loaded from Postgres before its first count.
local n = 0
local pv = tonumber(ARGV[2])
local now_keys = tonumber(ARGV[5])
for i, hash in ipairs(KEYS) do
  local cur = tonumber(redis.call('HGET', hash, 'pv') or '-1')
  if i > now_keys and redis.call('EXISTS', hash) == 0 then
    cur = pv -- an adjacent month not created: left alone
  end
  if cur < pv then
    redis.call('HSET', hash, 'p', ARGV[1], 'pv', pv)
    if i <= now_keys and ARGV[5 + i] ~= '0' then
      redis.call('EXPIREAT', hash, ARGV[5 + i])
    end
    n = n + 1
  end
end
announce(ARGV[3], ARGV[4])
return n
