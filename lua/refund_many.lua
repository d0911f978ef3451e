-- refund_many: give back every item of one earlier call with items (consume_many.lua, consume or
-- track), named by its idempotency record, at every level it counted at, in one atomic step.
--
-- KEYS[1]  idempotency record  {prefix}:1:{b}:i:<user>:<key>
-- KEYS[2]  dirty set
-- KEYS[3]  the user's route key (see misrouted in common.lua)
-- then per period the record names (its `pes`, in that order): the user's counter hash of that
--          period, then with an account the account's
-- ARGV[1]  the record's `pes` as the caller read it just before (the periods, comma-separated)
-- ARGV[2]  invalidation channel; ARGV[3] the user, announced there when something is given back
--          (and the account, when its pool got something back)
-- ARGV[4]  the account the caller believes the user is a member of ("" = none): the route
-- then per period: the user's dirty-set member, the account's ("" without an account)
--
-- The account's pool is given back too when the record says the call counted in it (`ac`) and
-- the user is still a member of that account, as refund.lua does.
--
-- Returns {status, detail, then per item: type, amount given back, used after, overage after,
--          period id, pool's amount given back, pool's used after, pool's overage after, the
--          plan stored in the user's counter hash ("" for none)}:
--   "ok"       every item given back, never below 0 (see lower in common.lua); detail "pool"
--              when the pool got its part back. The record is marked refunded.
--   "missing"  no such record, or not a call with items, or its periods are not ARGV[1]
--   "refunded" the record was refunded before
--   "hydrate"  a counter is not loaded from Postgres yet: detail "<period index>:user" or
--              "<period index>:account"; nothing done
--   "moved"    the route is not ARGV[4]; detail is what the route key holds; nothing done
local idem, dirty = KEYS[1], KEYS[2]
local account = ARGV[4]
local pooled = account ~= ''
local width = pooled and 2 or 1
local route = misrouted(KEYS[3], account)
if route == false then
  return {'hydrate', '1:user'}
elseif route then
  return {'moved', route}
end
local rec = redis.call('HMGET', idem, 'k', 'pes', 'r', 'ac', 'n')
if not rec[1] or string.sub(rec[1], 1, 6) ~= 'multi:' or rec[2] ~= ARGV[1] then
  return {'missing', ''}
end
if rec[3] == '1' then
  return {'refunded', ''}
end
local order, by_id = {}, {}
for id in string.gmatch(ARGV[1], '[^,]+') do
  local n = #order
  by_id[id] = {hash = KEYS[4 + n * width], ahash = pooled and KEYS[5 + n * width] or nil,
    member = ARGV[5 + n * 2], amember = ARGV[6 + n * 2]}
  order[n + 1] = id
  if redis.call('HEXISTS', by_id[id].hash, 'v') == 0 then
    return {'hydrate', (n + 1) .. ':user'}
  end
end
local in_pool = pooled and rec[4] == account
if in_pool then
  for n, id in ipairs(order) do
    if redis.call('HEXISTS', by_id[id].ahash, 'v') == 0 then
      return {'hydrate', n .. ':account'}
    end
  end
end
-- Every item, and every stored figure it lowers, read and checked before the first write: a
-- corrupt value stops the script with nothing given back (see `whole`).
local items = {}
for i = 1, tonumber(rec[5]) do
  local item = redis.call('HMGET', idem, 't' .. i, 'a' .. i, 'pe' .. i)
  local p = by_id[item[3]]
  if not p then
    return {'missing', ''}
  end
  for _, hash in ipairs({p.hash, in_pool and p.ahash or nil}) do
    stored_count(hash, 'v')
    stored_count(hash, item[1])
    stored_count(hash, 'ov:' .. item[1])
  end
  items[i] = {field = item[1], amount = tonumber(item[2]), id = item[3], p = p}
end
local reply = {'ok', in_pool and 'pool' or ''}
local given_any, pool_any = false, false
for _, item in ipairs(items) do
  local p = item.p
  local used, given, overage = lower(p.hash, item.field, item.amount, dirty, p.member)
  local aused, agiven, aoverage = 0, 0, 0
  if in_pool then
    aused, agiven, aoverage = lower(p.ahash, item.field, item.amount, dirty, p.amember)
  end
  given_any = given_any or given > 0
  pool_any = pool_any or agiven > 0
  local plan = redis.call('HGET', p.hash, 'p') or ''
  for _, v in ipairs({item.field, given, used, overage, item.id, agiven, aused, aoverage, plan}) do
    reply[#reply + 1] = v
  end
end
redis.call('HSET', idem, 'r', 1)
if given_any or pool_any then
  announce(ARGV[2], ARGV[3])
end
if pool_any then
  announce(ARGV[2], account)
end
return reply
