-- set_plan: put an owner's (a user's or an account's) new plan into their live counter hashes, so
-- the very next request on any replica counts under it. Postgres (user_plans, account_plans) is
-- written first and its row version comes along: an older plan change that arrives late never
-- overwrites a newer one.
--
-- KEYS[1]     the owner's route key (see misrouted in common.lua; an account's is never set)
-- KEYS[2..n+1]  the owner's counter hashes in force now (current month, lifetime)
-- KEYS[n+2..]  the months next to the current one (previous and next): written only if they
--              exist. Another replica (or this one a moment later) may already count in next
--              month's hash while this one's clock is still before midnight, and last month's
--              hash is where a fresh start takes the plan from.
-- ARGV[1]     plan version (its row's version in Postgres)
-- ARGV[2]     invalidation channel; ARGV[3] the owner, announced there
-- ARGV[4]     n
-- ARGV[5]     the route the caller believes ("" = no account, else the account id)
-- ARGV[6..5+n] EXPIREAT of each key in force now, unix seconds (0 = never)
-- ARGV[6+n]   plan name
-- (set_limits.lua takes the same arguments, its overrides in place of the plan name.)
--
-- Returns how many hashes took the plan, or {"moved", route} (nothing written) when the route is
-- not ARGV[5]. A hash in force now that did not exist yet is created with the plan only; without
-- `v` it is still loaded from Postgres before its first count.
-- A route missing where an account is believed (a Redis that lost its data) is written to: the
-- counters are loaded from Postgres, which holds the change already, wherever they live.
local route = misrouted(KEYS[1], ARGV[5])
if route then
  return {'moved', route}
end
local n = 0
local pv = tonumber(ARGV[1])
local now_keys = tonumber(ARGV[4])
local plan = ARGV[6 + now_keys]
for i = 2, #KEYS do
  local hash, k = KEYS[i], i - 1
  local cur = tonumber(redis.call('HGET', hash, 'pv') or '-1')
  if k > now_keys and redis.call('EXISTS', hash) == 0 then
    cur = pv -- an adjacent month not created: left alone
  end
  if cur < pv then
    redis.call('HSET', hash, 'p', plan, 'pv', pv)
    if k <= now_keys and ARGV[5 + k] ~= '0' then
      redis.call('EXPIREAT', hash, ARGV[5 + k])
    end
    n = n + 1
  end
end
announce(ARGV[2], ARGV[3])
return n
