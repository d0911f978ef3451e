-- move_in: the second step of moving a user's counters: fills them, and the user's idempotency
-- records, in their new bucket, and routes the user there.
--
-- KEYS[1]          the user's route key here
-- KEYS[2]          dirty set here
-- KEYS[3..2+n]     the user's counter hashes here, in move_out's order
-- KEYS[3+n]        the user's idempotency index here
-- KEYS[4+n..]      the user's idempotency records here, in move_out's order
-- ARGV[1]          the route to set ("" = no account: the route key is deleted; else the account id)
-- ARGV[2]          invalidation channel; ARGV[3] the user, announced there
-- ARGV[4]          now, ms (the score of a dirty mark)
-- ARGV[5]          n
-- then for each hash: its dirty-set member, its ms left to live (as move_out read it), m, and m
--             field, value pairs (m = 0: the hash did not exist)
-- then for each record: its ms left to live, m, and m field, value pairs
--
-- A hash is written unless one here is at least as new (a `v` as high: written by an earlier
-- attempt of the same move, and counted in since; or any loaded hash, against a copy without
-- `v`); the copy keeps every field but the dirty flag and the holds (`h:<type>`: open
-- reservations do not move), and is marked dirty here, so the next
-- flush writes it (Postgres takes nothing twice: the version is the one it had). A record is
-- written unless one is here already, with the time it had left, and indexed. Returns how many
-- hashes it wrote.
local written = 0
local n = tonumber(ARGV[5])
local at = 6
for i = 3, 2 + n do
  local hash, member, ttl, m = KEYS[i], ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local first = at + 3
  at = first + 2 * m
  if m > 0 then
    local incoming
    for j = first, first + 2 * m - 1, 2 do
      if ARGV[j] == 'v' then
        incoming = tonumber(ARGV[j + 1])
      end
    end
    local here = tonumber(redis.call('HGET', hash, 'v') or '-1')
    if (incoming and here < incoming) or (not incoming and here < 0) then
      redis.call('DEL', hash)
      for j = first, first + 2 * m - 1, 2 do
        -- Holds stay behind: the user's open reservations are records of the bucket they were
        -- made in, and end there (see expire.lua).
        if ARGV[j] ~= DIRTY and string.sub(ARGV[j], 1, 2) ~= 'h:' then
          redis.call('HSET', hash, ARGV[j], ARGV[j + 1])
        end
      end
      if ttl > 0 then
        redis.call('PEXPIRE', hash, ttl)
      end
      if incoming then
        redis.call('ZADD', KEYS[2], 'NX', ARGV[4], member)
        redis.call('HSET', hash, DIRTY, 1)
      end
      written = written + 1
    end
  end
end
local index = KEYS[3 + n]
for i = 4 + n, #KEYS do
  local record, ttl, m = KEYS[i], tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  local first = at + 2
  at = first + 2 * m
  if m > 0 and ttl > 0 and redis.call('EXISTS', record) == 0 then
    for j = first, first + 2 * m - 1, 2 do
      redis.call('HSET', record, ARGV[j], ARGV[j + 1])
    end
    redis.call('PEXPIRE', record, ttl)
    redis.call('ZADD', index, tonumber(ARGV[4]) + ttl, record)
    if redis.call('PTTL', index) < ttl then
      redis.call('PEXPIRE', index, ttl)
    end
  end
end
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
announce(ARGV[2], ARGV[3])
return written
