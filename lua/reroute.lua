-- reroute: a membership change that keeps the user's counters where they are (the old and the
-- new place share a bucket): only the route changes, in one step.
--
-- KEYS[1]  the user's route key
-- ARGV[1]  the route the user has ("" = no account, else the account id)
-- ARGV[2]  the new route ("" = no account: the key is deleted)
-- ARGV[3]  invalidation channel; ARGV[4] the user, announced there
--
-- Returns {"ok"} or, when the route is neither ARGV[1] nor ">moving", {"elsewhere", route}.
local route = redis.call('GET', KEYS[1]) or ''
if route ~= ARGV[1] and route ~= '>moving' then
  return {'elsewhere', route}
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
announce(ARGV[3], ARGV[4])
return {'ok'}
