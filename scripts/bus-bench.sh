#!/usr/bin/env bash
# Ingest over HTTP, AMQP and MQTT, and the relay's commit → AMQP delivery lag, against one
# fresh `shers serve` on DATABASE_URL with the buses on (the BENCHMARKS.md "Buses" figures).
#
#   cargo build --release --bin shers
#   scripts/bus-bench.sh sqlite:///tmp/bus-bench.db 18095 target/bench/bus 3
#
# The last argument is how many rounds of every scenario (default 3). RabbitMQ and Mosquitto
# come from BUS_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f) and BUS_MQTT_URL
# (default mqtt://127.0.0.1:1883). The server gets an exchange, queue prefix, topic prefix and
# MQTT client id of its own (bus-bench-<pid>), so nothing else on the brokers meets it; its
# queues are deleted at the end when rabbitmqctl works (the empty exchange stays).
# BENCH_BIN overrides the binary; BENCH_LOG the server's RUST_LOG (default warn);
# LOADGEN_ARGS adds loadgen options to every scenario; DURATION sets each run's seconds
# (default 10), DEVICES the wearables of each ingest run (default 2000).
set -euo pipefail
BIN=${BENCH_BIN:-target/release/shers}
if [[ $# -lt 3 ]]; then
    sed -n '2,15p' "$0"
    exit 2
fi
URL=$1; PORT=$2; OUT=$3; ROUNDS=${4:-3}
DURATION=${DURATION:-10}
DEVICES=${DEVICES:-2000}
AMQP_URL=${BUS_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
MQTT_URL=${BUS_MQTT_URL:-mqtt://127.0.0.1:1883}
TAG=bus-bench-$$
EXCHANGE=$TAG.topic
mkdir -p "$(dirname "$OUT")"
"$BIN" --database-url "$URL" migrate >/dev/null
TOKEN=$("$BIN" --database-url "$URL" token create --role admin --name bench | tail -1)
SHERS_AMQP__URL=$AMQP_URL SHERS_AMQP__EXCHANGE=$EXCHANGE SHERS_AMQP__QUEUE_PREFIX=$TAG \
SHERS_MQTT__URL=$MQTT_URL SHERS_MQTT__TOPIC_PREFIX=$TAG/devices SHERS_MQTT__CLIENT_ID=$TAG \
RUST_LOG=${BENCH_LOG:-warn} \
    "$BIN" --database-url "$URL" serve --bind "127.0.0.1:$PORT" >"$OUT-server.log" 2>&1 &
SERVER=$!
cleanup() {
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    for q in wearable-data dead-letter; do
        timeout 30 rabbitmqctl -q delete_queue "$TAG.q.$q" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
for _ in $(seq 1 150); do
    curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
    sleep 0.2
done
# The ingest queue and the MQTT subscription exist once the server is connected to both
# brokers (`/readyz` says so); a little more for the subscription to settle.
for _ in $(seq 1 150); do
    READY=$(curl -s "http://127.0.0.1:$PORT/readyz" | tr -d ' ')
    [[ $READY == *'"amqp":"connected"'* && $READY == *'"mqtt":"connected"'* ]] && break
    sleep 0.2
done
sleep 2
BUS=(--amqp-url "$AMQP_URL" --amqp-exchange "$EXCHANGE" --amqp-queue-prefix "$TAG"
     --mqtt-url "$MQTT_URL" --mqtt-prefix "$TAG/devices")
run() {
    local name=$1; shift
    echo "=== $name"
    "$BIN" loadgen --url "http://127.0.0.1:$PORT" --token "$TOKEN" --duration "$DURATION" \
        --json "$OUT-$name.json" "$@" ${LOADGEN_ARGS:-}
}
for round in $(seq 1 "$ROUNDS"); do
    # Ingest, the same DEVICES wearables each way: HTTP batches of 500 paced at DEVICES × 50
    # readings/s (100,000 with 2,000), the buses flat out (as fast as the broker confirms /
    # the in-flight window allows).
    run "r$round-http" --scenario ingest --devices "$DEVICES" --hz 50 --batch 500
    run "r$round-amqp-single" --scenario amqp-ingest --devices "$DEVICES" --flat-out "${BUS[@]}"
    run "r$round-amqp-batch100" --scenario amqp-ingest --devices "$DEVICES" --batch 100 --flat-out "${BUS[@]}"
    run "r$round-mqtt-single" --scenario mqtt-ingest --devices "$DEVICES" --flat-out "${BUS[@]}"
    run "r$round-mqtt-batch10" --scenario mqtt-ingest --devices "$DEVICES" --batch 10 --flat-out "${BUS[@]}"
    run "r$round-relay-lag" --scenario relay-lag --units 1000 "${BUS[@]}"
done
