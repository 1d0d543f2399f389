#!/usr/bin/env bash
# Runs the dispatch benchmarks on SQLite and PostgreSQL (release build) and prints one line per figure,
# then the intake benchmark (scripts/bench-intake.sh).
# Needs PostgreSQL at TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres).
# BENCH_INCIDENTS (1000), BENCH_DELIVERIES (10000), BENCH_CONCURRENCY (16 per channel) tune the run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench dispatch 2>/dev/null | grep -E '^(latency|drain) '
# The intake benchmark (bursts of Passthrus through wrk, beside naive baselines); BENCH_INTAKE=0 skips it.
if [ "${BENCH_INTAKE:-1}" != "0" ]; then
    if command -v wrk >/dev/null && command -v pgbench >/dev/null; then
        "$(dirname "$0")/bench-intake.sh"
    else
        echo "intake benchmark skipped: it needs wrk and pgbench (apt-get install wrk postgresql-contrib)" >&2
    fi
fi
