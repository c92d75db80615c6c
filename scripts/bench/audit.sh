#!/usr/bin/env bash
# What the audit log costs: read and search throughput with the audit on and
# off, the same requests (wrk, 2 threads, 16 connections, DURATION each,
# default 10s) with real tokens against two servers on copies of one
# database (the Synthea HIV set, SQLite), one started with EHRX_AUDIT=false;
# then the group-commit batches the audited server wrote (from /metrics).
# ROUNDS (default 1) repeats the pair, off then on, and gives each round's
# share and their median: the unaudited runs alone spread by a fifth on a
# small shared machine, so one round is not a verdict.
# SLICES=N runs each round's two servers side by side instead, and measures
# every shape in N pairs of short runs (DURATION each), off then on, so that
# both see the same state of the machine; a shape's throughput is the mean
# of its N runs.
#   scripts/bench/audit.sh [DATA_DIR]
# PROFILE selects the cargo profile built (default release; `profiling`
# for line tables); EHRX_BIN runs another build instead. Needs wrk, curl,
# python3 with tests/interop/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${1:-../shared/data}"
duration="${DURATION:-10s}"
rounds="${ROUNDS:-1}"
profile="${PROFILE:-release}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ehrx-target}"
if [ -z "${EHRX_BIN:-}" ]; then
  cargo build --profile "$profile" --quiet
fi
bin="${EHRX_BIN:-$CARGO_TARGET_DIR/$profile/ehrx}"
work=$(mktemp -d)
port="${BENCH_PORT:-18083}"
base="http://127.0.0.1:$port"
export EHRX_LOG=warn EHRX_BASE_URL="$base"
EHRX_DATABASE_URL="sqlite:$work/seed.db" "$bin" import --quiet "$data/synthea/hiv-transaction-bundles" >/dev/null
slices="${SLICES:-}"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$work"' EXIT

declare -A rps
shapes=()

# serve NAME AUDIT PORT: a server on a fresh copy of the imported database.
serve() {
  for f in "$work"/seed.db*; do cp "$f" "${f/seed/$1}"; done
  EHRX_DATABASE_URL="sqlite:$work/$1.db" EHRX_BASE_URL="http://127.0.0.1:$3" \
    EHRX_AUDIT="$2" EHRX_LISTEN="127.0.0.1:$3" "$bin" serve &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$3/metadata" >/dev/null && break; sleep 0.1; done
}

stop() {
  for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
  pids=()
}

# wrk_rps TOKEN URL: requests per second of one run (its latency lines go
# to stderr).
wrk_rps() {
  local out
  out=$(wrk -t2 -c16 -d"$duration" --latency -H "Authorization: Bearer $1" "$2")
  echo "$out" | grep -E "Requests/sec|50%|99%|Non-2xx|errors" >&2 || true
  echo "$out" | awk '/Requests\/sec/ {print $2}'
}

# shapes_of BASE: the shapes against the server at BASE, with its tokens.
shapes_of() {
  local base=$1 sys pat patient obs code q
  export EHRX_DATABASE_URL="sqlite:$work/$2.db" EHRX_BASE_URL="$1"
  sys=$(python3 scripts/bench/smart_token.py system "$base" "$bin" "system/*.rs")
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
  q=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$code")
  shapes=(
    "system token, read Patient|$sys|Patient/$patient"
    "system token, read Observation|$sys|Observation/$obs"
    "system token, search Observations by patient and code|$sys|Observation?patient=$patient&code=$q"
    "patient token, read own Observation|$pat|Observation/$obs"
    "patient token, search own Observations by code|$pat|Observation?patient=$patient&code=$q"
  )
}

# measure NAME BASE: every shape against the server at BASE.
measure() {
  shapes_of "$2" "$1"
  for s in "${shapes[@]}"; do
    IFS='|' read -r what token path <<<"$s"
    echo "== audit $1: $what: GET /$path"
    rps["$1|$what"]=$(wrk_rps "$token" "$2/$path")
  done
}

# measure_paired OFF ON: every shape against both servers (ports $port and
# $port + 1), in SLICES pairs of runs.
measure_paired() {
  local off on
  shapes_of "http://127.0.0.1:$port" "$1"
  off=("${shapes[@]}")
  shapes_of "http://127.0.0.1:$((port + 1))" "$2"
  on=("${shapes[@]}")
  for k in "${!shapes[@]}"; do
    IFS='|' read -r what t0 path <<<"${off[$k]}"
    IFS='|' read -r _ t1 _ <<<"${on[$k]}"
    echo "== $what: GET /$path, $slices pairs of $duration runs (off, on):"
    local a=() b=()
    for _ in $(seq "$slices"); do
      a+=("$(wrk_rps "$t0" "http://127.0.0.1:$port/$path" 2>/dev/null)")
      b+=("$(wrk_rps "$t1" "http://127.0.0.1:$((port + 1))/$path" 2>/dev/null)")
    done
    echo "   off: ${a[*]}"
    echo "   on:  ${b[*]}"
    rps["$1|$what"]=$(python3 -c 'import sys; v = [float(x) for x in sys.argv[1:]]; print(sum(v) / len(v))' "${a[@]}")
    rps["$2|$what"]=$(python3 -c 'import sys; v = [float(x) for x in sys.argv[1:]]; print(sum(v) / len(v))' "${b[@]}")
  done
}

echo "== $($bin --version 2>/dev/null || echo ehrx); machine: $(nproc) cores, shared by server and wrk; $duration per run, $rounds round(s)"
for r in $(seq "$rounds"); do
  echo "== round $r"
  if [ -n "$slices" ]; then
    serve "off$r" false "$port"
    serve "on$r" true "$((port + 1))"
    measure_paired "off$r" "on$r"
    audited="http://127.0.0.1:$((port + 1))"
  else
    serve "off$r" false "$port"
    measure "off$r" "$base"
    stop
    serve "on$r" true "$port"
    measure "on$r" "$base"
    audited=$base
  fi
  echo "== group commit (audited server, whole run):"
  curl -s "$audited/metrics" | grep -E '^ehrx_audit_(events_total|batches_total|batch_events|batch_requests|wait_seconds_(sum|count)|commit_seconds_(sum|count)|failures_total)' || true
  curl -s "$audited/metrics" | python3 -c '
import sys
m = {}
for line in sys.stdin:
    if line.startswith("#") or not line.strip():
        continue
    k, v = line.rsplit(" ", 1)
    m[k] = float(v)
events = m.get("ehrx_audit_events_total", 0)
batches = sum(v for k, v in m.items() if k.startswith("ehrx_audit_batches_total"))
wait_n = m.get("ehrx_audit_wait_seconds_count", 0)
wait_s = m.get("ehrx_audit_wait_seconds_sum", 0)
print(f"== {events:.0f} entries in {batches:.0f} batches: {events / max(batches, 1):.1f} entries per batch; "
      f"mean wait for the batch {1000 * wait_s / max(wait_n, 1):.2f} ms")
'
  stop
done
echo "== throughput with the audit on, as a share of audit off (target >= 70 %), each round and the median:"
for s in "${shapes[@]}"; do
  IFS='|' read -r what _ _ <<<"$s"
  pairs=()
  for r in $(seq "$rounds"); do
    pairs+=("${rps["off$r|$what"]}" "${rps["on$r|$what"]}")
  done
  python3 -c '
import statistics, sys
what, v = sys.argv[1], [float(x) for x in sys.argv[2:]]
rounds = [(v[i], v[i + 1]) for i in range(0, len(v), 2)]
shares = [100 * on / off for off, on in rounds]
each = ", ".join(f"off {off:.0f}/s, on {on:.0f}/s = {100 * on / off:.0f} %" for off, on in rounds)
print(f"{what}: {each}" + (f"; median {statistics.median(shares):.0f} %" if len(rounds) > 1 else ""))
' "$what" "${pairs[@]}"
done
