#!/usr/bin/env bash
# Exchange benchmark: N distinct signed C-CDA documents (one section
# encrypted by xmlsec1) posted one after another to POST /exchange/documents;
# prints documents per second. Needs xmlsec1 and openssl.
#   EXCHANGE_BENCH_DOCS=30 scripts/bench/exchange.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ehrx-target}"
EXCHANGE_BENCH_DOCS="${EXCHANGE_BENCH_DOCS:-30}" \
  cargo test --release --test exchange documents_in_a_row_are_each_stored -- --nocapture
