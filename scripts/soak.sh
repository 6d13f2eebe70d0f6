#!/usr/bin/env bash
# Run tests again and again beside CPU-bound neighbours: proof that they do not depend on an
# idle machine.
#
#   scripts/soak.sh timing [ROUNDS] [FILTER...]   the timing-dependent tests (TIMING below, or
#                                                  the FILTERs given), ROUNDS in a row (20)
#   scripts/soak.sh suite [ROUNDS]                 the whole suite (scripts/test.sh), ROUNDS in a
#                                                  row (3)
#
# SOAK_BURNERS (default 2) CPU-bound processes run beside every round. The first failing round
# ends the run (exit 1); each round's output is kept in target/soak/<mode>-<round>.log, and a
# line per round is appended to target/soak/summary.txt. Services are found as scripts/test.sh
# finds them (it runs every round).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The tests whose outcome depends on time: they wait on the product's own timers (offer expiry,
# escalation, fall grace, offline sweep, lease expiry, saga back-off), on other processes (a
# restarted or killed `shers serve`, a cluster, NGINX, a browser), or on delivery that is
# asynchronous to the request (WebSocket and SSE streams, notifications, the group-commit
# writer under concurrency, the buses' consumers and relay). Substring filters of `cargo test`.
TIMING=(
    amqp::
    amqp_relay::
    auth::acknowledged_tokens_survive_an_abrupt_stop
    billing::a_crash_after_the_charge_never_charges_twice
    billing::an_insurer_outage_is_retried_until_it_answers
    browser::the_dashboard_shows_a_new_emergency_live
    bus_restart::
    cluster::
    crash::
    demo::
    deploy::nginx_answers_problem_json_503
    dispatch::
    events::
    incidents::a_crashed_incident_actor_comes_back_with_its_state
    incidents::concurrent_readings_and_requests_make_one_incident
    incidents::open_incidents_survive_an_abrupt_stop
    loadgen::
    mqtt::
    notifications::
    ops::emergencies_open_incidents_again_after_a_postgres_outage
    ops::readyz_follows_a_postgres_outage_through_a_proxy
    persistence::concurrent_appenders_exactly_one_wins
    persistence::group_commit_
    persistence::sequence_is_gap_free_under_concurrency
    vitals::a_device_takes_readings_while_its_emergency_is_dispatched
    vitals::a_fall_cancel_
    vitals::a_running_fall_watch_escalates_after_a_restart
    vitals::a_silent_device_goes_offline_on_time_after_a_restart
    vitals::fall_
    vitals::gateway_websocket_round_trip
    vitals::movement_in_the_same_second_as_the_fall_stands_it_down
    vitals::silent_devices_go_offline_and_come_back
)

mode=${1:-}
case "$mode" in
timing) rounds=${2:-20} ;;
suite) rounds=${2:-3} ;;
*)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
shift $(($# < 2 ? $# : 2))
filters=("$@")
if [[ $mode == timing && ${#filters[@]} -eq 0 ]]; then
    filters=("${TIMING[@]}")
fi

out=target/soak
mkdir -p "$out"
burners=()
stop_burners() {
    for pid in "${burners[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}
trap stop_burners EXIT
for ((i = 0; i < ${SOAK_BURNERS:-2}; i++)); do
    (while :; do :; done) &
    burners+=($!)
done

# Build first, outside the rounds, so a round's time is the tests' own.
cargo test --locked --workspace --no-run --all-targets >/dev/null 2>&1 ||
    cargo test --locked --workspace --no-run --all-targets

for ((round = 1; round <= rounds; round++)); do
    log="$out/$mode-$round.log"
    started=$SECONDS
    rc=0
    if [[ $mode == suite ]]; then
        CI=true scripts/test.sh >"$log" 2>&1 || rc=$?
    else
        CI=true scripts/test.sh --test api -- "${filters[@]}" >"$log" 2>&1 || rc=$?
    fi
    passed=$(grep -o '[0-9]* passed' "$log" | awk '{s += $1} END {print s + 0}')
    line="$(date -u +%FT%TZ) $mode round $round/$rounds: exit $rc, $passed tests passed, $((SECONDS - started)) s, load $(cut -d' ' -f1-3 /proc/loadavg), head $(git rev-parse --short HEAD)"
    echo "$line" | tee -a "$out/summary.txt"
    if [[ $rc -ne 0 ]]; then
        grep -E '^test .* FAILED$|panicked at' "$log" | head -20 >&2 || true
        echo "round $round failed: $log" >&2
        exit 1
    fi
done
echo "$mode: $rounds rounds in a row passed beside ${SOAK_BURNERS:-2} CPU-bound processes"
