-- move_out: the first step of moving a user's counters to another bucket (the user joined, left
-- or changed account; see quota::Quota::set_account). Stops every script from using the user's
-- counters here, and hands them over with the user's idempotency records.
--
-- KEYS[1]           the user's route key here (see misrouted in common.lua)
-- KEYS[2..1+n]      the user's counter hashes here: lifetime, and the months around the current one
-- KEYS[2+n]         the user's idempotency index here {prefix}:1:{b}:ix:<user> (see consume.lua)
-- KEYS[3+n..]       the idempotency records the caller read from the index just before
-- ARGV[1]           the route the user has here ("" = no account, else the account id)
-- ARGV[2]           n
-- ARGV[3]           now, ms: records whose index score (their expiry) is past are gone
--
-- Sets the route to ">moving" (every script then answers "moved" with it, and callers wait) and
-- returns {"ok", fields of KEYS[2], ms left to live (-1 none, -2 missing), fields of KEYS[3], …,
-- then the same for each record}, each hash's fields as a flat field, value list. Repeating it (a
-- move a crash interrupted) finds ">moving" and hands the same over again. Returns {"elsewhere",
-- route} when the route is neither ARGV[1] nor ">moving" (the counters are not here), or
-- {"retry"} when the index lists a live record the caller did not name (a keyed call counted
-- since the caller read it): nothing done.
local route = redis.call('GET', KEYS[1]) or ''
if route ~= ARGV[1] and route ~= '>moving' then
  return {'elsewhere', route}
end
local n = tonumber(ARGV[2])
local named = {}
for i = 3 + n, #KEYS do
  named[KEYS[i]] = true
end
for _, record in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2 + n], ARGV[3], '+inf')) do
  if not named[record] then
    return {'retry'}
  end
end
redis.call('SET', KEYS[1], '>moving')
local out = {'ok'}
for i = 2, 1 + n do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
  out[#out + 1] = redis.call('PTTL', KEYS[i])
end
for i = 3 + n, #KEYS do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
  out[#out + 1] = redis.call('PTTL', KEYS[i])
end
return out
