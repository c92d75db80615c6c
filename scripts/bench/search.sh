#!/usr/bin/env bash
# Search benchmark over ~108,000 resources (the Synthea HIV set loaded 9 times
# with fresh ids and names), at concurrency 16 with wrk.
#   scripts/bench/search.sh [DATA_DIR]            SQLite in a temporary directory
#   EHRX_DATABASE_URL=postgres://… scripts/bench/search.sh
# Needs wrk (Debian package `wrk`), curl and python3. COPIES (default 9) and
# DURATION (default 20s) can be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${1:-../shared/data}"
copies="${COPIES:-9}"
duration="${DURATION:-20s}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ehrx-target}"
# EHRX_BIN runs another build of ehrx (e.g. an older commit's) instead.
if [ -z "${EHRX_BIN:-}" ]; then
  cargo build --release --quiet
fi
bin="${EHRX_BIN:-$CARGO_TARGET_DIR/release/ehrx}"
work=$(mktemp -d)
port="${BENCH_PORT:-18081}"
base="http://127.0.0.1:$port"
export EHRX_DATABASE_URL="${EHRX_DATABASE_URL:-sqlite:$work/bench.db}"
# Authorization off: these numbers are for storage and search alone.
EHRX_AUTH_DISABLED=true EHRX_LISTEN="127.0.0.1:$port" EHRX_LOG=warn "$bin" serve &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "$base/metadata" >/dev/null && break; sleep 0.1; done

echo "== database: ${EHRX_DATABASE_URL%%\?*}; machine: $(nproc) cores, shared by server and wrk"
python3 scripts/bench/replicate.py "$base" "$data/synthea/hiv-transaction-bundles" "$copies" 2
case "$EHRX_DATABASE_URL" in
  postgres*) psql -q "$EHRX_DATABASE_URL" -c ANALYZE ;;  # fresh statistics after the bulk load
esac
total=0
for t in Patient Observation Encounter Condition Claim ExplanationOfBenefit Immunization DiagnosticReport DocumentReference Organization Location Practitioner PractitionerRole Procedure MedicationRequest Provenance Device; do
  n=$(curl -s "$base/$t?_summary=count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])')
  total=$((total + n))
done
echo "== resources in the database: $total"

# Search values taken from the data: patients, their family names, common codes.
python3 - "$base" "$work" <<'PY'
import json, sys, urllib.request, urllib.parse
base, work = sys.argv[1], sys.argv[2]
def get(path):
    with urllib.request.urlopen(base + path) as r:
        return json.load(r)
pats, url = [], "/Patient?_count=500&_elements=name"
page = get(url)
for e in page.get("entry", []):
    r = e["resource"]
    fam = next((n["family"] for n in r.get("name", []) if "family" in n), None)
    if fam:
        pats.append((r["id"], fam))
codes = ["http://loinc.org|1271AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "http://loinc.org|1088AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
         "http://loinc.org|1111AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "http://loinc.org|1250AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]
q = urllib.parse.quote
shapes = {
    "family": [f"/Patient?family={q(f)}" for _, f in pats],
    "obs-code": [f"/Observation?patient={p}&code={q(codes[i % len(codes)])}" for i, (p, _) in enumerate(pats)],
    "obs-date-sort": [f"/Observation?patient={p}&date=ge2015&_sort=-date&_count=50" for p, _ in pats],
    "enc-revinclude": [f"/Encounter?patient={p}&_revinclude=Observation:encounter" for p, _ in pats],
    "chain": [f"/Condition?subject:Patient.name={q(f)}" for _, f in pats],
    "everything": [f"/Patient/{p}/$everything" for p, _ in pats],
    "chain-100-or": [
        "/Condition?subject:Patient.name=" + ",".join(q(f) for _, f in (pats[i:] + pats[:i])[:100])
        for i in range(0, len(pats), 7)
    ],
}
for name, paths in shapes.items():
    open(f"{work}/{name}.txt", "w").write("\n".join(paths) + "\n")
open(f"{work}/explain.txt", "w").write("\n".join(p[1:] for p in (v[0] for v in shapes.values())) + "\n")
print(f"== {len(pats)} patients to rotate through")
PY

for shape in family obs-code obs-date-sort enc-revinclude chain everything chain-100-or; do
  echo "== $shape: e.g. $(head -c 160 "$work/$shape.txt" | head -n 1)"
  PATHS="$work/$shape.txt" wrk -t2 -c16 -d"$duration" --latency -s scripts/bench/rotate.lua "$base" \
    | grep -E "Requests/sec|50%|90%|99%|Non-2xx|errors"
done

echo "== query plans"
while read -r s; do
  "$bin" explain "$s"
done < "$work/explain.txt"
