#!/usr/bin/env bash
# Intake benchmark: concurrent Passthru GETs with unique CallSids (each an incident with 2 contacts x 3
# channels = 6 deliveries) against the release server, at 2 and 8 connections, with the dispatcher off and
# on (dry-run: it drains the same database meanwhile), on SQLite and PostgreSQL. In the same run, the
# baselines do the same inserts without HTTP: a naive PostgreSQL client (pgbench, one transaction per
# incident, same connections) and a bare single-connection SQLite loop (synchronous=FULL, WAL).
# Prints one markdown table row per figure: req/s (or txn/s), p50, p99, peak RSS.
#
# Needs wrk and pgbench (Debian: apt-get install wrk postgresql-contrib), python3, and PostgreSQL at
# TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres).
# BENCH_SECONDS (10) sets each run's length.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${BENCH_SECONDS:-10}"
PG_ADMIN="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
PG_BASE="${PG_ADMIN%/*}"
TOKEN="bench-token-0123456789abcdef"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; drop_pg_dbs; rm -rf "$WORK"' EXIT

for tool in wrk pgbench python3; do
    command -v "$tool" >/dev/null || { echo "bench-intake needs $tool" >&2; exit 1; }
done
cargo build --release --quiet --bin exotel-sos
BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/exotel-sos"

cat >"$WORK/stakeholders.toml" <<'EOF'
[[contact]]
name = "Bench one"
phone = "+91 98000 00001"
teams = ["desk"]

[[contact]]
name = "Bench two"
phone = "+91 98000 00002"
teams = ["desk"]

[routes]
default = ["desk"]
EOF

# Unique CallSids across wrk's threads: each thread numbers its own requests.
cat >"$WORK/passthru.lua" <<EOF
local counter = 0
local threads = 0
function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end
function init(args)
    n = 0
end
function request()
    n = n + 1
    return wrk.format("GET", "/exotel/passthru?token=$TOKEN&CallSid=b" .. tid .. "x" .. n .. "y" .. math.random(1, 1e9) .. "&EmergencyType=Heart&CallFrom=09901320691")
end
EOF

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

new_pg_db() {
    local name="sos_bench_$RANDOM$RANDOM"
    psql -q "$PG_ADMIN" -c "CREATE DATABASE $name" >/dev/null
    echo "$name" >>"$WORK/pg-databases"
    echo "$PG_BASE/$name"
}

drop_pg_dbs() {
    [ -f "$WORK/pg-databases" ] || return 0
    while read -r name; do
        psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $name" >/dev/null 2>&1 || true
    done <"$WORK/pg-databases"
}

# wrk's --latency output: requests/s, p50 and p99.
parse_wrk() {
    awk '/Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} END {printf "%s req/s | %s | %s", rps, p50, p99}'
}

# run_server ENGINE URL DISPATCH CONNECTIONS
run_server() {
    local engine="$1" url="$2" dispatch="$3" conns="$4" p pid
    p="$(port)"
    SOS_DATABASE__URL="$url" SOS_STAKEHOLDERS__FILE="$WORK/stakeholders.toml" \
        SOS_SERVER__LISTEN="127.0.0.1:$p" SOS_SERVER__PUBLIC_URL="http://127.0.0.1:$p" \
        SOS_SERVER__WEBHOOK_TOKEN="$TOKEN" SOS_SERVER__ADMIN_TOKEN="$TOKEN" \
        SOS_DISPATCH__ENABLED="$dispatch" SOS_LOG__LEVEL=warn \
        "$BIN" serve >"$WORK/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        curl -fsS "http://127.0.0.1:$p/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    local out
    out="$(wrk -t2 -c"$conns" -d"${SECONDS_EACH}s" --latency -s "$WORK/passthru.lua" "http://127.0.0.1:$p" | parse_wrk)"
    local rss
    rss="$(awk '/VmHWM/ {printf "%.1f MB", $2/1024}' "/proc/$pid/status")"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    local disp="off"
    [ "$dispatch" = "true" ] && disp="on"
    echo "| $engine, dispatcher $disp | $conns | $out | $rss |"
}

sqlite_url() { echo "sqlite://$WORK/bench-$RANDOM$RANDOM.db?mode=rwc"; }

# Baselines: the same rows, written by the schema the server migrates.
naive_pg() {
    local conns="$1" url out
    url="$(new_pg_db)"
    SOS_DATABASE__URL="$url" SOS_STAKEHOLDERS__FILE="$WORK/stakeholders.toml" "$BIN" migrate >/dev/null 2>&1
    cat >"$WORK/naive.sql" <<'EOF'
\set n random(1, 2000000000)
\set m random(1, 2000000000)
BEGIN;
INSERT INTO incidents (id, source, call_sid, emergency_type, route, caller, raw_params, status, received_at)
  VALUES ('i' || :n || '-' || :m, 'exotel', 'c' || :n || '-' || :m, 'Heart', 'default', '+919901320691', '[]', 'open', 1);
INSERT INTO deliveries (id, incident_id, contact_name, phone, channel, provider, priority, greeting_ref, link_ref, status, due_at, created_at, updated_at)
  SELECT gen_random_uuid()::text, 'i' || :n || '-' || :m, 'c', '+91980000000' || c, ch, 'exotel:' || ch, 0, gen_random_uuid()::text, gen_random_uuid()::text, 'queued', 1, 1, 1
  FROM generate_series(1, 2) c, unnest(ARRAY['call', 'sms', 'whatsapp']) ch;
COMMIT;
EOF
    out="$(pgbench -n -c "$conns" -j 2 -T "$SECONDS_EACH" -r -f "$WORK/naive.sql" "$url" 2>/dev/null |
        awk '/^tps/ {tps=$3} /latency average/ {avg=$4} END {printf "%.0f txn/s | avg %s ms | -", tps, avg}')"
    echo "| naive PostgreSQL client (pgbench) | $conns | $out | - |"
}

bare_sqlite() {
    local url_file="$WORK/bare-$RANDOM$RANDOM.db"
    SOS_DATABASE__URL="sqlite://$url_file?mode=rwc" SOS_STAKEHOLDERS__FILE="$WORK/stakeholders.toml" "$BIN" migrate >/dev/null 2>&1
    python3 - "$url_file" "$SECONDS_EACH" <<'EOF'
import sqlite3, sys, time, uuid
path, seconds = sys.argv[1], float(sys.argv[2])
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("PRAGMA foreign_keys=ON")
lat = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    t = time.monotonic()
    iid = str(uuid.uuid4())
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO incidents (id, source, call_sid, emergency_type, route, caller, raw_params, status, received_at) VALUES (?, 'exotel', ?, 'Heart', 'default', '+919901320691', '[]', 'open', 1)", (iid, "b" + iid))
    rows = [(str(uuid.uuid4()), iid, "c", "+91980000000%d" % c, ch, "exotel:" + ch, str(uuid.uuid4()), str(uuid.uuid4())) for c in (1, 2) for ch in ("call", "sms", "whatsapp")]
    db.executemany("INSERT INTO deliveries (id, incident_id, contact_name, phone, channel, provider, priority, greeting_ref, link_ref, status, due_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, 'queued', 1, 1, 1)", rows)
    db.execute("COMMIT")
    lat.append(time.monotonic() - t)
lat.sort()
n = len(lat)
print("| bare SQLite loop (one connection, synchronous=FULL) | 1 | %.0f txn/s | %.2fms | %.2fms | - |" % (n / seconds, lat[n // 2] * 1000, lat[int(n * 0.99)] * 1000))
EOF
}

# Each group runs its baseline right beside the server runs it is compared with: these machines are
# noisy, and a baseline measured minutes apart would compare different machines.
echo "| run | connections | throughput | p50 | p99 | peak RSS |"
echo "|---|---|---|---|---|---|"
for conns in 2 8; do
    bare_sqlite
    for dispatch in false true; do
        run_server "SQLite" "$(sqlite_url)" "$dispatch" "$conns"
    done
    naive_pg "$conns"
    for dispatch in false true; do
        run_server "PostgreSQL" "$(new_pg_db)" "$dispatch" "$conns"
    done
done
