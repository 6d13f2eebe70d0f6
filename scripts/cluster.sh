#!/usr/bin/env bash
# A trial SHERS cluster on this machine: three `shers serve` nodes on loopback sharing one
# PostgreSQL database and one Redis, behind NGINX running the shipped deploy/nginx/shers.conf
# (its upstream pointed at the three nodes).
#
#   scripts/cluster.sh [DATABASE_URL [REDIS_URL [PORT]]]
#   (defaults: postgres://postgres@127.0.0.1:5432/shers_cluster redis://127.0.0.1:6379/ 18200)
#
# Needs PostgreSQL and Redis running, nginx and curl installed, and psql to create the database
# (or create it yourself); it says what is missing and how to get it. In order, it:
#   1. builds target/release/shers (cargo build --release; CLUSTER_BIN names another binary);
#   2. creates the database if it does not exist, applies the migrations, mints an admin token;
#   3. starts the nodes on PORT+1..PORT+3, each under a supervisor that starts it again when it
#      exits (code 75 when it lost its lease, or killed), as docker compose and Kubernetes do;
#   4. starts NGINX on PORT and waits until every node's /readyz and NGINX's answer, failing
#      with the nodes' last log lines if they do not within READY_TIMEOUT_S (default 90);
#   5. prints the URL, the token, how to mint more tokens, and runs until Ctrl-C, which stops
#      everything (SIGTERM: each node hands its work over as it goes).
#
# Payments use the labelled sandbox provider (no real money moves) unless
# SHERS_PAYMENTS__PROVIDER is set; other SHERS_* variables in the environment reach every node.
# Logs (plain text), pid files and the NGINX config go to target/cluster/.
set -euo pipefail

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
}
if [[ $# -gt 3 || ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 2
fi

# Resolve a CLUSTER_BIN given relative to the caller's directory, then work from the repository.
BIN=${CLUSTER_BIN:-}
if [[ -n "$BIN" && "$BIN" != /* ]]; then
    BIN=$PWD/$BIN
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DB=${1:-postgres://postgres@127.0.0.1:5432/shers_cluster}
REDIS=${2:-redis://127.0.0.1:6379/}
PORT=${3:-18200}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-90}
DIR=target/cluster

say() { printf '[cluster] %s\n' "$*" >&2; }
fail() {
    printf '[cluster] error: %s\n' "$1" >&2
    shift
    local line
    for line in "$@"; do printf '[cluster]   %s\n' "$line" >&2; done
    exit 1
}

# ---------------------------------------------------------------- 1. what it needs

if ! [[ "$PORT" =~ ^[0-9]+$ ]] || ((PORT < 1024 || PORT > 65532)); then
    fail "PORT must be a number from 1024 to 65532 (NGINX listens on it, the nodes on the next three): got '$PORT'"
fi
case "$DB" in
postgres://* | postgresql://*) ;;
*) fail "a cluster needs PostgreSQL: DATABASE_URL must start with postgres:// (got '${DB%%://*}://…')" \
    "(on SQLite, one 'shers serve' holds everything: there is nothing to share)" ;;
esac
case "$REDIS" in
redis://* | rediss://*) ;;
*) fail "REDIS_URL must start with redis:// (got '${REDIS%%://*}://…')" ;;
esac

NGINX=$(command -v nginx || true)
for candidate in /usr/sbin/nginx /usr/local/sbin/nginx /opt/homebrew/bin/nginx /usr/local/bin/nginx; do
    if [[ -z "$NGINX" && -x $candidate ]]; then NGINX=$candidate; fi
done
[[ -n "$NGINX" ]] || fail "nginx is not installed; the cluster's entry point is NGINX with deploy/nginx/shers.conf." \
    "Debian/Ubuntu: sudo apt-get install nginx-light    macOS: brew install nginx"
command -v curl >/dev/null 2>&1 || fail "curl is not installed (it checks that the nodes are ready)." \
    "Debian/Ubuntu: sudo apt-get install curl"

for port in "$PORT" $((PORT + 1)) $((PORT + 2)) $((PORT + 3)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        fail "port $port is already in use (is a cluster still running?); stop it or give another PORT"
    fi
done

# Host and port of a URL like scheme://[user[:pass]@]host[:port][/path][?query].
url_host() { local rest=${1#*://}; rest=${rest%%/*}; rest=${rest%%\?*}; rest=${rest##*@}; printf '%s' "${rest%%:*}"; }
url_port() {
    local rest=${1#*://}; rest=${rest%%/*}; rest=${rest%%\?*}; rest=${rest##*@}
    if [[ $rest == *:* ]]; then printf '%s' "${rest##*:}"; else printf '%s' "$2"; fi
}

redis_host=$(url_host "$REDIS"); redis_port=$(url_port "$REDIS" 6379)
if command -v redis-cli >/dev/null 2>&1; then
    redis_answer=$(redis-cli -u "$REDIS" ping 2>&1 </dev/null || true)
    [[ "$redis_answer" == *PONG* ]] || fail "Redis at ${redis_host:-127.0.0.1}:$redis_port does not answer PING: $redis_answer" \
        "start it (Debian/Ubuntu: sudo apt-get install redis-server; or redis-server --daemonize yes)"
elif ! (exec 3<>"/dev/tcp/${redis_host:-127.0.0.1}/$redis_port") 2>/dev/null; then
    fail "nothing listens on ${redis_host:-127.0.0.1}:$redis_port for Redis" \
        "start it (Debian/Ubuntu: sudo apt-get install redis-server; or redis-server --daemonize yes)"
fi

if [[ -z "$BIN" ]]; then
    BIN=$PWD/target/release/shers
    [[ -x "$BIN" ]] || say "building target/release/shers (a few minutes the first time)"
    # Up to date with the sources (a second or two when nothing changed).
    cargo build --release --locked --quiet --bin shers
fi
[[ -x "$BIN" ]] || fail "CLUSTER_BIN=$BIN is not an executable"

# ---------------------------------------------------------------- 2. the database

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
db_path=${DB#*://}
[[ "$db_path" == */* ]] || fail "DATABASE_URL names no database (postgres://user@host:port/NAME): '$DB'"
db_path=${db_path#*/}
db_name=${db_path%%\?*}
db_query=""
[[ "$db_path" == *\?* ]] && db_query="?${db_path#*\?}"
db_server=${DB%%/"$db_path"}
create_hint="createdb -h $(url_host "$DB") -p $(url_port "$DB" 5432) -U <user> '$db_name'   (or: psql <server URL> -c 'create database \"$db_name\"')"
[[ -n "$db_name" ]] || fail "DATABASE_URL names no database (postgres://user@host:port/NAME): '$DB'"
if command -v psql >/dev/null 2>&1; then
    maintenance="$db_server/postgres$db_query"
    if ! exists=$(PGCONNECT_TIMEOUT=5 psql "$maintenance" -XtAq -v ON_ERROR_STOP=1 \
        -c "select 1 from pg_database where datname = '${db_name//\'/\'\'}'" 2>"$DIR/psql.err" </dev/null); then
        fail "cannot reach PostgreSQL at $(url_host "$DB"):$(url_port "$DB" 5432) as the URL's user: $(cat "$DIR/psql.err")" \
            "start it (Debian/Ubuntu: sudo apt-get install postgresql), or give a DATABASE_URL whose user can log in" \
            "and create databases (a fresh Debian PostgreSQL wants a password on 127.0.0.1:" \
            "  sudo -u postgres psql -c \"alter user postgres password 'shers'\"" \
            "  then use postgres://postgres:shers@127.0.0.1:5432/$db_name)"
    fi
    if [[ "$exists" != 1 ]]; then
        say "creating database $db_name"
        psql "$maintenance" -XqAt -v ON_ERROR_STOP=1 -c "create database \"${db_name//\"/\"\"}\"" </dev/null ||
            fail "could not create database $db_name; create it yourself:" "$create_hint"
    fi
    rm -f "$DIR/psql.err"
else
    say "psql is not installed, so the database is not created here; if it does not exist yet:"
    say "  $create_hint   (psql: sudo apt-get install postgresql-client)"
fi

if ! "$BIN" --database-url "$DB" migrate >"$DIR/migrate.log" 2>&1; then
    cat "$DIR/migrate.log" >&2
    if grep -q 'does not exist' "$DIR/migrate.log"; then
        fail "the database does not exist; create it, then run this again:" "$create_hint"
    fi
    fail "applying the migrations failed (above)"
fi
TOKEN=$("$BIN" --database-url "$DB" token create --role admin --name "cluster.sh admin" 2>"$DIR/token.log" | tail -n 1) ||
    { cat "$DIR/token.log" >&2; fail "minting the admin token failed (above)"; }

# ---------------------------------------------------------------- 3. supervised nodes

export DATABASE_URL=$DB REDIS_URL=$REDIS
export RUST_LOG=${RUST_LOG:-info,shers::access=warn}
PAYMENTS_NOTE="payments: ${SHERS_PAYMENTS__PROVIDER:-} (from SHERS_PAYMENTS__PROVIDER)"
if [[ -z "${SHERS_PAYMENTS__PROVIDER:-}" ]]; then
    export SHERS_PAYMENTS__PROVIDER=sandbox
    PAYMENTS_NOTE="payments: SANDBOX provider for this trial, no real money moves (for real charges set SHERS_PAYMENTS__PROVIDER=stripe and SHERS_PAYMENTS__API_KEY)"
fi

# supervise I PORT: runs node I, starting it again whenever it exits, until sent SIGTERM.
supervise() {
    local i=$1 port=$2 child=0 rc started delay=1 quick=0 ever_up=0 stopping=0 why
    local log=$DIR/node$i.log
    trap 'stopping=1; if ((child > 0)); then kill -TERM "$child" 2>/dev/null || true; fi' TERM
    while :; do
        started=$SECONDS
        SHERS_CLUSTER__NODE_ID=node$i "$BIN" serve --bind "127.0.0.1:$port" >>"$log" 2>&1 </dev/null &
        child=$!
        echo "$child" >"$DIR/node$i.pid"
        # `wait` returns early when SIGTERM arrives: wait again until the node has stopped.
        while :; do
            rc=0
            wait "$child" 2>/dev/null || rc=$?  # (quiet: no "Killed" line from bash)
            kill -0 "$child" 2>/dev/null || break
        done
        rm -f "$DIR/node$i.pid"
        ((stopping)) && return 0
        if ((rc == 75)); then
            why="exited with code 75 (it lost a lease)"
        elif ((rc > 128)); then
            why="was killed (SIG$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128))))"
        else
            why="exited with code $rc"
        fi
        # A node that has never stayed up is misconfigured: say so instead of looping. One
        # that ran before is started again however often it fails, with capped backoff.
        if ((SECONDS - started < 10)); then quick=$((quick + 1)); else quick=0 delay=1 ever_up=1; fi
        if ((quick >= 3 && !ever_up)); then
            echo "node$i $why three times within seconds of starting; see $log" >"$DIR/node$i.failed"
            say "node$i $why three times within seconds of starting: not starting it again (see $log)"
            return 1
        fi
        say "node$i $why; starting it again in ${delay}s"
        printf '\n[cluster.sh] node%s %s; starting it again in %ss\n\n' "$i" "$why" "$delay" >>"$log"
        sleep "$delay" &
        wait $! || true
        ((stopping)) && return 0
        delay=$((delay * 2 > 30 ? 30 : delay * 2))
    done
}

SUPERVISORS=()
NGINX_PID=""
STOPPED=0
# shellcheck disable=SC2317  # run by the EXIT trap
stop() {
    ((STOPPED)) && return
    STOPPED=1
    if [[ ${#SUPERVISORS[@]} -gt 0 ]]; then
        say "stopping: each node hands its shards over as it stops (up to ~40 s)"
        kill -TERM "${SUPERVISORS[@]}" 2>/dev/null || true
        wait "${SUPERVISORS[@]}" 2>/dev/null || true
    fi
    if [[ -n "$NGINX_PID" ]]; then
        kill -TERM "$NGINX_PID" 2>/dev/null || true
        wait "$NGINX_PID" 2>/dev/null || true
    fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rm -f "$DIR"/node*.failed "$DIR"/node*.pid
for i in 1 2 3; do
    printf '[cluster.sh] %s: starting node%s on 127.0.0.1:%s\n' "$(date '+%F %T')" "$i" $((PORT + i)) >"$DIR/node$i.log"
    supervise "$i" $((PORT + i)) &
    SUPERVISORS+=($!)
done

# ---------------------------------------------------------------- 4. NGINX, readiness

# The shipped config, with the upstream on loopback and its paths under $DIR.
sed -e "s#server shers-1:8080#server 127.0.0.1:$((PORT + 1))#" \
    -e "s#server shers-2:8080#server 127.0.0.1:$((PORT + 2))#" \
    -e "s#server shers-3:8080#server 127.0.0.1:$((PORT + 3))#" \
    -e "s#listen 80;#listen 127.0.0.1:$PORT;#" \
    -e "s#/var/log/nginx/shers.access.log#$DIR/nginx-access.log#" \
    deploy/nginx/shers.conf >"$DIR/shers.conf"
grep -q "server 127.0.0.1:$((PORT + 3))" "$DIR/shers.conf" ||
    fail "deploy/nginx/shers.conf no longer lists shers-1..3:8080; update the sed above"
cat >"$DIR/nginx.conf" <<CONF
# Written by scripts/cluster.sh: NGINX for a trial cluster on loopback, as the invoking user.
worker_processes 1;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log error;
events { worker_connections 4096; }
http {
    # Everything under $DIR; request bodies up to the shipped 1m limit stay in memory and
    # responses are never spooled to disk, so the workers need no writable directory.
    client_body_temp_path $DIR/nginx-body;
    proxy_temp_path $DIR/nginx-proxy;
    fastcgi_temp_path $DIR/nginx-fastcgi;
    uwsgi_temp_path $DIR/nginx-uwsgi;
    scgi_temp_path $DIR/nginx-scgi;
    client_body_buffer_size 1m;
    proxy_max_temp_file_size 0;
    include $DIR/shers.conf;
}
CONF
nginx_args=(-p "$DIR" -c "$DIR/nginx.conf")
# -e (NGINX 1.19.5+) keeps it from opening the system error log before reading the config.
if "$NGINX" -h 2>&1 | grep -q -- '-e filename'; then nginx_args+=(-e "$DIR/nginx-error.log"); fi
"$NGINX" "${nginx_args[@]}" -t >"$DIR/nginx-test.log" 2>&1 ||
    { cat "$DIR/nginx-test.log" >&2; fail "NGINX refused the config $DIR/nginx.conf (above)"; }
"$NGINX" "${nginx_args[@]}" -g 'daemon off;' </dev/null &
NGINX_PID=$!

ready() { curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$1/readyz"; }
deadline=$((SECONDS + READY_TIMEOUT_S))
pending=(1 2 3 nginx)
while :; do
    still=()
    for what in "${pending[@]}"; do
        if [[ $what == nginx ]]; then port=$PORT; else port=$((PORT + what)); fi
        if [[ $what != nginx && -f "$DIR/node$what.failed" ]]; then
            tail -n 20 "$DIR/node$what.log" >&2
            fail "node$what does not start (its last log lines are above)"
        fi
        ready "$port" || still+=("$what")
    done
    pending=("${still[@]+"${still[@]}"}")
    [[ ${#pending[@]} -eq 0 ]] && break
    kill -0 "$NGINX_PID" 2>/dev/null || fail "NGINX exited: $(tail -n 5 "$DIR/nginx-error.log" 2>/dev/null)"
    if ((SECONDS >= deadline)); then
        for what in "${pending[@]}"; do
            if [[ $what == nginx ]]; then
                printf -- '--- NGINX (%s/nginx-error.log) ---\n' "$DIR" >&2
                tail -n 10 "$DIR/nginx-error.log" >&2 2>/dev/null || true
            else
                printf -- '--- node%s (%s/node%s.log) ---\n' "$what" "$DIR" "$what" >&2
                tail -n 20 "$DIR/node$what.log" >&2 || true
            fi
        done
        names=""
        for what in "${pending[@]}"; do
            if [[ $what == nginx ]]; then names+=" NGINX"; else names+=" node$what"; fi
        done
        fail "not ready after ${READY_TIMEOUT_S}s:$names (their last log lines are above)"
    fi
    sleep 0.5
done

# ---------------------------------------------------------------- 5. ready

cat <<EOF

SHERS cluster is ready: http://127.0.0.1:$PORT (NGINX) -> nodes on 127.0.0.1:$((PORT + 1))-$((PORT + 3))
  every node's /readyz and NGINX's answer 200
  $PAYMENTS_NOTE

admin token (a new one each start):
  $TOKEN
try it:
  curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:$PORT/admin/cluster
more tokens: name the cluster's database, or 'shers token create' writes ./data/shers.db
(SQLite), which the cluster never reads, and its token gets 401:
  $BIN --database-url '$DB' token create --role console --name me | tail -n 1

logs: $DIR/node{1,2,3}.log, nginx-access.log, nginx-error.log
node pids: $DIR/node{1,2,3}.pid; a failover drill:
  kill -9 \$(cat $DIR/node2.pid)   # its supervisor starts it again; the others take its shards within the lease (3 s)
Ctrl-C stops the cluster.
EOF

wait "$NGINX_PID" || true
say "NGINX exited ($(tail -n 1 "$DIR/nginx-error.log" 2>/dev/null)); stopping the nodes"
exit 1
