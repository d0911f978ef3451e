-- consume_many: consume, check or track several usage types in one call, all or nothing. Every
-- item is checked at every level (the user, and the user's account when they have one) before
-- anything is written; only when every item fits is every item counted, in this one atomic step.
--
-- KEYS[1]  dirty set               {prefix}:1:{b}:dirty
-- KEYS[2]  the bucket's marker     {prefix}:1:{b}:since
-- KEYS[3]  the user's route key    {prefix}:1:{b}:u:<user> (see misrouted in common.lua)
-- then for each period the items count in (ARGV[7] of them, in order), W keys (W = 2, or 4 with
-- an account): the user's counter hash of that period and its previous month's (for a fresh
-- start; see start_fresh), then with an account the account's counter hash and its previous
-- month's. Month and lifetime hashes of one owner share the bucket: every key is in one slot.
-- then, when ARGV[10] is "1": the idempotency record {prefix}:1:{b}:i:<user>:<key> and the
--          user's idempotency index {prefix}:1:{b}:ix:<user> (see consume.lua)
-- ARGV[1]  mode: "consume" (all or nothing), "check" (consume's decision, nothing written) or
--          "track" (counts every item regardless of limits)
-- ARGV[2]  default plan
-- ARGV[3]  plan override ("" = the plan stored in each hash, else the default plan)
-- ARGV[4]  idempotency record lifetime, seconds
-- ARGV[5]  the account the caller believes the user is a member of ("" = none): the route
-- ARGV[6]  allowed clock skew, ms (see start_fresh)
-- ARGV[7]  P, the number of periods; ARGV[8] N, the number of items
-- ARGV[9]  the items as the idempotency record keeps them: "<type>:<amount>,…" in the order sent
-- ARGV[10] "1" when the call has an idempotency key (its keys close KEYS), else "0"
-- ARGV[11 ..]  per period, 5 arguments: period id, the user's dirty-set member, the account's
--          ("" without an account), month start (ms, "0" for lifetime), the EXPIREAT of a counter
--          started fresh
-- then per item: type (the hash field), amount (a whole number > 0), its period's index
--          (1-based), its notify thresholds ("" = none; see record_thresholds), L, and L
--          arguments: the type's plan, limit, cap triples (see resolve_plan)
-- The caller sends each type at most once.
--
-- Returns {status, detail, then per item the twenty fields consume.lua answers (its status "ok"
-- or "denied", used .. account_held)}, items in the order sent:
--   "ok"         every item counted at every level (check: would be); each item's figures are
--                after the count (check: as they stand, with the overage it would add)
--   "denied"     consume and check: some item does not fit at some level: nothing counted
--                anywhere, nothing remembered. Each item says whether it fits ("ok") or not
--                ("denied", with limited_by), with the counts as they stand.
--   "replay"     the idempotency key was answered before: the stored answer, nothing counted
--   "conflict"   the idempotency key was used before for another call (another mode, or other
--                items or amounts; for check, any call: check records nothing); no items
--   "refunded"   the idempotency key names a call that was refunded; no items
--   "hydrate"    counters are not loaded from Postgres yet and cannot start fresh; detail lists
--                them as "<period index>:user" / "<period index>:account", space-separated; no
--                items
--   "moved"      the user's route is not ARGV[5]; detail is what the route key holds; no items
-- Order, as in consume.lua: every read and every check that can refuse comes first; the writes
-- that follow cannot fail. A counted item bumps its hash's `v` once per call, whatever the number
-- of items in it.
local dirty, marker = KEYS[1], KEYS[2]
local mode, account = ARGV[1], ARGV[5]
local pooled = account ~= ''
local nperiods, nitems = tonumber(ARGV[7]), tonumber(ARGV[8])
local width = pooled and 4 or 2
local keyed = ARGV[10] == '1'
local idem = keyed and KEYS[4 + nperiods * width] or nil
local index = keyed and KEYS[5 + nperiods * width] or nil

local route = misrouted(KEYS[3], account)
if route == false then
  return {'hydrate', '1:user'}
elseif route then
  return {'moved', route}
end

if idem then
  local seen = redis.call('HMGET', idem, 'k', 'items', 'r', 'ans')
  if seen[1] then
    if mode == 'check' or seen[1] ~= 'multi:' .. mode or seen[2] ~= ARGV[9] then
      return {'conflict', ''}
    end
    if seen[3] == '1' then
      return {'refunded', ''}
    end
    local reply = {'replay', ''}
    for _, v in ipairs(cjson.decode(seen[4])) do
      reply[#reply + 1] = v
    end
    return reply
  end
end

-- The periods: their keys and arguments.
local periods = {}
for p = 1, nperiods do
  local k, a = 3 + (p - 1) * width, 11 + (p - 1) * 5
  periods[p] = {hash = KEYS[k + 1], prev = KEYS[k + 2], ahash = pooled and KEYS[k + 3] or nil,
    aprev = pooled and KEYS[k + 4] or nil, id = ARGV[a], member = ARGV[a + 1],
    amember = ARGV[a + 2], start = ARGV[a + 3], expire_at = ARGV[a + 4], items = {}}
end

-- The items, and the fields each period's hashes are read for.
local items = {}
local at = 11 + nperiods * 5
for i = 1, nitems do
  local n = tonumber(ARGV[at + 4])
  local item = {field = ARGV[at], amount = tonumber(ARGV[at + 1]), period = tonumber(ARGV[at + 2]),
    notify = ARGV[at + 3], first = at + 5, last = at + 4 + n}
  items[i] = item
  local list = periods[item.period].items
  list[#list + 1] = item
  at = at + 5 + n
end

-- One HMGET per counter hash: version, dirty flag, stored plan, then per item of its period its
-- count, override, overage and units held (see consume.lua).
local function read_level(hash, prev, p)
  local names = {'v', DIRTY, 'p'}
  for _, item in ipairs(p.items) do
    local f = item.field
    names[#names + 1] = f
    names[#names + 1] = 'o:' .. f
    names[#names + 1] = 'ov:' .. f
    names[#names + 1] = 'h:' .. f
  end
  return read_counter(hash, prev, marker, p.start, ARGV[6], p.expire_at, unpack(names))
end
local missing = {}
for n, p in ipairs(periods) do
  p.got = read_level(p.hash, p.prev, p)
  if not p.got then
    missing[#missing + 1] = n .. ':user'
  end
  if pooled then
    p.agot = read_level(p.ahash, p.aprev, p)
    if not p.agot then
      missing[#missing + 1] = n .. ':account'
    end
  end
end
if #missing > 0 then
  return {'hydrate', table.concat(missing, ' ')}
end

-- Every item's figures at every level, and whether it fits.
local denied = false
for _, p in ipairs(periods) do
  p.version = whole(p.got[1], p.hash, 'v') -- corrupt data stops the script here, before any write
  if pooled then
    p.aversion = whole(p.agot[1], p.ahash, 'v')
  end
  for j, item in ipairs(p.items) do
    local f, g = item.field, 3 + (j - 1) * 4
    local u = {}
    u.plan, u.limit, u.source, u.cap = user_level(p.got[3], p.got[g + 2], ARGV[3], ARGV[2],
      item.first, pooled, item.last)
    u.used = whole(p.got[g + 1], p.hash, f)
    u.overage = whole(p.got[g + 3], p.hash, 'ov:' .. f)
    u.held = whole(p.got[g + 4], p.hash, 'h:' .. f)
    if u.used + item.amount >= EXACT then
      return redis.error_reply('ERR quotad: ' .. f .. ' of ' .. p.hash .. ' would pass 2^53; nothing counted')
    end
    item.user = u
    local a
    if pooled then
      a = {}
      a.plan, a.limit, a.source, a.cap = pool_level(p.agot[3], p.agot[g + 2], ARGV[2], item.first,
        item.last)
      a.used = whole(p.agot[g + 1], p.ahash, f)
      a.overage = whole(p.agot[g + 3], p.ahash, 'ov:' .. f)
      a.held = whole(p.agot[g + 4], p.ahash, 'h:' .. f)
      if a.used + item.amount >= EXACT then
        return redis.error_reply('ERR quotad: ' .. f .. ' of ' .. p.ahash .. ' would pass 2^53; nothing counted')
      end
      item.account = a
    end
    -- What open reservations hold is not there to take; track counts regardless.
    item.refused = mode ~= 'track' and refusing_level(item.amount, u.used + u.held, u.limit, u.cap,
      a and a.used + a.held, a and a.limit, a and a.cap)
    item.refused = item.refused or nil
    denied = denied or item.refused ~= nil
  end
end

-- An item's twenty fields as consume.lua answers them (whole numbers as text, so the stored
-- answer of a replay reads back exactly).
local function int(n)
  return string.format('%d', n)
end
local function fields(item, period_id, out)
  local u, a = item.user, item.account or {}
  local values = {item.refused and 'denied' or 'ok', int(u.used), u.plan, int(u.limit), period_id,
    '', item.refused or '', u.source, int(a.used or 0), a.plan or '', int(a.limit or -1),
    a.source or '', int(u.cap), int(u.overage), int(item.added or 0), int(a.cap or 0),
    int(a.overage or 0), int(item.aadded or 0), int(u.held), int(a.held or 0)}
  for _, v in ipairs(values) do
    out[#out + 1] = v
  end
end
local function answer(status)
  local out = {}
  for _, item in ipairs(items) do
    fields(item, periods[item.period].id, out)
  end
  local reply = {status, ''}
  for _, v in ipairs(out) do
    reply[#reply + 1] = v
  end
  return reply, out
end

if denied then
  return (answer('denied'))
end
if mode == 'check' then
  -- The overage each item would add if consumed now.
  for _, item in ipairs(items) do
    local u, a = item.user, item.account
    item.added = past_limit(item.amount, u.used, u.limit, u.cap)
    item.aadded = a and past_limit(item.amount, a.used, a.limit, a.cap) or 0
  end
  return (answer('ok'))
end

-- Writes, none of which can fail now: each item's count and overage at every level, then once
-- per hash its version and dirty mark.
local function count_level(hash, level, item)
  local added = past_limit(item.amount, level.used, level.limit, level.cap)
  level.used, level.overage = level.used + item.amount, level.overage + added
  if added > 0 then
    redis.call('HSET', hash, 'ov:' .. item.field, int(level.overage))
  end
  redis.call('HSET', hash, item.field, int(level.used))
  return added
end
local function changed(hash, version, flagged, member, lifetime)
  if flagged then
    redis.call('HSET', hash, 'v', int(version + 1))
  else
    redis.call('HSET', hash, 'v', int(version + 1), DIRTY, 1)
    redis.call('ZADD', dirty, 'NX', call_now_ms, member)
  end
  if lifetime then
    -- A lifetime counter loaded with nothing in Postgres expires unless something is counted in
    -- it (see hydrate.lua); this count makes it last.
    redis.call('PERSIST', hash)
  end
end
for _, p in ipairs(periods) do
  if #p.items > 0 then
    for _, item in ipairs(p.items) do
      item.added = count_level(p.hash, item.user, item)
      if item.notify ~= '' then
        record_thresholds(p.hash, item.field, item.notify, item.user.used, item.user.limit,
          item.user.plan)
      end
      if pooled then
        item.aadded = count_level(p.ahash, item.account, item)
      end
    end
    local lifetime = p.start == '0'
    changed(p.hash, p.version, p.got[2], p.member, lifetime)
    if pooled then
      changed(p.ahash, p.aversion, p.agot[2], p.amember, lifetime)
    end
  end
end

local reply, out = answer('ok')
if idem then
  -- A refund gives back every item (see refund_many.lua): the periods (`pes`, in KEYS' order),
  -- and per item its type, amount and period.
  local ids = {}
  for n, p in ipairs(periods) do
    ids[n] = p.id
  end
  local record = {'k', 'multi:' .. mode, 'items', ARGV[9], 'r', 0, 'ac', account, 'n', nitems,
    'pes', table.concat(ids, ','), 'ans', cjson.encode(out)}
  for i, item in ipairs(items) do
    record[#record + 1] = 't' .. i
    record[#record + 1] = item.field
    record[#record + 1] = 'a' .. i
    record[#record + 1] = int(item.amount)
    record[#record + 1] = 'pe' .. i
    record[#record + 1] = periods[item.period].id
  end
  redis.call('HSET', idem, unpack(record))
  redis.call('EXPIRE', idem, tonumber(ARGV[4]))
  local ttl_ms = tonumber(ARGV[4]) * 1000
  redis.call('ZADD', index, call_now_ms + ttl_ms, idem)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', call_now_ms)
  redis.call('PEXPIRE', index, ttl_ms)
end
return reply
