#!/usr/bin/env bash
# Load benchmarks of the ehrx HTTP API: Synthea transaction ingest, then
# GET /Patient/{id} and POST /Patient at concurrency 16 with wrk.
#   scripts/bench/run.sh [DATA_DIR]          (default ../shared/data)
# Needs wrk (Debian package `wrk`), curl and python3. Uses SQLite in a
# temporary directory unless EHRX_DATABASE_URL is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${1:-../shared/data}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ehrx-target}"
# EHRX_BIN runs another build of ehrx (e.g. an older commit's) instead.
if [ -z "${EHRX_BIN:-}" ]; then
  cargo build --release --quiet
fi
bin="${EHRX_BIN:-$CARGO_TARGET_DIR/release/ehrx}"
work=$(mktemp -d)
port="${BENCH_PORT:-18080}"
base="http://127.0.0.1:$port"
EHRX_DATABASE_URL="${EHRX_DATABASE_URL:-sqlite:$work/bench.db}" EHRX_LISTEN="127.0.0.1:$port" \
  EHRX_AUTH_DISABLED=true EHRX_LOG=warn "$bin" serve &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "$base/metadata" >/dev/null && break; sleep 0.1; done

echo "== machine: $(nproc) cores; server and load generator share them"
echo "== transaction ingest of the Synthea set (POST /, one Bundle at a time)"
python3 scripts/bench/ingest.py "$base" "$data/synthea/hiv-transaction-bundles"

id=$(curl -s "$base/Patient?_count=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["entry"][0]["resource"]["id"])')
echo "== read: GET /Patient/{id}, 16 connections, 20 s"
wrk -t2 -c16 -d20s --latency "$base/Patient/$id"
echo "== create: POST /Patient (Prefer: return=minimal), 16 connections, 20 s"
wrk -t2 -c16 -d20s --latency -s scripts/bench/create.lua "$base/Patient"
