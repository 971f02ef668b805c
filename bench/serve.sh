# Sourced by scripts/bench and scripts/soak: builds the release binary, starts it on a
# fresh database on $port, and seeds 100 users x 20 tasks through the API.
# Sets: binary, server (pid), work (temp dir), BENCH_USERS (the users file).
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }
# BENCH_BINARY: another build to measure (e.g. an earlier release), instead of this tree's.
if [ -z "${BENCH_BINARY:-}" ]; then
  cargo build --release --locked -q
fi
binary=${BENCH_BINARY:-target/release/task-api}
work=$(mktemp -d)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

export JWT_SECRET=bench-secret-bench-secret-bench-secret
export DATABASE_URL=${BENCH_DATABASE_URL:-sqlite://$work/bench.db}
export PORT=$port HOST=127.0.0.1 RUST_LOG=${RUST_LOG:-warn}
if [[ $DATABASE_URL == postgres* ]]; then
  # A clean table each run, so every run measures the same data.
  psql "$DATABASE_URL" -q -c 'DROP TABLE IF EXISTS tasks, user_changes, idempotency_keys, task_tombstones, service_secrets, event_tickets, _sqlx_migrations; DROP FUNCTION IF EXISTS tasks_count_change, task_tombstones_note_purge' 2>/dev/null || true
fi
"$binary" > "$work/server.log" 2>&1 &
server=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done

echo "seeding 100 users x 20 tasks…" >&2
python3 bench/seed.py "http://127.0.0.1:$port" "$binary" > "$work/users.txt"
export BENCH_USERS=$work/users.txt
backend=$(curl -s "http://127.0.0.1:$port/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["database"])')
