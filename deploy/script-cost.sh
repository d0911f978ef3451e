#!/usr/bin/env bash
# What a decision costs inside Redis, by part: a Redis of its own (port 18391, nothing kept), driven
# by redis-benchmark with 50 clients, prints Redis CPU per call (`INFO cpu` before and after) and
# the time Redis spent in the command itself (`INFO commandstats`, usec_per_call) for:
#   - PING, unpipelined and 16 deep (what one round trip costs Redis in socket work);
#   - a script of TIME, HMGET and HSET with no arguments (what a minimal counting script costs);
#   - lua/common.lua's prologue alone, with the consume call's 5 keys and 26 arguments;
#   - the consume script (lua/common.lua + lua/consume.lua), one allowed consume of one
#     loaded counter, with the arguments quotad sends;
#   - the same for a member of an account: the user's counter and the account's pool, both
#     loaded, checked and counted in the one script (7 keys);
#   - the same without an account but with an idempotency key, new on every call (redis-benchmark
#     puts a random number in it): the record and the user's index of records are written too;
#   - the consume script for a user past 80 % of a type that notifies at 80 and 100 %, the event
#     recorded already: what notifications add to each call past a threshold.
# Each line also gives the Redis commands run per call (inside the script too, from `INFO
# commandstats`), the figure that moves least with the machine's noise.
#   deploy/script-cost.sh [CALLS]      # default 200000 calls each
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-200000}
[[ $calls =~ ^[1-9][0-9]{0,8}$ ]] ||
  { echo "CALLS must be a whole number from 1 to 999999999, not '$calls'" >&2; exit 2; }
port=18391
dir=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
  --daemonize no --logfile "$dir/redis.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done

rc() { redis-cli -p "$port" "$@"; }
cpu() { rc info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/{s+=$2} END{printf "%.6f", s}'; }
usec() { rc info commandstats | tr -d '\r' | awk -F'[=,]' -v c="cmdstat_$1:calls" '$1==c{print $6}'; }
# Commands run since the last reset, this script's own INFO calls left out.
commands() { rc info commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_/ && $1!="cmdstat_info"{s+=$3} END{print s+0}'; }

# One month counter, loaded (it has `v`), as quotad's keys and arguments name it.
user=993971cb-494e-4ae7-8bfd-16cfcd3d2ba4
b="{765}"
hash="bench:1:$b:c:$user:2026-11"
rc hset "$hash" v 0 >/dev/null
keys=("$hash" "bench:1:$b:dirty" "bench:1:$b:c:$user:2026-10" "bench:1:$b:since"
  "bench:1:$b:u:$user")
deadline=$(( $(date +%s) * 1000 + 3600000 ))
args=(consume ai_generation 1 "$user:2026-11" PRO FREE 86400 2026-11 64 1793491200000 60000
  1799107200 "" "" "" 0 ENTERPRISE -1 0 FREE 50 0 PRO -1 0 "$deadline")

# A member of an account: their counter and the account's pool in the account's bucket, the
# route key saying they count there. No plan of their own: the pool's FREE limit (50) is far
# below what the bench counts, so the pool is unlimited by an override, as an ENTERPRISE pool.
member=5a0b1f7e-2c3d-4e5f-8a9b-0c1d2e3f4a5b
account=0a6c2e2e-6f1c-4b8e-9d55-2f1f0b7c3a10
a="{311}"
mhash="bench:1:$a:c:$member:2026-11"
pool="bench:1:$a:a:$account:2026-11"
rc hset "$mhash" v 0 >/dev/null
rc hset "$pool" v 0 o:ai_generation -1 >/dev/null
rc set "bench:1:$a:u:$member" "$account" >/dev/null
mkeys=("$mhash" "bench:1:$a:dirty" "bench:1:$a:c:$member:2026-10" "bench:1:$a:since"
  "bench:1:$a:u:$member" "$pool" "bench:1:$a:a:$account:2026-10")
margs=(consume ai_generation 1 "$member:2026-11" "" FREE 86400 2026-11 64 1793491200000 60000
  1799107200 "$account" "a:$account:2026-11" "" 0 ENTERPRISE -1 0 FREE 50 0 PRO -1 0 "$deadline")

# A user past 80 % of a large limit, on a type that notifies at 80 and 100 %: the 80 % event is
# recorded already (its mark carries the same limit), so each call reads the mark and records
# nothing: what notifications add to every call past a threshold.
nuser=7e0c9a55-1d2b-4c3d-8e4f-5a6b7c8d9e0f
n="{512}"
nhash="bench:1:$n:c:$nuser:2026-11"
rc hset "$nhash" v 0 ai_generation 800000000000 \
  e:ai_generation:80 "1000000000000 800000000000 BIG 1793491200000" >/dev/null
nkeys=("$nhash" "bench:1:$n:dirty" "bench:1:$n:c:$nuser:2026-10" "bench:1:$n:since"
  "bench:1:$n:u:$nuser")
nargs=(consume ai_generation 1 "$nuser:2026-11" BIG FREE 86400 2026-11 64 1793491200000 60000
  1799107200 "" "" "80,100" 0 BIG 1000000000000 0 FREE 50 0 "$deadline")

measure() { # name, command name in commandstats, pipeline depth, command...
  local name=$1 stat=$2 depth=$3
  shift 3
  rc config resetstat >/dev/null
  local before after
  before=$(cpu)
  redis-benchmark -p "$port" -c 50 -n "$calls" -P "$depth" -q "$@" >/dev/null 2>&1
  after=$(cpu)
  awk -v n="$name" -v b="$before" -v a="$after" -v c="$calls" -v u="$(usec "$stat")" -v k="$(commands)" \
    'BEGIN{printf "%-52s Redis CPU %6.2f µs/call   in the command %6.2f µs/call   %5.2f commands/call\n", n, (a-b)*1e6/c, u, k/c}'
}

minimal=$(rc script load "redis.call('TIME'); redis.call('HMGET', KEYS[1], 'v', 'f', 'x', 'p'); redis.call('HSET', KEYS[1], 'f', 1, 'v', 2); return 1")
prologue=$(rc script load "$(sed -n '1,20p' lua/common.lua; echo 'return 1')")
consume=$(rc script load "$(cat lua/common.lua; echo; cat lua/consume.lua)")

measure "PING, one at a time" ping 1 PING
measure "PING, 16 pipelined" ping 16 PING
measure "TIME + HMGET + HSET script, one at a time" evalsha 1 EVALSHA "$minimal" 1 "$hash"
measure "TIME + HMGET + HSET script, 16 pipelined" evalsha 16 EVALSHA "$minimal" 1 "$hash"
measure "common.lua prologue, consume's keys and args, 16 deep" evalsha 16 EVALSHA "$prologue" 5 "${keys[@]}" "${args[@]}"
measure "consume script, one at a time" evalsha 1 EVALSHA "$consume" 5 "${keys[@]}" "${args[@]}"
measure "consume script, 16 pipelined" evalsha 16 EVALSHA "$consume" 5 "${keys[@]}" "${args[@]}"
measure "consume script past a notify threshold, one at a time" evalsha 1 EVALSHA "$consume" 5 "${nkeys[@]}" "${nargs[@]}"
measure "consume script past a notify threshold, 16 pipelined" evalsha 16 EVALSHA "$consume" 5 "${nkeys[@]}" "${nargs[@]}"
measure "consume script with an account, one at a time" evalsha 1 EVALSHA "$consume" 7 "${mkeys[@]}" "${margs[@]}"
measure "consume script with an account, 16 pipelined" evalsha 16 EVALSHA "$consume" 7 "${mkeys[@]}" "${margs[@]}"
# With a key: each call's record is new (`__rand_int__`, from -r), so each writes it and indexes it.
ikeys=("${keys[@]}" "bench:1:$b:i:$user:k__rand_int__" "bench:1:$b:ix:$user")
measure "consume script with a new idempotency key, 16 pipelined" evalsha 16 -r 1000000000 EVALSHA "$consume" 7 "${ikeys[@]}" "${args[@]}"
counted=$(rc hget "$hash" ai_generation)
records=$(rc zcard "bench:1:$b:ix:$user")
echo "counted: $counted (expected $((3 * calls)), less the rare repeated random key: $records records indexed)"
(( counted > 2 * calls && counted <= 3 * calls )) || { echo "the consume script did not count every call" >&2; exit 1; }
n=$(rc hget "$nhash" ai_generation)
[[ $n == $((800000000000 + 2 * calls)) ]] || { echo "the consume script past a threshold did not count every call" >&2; exit 1; }
[[ $(rc hexists "$nhash" x:ev) == 0 ]] || { echo "a threshold recorded already was recorded again" >&2; exit 1; }
for h in "$mhash" "$pool"; do
  n=$(rc hget "$h" ai_generation)
  echo "counted in $h: $n (expected $((2 * calls)))"
  [[ $n == $((2 * calls)) ]] || { echo "the consume script with an account did not count every call at every level" >&2; exit 1; }
done
