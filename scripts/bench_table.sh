#!/usr/bin/env bash
# Prints the with/without table of the last `cargo bench --bench layer` run: mean time per
# request without and with the layer, the time added, and the ratio.
#   scripts/bench_table.sh [criterion-dir]   (default: ${CARGO_TARGET_DIR:-target}/criterion)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${CARGO_TARGET_DIR:-target}/criterion}
command -v jq >/dev/null || { echo "needs jq: apt-get install -y jq" >&2; exit 1; }
printf '%-16s %-16s %14s %14s %14s %8s\n' group case without with added ratio
for with in "$DIR"/*/with_layer/*/new/estimates.json; do
    [ -e "$with" ] || { echo "no results in $DIR" >&2; exit 1; }
    case_dir=$(dirname "$(dirname "$with")")
    group=$(basename "$(dirname "$(dirname "$case_dir")")")
    name=$(basename "$case_dir")
    without="$DIR/$group/without_layer/$name/new/estimates.json"
    [ -e "$without" ] || continue
    w=$(jq '.mean.point_estimate' "$with")
    o=$(jq '.mean.point_estimate' "$without")
    awk -v g="$group" -v n="$name" -v w="$w" -v o="$o" 'function t(ns) {
            return ns >= 1e6 ? sprintf("%.2f ms", ns / 1e6) : ns >= 1e3 ? sprintf("%.2f us", ns / 1e3) : sprintf("%.0f ns", ns) }
        BEGIN { printf "%-16s %-16s %14s %14s %14s %8.2f\n", g, n, t(o), t(w), t(w - o), w / o }'
done
