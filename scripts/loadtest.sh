#!/usr/bin/env bash
# End-to-end overhead of the metering layer: the gateway example in front of a fast fake
# upstream, once with metering and once with METERING=off, driven by wrk over 127.0.0.1 in
# alternating rounds. Prints requests/s, p50/p99 latency and the with/without ratios for JSON
# and for SSE streaming (50 chunks).
#
#   scripts/loadtest.sh                     # 3 rounds x 10 s per mode and kind
#   ROUNDS=5 DURATION=5 CONNECTIONS=16 scripts/loadtest.sh
#
# Needs wrk (installed with apt-get when run as root, else: apt-get install -y wrk).
# Everything it starts is stopped on exit. The metered gateway sends its events with
# OpenMeterSink to the fake upstream, which stands in for OpenMeter (answers 204 and counts
# them: events/request is printed per round). SINK=stdout uses the gateway's StdoutSink instead,
# events to /dev/null: a locked write system call per event, which measures that sink more than
# the layer.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
THREADS=${THREADS:-1}
UP_PORT=${UP_PORT:-19100}
ON_PORT=${ON_PORT:-19101}
OFF_PORT=${OFF_PORT:-19102}

if ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing wrk..." >&2
        (apt-get install -y -qq wrk || { apt-get update -qq && apt-get install -y -qq wrk; }) >/dev/null
    else
        echo "wrk is missing: apt-get install -y wrk" >&2
        exit 1
    fi
fi

BIN="${CARGO_TARGET_DIR:-target}/release/examples"
if [ -n "${GATEWAY_BIN:-}" ]; then
    # A gateway built elsewhere (e.g. from a branch not merged yet).
    cargo build --release --quiet --example fake_upstream
else
    cargo build --release --quiet --example gateway --example fake_upstream
    GATEWAY_BIN="$BIN/gateway"
fi
TTFB_REQUESTS=${TTFB_REQUESTS:-300}
SINK=${SINK:-openmeter}

WORK=$(mktemp -d "$( [ -d /dev/shm ] && echo /dev/shm || echo /tmp )/loadtest.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1; logs in $WORK:" >&2
    tail -n 20 "$WORK"/*.log >&2 || true
    exit 1
}

LISTEN_ADDR=127.0.0.1:$UP_PORT "$BIN/fake_upstream" 2>"$WORK/upstream.log" &
PIDS+=($!)
wait_port "$UP_PORT"
for mode in on off; do
    port=$ON_PORT; [ "$mode" = off ] && port=$OFF_PORT
    openmeter=http://127.0.0.1:$UP_PORT; [ "$SINK" = stdout ] && openmeter=
    OPENMETER_URL=$openmeter LISTEN_ADDR=127.0.0.1:$port UPSTREAM_URL=http://127.0.0.1:$UP_PORT \
        METERING=$mode RUST_LOG=warn "$GATEWAY_BIN" >/dev/null 2>"$WORK/gateway-$mode.log" &
    PIDS+=($!)
    wait_port "$port"
done

cat >"$WORK/json.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"gpt-4o","user":"customer-1","messages":[{"role":"user","content":"Hello, how are you?"}]}'
LUA
cat >"$WORK/sse.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"gpt-4o","user":"customer-1","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hello"}]}'
LUA

# Sanity: both gateways answer, the metered one emits events.
for port in "$ON_PORT" "$OFF_PORT"; do
    curl -sf -o /dev/null -X POST -H 'content-type: application/json' \
        -d '{"model":"gpt-4o","user":"customer-1","messages":[]}' "http://127.0.0.1:$port/v1/chat/completions" \
        || { echo "gateway on port $port does not answer" >&2; exit 1; }
done

# wrk latency ("1.23ms", "850.00us", "1.01s") in microseconds.
to_us() {
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000;
        else if (v ~ /s$/) print n * 1000000; else print n }'
}

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
run() { # kind mode round
    local kind=$1 mode=$2 round=$3 port=$ON_PORT out
    [ "$mode" = off ] && port=$OFF_PORT
    local events_before
    events_before=$(curl -sf "http://127.0.0.1:$UP_PORT/events")
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/$kind.lua" \
        "http://127.0.0.1:$port/v1/chat/completions")
    local rps p50 p99 reqs errors events
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
    p50=$(to_us "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_us "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    errors=$(awk '/Non-2xx|Socket errors/ { print }' <<<"$out" | tr '\n' ' ')
    sleep 0.5 # the sink's last batch
    events=$(( $(curl -sf "http://127.0.0.1:$UP_PORT/events") - events_before ))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$mode" "$round" "$rps" "$p50" "$p99" "$reqs" "$events" >>"$RESULTS"
    local per_request="-"
    [ "$SINK" = openmeter ] && per_request=$(awk -v e="$events" -v r="$reqs" 'BEGIN { printf "%.2f", (r > 0 ? e / r : 0) }')
    printf '%-5s %-4s round %s: %10.0f req/s  p50 %8.0f us  p99 %8.0f us  events/request %s %s\n' \
        "$kind" "$mode" "$round" "$rps" "$p50" "$p99" "$per_request" "$errors"
}

echo "load: $ROUNDS rounds x ${DURATION}s per mode, wrk -t$THREADS -c$CONNECTIONS, $(nproc) cores; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for kind in json sse; do
    # Warm-up, not recorded.
    wrk -t1 -c"$CONNECTIONS" -d2s -s "$WORK/$kind.lua" "http://127.0.0.1:$ON_PORT/v1/chat/completions" >/dev/null
    wrk -t1 -c"$CONNECTIONS" -d2s -s "$WORK/$kind.lua" "http://127.0.0.1:$OFF_PORT/v1/chat/completions" >/dev/null
    for round in $(seq "$ROUNDS"); do
        if [ $((round % 2)) = 1 ]; then order="off on"; else order="on off"; fi
        for mode in $order; do run "$kind" "$mode" "$round"; done
    done
done

echo
echo "Medians over $ROUNDS rounds (with = metering on, without = METERING=off):"
printf '%-5s %12s %12s %7s %10s %10s %10s %10s %10s\n' kind "req/s with" "req/s w/o" ratio "p50 with" "p50 w/o" "p99 with" "p99 w/o" "p99 added"
for kind in json sse; do
    median() { # mode column
        awk -F'\t' -v k="$kind" -v m="$1" -v c="$2" '$1 == k && $2 == m { print $c }' "$RESULTS" | sort -g |
            awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
    }
    rw=$(median on 4); ro=$(median off 4); pw=$(median on 5); po=$(median off 5); qw=$(median on 6); qo=$(median off 6)
    awk -v k="$kind" -v rw="$rw" -v ro="$ro" -v pw="$pw" -v po="$po" -v qw="$qw" -v qo="$qo" 'BEGIN {
        printf "%-5s %12.0f %12.0f %7.3f %8.0fus %8.0fus %8.0fus %8.0fus %8.0fus\n", k, rw, ro, rw / ro, pw, po, qw, qo, qw - qo }'
done

# Streaming time to first byte and total, one request at a time (no load), alternating modes.
echo
echo "SSE time to first byte, sequential requests ($TTFB_REQUESTS per mode, alternating), medians:"
for i in $(seq "$TTFB_REQUESTS"); do
    for mode in on off; do
        port=$ON_PORT; [ "$mode" = off ] && port=$OFF_PORT
        curl -s -o /dev/null -w "$mode %{time_starttransfer} %{time_total}\n" -X POST \
            -H 'content-type: application/json' \
            -d '{"model":"gpt-4o","user":"customer-1","stream":true,"stream_options":{"include_usage":true},"messages":[]}' \
            "http://127.0.0.1:$port/v1/chat/completions"
    done
done >"$WORK/ttfb.txt"
for col in 2 3; do
    for mode in on off; do
        awk -v m="$mode" -v c="$col" '$1 == m { print $c * 1e6 }' "$WORK/ttfb.txt" | sort -g |
            awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
    done
done | paste -sd' ' | awk '{ printf "first byte: with %.0f us, without %.0f us, ratio %.3f; total: with %.0f us, without %.0f us, ratio %.3f\n", $1, $2, $1 / $2, $3, $4, $3 / $4 }'
