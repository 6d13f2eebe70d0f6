#!/usr/bin/env bash
# Runs a SHERS cluster on this machine: three `shers serve` nodes on loopback sharing one
# PostgreSQL database and one Redis, behind NGINX with the shipped deploy/nginx/shers.conf
# (its upstream pointed at the three nodes). Ctrl-C stops everything (SIGTERM: each node hands
# its work over as it goes).
#
#   scripts/cluster.sh postgres://postgres@127.0.0.1:5432/shers_cluster redis://127.0.0.1:6379/ 18200
#
# NGINX listens on PORT, the nodes on PORT+1..PORT+3; logs and the NGINX config go to
# target/cluster/. CLUSTER_BIN overrides the binary (default target/release/shers); extra
# SHERS_* variables in the environment reach every node. An admin token is printed.
set -euo pipefail
if [[ $# -lt 3 ]]; then
    sed -n '2,11p' "$0"
    exit 2
fi
DB=$1; REDIS=$2; PORT=$3
BIN=${CLUSTER_BIN:-target/release/shers}
DIR=target/cluster
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
"$BIN" --database-url "$DB" migrate >/dev/null
TOKEN=$("$BIN" --database-url "$DB" token create --role admin --name cluster | tail -1)

PIDS=()
stop() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop EXIT INT TERM

for i in 1 2 3; do
    DATABASE_URL=$DB REDIS_URL=$REDIS SHERS_CLUSTER__NODE_ID=node$i RUST_LOG=${RUST_LOG:-info,shers::access=warn} \
        "$BIN" serve --bind "127.0.0.1:$((PORT + i))" >"$DIR/node$i.log" 2>&1 &
    PIDS+=($!)
done

# The shipped config, with the upstream on loopback and paths under $DIR.
sed -e "s#server shers-1:8080#server 127.0.0.1:$((PORT + 1))#" \
    -e "s#server shers-2:8080#server 127.0.0.1:$((PORT + 2))#" \
    -e "s#server shers-3:8080#server 127.0.0.1:$((PORT + 3))#" \
    -e "s#listen 80;#listen 127.0.0.1:$PORT;#" \
    -e "s#/var/log/nginx/shers.access.log#$DIR/nginx-access.log#" \
    deploy/nginx/shers.conf >"$DIR/shers.conf"
cat >"$DIR/nginx.conf" <<CONF
worker_processes 1;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log error;
events { worker_connections 4096; }
http {
    client_body_temp_path $DIR/nginx-body;
    proxy_temp_path $DIR/nginx-proxy;
    include $DIR/shers.conf;
}
CONF
nginx -c "$DIR/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
    sleep 0.2
done
echo "SHERS cluster: http://127.0.0.1:$PORT (NGINX) -> nodes on ports $((PORT + 1))-$((PORT + 3))"
echo "logs: $DIR; admin token:"
echo "$TOKEN"
wait
