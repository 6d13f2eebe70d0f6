#!/usr/bin/env bash
# Reading → offer (`detect-to-offer`) with each ETA provider: the straight line, OSRM and Google
# (docs/interop.md §5), both routers played by `shers fake-routing` answering after
# ROUTING_DELAY_MS (default 20). Each run gets a fresh SQLite database (or DATABASE_URL_<MODE>).
#
#   cargo build --release
#   scripts/routing-bench.sh target/bench/routing [straight osrm google]
#
# BENCH_BIN overrides the binary; LOADGEN_ARGS adds loadgen options (e.g. "--duration 20").
# The Google answer cache rarely helps here: every probe's scene is a new point.
set -euo pipefail
BIN=${BENCH_BIN:-target/release/shers}
if [[ $# -lt 1 ]]; then
    sed -n '2,10p' "$0"
    exit 2
fi
OUT=$1; shift
MODES=("$@")
[[ ${#MODES[@]} -gt 0 ]] || MODES=(straight osrm google)
FAKE_PORT=${FAKE_ROUTING_PORT:-18700}
"$BIN" fake-routing --bind "127.0.0.1:$FAKE_PORT" --delay-ms "${ROUTING_DELAY_MS:-20}" &
FAKE=$!
trap 'kill $FAKE 2>/dev/null; wait $FAKE 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
    curl -s -o /dev/null "http://127.0.0.1:$FAKE_PORT/" && break
    sleep 0.1
done
port=18710
for mode in "${MODES[@]}"; do
    db_var="DATABASE_URL_${mode^^}"
    db=${!db_var:-sqlite:///tmp/routing-bench-$mode.db}
    [[ $db == sqlite://* ]] && rm -f "${db#sqlite://}"*
    case $mode in
        straight) export SHERS_ROUTING__PROVIDERS="" ;;
        osrm) export SHERS_ROUTING__PROVIDERS=osrm SHERS_ROUTING__BASE_URL="http://127.0.0.1:$FAKE_PORT" ;;
        google) export SHERS_ROUTING__PROVIDERS=google SHERS_ROUTING__GOOGLE_API_KEY=bench \
                       SHERS_ROUTING__GOOGLE_BASE_URL="http://127.0.0.1:$FAKE_PORT" ;;
        *) echo "unknown mode $mode (straight, osrm, google)" >&2; exit 2 ;;
    esac
    echo "=== routing: $mode"
    BENCH_BIN=$BIN scripts/bench.sh "$db" "$port" "$OUT-$mode" detect-to-offer
    unset SHERS_ROUTING__PROVIDERS SHERS_ROUTING__BASE_URL SHERS_ROUTING__GOOGLE_API_KEY SHERS_ROUTING__GOOGLE_BASE_URL
    port=$((port + 1))
done
