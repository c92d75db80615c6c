#!/usr/bin/env bash
# Exchange load benchmark against a release `ehrx serve` with an embedded
# SQLite database: distinct C-CDA documents, each with one section encrypted
# for ehrx and signed by xmlsec1, POSTed to /exchange/documents with wrk —
# first over one connection, then over four, then the first set again
# (resubmissions, answered 200 without storing anything).
#   scripts/bench/exchange.sh [DATA_DIR]          (default ../shared/data)
# Needs wrk, xmlsec1, openssl, curl and python3. EXCHANGE_BENCH_SECONDS sets
# the length of each run (default 10).
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${1:-../shared/data}"
secs="${EXCHANGE_BENCH_SECONDS:-10}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ehrx-target}"
# EHRX_BIN: a binary to measure instead of building this checkout's.
if [ -z "${EHRX_BIN:-}" ]; then cargo build --release --quiet --bin ehrx; fi
bin="${EHRX_BIN:-$CARGO_TARGET_DIR/release/ehrx}"
work=$(mktemp -d)
port="${BENCH_PORT:-18081}"
base="http://127.0.0.1:$port"
export EHRX_DATABASE_URL="sqlite:$work/bench.db" EHRX_LISTEN="127.0.0.1:$port" EHRX_LOG=warn
"$bin" exchange-cert >"$work/ehrx.pem"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout "$work/sender.key" \
  -out "$work/sender.pem" -subj "/CN=Bench Hospital/O=Bench" 2>/dev/null
"$bin" subscriber add --name "Bench Hospital" --kind hospital --cert "$work/sender.pem" >/dev/null
"$bin" serve &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "$base/metadata" >/dev/null && break; sleep 0.1; done

ccd="$data/ccda/hl7-c-cda-examples/Documents_CCD_CCD_2_CCD.xml"
# Enough documents that no run uses its set up: about 50 documents/s on one
# connection and twice that on four have been measured on 2 cores.
one=$((secs * 100)); four=$((secs * 250))
echo "== making $((one + four)) signed documents with xmlsec1"
start=$(date +%s)
python3 scripts/bench/exchange_docs.py "$ccd" "$work/ehrx.pem" "$work/sender.key" \
  "$work/sender.pem" "$work/one" "$one"
python3 scripts/bench/exchange_docs.py "$ccd" "$work/ehrx.pem" "$work/sender.key" \
  "$work/sender.pem" "$work/four" "$four"
echo "   $(($(date +%s) - start)) s"
ls "$work"/one/*.xml >"$work/one.txt"
ls "$work"/four/*.xml >"$work/four.txt"

echo "== machine: $(nproc) cores; server, load generator and nothing else share them"
echo "== one connection, ${secs} s"
EXCHANGE_DOCS="$work/one.txt" EXCHANGE_THREADS=1 \
  wrk -t1 -c1 -d"${secs}s" -s scripts/bench/exchange.lua "$base"
echo "== four connections, ${secs} s"
EXCHANGE_DOCS="$work/four.txt" EXCHANGE_THREADS=2 \
  wrk -t2 -c4 -d"${secs}s" -s scripts/bench/exchange.lua "$base"
echo "== resubmissions of the first set (already stored), four connections, ${secs} s"
EXCHANGE_DOCS="$work/one.txt" EXCHANGE_THREADS=2 \
  wrk -t2 -c4 -d"${secs}s" -s scripts/bench/exchange.lua "$base"
