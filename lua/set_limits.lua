-- set_limits: put an owner's (a user's or an account's) limit overrides into their live counter
-- hashes, so the very next request on any replica decides under them. Postgres
-- (limit_overrides) is written first; the whole set of overrides comes along with its version, so
-- an older change that arrives late never overwrites a newer one.
--
-- KEYS[1]       the owner's route key (see misrouted in common.lua; an account's is never set)
-- KEYS[2..n+1]  the owner's counter hashes in force now (current month, lifetime)
-- KEYS[n+2..]   the months next to the current one: written only if they exist (see set_plan.lua)
-- ARGV[1]       the overrides' version (limit_overrides.version)
-- ARGV[2]       invalidation channel; ARGV[3] the owner, announced there
-- ARGV[4]       n
-- ARGV[5]       the route the caller believes ("" = no account, else the account id)
-- ARGV[6..5+n]  EXPIREAT of each key in force now, unix seconds (0 = never)
-- ARGV[6+n..]   type, limit pairs: every override in force (-1 = unlimited); a type not listed
--               has none (its plan's limit applies)
--
-- A hash takes the set when its `x:ov` is older: every `o:<type>` field goes, the listed ones are
-- written, `x:ov` becomes ARGV[1]. Returns how many hashes took it, or {"moved", route} (nothing
-- written). A hash in force now that did not exist yet is created with the overrides only;
-- without `v` it is still loaded from Postgres before its first count.
-- A route missing where an account is believed (a Redis that lost its data) is written to: the
-- counters are loaded from Postgres, which holds the change already, wherever they live.
local route = misrouted(KEYS[1], ARGV[5])
if route then
  return {'moved', route}
end
local version = tonumber(ARGV[1])
local now_keys = tonumber(ARGV[4])
local first_pair = 6 + now_keys
local n = 0
for i = 2, #KEYS do
  local hash, k = KEYS[i], i - 1
  local cur = tonumber(redis.call('HGET', hash, 'x:ov') or '0')
  if k > now_keys and redis.call('EXISTS', hash) == 0 then
    cur = version -- an adjacent month not created: left alone
  end
  if cur < version then
    for _, f in ipairs(redis.call('HKEYS', hash)) do
      if string.sub(f, 1, 2) == 'o:' then
        redis.call('HDEL', hash, f)
      end
    end
    for j = first_pair, #ARGV, 2 do
      redis.call('HSET', hash, 'o:' .. ARGV[j], ARGV[j + 1])
    end
    redis.call('HSET', hash, 'x:ov', version)
    if k <= now_keys and ARGV[5 + k] ~= '0' then
      redis.call('EXPIREAT', hash, ARGV[5 + k])
    end
    n = n + 1
  end
end
announce(ARGV[2], ARGV[3])
return n
