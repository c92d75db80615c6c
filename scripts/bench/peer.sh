#!/usr/bin/env bash
# ehrx side by side with the Helios FHIR Server and a bare axum handler, on
# the same Synthea data with the same wrk load; prints the median req/s of
# each server per request shape and the ratios issue 13 sets targets for.
#
#   scripts/bench/peer.sh [DATA_DIR]                  (default ../shared/data)
#
# Servers, one at a time, each on a free loopback port:
#   ehrx-token  ehrx with authorization on; every request carries a real
#               bearer token of a registered backend client (system/*.rs,
#               client_credentials with a signed assertion; smart_token.py)
#   ehrx-off    the same database, EHRX_AUTH_DISABLED=true
#   helios      Helios FHIR Server (`hfs`, SQLite, no auth), working in a
#               temporary directory whose data/ holds search-parameters-r4.json
#               and compartment-definitions-r4.json made from
#               DATA_DIR/definitions (peer.py helios-data)
#   bare        examples/bare_axum.rs: a fixed 1 KB Patient, no database
# Request shapes (wrk -t2 -c16, DURATION each after a WARMUP run):
#   read    GET /Patient/{id}
#   family  GET /Patient?family=X
#   obs     GET /Observation?patient=P&code=C&_count=50 (_count so that both
#           servers return every match on one page: Helios's default page
#           is 20, ehrx's 50)
#   ingest  the transaction bundles POSTed one at a time by one client
#           (ingest.py), into an empty database: resources stored per second
# P is the patient with the smallest Synthea identifier in the loaded set,
# X their family name, C their most frequent Observation code (peer.py pick);
# each server's ids are looked up by the Synthea identifier. Rounds are
# interleaved — in every round each server runs in turn, the order rotating
# by one per round — so drift on the machine hits all of them; the table
# reports the median. Ingest rounds come first (ehrx and Helios, a fresh
# database each); the first round's databases serve the request shapes.
# If either server refuses some bundles in the first round, the set is
# narrowed to those both accepted and that round is loaded again, so that
# both servers always hold the same data; refusals are printed.
#
# Environment:
#   DURATION (10s), WARMUP (2s; 0 skips), ROUNDS (3)
#   BUNDLES     folder of transaction bundles (DATA_DIR/synthea/hiv-transaction-bundles:
#               29 bundles, 16,236 resources)
#   EHRX_BIN    an ehrx binary to run instead of this tree's release build
#   BARE_BIN    the bare_axum binary instead of building it
#   HFS_BIN     the Helios binary (default: `hfs` on PATH, else ~/.cargo/bin/hfs)
# Needs wrk, curl, python3 with tests/interop/requirements.txt (for the
# token), and Helios: `cargo install --locked helios-hfs --version 0.2.7`.
# Building: the example compiles the ehrx library once more (an example
# brings in the dev-dependencies' features), so the first run takes about two
# release builds; installing Helios compiles some 460 crates (well over an
# hour on 2 busy cores with -j1). A run of the defaults then takes about
# 10 minutes. The machine's cores are shared by the server and wrk; run it
# on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${1:-../shared/data}"
duration="${DURATION:-10s}"
warmup="${WARMUP:-2s}"
rounds="${ROUNDS:-3}"
bundles="${BUNDLES:-$data/synthea/hiv-transaction-bundles}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ehrx-target}"
for tool in wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "peer.sh: $tool is needed" >&2; exit 1; }
done
hfs="${HFS_BIN:-$(command -v hfs || echo "$HOME/.cargo/bin/hfs")}"
[ -x "$hfs" ] || { echo "peer.sh: no Helios at $hfs (cargo install --locked helios-hfs --version 0.2.7, or HFS_BIN)" >&2; exit 1; }
[ -d "$bundles" ] || { echo "peer.sh: no bundles in $bundles" >&2; exit 1; }
if [ -z "${EHRX_BIN:-}" ]; then
  cargo build --release --quiet --bin ehrx
fi
if [ -z "${BARE_BIN:-}" ]; then
  cargo build --release --quiet --example bare_axum
fi
bin="${EHRX_BIN:-$CARGO_TARGET_DIR/release/ehrx}"
bare="${BARE_BIN:-$CARGO_TARGET_DIR/release/examples/bare_axum}"

work=$(mktemp -d)
pid=""
stop() {
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=""
}
trap 'stop; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

python3 scripts/bench/peer.py helios-data "$data/definitions" "$work/hfs/data"
results="$work/results"
: >"$results"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start SERVER DB: runs SERVER on DB; sets base, auth (curl/wrk arguments).
start() {
  local server=$1 db=$2 port url log
  port=$(free_port)
  base="http://127.0.0.1:$port"
  auth=()
  log="$work/$server.log"
  url="$base/metadata"
  case $server in
    ehrx-token | ehrx-off)
      local off=false
      [ "$server" = ehrx-off ] && off=true
      EHRX_DATABASE_URL="sqlite:$db" EHRX_LISTEN="127.0.0.1:$port" EHRX_BASE_URL="$base" \
        EHRX_LOG=warn EHRX_AUTH_DISABLED=$off "$bin" serve >>"$log" 2>&1 &
      pid=$! ;;
    helios)
      (cd "$work/hfs" && HFS_BASE_URL="$base" HFS_UI_ENABLED=false HFS_REQUEST_TIMEOUT=600 \
        exec "$hfs" --host 127.0.0.1 --port "$port" --database-url "$db" --log-level warn) >>"$log" 2>&1 &
      pid=$! ;;
    bare)
      "$bare" "127.0.0.1:$port" >>"$log" 2>&1 &
      pid=$!
      url="$base/Patient/x" ;;
  esac
  for _ in $(seq 1800); do
    curl -sf -o /dev/null "$url" && break
    kill -0 "$pid" 2>/dev/null || { echo "peer.sh: $server exited; its log:" >&2; tail -20 "$log" >&2; exit 1; }
    sleep 0.1
  done
  curl -sf -o /dev/null "$url" || { echo "peer.sh: $server did not answer $url" >&2; tail -20 "$log" >&2; exit 1; }
  if [ "$server" = ehrx-token ]; then
    local token
    token=$(EHRX_DATABASE_URL="sqlite:$db" python3 scripts/bench/smart_token.py system "$base" "$bin" "system/*.rs")
    auth=(-H "Authorization: Bearer $token")
  fi
}

# order ROUND NAME...: the names rotated by ROUND-1.
order() {
  local r=$1 i
  shift
  local names=("$@")
  for ((i = 0; i < ${#names[@]}; i++)); do
    echo "${names[$(((i + r - 1) % ${#names[@]}))]}"
  done
}

# ingest SERVER ROUND DB: loads the set into a fresh DB; records
# resources/s and, as errors, how many bundles of the set were not loaded.
ingest() {
  local server=$1 r=$2 db=$3 out rate loaded missing
  rm -f "$db" "$db"-*
  start "$server" "$db"
  out=$(python3 scripts/bench/ingest.py --keep-going --only "$work/set" --loaded "$work/loaded" \
    "$base" "$bundles" 2>"$work/refused") || true
  stop
  rate=$(sed -n 's/.*: \([0-9]*\) resources\/s.*/\1/p' <<<"$out")
  [ -n "$rate" ] || { echo "peer.sh: ingest into $server failed: $out" >&2; cat "$work/refused" >&2; exit 1; }
  loaded=$(wc -l <"$work/loaded")
  missing=$((setsize - loaded))
  echo "   round $r, $server ingest: $out"
  sed 's/^/     /' "$work/refused" | cut -c1-300
  echo "$server ingest $r $rate $missing" >>"$results"
}

# wrk_run SERVER SHAPE ROUND PATH
wrk_run() {
  local server=$1 shape=$2 r=$3 path=$4 status size out rps errors
  read -r status size < <(curl -s -o /dev/null -w '%{http_code} %{size_download}\n' "${auth[@]}" "$base/$path")
  [ "$status" = 200 ] || { echo "peer.sh: $server: GET /$path answered $status" >&2; exit 1; }
  if [ "$warmup" != 0 ]; then
    wrk -t2 -c16 -d"$warmup" "${auth[@]}" "$base/$path" >/dev/null
  fi
  out=$(wrk -t2 -c16 -d"$duration" "${auth[@]}" "$base/$path")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/[^0-9]+/, " "); for (i = 1; i <= NF; i++) n += $i} END {print n + 0}' <<<"$out")
  printf '   round %s, %-10s %-6s %8.0f req/s (%s bytes)%s\n' "$r" "$server" "$shape" "$rps" "$size" \
    "$([ "$errors" = 0 ] || echo " ($errors errors)")"
  echo "$server $shape $r $rps $errors" >>"$results"
}

echo "== ehrx: $bin ($("$bin" --version 2>/dev/null || echo '?'); tree $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "== Helios: $hfs ($("$hfs" --version 2>/dev/null || echo '?'))"
echo "== machine: $(nproc) cores, shared by the server and wrk; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== wrk -t2 -c16 -d$duration (warm-up $warmup), $rounds interleaved rounds"

# Ingest. If either server refuses some bundles in the first round, the set
# is narrowed to those both accepted and the first round loaded again.
find "$bundles" -maxdepth 1 -name '*.json' -printf '%f\n' | LC_ALL=C sort >"$work/set"
setsize=$(wc -l <"$work/set")
echo "== transaction ingest of $setsize bundles from $bundles (one client, one bundle at a time)"
for r in $(seq "$rounds"); do
  for server in $(order "$r" helios ehrx-off); do
    if [ "$r" = 1 ]; then db="$work/$server.db"; else db="$work/ingest.db"; fi
    ingest "$server" "$r" "$db"
    LC_ALL=C sort "$work/loaded" >"$work/$server.loaded"
    [ "$r" = 1 ] || rm -f "$db" "$db"-*
  done
  if [ "$r" = 1 ]; then
    LC_ALL=C comm -12 "$work/helios.loaded" "$work/ehrx-off.loaded" >"$work/both"
    if [ "$(wc -l <"$work/both")" -lt "$setsize" ]; then
      echo "   only $(wc -l <"$work/both") of the $setsize bundles were accepted by both servers: the set is narrowed to them and round 1 loaded again"
      cp "$work/both" "$work/set"
      setsize=$(wc -l <"$work/set")
      grep -v ' ingest 1 ' "$results" >"$work/kept" || true
      mv "$work/kept" "$results"
      for server in helios ehrx-off; do
        ingest "$server" 1 "$work/$server.db"
      done
    fi
  fi
done

read -r ident family code < <(python3 scripts/bench/peer.py pick "$bundles" "$work/set")
qcode=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$code")
echo "== patient with Synthea identifier $ident, family $family, Observation code $code"

# Ids, and what each search matches (the same on every server, or the
# comparison is not of the same work).
for server in helios ehrx-off; do
  start "$server" "$work/$server.db"
  id=$(python3 scripts/bench/peer.py id "$base" "$ident")
  echo "$id" >"$work/$server.id"
  nf=$(python3 scripts/bench/peer.py matches "$base" "Patient?family=$family")
  no=$(python3 scripts/bench/peer.py matches "$base" "Observation?patient=$id&code=$qcode&_count=50")
  echo "   $server: Patient/$id; family=$family matches $nf, Observation?patient&code matches $no"
  echo "$nf $no" >"$work/$server.matches"
  stop
done
cmp -s "$work/helios.matches" "$work/ehrx-off.matches" ||
  echo "   WARNING: the searches match different numbers of resources on the two servers"

for r in $(seq "$rounds"); do
  for server in $(order "$r" ehrx-token ehrx-off helios bare); do
    case $server in
      helios) db="$work/helios.db"; id=$(cat "$work/helios.id") ;;
      bare) db=""; id=$(cat "$work/ehrx-off.id") ;;
      *) db="$work/ehrx-off.db"; id=$(cat "$work/ehrx-off.id") ;;
    esac
    start "$server" "$db"
    wrk_run "$server" read "$r" "Patient/$id"
    if [ "$server" != bare ]; then
      wrk_run "$server" family "$r" "Patient?family=$family"
      wrk_run "$server" obs "$r" "Observation?patient=$id&code=$qcode&_count=50"
    fi
    stop
  done
done

echo
python3 scripts/bench/peer.py table "$results"
