-- consume / track: check the limit of every level (the user, and the user's account when they
-- have one) and count at every level, in one atomic step.
--
-- KEYS[1]  the user's counter hash {prefix}:1:{b}:c:<user>:<period>
-- KEYS[2]  dirty set               {prefix}:1:{b}:dirty
-- KEYS[3]  the user's previous month's counter hash (for a fresh start; see start_fresh)
-- KEYS[4]  the bucket's marker     {prefix}:1:{b}:since
-- KEYS[5]  the user's route key    {prefix}:1:{b}:u:<user> (see misrouted in common.lua)
-- KEYS[6], KEYS[7]  with an account only: the account's counter hash
--          {prefix}:1:{b}:a:<account>:<period> and its previous month's
-- KEYS[6 or 8] idempotency record  {prefix}:1:{b}:i:<user>:<key>   (only when the call has a key)
-- KEYS[7 or 9] the user's idempotency index {prefix}:1:{b}:ix:<user> (with the record): a sorted
--          set of the user's records here, scored by their expiry (ms), so a membership change
--          can carry them to the user's new bucket (see move_out.lua)
-- `{b}` is the bucket of the account's id for a member, of the user's id otherwise: every key is
-- in one slot.
-- ARGV[1]  mode: "consume" enforces the limits; "track" counts regardless
-- ARGV[2]  usage type (the hash field)
-- ARGV[3]  amount, a whole number > 0
-- ARGV[4]  the user's dirty-set member "<user>:<period>"
-- ARGV[5]  plan override ("" = the plan stored in the hash, else the default plan)
-- ARGV[6]  default plan
-- ARGV[7]  idempotency record lifetime, seconds
-- ARGV[8]  period id, kept in the idempotency record so a refund finds the right counter
-- ARGV[9]  most metadata names one counter may collect
-- ARGV[10] month start, ms ("0" for lifetime); ARGV[11] allowed clock skew, ms; ARGV[12] the
--          EXPIREAT of a counter started fresh (see start_fresh)
-- ARGV[13] the account the caller believes the user is a member of ("" = none): the route
-- ARGV[14] the account's dirty-set member "a:<account>:<period>" ("" without an account)
-- ARGV[15] the type's notify thresholds, percent of the limit, ascending: "80,100" ("" = none);
--          see record_thresholds in common.lua
-- ARGV[16] n: metadata entries that follow, as n triples kind ("n" number | "s" text), name, value
--          (numbers are finite, as Rust's f64 Display writes them)
-- ARGV[17 + 3n ..]  plan, limit, cap triples for this type (limit -1 = unlimited; cap: units
--          allowed past the limit, 0 = none, -1 = no cap: a soft limit; see resolve_plan)
--
-- Returns {status, used, plan, limit, period, detail, limited_by, source,
--          account_used, account_plan, account_limit, account_source,
--          cap, overage, added, account_cap, account_overage, account_added, held,
--          account_held}: the user's level in used..source, cap..added and held, the account's
-- in account_* (0, "", -1, "", 0, 0, 0, 0 without an account). `held` is what open reservations
-- hold at that level (`h:<type>`, see reserve.lua): a consume fits only where used + held +
-- amount stays within limit + cap. `source` says where a limit comes from: "plan", "override", or (the user's level of a
-- member with neither a stored plan nor an override) "account": the account's pool alone limits
-- them. `cap` is the level's overage cap, `overage` the period's overage after the call
-- (`ov:<type>`), `added` the overage this call counted (see past_limit in common.lua): a consume
-- is refused only past limit + cap, and the units it counts past the limit are overage. A track
-- counts past everything; its units past the limit are overage too where the plan allows overage
-- (past the cap as well: they were used).
--   "ok"         counted at every level; used (account_used) is the new total, overage
--                (account_overage) likewise
--   "denied"     consume only: the amount does not fit at level `limited_by` ("user" or
--                "account"); nothing counted at any level, nothing remembered
--   "replay"     the idempotency key was answered before: the stored answer (its overage
--                figures too), nothing counted
--   "conflict"   the idempotency key was used before for another mode, type or amount
--   "refunded"   the idempotency key names a call that was refunded: nothing counted (a retry of
--                a refunded call must not count for free under the old answer, nor count again)
--   "meta_limit" the call's metadata would take the counter past ARGV[9] names; nothing counted
--   "meta_sum"   the sum of numeric metadata `detail` would not be a finite number (beyond
--                ±1.8e308); nothing counted
--   "hydrate"    a counter is not loaded from Postgres yet, and cannot start fresh; `detail`
--                says which: "user", "account" or "user account"; nothing counted
--   "moved"      the user's route is not ARGV[13]; `detail` is what the route key holds ("" when
--                missing); nothing done
--
-- Order: every read and every check that can refuse comes first; the writes that follow cannot
-- fail, so a call either changes nothing or counts at every level (with its overage), bumps each
-- `v`, records the threshold events it causes (the user's level only), writes its metadata (the
-- user's counter only), marks the counters dirty (if they are not yet) and stores its idempotency
-- record, all together. (A fresh start, which writes, is the one exception: it only creates the
-- empty counter a check would create too.)
--
-- A stored count, `v` or `n:<type>` that is not a whole number is corrupt data: the script stops
-- with an error reply before writing. A stored `m:<type>:<name>` sum that is not a finite number
-- (corrupt data too; quotad never writes one) is dropped: the sum starts again from this call's
-- value, so one bad field cannot stop a user's counting; the script logs it (Redis log, warning).
-- Sums are written with HSET of '%.17g' (a double's full precision), never HINCRBYFLOAT, whose
-- refusal of an infinite result would come after the count was written.
local hash, dirty = KEYS[1], KEYS[2]
local account = ARGV[13]
local ahash = account ~= '' and KEYS[6] or nil
local idem = KEYS[ahash and 8 or 6]
local index = KEYS[ahash and 9 or 7]
local mode, field, amount = ARGV[1], ARGV[2], tonumber(ARGV[3])

local function answer(status, used, plan, limit, period, detail, limited_by, source, aused, aplan,
    alimit, asource, cap, overage, added, acap, aoverage, aadded, held, aheld)
  return {status, used or 0, plan or '', limit or 0, period or '', detail or '', limited_by or '',
    source or '', aused or 0, aplan or '', alimit or -1, asource or '', cap or 0, overage or 0,
    added or 0, acap or 0, aoverage or 0, aadded or 0, held or 0, aheld or 0}
end

local route = misrouted(KEYS[5], account)
if route == false then
  return answer('hydrate', 0, '', 0, '', 'user')
elseif route then
  return answer('moved', 0, '', 0, '', route)
end

if idem then
  local seen = redis.call('HMGET', idem, 'k', 't', 'a', 'u', 'pl', 'l', 'pe', 'r', 'ls', 'au', 'ap',
    'al', 'as', 'oc', 'ov', 'oa', 'aoc', 'aov', 'aoa')
  if seen[1] then
    if seen[1] ~= mode or seen[2] ~= field or tonumber(seen[3]) ~= amount then
      return answer('conflict')
    end
    if seen[8] == '1' then
      return answer('refunded', 0, '', 0, seen[7])
    end
    return answer('replay', tonumber(seen[4]), seen[5], tonumber(seen[6]), seen[7], '', '', seen[9],
      tonumber(seen[10]), seen[11], tonumber(seen[12]), seen[13], tonumber(seen[14]),
      tonumber(seen[15]), tonumber(seen[16]), tonumber(seen[17]), tonumber(seen[18]),
      tonumber(seen[19]))
  end
end

-- Everything the decision reads, one HMGET per level: version, count, dirty flag, stored plan,
-- override, overage, units held by open reservations.
local over, ov_field, hold = 'o:' .. field, 'ov:' .. field, 'h:' .. field
local got, ag, missing = read_levels(hash, KEYS[3], ahash, KEYS[7], KEYS[4], ARGV[10], ARGV[11],
  ARGV[12], 'v', field, DIRTY, 'p', over, ov_field, hold)
if missing then
  return answer('hydrate', 0, '', 0, '', missing)
end
local version = whole(got[1], hash, 'v') -- a corrupt version stops the script here, before any write

local nmeta = tonumber(ARGV[16])
local first_meta, last_meta = 17, 16 + 3 * nmeta
local plan, limit, source, cap = user_level(got[4], got[5], ARGV[5], ARGV[6], last_meta + 1,
  ahash ~= nil)
local used = whole(got[2], hash, field)
local overage = whole(got[6], hash, ov_field)
local held = whole(got[7], hash, hold)
if used + amount >= EXACT then
  return redis.error_reply('ERR quotad: ' .. field .. ' of ' .. hash .. ' would pass 2^53; nothing counted')
end

local aversion, aplan, alimit, asource, aused, acap, aoverage, aheld
if ahash then
  aversion = whole(ag[1], ahash, 'v')
  aplan, alimit, asource, acap = pool_level(ag[4], ag[5], ARGV[6], last_meta + 1)
  aused = whole(ag[2], ahash, field)
  aoverage = whole(ag[6], ahash, ov_field)
  aheld = whole(ag[7], ahash, hold)
  if aused + amount >= EXACT then
    return redis.error_reply('ERR quotad: ' .. field .. ' of ' .. ahash .. ' would pass 2^53; nothing counted')
  end
end

-- What open reservations hold is not there to take.
local refused = mode == 'consume'
  and refusing_level(amount, used + held, limit, cap, aused and aused + aheld, alimit, acap)
if refused then
  return answer('denied', used, plan, limit, ARGV[8], '', refused, source, aused, aplan, alimit,
    asource, cap, overage, 0, acap, aoverage, 0, held, aheld)
end

-- Metadata names are bounded per counter, so a caller cannot grow a hash (and its Postgres row)
-- without end; numeric sums must stay finite. Both are checked before any write.
local fresh = 0
local sums = {}
for i = first_meta, last_meta, 3 do
  local name = field .. ':' .. ARGV[i + 1]
  if ARGV[i] == 'n' then
    local raw = redis.call('HGET', hash, 'm:' .. name)
    local cur = raw and tonumber(raw)
    if raw and not (cur and cur == cur and cur ~= math.huge and cur ~= -math.huge) then
      redis.log(redis.LOG_WARNING, 'quotad: ' .. hash .. ' m:' .. name .. ' holds ' .. raw
        .. ', not a number; the sum starts again')
      cur = 0
    end
    local sum = (cur or 0) + tonumber(ARGV[i + 2])
    if sum ~= sum or sum == math.huge or sum == -math.huge then
      return answer('meta_sum', used, plan, limit, ARGV[8], ARGV[i + 1])
    end
    sums[#sums + 1] = {'m:' .. name, string.format('%.17g', sum)}
    if not raw and redis.call('HEXISTS', hash, 's:' .. name) == 0 then
      fresh = fresh + 1
    end
  elseif redis.call('HEXISTS', hash, 'm:' .. name) == 0 and redis.call('HEXISTS', hash, 's:' .. name) == 0 then
    fresh = fresh + 1
  end
end
if fresh > 0 and stored_count(hash, 'n:' .. field) + fresh > tonumber(ARGV[9]) then
  return answer('meta_limit', used, plan, limit, ARGV[8])
end

-- Writes, none of which can fail now.
if fresh > 0 then
  redis.call('HINCRBY', hash, 'n:' .. field, fresh)
end
-- Count and version in one write ('%d': whole numbers, never a float's exponent form), the
-- overage with them when this count adds some; the dirty mark only on the first change since the
-- counter's last flush (see mark_dirty).
local function count_in(h, cur, ver, flagged, member, ov, added)
  local count, next_version = string.format('%d', cur + amount), string.format('%d', ver + 1)
  if added > 0 then
    redis.call('HSET', h, ov_field, string.format('%d', ov + added))
  end
  if flagged then
    redis.call('HSET', h, field, count, 'v', next_version)
  else
    redis.call('HSET', h, field, count, 'v', next_version, DIRTY, 1)
    redis.call('ZADD', dirty, 'NX', call_now_ms, member)
  end
  if ARGV[10] == '0' then
    -- A lifetime counter loaded with nothing in Postgres expires unless something is counted in
    -- it (see hydrate.lua); this count makes it last.
    redis.call('PERSIST', h)
  end
end
local added = past_limit(amount, used, limit, cap)
count_in(hash, used, version, got[3], ARGV[4], overage, added)
used, overage = used + amount, overage + added
if ARGV[15] ~= '' then
  record_thresholds(hash, field, ARGV[15], used, limit, plan)
end
local aadded = 0
if ahash then
  aadded = past_limit(amount, aused, alimit, acap)
  count_in(ahash, aused, aversion, ag[3], ARGV[14], aoverage, aadded)
  aused, aoverage = aused + amount, aoverage + aadded
end
for _, kv in ipairs(sums) do
  redis.call('HSET', hash, kv[1], kv[2])
end
for i = first_meta, last_meta, 3 do
  if ARGV[i] == 's' then
    redis.call('HSET', hash, 's:' .. field .. ':' .. ARGV[i + 1], ARGV[i + 2])
  end
end

if idem then
  redis.call('HSET', idem, 'k', mode, 't', field, 'a', amount, 'u', used, 'pl', plan, 'l', limit,
    'pe', ARGV[8], 'r', 0, 'ls', source, 'ac', account, 'oc', cap, 'ov', overage, 'oa', added)
  if ahash then
    redis.call('HSET', idem, 'au', aused, 'ap', aplan, 'al', alimit, 'as', asource, 'aoc', acap,
      'aov', aoverage, 'aoa', aadded)
  end
  redis.call('EXPIRE', idem, tonumber(ARGV[7]))
  if index then
    local ttl_ms = tonumber(ARGV[7]) * 1000
    redis.call('ZADD', index, call_now_ms + ttl_ms, idem)
    redis.call('ZREMRANGEBYSCORE', index, '-inf', call_now_ms)
    redis.call('PEXPIRE', index, ttl_ms)
  end
end
return answer('ok', used, plan, limit, ARGV[8], '', '', source, aused, aplan, alimit, asource,
  cap, overage, added, acap, aoverage, aadded, held, aheld)
