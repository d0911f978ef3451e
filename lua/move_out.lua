-- move_out: the first step of moving a user's counters to another bucket (the user joined, left
-- or changed account; see quota::Quota::set_account). Stops every script from using the user's
-- counters here, and hands their contents over.
--
-- KEYS[1]     the user's route key here (see misrouted in common.lua)
-- KEYS[2..]   the user's counter hashes here: lifetime, and the months around the current one
-- ARGV[1]     the route the user has here ("" = no account, else the account id)
--
-- Sets the route to ">moving" (every script then answers "moved" with it, and callers wait) and
-- returns {"ok", fields of KEYS[2], ms left to live (-1 none, -2 missing), fields of KEYS[3], …},
-- each hash's fields as a flat field, value list. Repeating it (a move a crash interrupted) finds
-- ">moving" and hands the same counters over again. Returns {"elsewhere", route} when the route is
-- neither ARGV[1] nor ">moving": the counters are not here.
local route = redis.call('GET', KEYS[1]) or ''
if route ~= ARGV[1] and route ~= '>moving' then
  return {'elsewhere', route}
end
redis.call('SET', KEYS[1], '>moving')
local out = {'ok'}
for i = 2, #KEYS do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
  out[#out + 1] = redis.call('PTTL', KEYS[i])
end
return out
