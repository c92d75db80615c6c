#!/usr/bin/env bash
# What consent enforcement costs: search and $everything for a practitioner
# whose patient has a Consent of five provisions that names them, against
# an unrestricted system/*.rs token, on the Synthea HIV set loaded COPIES
# times (default 9: about 108,000 resources, scripts/bench/replicate.py)
# into a fresh SQLite database. Each shape runs DURATION (default 10s) with wrk (2
# threads, 16 connections); rounds alternate the two tokens (ROUNDS,
# default 3) and the p50 latencies are printed per round. Shapes: the
# patient's Observations of their most frequent code, of their rarest
# code (a small answer: the fixed cost per request), and $everything.
#   scripts/bench/consent.sh [DATA_DIR]
# BENCH_SEED=FILE keeps (or reuses) the loaded database, below.
# EHRX_BIN runs another build of ehrx instead of this tree's release
# build. Needs wrk, curl, python3 with tests/interop/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${1:-../shared/data}"
duration="${DURATION:-10s}"
rounds="${ROUNDS:-3}"
copies="${COPIES:-9}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ehrx-target}"
if [ -z "${EHRX_BIN:-}" ]; then
  cargo build --release --quiet
fi
bin="${EHRX_BIN:-$CARGO_TARGET_DIR/release/ehrx}"
work=$(mktemp -d)
port="${BENCH_PORT:-18083}"
base="http://127.0.0.1:$port"
export EHRX_DATABASE_URL="sqlite:$work/bench.db" EHRX_LOG=warn EHRX_BASE_URL="$base"
# Loading: authorization off, then the server is started again with it on.
# BENCH_SEED=FILE keeps the loaded database in FILE (with its -wal) and, when
# FILE exists, starts from a copy of it instead of loading: two builds then
# run on the same data and the same patient (load it with the older build,
# whose migrations the newer one can apply).
seed="${BENCH_SEED:-}"
pid=""
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
if [ -n "$seed" ] && [ -f "$seed" ]; then
  for f in "$seed" "$seed-wal"; do [ -f "$f" ] && cp "$f" "$work/bench.db${f#"$seed"}"; done
else
  EHRX_AUTH_DISABLED=true EHRX_LISTEN="127.0.0.1:$port" "$bin" serve &
  pid=$!
  for _ in $(seq 100); do curl -sf "$base/metadata" >/dev/null && break; sleep 0.1; done
  python3 scripts/bench/replicate.py "$base" "$data/synthea/hiv-transaction-bundles" "$copies" 2
  kill $pid; wait $pid 2>/dev/null || true
  if [ -n "$seed" ]; then
    for f in "$work"/bench.db "$work"/bench.db-wal; do [ -f "$f" ] && cp "$f" "$seed${f#"$work/bench.db"}"; done
  fi
fi
EHRX_LISTEN="127.0.0.1:$port" "$bin" serve &
pid=$!
for _ in $(seq 100); do curl -sf "$base/metadata" >/dev/null && break; sleep 0.1; done

sys=$(python3 scripts/bench/smart_token.py system "$base" "$bin" "system/*.cruds")
# A patient and their most frequent Observation code; Practitioner/bench is
# not their general practitioner: only the Consent lets them in.
read -r patient code rare total < <(python3 - "$base" "$sys" <<'PY'
import collections, json, sys, urllib.request
base, token = sys.argv[1], sys.argv[2]
def call(path, body=None, method="GET"):
    req = urllib.request.Request(base + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/fhir+json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)
# The patient of the first Observation in id order (ids are new on every
# load, so which patient it is varies from run to run).
first = call("/Observation?_count=1&_sort=_id")["entry"][0]["resource"]
p = first["subject"]["reference"].split("/")[-1]
obs = [e["resource"] for e in call(f"/Observation?patient={p}&_count=1000")["entry"]]
codes = collections.Counter(o["code"]["coding"][0]["system"] + "|" + o["code"]["coding"][0]["code"] for o in obs)
code = min(codes, key=lambda c: (-codes[c], c))
rare = min(codes, key=lambda c: (codes[c], c))
call("/Practitioner/bench", {"resourceType": "Practitioner", "id": "bench"}, "PUT")
labels = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
actor = lambda r: [{"role": {"text": "x"}, "reference": {"reference": r}}]
consent = {
    "resourceType": "Consent", "id": "bench", "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
    "patient": {"reference": f"Patient/{p}"},
    "provision": {"type": "permit", "provision": [
        {"type": "permit", "actor": actor("Practitioner/bench"),
         "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}]}]},
        {"type": "deny", "actor": actor("Practitioner/bench"), "securityLabel": [{"system": labels, "code": "PSY"}]},
        {"type": "deny", "actor": actor("Practitioner/bench"), "securityLabel": [{"system": labels, "code": "ETH"}]},
        {"type": "deny", "actor": actor("Organization/acme"), "securityLabel": [{"system": labels, "code": "HIV"}]},
    ]},
}
call("/Consent/bench", consent, "PUT")
print(p, code, rare, len(obs))
PY
)
doc=$(python3 scripts/bench/smart_token.py user "$base" "$bin" "Practitioner/bench" "openid fhirUser user/*.rs")
quote() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1"; }
q=$(quote "$code")
r=$(quote "$rare")
echo "== $($bin --version 2>/dev/null || echo ehrx); machine: $(nproc) cores, shared by server and wrk"
echo "== patient $patient ($total Observations), most frequent code $code, rarest $rare"

p50() {
  local token=$1 path=$2
  wrk -t2 -c16 -d"$duration" --latency -H "Authorization: Bearer $token" "$base/$path" \
    | awk '/ 50%/{print $2} /Requests\/sec/{print $2}' | paste -sd' '
}
for path in "Observation?patient=$patient&code=$q" "Observation?patient=$patient&code=$r" "Patient/$patient/\$everything"; do
  for who in doc sys; do
    tok=${!who}
    n=$(curl -s -H "Authorization: Bearer $tok" "$base/$path" | python3 -c 'import json,sys; b=json.load(sys.stdin); print(b.get("total", len(b.get("entry", []))))')
    echo "== $path as $who: $n entries"
  done
  for r in $(seq "$rounds"); do
    echo "round $r  consent(p50 req/s): $(p50 "$doc" "$path")  unrestricted(p50 req/s): $(p50 "$sys" "$path")"
  done
done
