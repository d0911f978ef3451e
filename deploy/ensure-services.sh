#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL that quotad's tests and local runs use are installed,
# running and answering: Redis on 127.0.0.1:6379, Postgres on 127.0.0.1:5432 with password-less
# (trust) TCP login as `postgres`. Idempotent: when both already answer, it only checks.
# Also installs Prometheus, without using its service: tests/api/prometheus.rs runs
# /usr/bin/prometheus itself on a free port, and CI checks deploy/prometheus/ with promtool.
# Works without systemd (containers, CI), so services are started directly.
set -euo pipefail

REDIS_HOST=127.0.0.1 REDIS_PORT=6379
PG_HOST=127.0.0.1 PG_PORT=5432
TRUST_RULE='host all all 127.0.0.1/32 trust'
WAIT_SECONDS=30

log() { echo "ensure-services: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# wait_for <command...>: retry the command for up to WAIT_SECONDS.
wait_for() {
  local deadline=$((SECONDS + WAIT_SECONDS))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# Every probe has its own short timeout: a peer that accepts but never answers must not hang us.
redis_ok() { [[ $(timeout 3 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }
pg_ready() { pg_isready -q -t 3 -h "$PG_HOST" -p "$PG_PORT"; }
# -w: never prompt, so a missing trust rule shows up as a failure instead of a hang.
pg_login() {
  env -u PGPASSWORD PGCONNECT_TIMEOUT=3 \
    psql -w -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atqc 'select 1'
}
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
# Prints "<version> <name>" of the cluster configured on PG_PORT (nothing if there is none).
pg_cluster() { pg_lsclusters --no-header | awk -v p="$PG_PORT" '$3 == p { print $1, $2; exit }'; }

# --- 1. install what is missing (only then touch apt) -------------------------------------
packages=()
for bin in redis-server redis-cli; do
  command -v "$bin" >/dev/null || { packages+=(redis-server); break; }
done
for bin in psql pg_isready pg_ctlcluster pg_lsclusters pg_createcluster; do
  command -v "$bin" >/dev/null || { packages+=(postgresql); break; }
done
# postgresql-common can be present without any server version installed.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || packages+=(postgresql)
# Debian's prometheus package provides /usr/bin/prometheus and /usr/bin/promtool. Its
# recommends (node exporter, smartmontools, ...) are not wanted here. Nothing uses its service:
# without systemd it is normally not started, and if it is, tests do not depend on port 9090.
extra=()
command -v promtool >/dev/null && [[ -x /usr/bin/prometheus ]] || extra+=(prometheus)
wanted=("${packages[@]}" "${extra[@]}")
if ((${#wanted[@]})); then
  ((EUID == 0)) || die "missing ${wanted[*]}; install them (needs root): apt-get install ${wanted[*]}"
  log "installing ${wanted[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  ((${#packages[@]} == 0)) || apt-get install -y -qq "${packages[@]}" >/dev/null
  ((${#extra[@]} == 0)) || apt-get install -y -qq --no-install-recommends "${extra[@]}" >/dev/null
fi

# --- 2. Redis ---------------------------------------------------------------------------------
if ! redis_ok; then
  # Start our own only if nothing holds the port; something there that does not answer PONG
  # (loading a big dataset, wants a password) is not ours to replace.
  if ! port_open "$REDIS_HOST" "$REDIS_PORT"; then
    log "starting redis-server on $REDIS_HOST:$REDIS_PORT"
    mkdir -p /var/lib/redis /var/log/redis
    # No persistence: test and dev counters are disposable (Postgres holds the durable record).
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  fi
  wait_for redis_ok ||
    die "Redis on $REDIS_HOST:$REDIS_PORT did not answer PING within ${WAIT_SECONDS}s (log: /var/log/redis/ci.log)"
fi

# --- 3. PostgreSQL ----------------------------------------------------------------------------
if ! pg_ready; then
  # The cluster that owns port 5432; a fresh install normally has created <ver>/main on it.
  read -r pg_ver pg_name < <(pg_cluster) || true
  if [[ -z ${pg_ver:-} ]]; then
    [[ -z $(pg_lsclusters --no-header) ]] ||
      die "PostgreSQL clusters exist but none on port $PG_PORT; see pg_lsclusters"
    pg_ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1) pg_name=main
    log "creating PostgreSQL cluster $pg_ver/$pg_name on port $PG_PORT"
    pg_createcluster --port "$PG_PORT" "$pg_ver" "$pg_name" >/dev/null
  fi
  if ! pg_ctlcluster "$pg_ver" "$pg_name" status >/dev/null 2>&1; then
    log "starting PostgreSQL cluster $pg_ver/$pg_name"
    pg_ctlcluster --skip-systemctl-redirect "$pg_ver" "$pg_name" start
  fi
  wait_for pg_ready ||
    die "PostgreSQL on $PG_HOST:$PG_PORT not ready within ${WAIT_SECONDS}s (log: /var/log/postgresql/)"
fi

if ! pg_login >/dev/null 2>&1; then
  # Debian's default pg_hba.conf asks TCP clients for a password; the tests log in without one.
  # Rules match first-wins, so ours goes at the top. Local trust is for this machine only.
  read -r pg_ver pg_name < <(pg_cluster) || true
  hba=/etc/postgresql/${pg_ver:-?}/${pg_name:-?}/pg_hba.conf
  [[ -f $hba ]] || die "cannot log in to PostgreSQL as postgres and found no pg_hba.conf for port $PG_PORT"
  first_rule=$(sed 's/#.*//' "$hba" | awk 'NF { $1 = $1; print; exit }') # normalised blanks
  if [[ $first_rule != "$TRUST_RULE" ]]; then
    log "adding '$TRUST_RULE' to the top of $hba and reloading"
    { echo "$TRUST_RULE  # added by quotad deploy/ensure-services.sh"; cat "$hba"; } >"$hba.new"
    cat "$hba.new" >"$hba" && rm -f "$hba.new" # cat, not mv: keeps owner and mode
    pg_ctlcluster --skip-systemctl-redirect "$pg_ver" "$pg_name" reload
  fi
  wait_for pg_login ||
    die "psql -h $PG_HOST -p $PG_PORT -U postgres still fails: $(pg_login 2>&1 | head -n1)"
fi

log "ok: redis $REDIS_HOST:$REDIS_PORT, postgres $PG_HOST:$PG_PORT"
