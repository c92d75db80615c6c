#!/usr/bin/env bash
# What consent enforcement costs: search and $everything for a practitioner
# whose patient has a Consent of five provisions that names them, against
# an unrestricted system/*.rs token, on the Synthea HIV set loaded COPIES
# times (default 9: about 108,000 resources, scripts/bench/replicate.py)
# into a fresh SQLite database. Each shape runs DURATION (default 10s) with wrk (2
# threads, 16 connections); rounds alternate the two tokens (ROUNDS,
# default 3) and the p50 latencies are printed per round.
#   scripts/bench/consent.sh [DATA_DIR]
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
EHRX_AUTH_DISABLED=true EHRX_LISTEN="127.0.0.1:$port" "$bin" serve &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "$base/metadata" >/dev/null && break; sleep 0.1; done
python3 scripts/bench/replicate.py "$base" "$data/synthea/hiv-transaction-bundles" "$copies" 2
kill $pid; wait $pid 2>/dev/null || true
EHRX_LISTEN="127.0.0.1:$port" "$bin" serve &
pid=$!
for _ in $(seq 100); do curl -sf "$base/metadata" >/dev/null && break; sleep 0.1; done

sys=$(python3 scripts/bench/smart_token.py system "$base" "$bin" "system/*.cruds")
# The patient with the smallest Synthea identifier and their most frequent
# Observation code; Practitioner/bench is not their general practitioner:
# only the Consent lets them in.
read -r patient code total < <(python3 - "$base" "$sys" <<'PY'
import collections, json, sys, urllib.request
base, token = sys.argv[1], sys.argv[2]
def call(path, body=None, method="GET"):
    req = urllib.request.Request(base + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/fhir+json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)
pats = [e["resource"] for e in call("/Patient?_count=1000&_elements=identifier")["entry"]]
def key(p):
    return min(i["value"] for i in p["identifier"] if i.get("system") == "https://github.com/synthetichealth/synthea")
p = min(pats, key=key)["id"]
obs = [e["resource"] for e in call(f"/Observation?patient={p}&_count=1000")["entry"]]
codes = collections.Counter(o["code"]["coding"][0]["system"] + "|" + o["code"]["coding"][0]["code"] for o in obs)
code = min(codes, key=lambda c: (-codes[c], c))
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
print(p, code, len(obs))
PY
)
doc=$(python3 scripts/bench/smart_token.py user "$base" "$bin" "Practitioner/bench" "openid fhirUser user/*.rs")
q=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$code")
echo "== $($bin --version 2>/dev/null || echo ehrx); machine: $(nproc) cores, shared by server and wrk"
echo "== patient $patient ($total Observations), code $code"

p50() {
  local token=$1 path=$2
  wrk -t2 -c16 -d"$duration" --latency -H "Authorization: Bearer $token" "$base/$path" \
    | awk '/ 50%/{print $2} /Requests\/sec/{print $2}' | paste -sd' '
}
for path in "Observation?patient=$patient&code=$q" "Patient/$patient/\$everything"; do
  for who in doc sys; do
    tok=${!who}
    n=$(curl -s -H "Authorization: Bearer $tok" "$base/$path" | python3 -c 'import json,sys; b=json.load(sys.stdin); print(b.get("total", len(b.get("entry", []))))')
    echo "== $path as $who: $n entries"
  done
  for r in $(seq "$rounds"); do
    echo "round $r  consent(p50 req/s): $(p50 "$doc" "$path")  unrestricted(p50 req/s): $(p50 "$sys" "$path")"
  done
done
