#!/usr/bin/env bash
# Proves the deployment recipes of the README by running them:
#   0. tools      podman, buildah, debootstrap, runc, systemd, shellcheck (apt-get)
#   1. lint       hadolint on the Dockerfile and the systemd test image, shellcheck
#   2. images     the Dockerfile's image, and a systemd image with the unit installed
#   3. unit       `systemd-analyze verify` prints nothing; security exposure <= 2.0
#   4. container  the image with a spool at /data: a dropped prediction is
#                 converted, `niftidrop health` passes, `podman stop` is clean
#   5. compose    deploy/compose.yaml: two instances on one spool, one killed with
#                 SIGKILL while inputs flow; every input converted exactly once
#   6. systemd    the unit under real systemd (PID 1 of a container): active,
#                 converts, hardening in force, clean stop, watchdog restarts
# No Docker engine is needed: podman (rootful, runc) builds and runs everything,
# and the base image is made with debootstrap from the host's Debian mirror.
# Run as root on Debian; what is missing is installed with apt-get. Every check
# fails loudly; none is skipped. Called by .ci/run and `make deploy-check`.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
# shellcheck source=deploy/lib.sh
source deploy/lib.sh

VENV="${DEPLOY_CHECK_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
[[ -x "$PY" ]] || fail "no $PY: run \`make test\` (or \`make deploy-check\`) first, it creates .venv"
FIXTURE=("$PY" "$REPO/deploy/spool_fixture.py")
FIXTURE_IN_CONTAINER=/opt/ci/spool_fixture.py

WORK="$(mktemp -d /var/tmp/niftidrop-deploy.XXXXXX)"
export CONTAINERS_CONF="$WORK/containers.conf"

cleanup() {
    podman rm --force --ignore --time 0 "$APP_CONTAINER" "$SYSTEMD_CONTAINER" >/dev/null 2>&1 || true
    podman ps --all --quiet --filter "label=io.podman.compose.project=${COMPOSE_PROJECT}" |
        xargs --no-run-if-empty podman rm --force --time 0 >/dev/null 2>&1 || true
    podman network rm --force "${COMPOSE_PROJECT}_default" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

TIMINGS=()
# run_step NAME FUNCTION: run one check, print how long it took.
run_step() {
    local name="$1" started=$SECONDS
    echo "==> ${name}"
    "$2"
    TIMINGS+=("$(printf '%-10s %4d s' "$name" $((SECONDS - started)))")
    echo "==> ${name}: ok ($((SECONDS - started)) s)"
}

step_lint() {
    if [[ ! -x "$VENV/bin/hadolint" ]]; then
        log "installing hadolint into ${VENV} (extra 'deploy')"
        "$VENV/bin/pip" install --quiet -e ".[deploy]" || fail "pip install -e .[deploy]"
    fi
    "$VENV/bin/hadolint" Dockerfile deploy/systemd-test/Containerfile ||
        fail "hadolint found problems in the Dockerfiles"
    shellcheck --external-sources deploy/*.sh || fail "shellcheck found problems in deploy/"
}

step_images() {
    ensure_base_image "$WORK/debootstrap.log"
    local ca pip_args=()
    ca="$(host_ca_bundle)"
    mapfile -t pip_args < <(host_pip_build_args)
    # The host's CA bundle and pip settings exist during the build only.
    podman build --pull=never --format docker --quiet \
        --volume "${ca}:/etc/ssl/certs/ca-certificates.crt:ro" \
        --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt "${pip_args[@]}" \
        --tag "$APP_IMAGE" . >"$WORK/build-app.log" 2>&1 ||
        { tail -n 30 "$WORK/build-app.log" >&2; fail "podman build of the Dockerfile"; }
    local context="$WORK/systemd-context"
    mkdir -p "$context"
    cp systemd/niftidrop.service systemd/niftidrop.toml "$context/"
    podman build --pull=never --format docker --quiet \
        --build-arg "APP_IMAGE=$APP_IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --file deploy/systemd-test/Containerfile \
        --tag "$SYSTEMD_IMAGE" "$context" >"$WORK/build-systemd.log" 2>&1 ||
        { tail -n 30 "$WORK/build-systemd.log" >&2; fail "podman build of the systemd test image"; }
    # Rebuilds leave the previous, now untagged, images behind.
    podman image prune --force >/dev/null
    IMAGE_MB="$(podman image inspect --format '{{.Size}}' "$APP_IMAGE" | awk '{printf "%.0f", $1 / 1e6}')"
    log "image ${APP_IMAGE}: ${IMAGE_MB} MB"
}

step_unit() {
    # Verified where niftidrop is installed, so ExecStart= is checked too.
    local output
    output="$(podman run --rm "$SYSTEMD_IMAGE" \
        systemd-analyze verify /etc/systemd/system/niftidrop.service 2>&1)" ||
        fail "systemd-analyze verify exited non-zero: ${output}"
    [[ -z "$output" ]] || fail "systemd-analyze verify printed: ${output}"
    local report
    report="$(SYSTEMD_COLORS=0 SYSTEMD_URLIFY=0 systemd-analyze security --offline=yes \
        --no-pager systemd/niftidrop.service 2>&1)" || true
    EXPOSURE="$(sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p' <<<"$report")"
    [[ -n "$EXPOSURE" ]] || fail "no exposure level in systemd-analyze security output: ${report}"
    awk -v exposure="$EXPOSURE" 'BEGIN { exit !(exposure <= 2.0) }' ||
        fail "security exposure ${EXPOSURE}, expected at most 2.0"
    log "systemd-analyze verify: clean; security exposure ${EXPOSURE}"
}

# app_logs: the container's stdout (the JSON log), without podman's stderr.
app_logs() {
    podman logs "$APP_CONTAINER" 2>/dev/null
}

app_has_event() {
    app_logs | "${FIXTURE[@]}" has-event "$1"
}

step_container() {
    local spool="$WORK/spool"
    mkdir -p "$spool/inbox" "$spool/library"
    "${FIXTURE[@]}" reference "$spool/library" >/dev/null
    chown -R "$APP_UID:$APP_UID" "$spool"
    # No systemd on the host to schedule health checks: `podman healthcheck run`
    # below runs the image's HEALTHCHECK by hand instead.
    podman run --detach --name "$APP_CONTAINER" --volume "$spool:/data" \
        --volume "$REPO/deploy/spool_fixture.py:$FIXTURE_IN_CONTAINER:ro" \
        --health-interval disable --env NIFTIDROP_METRICS_ADDRESS=0.0.0.0:9464 \
        --env NIFTIDROP_HEARTBEAT_INTERVAL=1 --env NIFTIDROP_SETTLE_SECONDS=0.2 \
        "$APP_IMAGE" >/dev/null 2>"$WORK/run-app.log" ||
        { cat "$WORK/run-app.log" >&2; fail "podman run ${APP_IMAGE}"; }
    wait_for "$WAIT_SECONDS" "service_ready in the container's log" app_has_event service_ready
    # The producer runs with the container's uid, as the README recommends.
    "${FIXTURE[@]}" drop "$spool/inbox" "$APP_UID:$APP_UID" 0644 >/dev/null
    wait_for "$WAIT_SECONDS" "outbox/case001_pred.nii.gz" test -f "$spool/outbox/case001_pred.nii.gz"
    "${FIXTURE[@]}" verify "$spool/outbox/case001_pred.nii.gz" "$spool/library/case001.nii.gz" ||
        fail "the container's output does not match the prediction and its reference"
    wait_for "$WAIT_SECONDS" "archive/case001_pred.npy" test -f "$spool/archive/case001_pred.npy"
    app_has_event input_converted || fail "no input_converted in the container's log"
    podman exec "$APP_CONTAINER" niftidrop health || fail "niftidrop health inside the container"
    podman exec "$APP_CONTAINER" python "$FIXTURE_IN_CONTAINER" scrape http://127.0.0.1:9464 ||
        fail "the metrics endpoint inside the container"
    podman healthcheck run "$APP_CONTAINER" || fail "the image's HEALTHCHECK"
    podman stop --time 40 "$APP_CONTAINER" >/dev/null 2>>"$WORK/run-app.log" || fail "podman stop"
    local status
    status="$(podman inspect --format '{{.State.ExitCode}}' "$APP_CONTAINER")"
    [[ "$status" == 0 ]] || { app_logs | tail -n 20 >&2; fail "exit code ${status} after podman stop, expected 0"; }
    app_has_event service_stopped || fail "no service_stopped in the log after podman stop"
    log "converted, healthy, stopped with exit code 0"
}

# compose ARGS: podman-compose on deploy/compose.yaml, as this run's project.
compose() {
    podman-compose --project-name "$COMPOSE_PROJECT" --file "$REPO/deploy/compose.yaml" "$@"
}

container_has_event() {
    podman logs "$1" 2>/dev/null | "${FIXTURE[@]}" has-event "$2"
}

archived_at_least() {
    (($(find "$1/archive" -name '*.npy' | wc -l) >= $2))
}

# Two instances from deploy/compose.yaml on one spool; one container killed with
# SIGKILL while inputs flow: every input still converted exactly once.
step_compose() {
    local spool="$WORK/compose-spool" count=300
    local first="${COMPOSE_PROJECT}_niftidrop-1_1" second="${COMPOSE_PROJECT}_niftidrop-2_1"
    mkdir -p "$spool/inbox" "$spool/library"
    "${FIXTURE[@]}" reference "$spool/library" >/dev/null
    chown -R "$APP_UID:$APP_UID" "$spool"
    NIFTIDROP_IMAGE="$APP_IMAGE" NIFTIDROP_SPOOL="$spool" NIFTIDROP_LEASE_TIMEOUT=10 \
        compose up -d >"$WORK/compose.log" 2>&1 ||
        { tail -n 30 "$WORK/compose.log" >&2; fail "podman-compose up"; }
    wait_for "$WAIT_SECONDS" "service_ready from ${first}" container_has_event "$first" service_ready
    wait_for "$WAIT_SECONDS" "service_ready from ${second}" container_has_event "$second" service_ready
    "${FIXTURE[@]}" drop-many "$spool/inbox" "$count" "$APP_UID:$APP_UID" ||
        fail "dropping ${count} inputs"
    kill_holding_claims "$first" "$spool/inbox/.niftidrop/instances/niftidrop-1/claimed"
    # podman does not restart a container it killed: the other adopts its claims.
    wait_for "$WAIT_SECONDS" "claim_adopted from ${second}" \
        container_has_event "$second" claim_adopted
    wait_for "$WAIT_SECONDS" "every input converted once" \
        "${FIXTURE[@]}" verify-many "$spool" "$count"
    compose down -t 40 >>"$WORK/compose.log" 2>&1 || fail "podman-compose down"
    "${FIXTURE[@]}" verify-many "$spool" "$count" || fail "after podman-compose down"
    log "two instances, one killed holding claims: the other adopted them," \
        "${count} inputs converted once each"
}

# kill_holding_claims CONTAINER CLAIMS: SIGKILL the container while it holds a
# claim (paused while its claims folder is looked at, so none finishes meanwhile).
kill_holding_claims() {
    local container="$1" claims="$2" try
    for try in $(seq 200); do
        podman pause "$container" >/dev/null || fail "podman pause ${container}"
        if [[ -n "$(find "$claims" -type f -not -name '.*' -print -quit 2>/dev/null)" ]]; then
            podman kill --signal KILL "$container" >/dev/null || fail "podman kill ${container}"
            return
        fi
        podman unpause "$container" >/dev/null || fail "podman unpause ${container}"
        sleep 0.05
    done
    fail "${container} never held a claim in ${try} looks"
}

# unit_property NAME: a property of niftidrop.service, from systemd in the container.
unit_property() {
    podman exec "$SYSTEMD_CONTAINER" systemctl show --property "$1" --value niftidrop.service
}

unit_is() {
    [[ "$(unit_property "$1")" == "$2" ]]
}

unit_journal_has_event() {
    # The service's stdout only, not systemd's own lines about the unit.
    podman exec "$SYSTEMD_CONTAINER" journalctl --output cat --no-pager \
        _SYSTEMD_UNIT=niftidrop.service _TRANSPORT=stdout |
        "${FIXTURE[@]}" has-event "$1"
}

check_hardening_in_force() {
    local pid status
    pid="$(unit_property MainPID)"
    status="$(podman exec "$SYSTEMD_CONTAINER" cat "/proc/${pid}/status")"
    grep -q -E '^NoNewPrivs:[[:space:]]+1$' <<<"$status" || fail "NoNewPrivs is not set on the service"
    grep -q -E '^Seccomp:[[:space:]]+2$' <<<"$status" || fail "no seccomp filter on the service"
    grep -q -E '^CapEff:[[:space:]]+0+$' <<<"$status" || fail "the service holds capabilities"
    local user
    user="$(podman exec "$SYSTEMD_CONTAINER" ps -o user= -p "$pid")"
    [[ "$user" == niftidrop ]] || fail "the service runs as ${user}, expected niftidrop"
    # Each conversion process caps its memory (max_memory), which the filter must allow.
    local child
    child="$(podman exec "$SYSTEMD_CONTAINER" pgrep --parent "$pid" | head -n 1)"
    [[ -n "$child" ]] || fail "the service has no conversion process"
    podman exec "$SYSTEMD_CONTAINER" cat "/proc/${child}/limits" |
        grep -q -E '^Max data size +[0-9]+ ' || fail "max_memory is not applied to the conversion processes"
}

step_systemd() {
    local spool="$WORK/systemd-spool" library="$WORK/systemd-library"
    mkdir -p "$spool" "$library"
    "${FIXTURE[@]}" reference "$library" >/dev/null
    podman run --detach --name "$SYSTEMD_CONTAINER" --systemd=always \
        --volume "$spool:/var/lib/niftidrop" --volume "$library:/srv/niftidrop/library:ro" \
        --volume "$REPO/deploy/spool_fixture.py:$FIXTURE_IN_CONTAINER:ro" \
        "$SYSTEMD_IMAGE" >/dev/null || fail "podman run --systemd=always ${SYSTEMD_IMAGE}"
    # Type=notify: "active" only once niftidrop has sent READY=1.
    wait_for "$WAIT_SECONDS" "niftidrop.service ActiveState=active" unit_is ActiveState active
    check_hardening_in_force
    wait_for "$WAIT_SECONDS" "the inbox" test -d "$spool/inbox"
    # The producer is another user in the niftidrop group, as the README recommends.
    local group
    group="$(podman exec "$SYSTEMD_CONTAINER" id --group niftidrop)"
    "${FIXTURE[@]}" drop "$spool/inbox" "$PRODUCER_UID:$group" 0660 >/dev/null
    wait_for "$WAIT_SECONDS" "outbox/case001_pred.nii.gz" test -f "$spool/outbox/case001_pred.nii.gz"
    "${FIXTURE[@]}" verify "$spool/outbox/case001_pred.nii.gz" "$library/case001.nii.gz" ||
        fail "the unit's output does not match the prediction and its reference"
    unit_journal_has_event input_converted || fail "no input_converted in the unit's journal"
    # The example config serves metrics on loopback, which the unit's IP filter allows.
    podman exec "$SYSTEMD_CONTAINER" /opt/niftidrop/bin/python "$FIXTURE_IN_CONTAINER" \
        scrape http://127.0.0.1:9464 || fail "the unit's metrics endpoint"
    unit_is ActiveState active || fail "niftidrop.service is $(unit_property ActiveState) after converting"

    podman exec "$SYSTEMD_CONTAINER" systemctl stop niftidrop.service ||
        fail "systemctl stop niftidrop.service"
    unit_is ActiveState inactive || fail "ActiveState $(unit_property ActiveState) after stop"
    unit_is Result success || fail "Result $(unit_property Result) after stop, expected success"
    unit_is NRestarts 0 || fail "NRestarts $(unit_property NRestarts), expected 0"
    unit_journal_has_event service_stopped || fail "no service_stopped in the unit's journal"
    log "active, converted, hardened, clean stop"

    check_watchdog_restart
}

watchdog_pinged() {
    [[ "$(unit_property WatchdogTimestampMonotonic)" != 0 ]]
}

# A service that stops answering is killed and restarted by the watchdog. A
# drop-in shortens the unit's timings so this takes seconds, not minutes.
check_watchdog_restart() {
    podman exec "$SYSTEMD_CONTAINER" sh -c '
        mkdir -p /run/systemd/system/niftidrop.service.d &&
        printf "[Service]\nWatchdogSec=3\nTimeoutAbortSec=2\nRestartSec=1\n" \
            >/run/systemd/system/niftidrop.service.d/ci-watchdog.conf &&
        systemctl daemon-reload && systemctl start niftidrop.service' ||
        fail "restarting niftidrop.service with a 3 s watchdog"
    wait_for "$WAIT_SECONDS" "ActiveState=active with the short watchdog" unit_is ActiveState active
    wait_for "$WAIT_SECONDS" "a WATCHDOG=1 ping" watchdog_pinged
    local hung_pid
    hung_pid="$(unit_property MainPID)"
    podman exec "$SYSTEMD_CONTAINER" kill -STOP "$hung_pid" || fail "SIGSTOP to ${hung_pid}"
    wait_for "$WAIT_SECONDS" "a restart after the missed watchdog" unit_is NRestarts 1
    wait_for "$WAIT_SECONDS" "ActiveState=active after the restart" unit_is ActiveState active
    [[ "$(unit_property MainPID)" != "$hung_pid" ]] || fail "the hung process was not replaced"
    podman exec "$SYSTEMD_CONTAINER" systemctl stop niftidrop.service || fail "systemctl stop"
    log "a missed watchdog killed and restarted the service"
}

step_tools() {
    ensure_tools
    write_containers_conf "$CONTAINERS_CONF"
    podman rm --force --ignore --time 0 "$APP_CONTAINER" "$SYSTEMD_CONTAINER" >/dev/null 2>&1 || true
}

STARTED=$SECONDS
run_step tools step_tools
run_step lint step_lint
run_step images step_images
run_step unit step_unit
run_step container step_container
run_step compose step_compose
run_step systemd step_systemd

echo "==> deployment checks passed in $((SECONDS - STARTED)) s"
printf '    %s\n' "${TIMINGS[@]}"
echo "    image ${APP_IMAGE}: ${IMAGE_MB} MB; unit exposure: ${EXPOSURE}"
echo "deploy: ${#TIMINGS[@]} passed, 0 failed"
