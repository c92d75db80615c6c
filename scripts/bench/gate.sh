#!/usr/bin/env bash
# Reads and searches with real tokens, so that every request passes the
# token check and the caller-scoped store with the caller's conditions in
# its SQL: a patient/ token (EHR launch) and system/ tokens (backend
# services), each shape for DURATION (default 10s) with wrk, 2 threads,
# 16 connections, against the Synthea HIV set in a fresh SQLite database.
#   scripts/bench/gate.sh [DATA_DIR]
# EHRX_BIN runs another build of ehrx (e.g. an older commit's) instead of
# this tree's release build. Needs wrk, curl, python3 with
# tests/interop/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${1:-../shared/data}"
duration="${DURATION:-10s}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ehrx-target}"
if [ -z "${EHRX_BIN:-}" ]; then
  cargo build --release --quiet
fi
bin="${EHRX_BIN:-$CARGO_TARGET_DIR/release/ehrx}"
work=$(mktemp -d)
port="${BENCH_PORT:-18082}"
base="http://127.0.0.1:$port"
export EHRX_DATABASE_URL="sqlite:$work/bench.db" EHRX_LOG=warn EHRX_BASE_URL="$base"
"$bin" import --quiet "$data/synthea/hiv-transaction-bundles" >/dev/null
EHRX_LISTEN="127.0.0.1:$port" "$bin" serve &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "$base/metadata" >/dev/null && break; sleep 0.1; done

sys=$(python3 scripts/bench/smart_token.py system "$base" "$bin" "system/*.rs")
lab_scope='system/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory'
lab=$(python3 scripts/bench/smart_token.py system "$base" "$bin" "$lab_scope")
# The same patient, Observation and code on every run (ids are new on every
# import): the patient with the smallest Synthea identifier, their most
# frequent Observation code (ties: the smallest), its earliest Observation.
read -r patient obs code < <(python3 - "$base" "$sys" <<'PY'
import collections, json, sys, urllib.request
base, token = sys.argv[1], sys.argv[2]
def get(path):
    req = urllib.request.Request(base + path, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req) as r:
        return json.load(r)
pats = [e["resource"] for e in get("/Patient?_count=1000&_elements=identifier")["entry"]]
def key(p):
    return min(i["value"] for i in p["identifier"] if i.get("system") == "https://github.com/synthetichealth/synthea")
p = min(pats, key=key)["id"]
obs = [e["resource"] for e in get(f"/Observation?patient={p}&_sort=date,_id&_count=1000")["entry"]]
codes = collections.Counter(o["code"]["coding"][0]["system"] + "|" + o["code"]["coding"][0]["code"] for o in obs)
code = min(codes, key=lambda c: (-codes[c], c))
o = next(o for o in obs if o["code"]["coding"][0]["system"] + "|" + o["code"]["coding"][0]["code"] == code)
print(p, o["id"], code)
PY
)
pat=$(python3 scripts/bench/smart_token.py patient "$base" "$bin" "$patient" "patient/*.rs")
echo "== $($bin --version 2>/dev/null || echo ehrx); machine: $(nproc) cores, shared by server and wrk"
echo "== patient $patient, observation $obs, code $code"

run() {
  local what=$1 token=$2 path=$3
  local status
  status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "$base/$path")
  echo "== $what: GET /$path (status $status)"
  wrk -t2 -c16 -d"$duration" --latency -H "Authorization: Bearer $token" "$base/$path" \
    | grep -E "Requests/sec|50%|90%|99%|Non-2xx|errors"
}
q=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$code")
run "patient token, read own Patient" "$pat" "Patient/$patient"
run "patient token, read own Observation" "$pat" "Observation/$obs"
run "patient token, search own Observations by code" "$pat" "Observation?patient=$patient&code=$q"
run "patient token, \$everything" "$pat" "Patient/$patient/\$everything"
run "system/*.rs token, read Patient" "$sys" "Patient/$patient"
run "system/*.rs token, search Observations by code" "$sys" "Observation?patient=$patient&code=$q"
run "granular system token (laboratory), search Observations" "$lab" "Observation?patient=$patient"
