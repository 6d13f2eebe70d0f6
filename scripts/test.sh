#!/usr/bin/env bash
# Run the SHERS test suite (unit + integration) on a fresh machine.
#
#   scripts/test.sh [extra cargo test args...]     e.g. scripts/test.sh -- --nocapture
#
# The tests need PostgreSQL and Redis. This script finds them, in this order:
#   PostgreSQL: $SHERS_TEST_DATABASE_URL (a maintenance DB of a role allowed to CREATE DATABASE)
#               -> a server already answering on 127.0.0.1:5432 (as user postgres, then as you)
#               -> a throwaway cluster (initdb + pg_ctl) in a temp dir on a random port
#   Redis:      $SHERS_TEST_REDIS_URL -> a server answering on 127.0.0.1:6379
#               -> a throwaway redis-server on a random port
#   RabbitMQ:   $SHERS_TEST_AMQP_URL -> a broker on 127.0.0.1:5672 (guest/guest)
#               -> a throwaway rabbitmq-server node on a random port
#   Mosquitto:  $SHERS_TEST_MQTT_URL -> a broker on 127.0.0.1:1883 (anonymous)
#               -> a throwaway mosquitto on a random port
#   moto:       $SHERS_TEST_MOTO_SERVER -> the CI tools environment (target/ci-tools/venv/bin/
#               moto_server, pinned, made by .ci/run) -> moto_server on the PATH; the SNS tests
#               start private servers from it (pip install 'moto[server]')
# Throwaway servers are stopped and deleted when the script exits.
# If a service cannot be found or started: with CI=true the script fails; otherwise it says what
# to install and runs the tests with SHERS_TEST_SKIP_POSTGRES=1 / SHERS_TEST_SKIP_REDIS=1 /
# SHERS_TEST_SKIP_AMQP=1 / SHERS_TEST_SKIP_MQTT=1.
#
# Knobs (mostly for testing this script): SHERS_TEST_PG_PORT (default 5432),
# SHERS_TEST_REDIS_PORT (default 6379), SHERS_TEST_AMQP_PORT (default 5672) and
# SHERS_TEST_MQTT_PORT (default 1883) are the ports probed for already-running servers.
# The exit code is cargo's.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PG_PROBE_PORT="${SHERS_TEST_PG_PORT:-5432}"
REDIS_PROBE_PORT="${SHERS_TEST_REDIS_PORT:-6379}"
AMQP_PROBE_PORT="${SHERS_TEST_AMQP_PORT:-5672}"
MQTT_PROBE_PORT="${SHERS_TEST_MQTT_PORT:-1883}"

PG_TMP=""        # temp dir of a throwaway PostgreSQL cluster (if we started one)
PG_BIN=""        # directory holding its initdb/pg_ctl
PG_RUN_AS=""     # OS user that owns it (when we are root)
REDIS_TMP=""     # temp dir of a throwaway redis-server (if we started one)
RABBIT_TMP=""    # temp dir of a throwaway RabbitMQ node (if we started one)
RABBIT_NODE=""   # its node name
MQTT_TMP=""      # temp dir of a throwaway mosquitto (if we started one)
CI_VENV=target/ci-tools/venv  # where .ci/run installs its Python tools (moto among them)

log() { printf '[test.sh] %s\n' "$*" >&2; }

is_ci() { [[ "${CI:-}" == "true" || "${CI:-}" == "1" ]]; }

# Print a URL with any password replaced by ***.
redact() { printf '%s\n' "$1" | sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#'; }

# Run a command with a time limit when `timeout` exists (it does not on stock macOS).
with_timeout() {
    local secs=$1
    shift
    if command -v timeout >/dev/null 2>&1; then
        timeout "$secs" "$@"
    else
        "$@"
    fi
}

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    # shellcheck disable=SC2016  # $1 is expanded by the inner bash, on purpose
    with_timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# A random TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
    local port
    for _ in $(seq 1 50); do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        if ! port_open "$port"; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    return 1
}

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    if [[ -n "$RABBIT_TMP" ]]; then
        RABBITMQ_MNESIA_BASE="$RABBIT_TMP/mnesia" RABBITMQ_LOG_BASE="$RABBIT_TMP/log" \
            with_timeout 60 rabbitmqctl -n "$RABBIT_NODE" stop >/dev/null 2>&1 || true
        rm -rf "$RABBIT_TMP"
        log "stopped and removed the throwaway RabbitMQ"
    fi
    if [[ -n "$MQTT_TMP" ]]; then
        if [[ -f "$MQTT_TMP/mosquitto.pid" ]]; then
            kill "$(cat "$MQTT_TMP/mosquitto.pid")" 2>/dev/null || true
        fi
        rm -rf "$MQTT_TMP"
        log "stopped and removed the throwaway Mosquitto"
    fi
    if [[ -n "$REDIS_TMP" ]]; then
        if [[ -f "$REDIS_TMP/redis.pid" ]]; then
            local pid
            pid=$(cat "$REDIS_TMP/redis.pid" 2>/dev/null || true)
            if [[ -n "$pid" ]]; then
                kill "$pid" 2>/dev/null || true
                for _ in $(seq 1 50); do
                    kill -0 "$pid" 2>/dev/null || break
                    sleep 0.1
                done
            fi
        fi
        rm -rf "$REDIS_TMP"
        log "stopped and removed the throwaway Redis"
    fi
    if [[ -n "$PG_TMP" ]]; then
        if [[ -f "$PG_TMP/data/postmaster.pid" ]]; then
            (cd "$PG_TMP" && as_pg_user "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m immediate -w -t 30 stop) \
                >/dev/null 2>&1 || true
        fi
        rm -rf "$PG_TMP"
        log "stopped and removed the throwaway PostgreSQL"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- PostgreSQL

# Run a command as the OS user owning the throwaway cluster (initdb refuses to run as root).
as_pg_user() {
    if [[ -z "$PG_RUN_AS" ]]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$PG_RUN_AS" -- "$@"
    else
        # su needs a single command string; quote every argument.
        su "$PG_RUN_AS" -s /bin/sh -c "$(printf '%q ' "$@")"
    fi
}

# Does the server on 127.0.0.1:$PG_PROBE_PORT let $1 in without a password, with CREATEDB?
pg_user_ok() {
    local user=$1 out
    out=$(PGCONNECT_TIMEOUT=3 with_timeout 10 psql -X -w -q -At -h 127.0.0.1 -p "$PG_PROBE_PORT" \
        -U "$user" -d postgres \
        -c 'select rolsuper or rolcreatedb from pg_roles where rolname = current_user' 2>/dev/null) || return 1
    [[ "$out" == "t" ]]
}

find_pg_bin() {
    local dir candidates=()
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dir=$(dirname "$(command -v initdb)")
        # Debian symlinks /usr/local/bin/initdb etc.; resolve so pg_ctl finds its postgres binary.
        if command -v readlink >/dev/null 2>&1 && readlink -f "$dir/initdb" >/dev/null 2>&1; then
            dir=$(dirname "$(readlink -f "$dir/initdb")")
        fi
        if [[ -x "$dir/pg_ctl" ]]; then candidates+=("$dir"); fi
    fi
    # Newest version first: Debian/Ubuntu, RHEL, Homebrew (Apple silicon and Intel).
    local d
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin /usr/pgsql-*/bin /opt/homebrew/opt/postgresql@*/bin \
        /usr/local/opt/postgresql@*/bin | sort -rV); do
        if [[ -d "$d" ]]; then candidates+=("$d"); fi
    done
    for d in "${candidates[@]+"${candidates[@]}"}"; do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
            printf '%s\n' "$d"
            return 0
        fi
    done
    return 1
}

start_throwaway_pg() {
    PG_BIN=$(find_pg_bin) || return 1
    if [[ $(id -u) -eq 0 ]]; then
        if getent passwd postgres >/dev/null 2>&1; then
            PG_RUN_AS=postgres
        elif getent passwd nobody >/dev/null 2>&1; then
            PG_RUN_AS=nobody
        else
            log "running as root and there is no 'postgres' or 'nobody' user to run initdb as"
            return 1
        fi
        if ! command -v runuser >/dev/null 2>&1 && ! command -v su >/dev/null 2>&1; then
            log "running as root and neither runuser nor su exists to drop privileges for initdb"
            return 1
        fi
    fi
    # Short path under /tmp: the Unix socket lives here too (path length limit ~100 bytes).
    PG_TMP=$(mktemp -d /tmp/shers-pg.XXXXXX)
    if [[ -n "$PG_RUN_AS" ]]; then
        chown "$PG_RUN_AS" "$PG_TMP"
    fi
    log "starting a throwaway PostgreSQL from $PG_BIN in $PG_TMP${PG_RUN_AS:+ (as $PG_RUN_AS)}"
    if ! (cd "$PG_TMP" && as_pg_user "$PG_BIN/initdb" -D "$PG_TMP/data" -U postgres -A trust \
        -E UTF8 --locale=C --no-sync >"$PG_TMP/initdb.log" 2>&1); then
        log "initdb failed:"
        cat "$PG_TMP/initdb.log" >&2
        return 1
    fi
    local port attempt
    for attempt in 1 2 3; do
        port=$(free_port) || return 1
        if (cd "$PG_TMP" && as_pg_user "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/postgres.log" \
            -w -t 30 -o "-p $port -c listen_addresses=127.0.0.1 -k $PG_TMP -F -c max_connections=200 -c synchronous_commit=off -c full_page_writes=off" \
            start >/dev/null 2>&1); then
            export SHERS_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
            return 0
        fi
        log "throwaway PostgreSQL did not start on port $port (attempt $attempt); log tail:"
        tail -n 5 "$PG_TMP/postgres.log" >&2 || true
    done
    return 1
}

setup_postgres() {
    if [[ -n "${SHERS_TEST_DATABASE_URL:-}" ]]; then
        PG_SOURCE="given by SHERS_TEST_DATABASE_URL"
        return 0
    fi
    if [[ "${SHERS_TEST_SKIP_POSTGRES:-}" == "1" ]] && ! is_ci; then
        PG_SOURCE="skipped (SHERS_TEST_SKIP_POSTGRES=1)"
        return 0
    fi
    # 1. A server that is already running.
    local answered=no
    if command -v pg_isready >/dev/null 2>&1; then
        if pg_isready -q -h 127.0.0.1 -p "$PG_PROBE_PORT" -t 3; then answered=yes; fi
    elif port_open "$PG_PROBE_PORT"; then
        answered=yes
    fi
    if [[ $answered == yes ]]; then
        if command -v psql >/dev/null 2>&1; then
            local user me
            me=$(id -un)
            for user in postgres "$me"; do
                if pg_user_ok "$user"; then
                    export SHERS_TEST_DATABASE_URL="postgres://$user@127.0.0.1:$PG_PROBE_PORT/postgres"
                    PG_SOURCE="already running on 127.0.0.1:$PG_PROBE_PORT"
                    return 0
                fi
            done
            log "a PostgreSQL server answers on 127.0.0.1:$PG_PROBE_PORT, but neither 'postgres' nor '$me'" \
                "can log in without a password and create databases; set SHERS_TEST_DATABASE_URL to use it."
        else
            export SHERS_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PROBE_PORT/postgres"
            PG_SOURCE="already running on 127.0.0.1:$PG_PROBE_PORT (psql not installed, login not checked)"
            return 0
        fi
    fi
    # 2. A throwaway cluster from the installed binaries.
    if start_throwaway_pg; then
        PG_SOURCE="throwaway cluster in $PG_TMP"
        return 0
    fi
    # 3. Nothing.
    if is_ci; then
        log "ERROR: CI=true and no PostgreSQL is available: SHERS_TEST_DATABASE_URL is unset, nothing" \
            "usable answers on 127.0.0.1:$PG_PROBE_PORT, and no initdb/pg_ctl could start a throwaway cluster."
        log "Install it (Debian/Ubuntu: apt-get install postgresql) or set SHERS_TEST_DATABASE_URL."
        exit 1
    fi
    cat >&2 <<'EOF'
[test.sh] WARNING: no PostgreSQL found; the PostgreSQL tests will be SKIPPED (SQLite only).
[test.sh]   Debian/Ubuntu: sudo apt-get install postgresql
[test.sh]   macOS:         brew install postgresql@16
[test.sh]   (this script then starts a throwaway cluster by itself)
[test.sh]   or point SHERS_TEST_DATABASE_URL at a server, e.g. postgres://postgres@127.0.0.1:5432/postgres
EOF
    export SHERS_TEST_SKIP_POSTGRES=1
    PG_SOURCE="none (PostgreSQL tests skipped)"
}

# ---------------------------------------------------------------- Redis

# True if a Redis server on 127.0.0.1:$1 answers PING.
redis_ping() {
    local port=$1
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(with_timeout 3 redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" == "PONG" ]]
    else
        # Speak RESP over bash's /dev/tcp.
        # shellcheck disable=SC2016  # $1 is expanded by the inner bash, on purpose
        with_timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
            printf "PING\r\n" >&3
            IFS= read -r -t 2 line <&3 || exit 1
            [[ "$line" == "+PONG"* ]]' _ "$port" 2>/dev/null
    fi
}

find_redis_server() {
    local c
    if command -v redis-server >/dev/null 2>&1; then
        command -v redis-server
        return 0
    fi
    for c in /usr/bin/redis-server /usr/sbin/redis-server /usr/local/bin/redis-server \
        /opt/homebrew/bin/redis-server; do
        if [[ -x "$c" ]]; then
            printf '%s\n' "$c"
            return 0
        fi
    done
    return 1
}

start_throwaway_redis() {
    local server port attempt
    server=$(find_redis_server) || return 1
    REDIS_TMP=$(mktemp -d /tmp/shers-redis.XXXXXX)
    for attempt in 1 2 3; do
        port=$(free_port) || return 1
        log "starting a throwaway Redis ($server) on 127.0.0.1:$port in $REDIS_TMP"
        rm -f "$REDIS_TMP/redis.pid"
        if "$server" --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
            --pidfile "$REDIS_TMP/redis.pid" --dir "$REDIS_TMP" --logfile "$REDIS_TMP/redis.log" >/dev/null 2>&1; then
            for _ in $(seq 1 50); do
                if redis_ping "$port"; then
                    export SHERS_TEST_REDIS_URL="redis://127.0.0.1:$port/"
                    return 0
                fi
                sleep 0.1
            done
        fi
        log "throwaway Redis did not start on port $port (attempt $attempt); log tail:"
        tail -n 5 "$REDIS_TMP/redis.log" >&2 2>/dev/null || true
        if [[ -f "$REDIS_TMP/redis.pid" ]]; then
            kill "$(cat "$REDIS_TMP/redis.pid")" 2>/dev/null || true
        fi
    done
    return 1
}

setup_redis() {
    if [[ -n "${SHERS_TEST_REDIS_URL:-}" ]]; then
        REDIS_SOURCE="given by SHERS_TEST_REDIS_URL"
        return 0
    fi
    if [[ "${SHERS_TEST_SKIP_REDIS:-}" == "1" ]] && ! is_ci; then
        REDIS_SOURCE="skipped (SHERS_TEST_SKIP_REDIS=1)"
        return 0
    fi
    if redis_ping "$REDIS_PROBE_PORT"; then
        export SHERS_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PROBE_PORT/"
        REDIS_SOURCE="already running on 127.0.0.1:$REDIS_PROBE_PORT"
        return 0
    fi
    if start_throwaway_redis; then
        REDIS_SOURCE="throwaway server in $REDIS_TMP"
        return 0
    fi
    if is_ci; then
        log "ERROR: CI=true and no Redis is available: SHERS_TEST_REDIS_URL is unset, nothing answers" \
            "PING on 127.0.0.1:$REDIS_PROBE_PORT, and no redis-server could be started."
        log "Install it (Debian/Ubuntu: apt-get install redis-server) or set SHERS_TEST_REDIS_URL."
        exit 1
    fi
    cat >&2 <<'EOF'
[test.sh] WARNING: no Redis found; the Redis (multi-node) tests will be SKIPPED.
[test.sh]   Debian/Ubuntu: sudo apt-get install redis-server
[test.sh]   macOS:         brew install redis
[test.sh]   (this script then starts a throwaway server by itself)
[test.sh]   or point SHERS_TEST_REDIS_URL at a server, e.g. redis://127.0.0.1:6379/
EOF
    export SHERS_TEST_SKIP_REDIS=1
    REDIS_SOURCE="none (Redis tests skipped)"
}

# ---------------------------------------------------------------- RabbitMQ and Mosquitto

# The path of an installed program, also in sbin directories a user's PATH may lack.
find_program() {
    local c
    if command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
        return 0
    fi
    for c in "/usr/sbin/$1" "/usr/local/sbin/$1" "/opt/homebrew/sbin/$1" "/opt/homebrew/opt/rabbitmq/sbin/$1"; do
        if [[ -x "$c" ]]; then
            printf '%s\n' "$c"
            return 0
        fi
    done
    return 1
}

start_throwaway_rabbitmq() {
    local server port
    server=$(find_program rabbitmq-server) || return 1
    port=$(free_port) || return 1
    RABBIT_TMP=$(mktemp -d /tmp/shers-rabbit.XXXXXX)
    # The server may drop to its own user (Debian's does): it must write here.
    chmod 777 "$RABBIT_TMP"
    # Its own config file, so a system-wide one (e.g. listeners.tcp on 5672) does not apply.
    printf 'listeners.tcp.local = 127.0.0.1:%s\n' "$port" >"$RABBIT_TMP/rabbitmq.conf"
    chmod 644 "$RABBIT_TMP/rabbitmq.conf"
    RABBIT_NODE="shers-test-$$@localhost"
    log "starting a throwaway RabbitMQ node $RABBIT_NODE ($server) on 127.0.0.1:$port"
    if ! RABBITMQ_NODENAME="$RABBIT_NODE" RABBITMQ_CONFIG_FILE="$RABBIT_TMP/rabbitmq.conf" \
        RABBITMQ_DIST_PORT=$((port + 20000)) RABBITMQ_MNESIA_BASE="$RABBIT_TMP/mnesia" \
        RABBITMQ_LOG_BASE="$RABBIT_TMP/log" "$server" -detached >/dev/null 2>&1; then
        return 1
    fi
    for _ in $(seq 1 120); do
        if port_open "$port"; then
            export SHERS_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:$port/%2f"
            return 0
        fi
        sleep 0.5
    done
    log "throwaway RabbitMQ did not open port $port within 60 s"
    return 1
}

setup_amqp() {
    if [[ -n "${SHERS_TEST_AMQP_URL:-}" ]]; then
        AMQP_SOURCE="given by SHERS_TEST_AMQP_URL"
        return 0
    fi
    if [[ "${SHERS_TEST_SKIP_AMQP:-}" == "1" ]] && ! is_ci; then
        AMQP_SOURCE="skipped (SHERS_TEST_SKIP_AMQP=1)"
        return 0
    fi
    if port_open "$AMQP_PROBE_PORT"; then
        export SHERS_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PROBE_PORT/%2f"
        AMQP_SOURCE="already running on 127.0.0.1:$AMQP_PROBE_PORT"
        return 0
    fi
    if start_throwaway_rabbitmq; then
        AMQP_SOURCE="throwaway node in $RABBIT_TMP"
        return 0
    fi
    if is_ci; then
        log "ERROR: CI=true and no RabbitMQ is available (SHERS_TEST_AMQP_URL unset, nothing on" \
            "127.0.0.1:5672, no rabbitmq-server to start). Debian/Ubuntu: apt-get install rabbitmq-server"
        exit 1
    fi
    log "WARNING: no RabbitMQ found; the AMQP tests will be SKIPPED (apt-get install rabbitmq-server," \
        "or set SHERS_TEST_AMQP_URL)"
    export SHERS_TEST_SKIP_AMQP=1
    AMQP_SOURCE="none (AMQP tests skipped)"
}

start_throwaway_mosquitto() {
    local server port attempt
    server=$(find_program mosquitto) || return 1
    MQTT_TMP=$(mktemp -d /tmp/shers-mqtt.XXXXXX)
    # Started as root, mosquitto drops to its own user, which writes the pid file here.
    chmod 777 "$MQTT_TMP"
    for attempt in 1 2 3; do
        port=$(free_port) || return 1
        printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\npid_file %s\n' \
            "$port" "$MQTT_TMP/mosquitto.pid" >"$MQTT_TMP/mosquitto.conf"
        log "starting a throwaway Mosquitto ($server) on 127.0.0.1:$port"
        "$server" -d -c "$MQTT_TMP/mosquitto.conf" >/dev/null 2>&1 || true
        for _ in $(seq 1 50); do
            if port_open "$port"; then
                export SHERS_TEST_MQTT_URL="mqtt://127.0.0.1:$port"
                return 0
            fi
            sleep 0.1
        done
        log "throwaway Mosquitto did not start on port $port (attempt $attempt)"
    done
    return 1
}

setup_mqtt() {
    if [[ -n "${SHERS_TEST_MQTT_URL:-}" ]]; then
        MQTT_SOURCE="given by SHERS_TEST_MQTT_URL"
        return 0
    fi
    if [[ "${SHERS_TEST_SKIP_MQTT:-}" == "1" ]] && ! is_ci; then
        MQTT_SOURCE="skipped (SHERS_TEST_SKIP_MQTT=1)"
        return 0
    fi
    if port_open "$MQTT_PROBE_PORT"; then
        export SHERS_TEST_MQTT_URL="mqtt://127.0.0.1:$MQTT_PROBE_PORT"
        MQTT_SOURCE="already running on 127.0.0.1:$MQTT_PROBE_PORT"
        return 0
    fi
    if start_throwaway_mosquitto; then
        MQTT_SOURCE="throwaway broker in $MQTT_TMP"
        return 0
    fi
    if is_ci; then
        log "ERROR: CI=true and no MQTT broker is available (SHERS_TEST_MQTT_URL unset, nothing on" \
            "127.0.0.1:1883, no mosquitto to start). Debian/Ubuntu: apt-get install mosquitto mosquitto-clients"
        exit 1
    fi
    log "WARNING: no MQTT broker found; the MQTT tests will be SKIPPED (apt-get install mosquitto" \
        "mosquitto-clients, or set SHERS_TEST_MQTT_URL)"
    export SHERS_TEST_SKIP_MQTT=1
    MQTT_SOURCE="none (MQTT tests skipped)"
}

# ---------------------------------------------------------------- moto (Amazon SNS)

setup_moto() {
    if [[ -n "${SHERS_TEST_MOTO_SERVER:-}" ]]; then
        MOTO_SOURCE="given by SHERS_TEST_MOTO_SERVER"
        return 0
    fi
    # The pinned one .ci/run installs first; a PATH entry only if it runs (a pyenv shim may
    # name a program the active Python lacks).
    local found=""
    if [[ -x "$CI_VENV/bin/moto_server" ]]; then
        found="$PWD/$CI_VENV/bin/moto_server"
    elif command -v moto_server >/dev/null 2>&1 &&
        with_timeout 30 moto_server --help >/dev/null 2>&1; then
        found=$(command -v moto_server)
    fi
    if [[ -n "$found" ]]; then
        export SHERS_TEST_MOTO_SERVER="$found"
        MOTO_SOURCE="found"
        return 0
    fi
    if is_ci; then
        log "ERROR: CI=true and no moto_server is available (SHERS_TEST_MOTO_SERVER unset, none on" \
            "the PATH or in $CI_VENV). .ci/run installs it; or: pip install 'moto[server]'"
        exit 1
    fi
    log "WARNING: no moto_server found; the SNS tests will be SKIPPED (pip install 'moto[server]'," \
        "or set SHERS_TEST_MOTO_SERVER)"
    MOTO_SOURCE="none (SNS tests skipped)"
}

# ---------------------------------------------------------------- main

PG_SOURCE=""
REDIS_SOURCE=""
AMQP_SOURCE=""
MQTT_SOURCE=""
MOTO_SOURCE=""
if is_ci; then
    # In CI a missing service is a failure, never a skip.
    unset SHERS_TEST_SKIP_POSTGRES SHERS_TEST_SKIP_REDIS SHERS_TEST_SKIP_AMQP SHERS_TEST_SKIP_MQTT
fi
setup_postgres
setup_redis
setup_amqp
setup_mqtt
setup_moto

log "PostgreSQL: ${SHERS_TEST_DATABASE_URL:+$(redact "$SHERS_TEST_DATABASE_URL")  }[$PG_SOURCE]"
log "Redis:      ${SHERS_TEST_REDIS_URL:+$(redact "$SHERS_TEST_REDIS_URL")  }[$REDIS_SOURCE]"
log "RabbitMQ:   ${SHERS_TEST_AMQP_URL:+$(redact "$SHERS_TEST_AMQP_URL")  }[$AMQP_SOURCE]"
log "Mosquitto:  ${SHERS_TEST_MQTT_URL:+$(redact "$SHERS_TEST_MQTT_URL")  }[$MQTT_SOURCE]"
log "moto:       ${SHERS_TEST_MOTO_SERVER:+$SHERS_TEST_MOTO_SERVER  }[$MOTO_SOURCE]"
# --workspace: the test support crate (crates/test-support) has tests of its own.
log "running: cargo test --locked --workspace $*"

rc=0
cargo test --locked --workspace "$@" || rc=$?
exit "$rc"
