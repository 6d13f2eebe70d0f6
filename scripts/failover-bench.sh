#!/usr/bin/env bash
# Measures failover on a running local cluster (scripts/cluster.sh): ROUNDS times, kill -9 the
# node holding the dispatch shard, at once post an emergency reading through NGINX (retrying
# 503s after their Retry-After, as a gateway does), and time from the kill to the incident's
# first offer. The killed node is started again before the next round.
#
#   scripts/failover-bench.sh DATABASE_URL REDIS_URL PORT ADMIN_TOKEN [ROUNDS]
#
# PORT is the NGINX port given to scripts/cluster.sh (nodes on PORT+1..PORT+3). Prints one line
# per round and the p50 / p99 / max at the end. The nodes it starts again outlive
# scripts/cluster.sh: stop them with `pkill -f 'shers serve'`.
set -euo pipefail
if [[ $# -lt 4 ]]; then
    sed -n '2,10p' "$0"
    exit 2
fi
DB=$1; REDIS=$2; PORT=$3; TOKEN=$4; ROUNDS=${5:-20}
BIN=${CLUSTER_BIN:-target/release/shers}
DIR=target/cluster
API="http://127.0.0.1:$PORT"
auth=(-H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json")
post() { curl -s "${auth[@]}" -X POST "$API$1" -d "$2"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

GATEWAY=$("$BIN" --database-url "$DB" token create --role gateway --name failover | tail -1)
CONSOLE=$("$BIN" --database-url "$DB" token create --role console --name failover | tail -1)
RUN=$(date +%s)
for i in $(seq 1 "$ROUNDS"); do
    post /api/v1/units "{\"id\":\"FO-$RUN-$i\",\"call_sign\":\"FO $i\",\"capability\":\"als\",\"location\":{\"lat\":55.95,\"lng\":-3.19}}" >/dev/null
    post /api/v1/patients "{\"id\":\"fo-$RUN-$i\",\"name\":\"Failover $i\"}" >/dev/null
    post /api/v1/devices "{\"id\":\"fow-$RUN-$i\",\"patient_id\":\"fo-$RUN-$i\",\"model\":\"w\"}" >/dev/null
done

times=()
for i in $(seq 1 "$ROUNDS"); do
    owner=$(curl -s -H "Authorization: Bearer $TOKEN" "$API/admin/cluster" |
        json "[s['holder'] for s in d['shards'] if s['live'] and s['shard'] == 'dispatch/default'][0]")
    n=${owner#node}
    pid=$(pgrep -f "serve --bind 127.0.0.1:$((PORT + n))\$" | head -1)
    start=$(date +%s.%N)
    kill -9 "$pid"
    at=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
    body="{\"device_id\":\"fow-$RUN-$i\",\"timestamp\":\"$at\",\"heart_rate_bpm\":165,\"spo2_pct\":86,\"location\":{\"lat\":55.95,\"lng\":-3.19}}"
    while :; do
        answer=$(curl -s -w '\n%{http_code}' -H "Authorization: Bearer $GATEWAY" \
            -H "Content-Type: application/json" -X POST "$API/api/v1/vitals" -d "$body")
        [[ ${answer##*$'\n'} == 200 ]] && break
        sleep 0.1
    done
    incident=$(printf '%s' "${answer%$'\n'*}" | json "d['results'][0]['incident_id']")
    while :; do
        offers=$(curl -s -H "Authorization: Bearer $CONSOLE" "$API/api/v1/incidents/$incident" |
            json "len(d.get('offers') or [])" 2>/dev/null || echo 0)
        [[ $offers -gt 0 ]] && break
        sleep 0.02
    done
    took=$(echo "$(date +%s.%N) - $start" | bc)
    times+=("$took")
    printf 'round %2d: killed %s, first offer after %.2f s\n' "$i" "$owner" "$took"
    post "/api/v1/incidents/$incident/cancel" '{"reason":"failover drill"}' >/dev/null
    DATABASE_URL=$DB REDIS_URL=$REDIS SHERS_CLUSTER__NODE_ID=$owner RUST_LOG=${RUST_LOG:-info,shers::access=warn} \
        "$BIN" serve --bind "127.0.0.1:$((PORT + n))" >>"$DIR/$owner.log" 2>&1 &
    disown
    sleep 2
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {
    p50=a[int((NR+1)/2)]; p99=a[(NR*99+99)/100 > NR ? NR : int((NR*99+99)/100)];
    printf "kill -9 to first offer over %d rounds: p50 %.2f s, p99 %.2f s, max %.2f s\n", NR, p50, p99, a[NR] }'
