#!/usr/bin/env bash
# Runs the gateway example in front of a fake upstream (scripts/fake_upstream.py) and checks,
# offline, that clients see exactly what the upstream sends: raw bytes and headers with curl,
# parsed results with the official `openai` and `anthropic` Python SDKs, JSON and streaming.
# Then prints the CloudEvents the gateway emitted and stops it with SIGTERM (expects exit 0).
#
# Needs a venv with the SDKs, made once (the only step that uses the network):
#   python3 -m venv /tmp/sdkvenv && /tmp/sdkvenv/bin/pip install openai anthropic
# Usage: scripts/sdk_check.sh [VENV]        (default VENV: /tmp/sdkvenv)
# Extra gateway settings pass through the environment, e.g. METERING_EVENT_SHAPE=per-request.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/sdkvenv}
target=${CARGO_TARGET_DIR:-target}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --quiet --example gateway

python3 scripts/fake_upstream.py 0 >"$work/upstream.out" 2>"$work/upstream.log" &
pids+=($!)
for _ in $(seq 100); do grep -q '^port' "$work/upstream.out" 2>/dev/null && break; sleep 0.1; done
upstream="http://127.0.0.1:$(awk '/^port/ {print $2}' "$work/upstream.out")"

LISTEN_ADDR=127.0.0.1:0 UPSTREAM_URL="$upstream" SUBJECT_HEADER=${SUBJECT_HEADER:-x-customer} \
    "$target/debug/examples/gateway" >"$work/events.jsonl" 2>"$work/gateway.log" &
gateway_pid=$!
for _ in $(seq 100); do grep -q '^listening on' "$work/gateway.log" 2>/dev/null && break; sleep 0.1; done
gateway=$(awk '/^listening on/ {print $3}' "$work/gateway.log")
echo "upstream $upstream, gateway $gateway"

status=0
check() { # name path body [header]
    local name=$1 path=$2 body=$3 extra=(-H "x-customer: customer-curl")
    for side in direct gateway; do
        local base=$upstream; [[ $side == gateway ]] && base=$gateway
        curl -sS -N -D "$work/$side.h" -o "$work/$side.b" -H 'content-type: application/json' \
            -H 'authorization: Bearer sk-test' "${extra[@]}" -d "$body" "$base$path"
        # Header names are case-insensitive (the gateway, like any HTTP/2 hop, sends them in
        # lower case); names, values and order are compared, Date aside.
        grep -vi '^date:' "$work/$side.h" | awk -F': ' -v OFS=': ' '{ $1 = tolower($1); print }' >"$work/$side.hd"
    done
    if cmp -s "$work/direct.b" "$work/gateway.b" && diff -q "$work/direct.hd" "$work/gateway.hd" >/dev/null; then
        echo "curl $name: identical ($(wc -c <"$work/gateway.b") body bytes, $(grep -c . "$work/gateway.hd") header lines)"
    else
        echo "curl $name: DIFFERENT"; diff "$work/direct.hd" "$work/gateway.hd" || true
        cmp "$work/direct.b" "$work/gateway.b" || true; status=1
    fi
}
check "chat.completions" /v1/chat/completions '{"model":"gpt-4o","messages":[]}'
check "chat.completions stream" /v1/chat/completions \
    '{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}'
check "chat.completions stream, no include_usage" /v1/chat/completions \
    '{"model":"gpt-4o","messages":[],"stream":true}'
check "messages" /v1/messages '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[]}'
check "messages stream" /v1/messages '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[],"stream":true}'
check "404" /v1/nothing '{}'

"$venv/bin/python" scripts/sdk_check.py "$upstream" "$gateway" || status=1

kill -TERM "$gateway_pid"
gateway_status=0; wait "$gateway_pid" || gateway_status=$?
echo "gateway exit status after SIGTERM: $gateway_status"; [[ $gateway_status == 0 ]] || status=1
echo "events ($(wc -l <"$work/events.jsonl")): subject type/api tokens"
python3 -c '
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line); d = e["data"]
    counts = d.get("tokens", {k: d[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in d})
    print("  %-24s %-8s %-12s %-18s %s%s" % (e["subject"], e["type"], d.get("type", "-"), d["api"], counts,
          ("" if d.get("complete", True) else " (incomplete)") +
          (" (usage missing)" if d.get("usage_source") == "missing" else "")))
' "$work/events.jsonl"
exit $status
