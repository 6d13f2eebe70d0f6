#!/usr/bin/env bash
# Runs loadgen scenarios against a fresh release `shers serve` on DATABASE_URL and keeps the
# JSON results and SVG histograms (the BENCHMARKS.md figures).
#
#   cargo build --release
#   scripts/bench.sh sqlite:///tmp/bench.db 18090 target/bench/sqlite ingest detect-to-offer accept-race fanout
#   scripts/bench.sh postgres://postgres@127.0.0.1:5432/shers_bench 18091 target/bench/pg fanout
#
# The PostgreSQL database should be empty and dedicated. BENCH_BIN overrides the binary;
# BENCH_LOG sets the server's RUST_LOG (default warn; see scripts/writer-phases.py);
# LOADGEN_ARGS adds loadgen options to every scenario (e.g. "--devices 0 --duration 10").
set -euo pipefail
BIN=${BENCH_BIN:-target/release/shers}
if [[ $# -lt 4 ]]; then
    sed -n '2,9p' "$0"
    exit 2
fi
URL=$1; PORT=$2; OUT=$3; shift 3
mkdir -p "$(dirname "$OUT")"
"$BIN" --database-url "$URL" migrate >/dev/null
TOKEN=$("$BIN" --database-url "$URL" token create --role admin --name bench | tail -1)
RUST_LOG=${BENCH_LOG:-warn} "$BIN" --database-url "$URL" serve --bind "127.0.0.1:$PORT" >"$OUT-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
    sleep 0.2
done
for scenario in "$@"; do
    echo "=== $scenario"
    "$BIN" loadgen --url "http://127.0.0.1:$PORT" --token "$TOKEN" --scenario "$scenario" \
        --json "$OUT-$scenario.json" --svg "$OUT-$scenario.svg" ${LOADGEN_ARGS:-}
done
