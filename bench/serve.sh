# shellcheck shell=bash disable=SC2034,SC2154 # sourced: sets variables for its caller, reads its $port
# Sourced by scripts/bench, scripts/bench-limits and scripts/soak: builds the release
# binary, starts it on a fresh database on $port with the rate limits of BENCH_LIMITS, and
# seeds 100 users x 20 tasks through the API.
# Sets: binary, server (pid), work (temp dir), BENCH_USERS (the users file), backend,
# limits_note (the limits' settings, for a report's header).
# Functions: limits_env MODE, start_server, stop_server (to measure several modes on one
# database) and server_counters (429s and Redis errors the running server counted).
#
# BENCH_LIMITS:
#   memory (the default)  the per-user and failed-authentication limits on, kept in the
#                         server's memory, with a quota no run reaches: every request
#                         pays for the check, none is refused
#   redis                 the same, shared through Redis at BENCH_REDIS_URL (default
#                         redis://127.0.0.1:6379; when nothing answers there, a local
#                         redis-server is started and left running), under a fresh key
#                         prefix (bench:<random>:) for each server start; the keys are
#                         deleted at exit
#   off                   both limits off (RATE_LIMIT=0 AUTH_FAILURE_LIMIT=0)
#
# BENCH_TOKENS: hs256 (the default: tokens from the service's `token` command, signed with
# the shared secret), eddsa or rs256: tokens signed as Better Auth signs them, by a key
# made for the run whose JWKS a local web server publishes (JWKS_URL), made by
# examples/bench_tokens.rs. Sets tokens_note.
#
# BENCH_WORKERS: the server's worker threads (TOKIO_WORKER_THREADS; default: one per
# core). Sets workers_note.
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }
# BENCH_BINARY: another build to measure (e.g. an earlier release), instead of this tree's.
if [ -z "${BENCH_BINARY:-}" ]; then
  cargo build --release --locked -q
fi
binary=${BENCH_BINARY:-target/release/task-api}
work=$(mktemp -d)
redis_url=${BENCH_REDIS_URL:-redis://127.0.0.1:6379}
redis_prefixes=()

# Deletes the keys of every prefix this benchmark used.
redis_clean() {
  local prefix
  for prefix in "${redis_prefixes[@]}"; do
    redis-cli -u "$redis_url" --scan --pattern "${prefix}*" 2>/dev/null \
      | xargs -r redis-cli -u "$redis_url" unlink >/dev/null 2>&1 || true
  done
}

stop_server() {
  if [ -n "${server:-}" ]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=
  fi
}
trap 'stop_server; redis_clean; rm -rf "$work"' EXIT

# Redis answering at $redis_url; the local default one is started when it does not.
redis_up() {
  command -v redis-cli >/dev/null || { echo "redis-cli is not installed (apt-get install redis-server)" >&2; exit 1; }
  [ "$(redis-cli -u "$redis_url" ping 2>/dev/null)" = PONG ] && return
  if [ -z "${BENCH_REDIS_URL:-}" ]; then
    echo "no Redis at $redis_url: starting redis-server there (no persistence; left running)…" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 1 50); do
      [ "$(redis-cli -u "$redis_url" ping 2>/dev/null)" = PONG ] && return
      sleep 0.1
    done
  fi
  echo "no Redis answers at $redis_url (BENCH_REDIS_URL)" >&2
  exit 1
}

# Exports the server's limit settings for mode MODE (see BENCH_LIMITS above).
limits_env() {
  unset RATE_LIMIT RATE_LIMIT_WINDOW AUTH_FAILURE_LIMIT REDIS_URL REDIS_KEY_PREFIX
  case $1 in
    off)
      export RATE_LIMIT=0 AUTH_FAILURE_LIMIT=0
      limits_note="limits off"
      ;;
    memory|redis)
      # 1,000,000 requests per user per 1 s window: the highest quota RATE_LIMIT takes
      # over its shortest window. A request costs 1 µs of the window, so no user is refused
      # below 1,000,000 req/s: 20 x the 50,000 req/s a run here could send one user (the
      # page scenarios send all their requests as one user). The check is the same work
      # as with the default 1200 per 60 s. The failed-authentication limit keeps its
      # default (120 per address per minute): every request here authenticates, so it
      # only checks.
      export RATE_LIMIT=1000000 RATE_LIMIT_WINDOW=1s
      limits_note="limits on in memory (1,000,000 req/s per user, never reached)"
      if [ "$1" = redis ]; then
        redis_up
        REDIS_KEY_PREFIX="bench:$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n'):"
        export REDIS_URL=$redis_url REDIS_KEY_PREFIX
        redis_prefixes+=("$REDIS_KEY_PREFIX")
        limits_note="limits on through Redis (1,000,000 req/s per user, never reached)"
      fi
      ;;
    *)
      echo "BENCH_LIMITS: expected memory, redis or off, got \"$1\"" >&2
      exit 1
      ;;
  esac
}

# Starts the binary with the current environment and waits until it serves.
start_server() {
  "$binary" >> "$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null; then
      kill -0 "$server" 2>/dev/null && return
      break
    fi
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
  done
  echo "the server did not start on port $port; its log:" >&2
  tail -20 "$work/server.log" >&2
  exit 1
}

# "429s Redis-errors": what the running server counted since it started.
server_counters() {
  local text
  text=$(curl -sf "http://$METRICS_ADDR/metrics") \
    || { echo "cannot read the server's metrics at $METRICS_ADDR" >&2; return 1; }
  awk '
    /^task_api_rate_limited_requests_total/ { limited += $NF }
    /^task_api_redis_errors_total/ { redis += $NF }
    END { printf "%d %d\n", limited, redis }' <<<"$text"
}

tokens=${BENCH_TOKENS:-hs256}
case $tokens in
  hs256) tokens_note="HS256 tokens" ;;
  eddsa|rs256)
    alg=$([ "$tokens" = eddsa ] && echo EdDSA || echo RS256)
    cargo build --release --locked -q --example bench_tokens
    target/release/examples/bench_tokens jwks "$alg" "$work/key.der" > "$work/jwks.json"
    jwks_port=${BENCH_JWKS_PORT:-$((port + 2000))}
    python3 -m http.server --bind 127.0.0.1 --directory "$work" "$jwks_port" >/dev/null 2>&1 &
    jwks_server=$!
    for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$jwks_port/jwks.json" >/dev/null && break; sleep 0.1; done
    export JWKS_URL=http://127.0.0.1:$jwks_port/jwks.json
    tokens_note="$alg tokens (JWKS)"
    ;;
  *) echo "BENCH_TOKENS: expected hs256, eddsa or rs256, got \"$tokens\"" >&2; exit 1 ;;
esac
trap 'stop_server; kill "${jwks_server:-}" 2>/dev/null || true; redis_clean; rm -rf "$work"' EXIT

export JWT_SECRET=bench-secret-bench-secret-bench-secret
if [ -n "${BENCH_WORKERS:-}" ]; then
  export TOKIO_WORKER_THREADS=$BENCH_WORKERS
  workers_note="$BENCH_WORKERS worker thread(s)"
else
  unset TOKIO_WORKER_THREADS
  workers_note="$(nproc) worker threads (one per core)"
fi
export DATABASE_URL=${BENCH_DATABASE_URL:-sqlite://$work/bench.db}
export PORT=$port HOST=127.0.0.1 RUST_LOG=${RUST_LOG:-warn}
# The metrics listener, read by server_counters (the counters are kept either way).
export METRICS_ADDR=127.0.0.1:${BENCH_METRICS_PORT:-$((port + 1000))}
limits=${BENCH_LIMITS:-memory}
limits_env "$limits"
if [[ $DATABASE_URL == postgres* ]]; then
  # A clean table each run, so every run measures the same data.
  psql "$DATABASE_URL" -q -c 'DROP TABLE IF EXISTS tasks, user_changes, idempotency_keys, task_tombstones, service_secrets, event_tickets, _sqlx_migrations; DROP FUNCTION IF EXISTS tasks_count_change, task_tombstones_note_purge' 2>/dev/null || true
fi
start_server

echo "seeding 100 users x 20 tasks…" >&2
python3 bench/seed.py "http://127.0.0.1:$port" "$binary" > "$work/users.txt"
export BENCH_USERS=$work/users.txt
if [ "$tokens" != hs256 ]; then
  target/release/examples/bench_tokens sign "$alg" "$work/key.der" < "$work/users.txt" > "$work/users-$tokens.txt"
  export BENCH_USERS=$work/users-$tokens.txt
fi
backend=$(curl -s "http://127.0.0.1:$port/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["database"])')
