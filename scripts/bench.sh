#!/usr/bin/env bash
# Runs the dispatch benchmarks on SQLite and PostgreSQL (release build) and prints one line per figure.
# Needs PostgreSQL at TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres).
# BENCH_INCIDENTS (1000), BENCH_DELIVERIES (10000), BENCH_CONCURRENCY (16 per channel) tune the run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench dispatch 2>/dev/null | grep -E '^(latency|drain) '
