# Shared helpers of the deployment checks; sourced by deploy/ci.sh.
# shellcheck shell=bash
# shellcheck disable=SC2034  # the names below are used by deploy/ci.sh

# The Dockerfile's base image, and the names of what the checks build and run.
BASE_IMAGE="python:3.11.13-slim-bookworm"
BASE_SUITE="bookworm"
APP_IMAGE="localhost/niftidrop:ci"
SYSTEMD_IMAGE="localhost/niftidrop-systemd:ci"
APP_CONTAINER="niftidrop-ci-app"
SYSTEMD_CONTAINER="niftidrop-ci-systemd"
COMPOSE_PROJECT="niftidrop-ci-compose"
# uid:gid of the Dockerfile's niftidrop user, owner of the mounted spool.
APP_UID=10001
# A producer's uid in the systemd check: any user but niftidrop.
PRODUCER_UID=20001
# Debian packages the checks run with.
DEPLOY_PACKAGES=(podman podman-compose buildah debootstrap runc systemd shellcheck containernetworking-plugins
    iptables debian-archive-keyring ca-certificates)
# How long to wait for anything to happen before failing.
WAIT_SECONDS="${DEPLOY_CHECK_WAIT:-120}"

fail() {
    echo "deploy: FAILED: $*" >&2
    exit 1
}

log() {
    echo "deploy: $*"
}

# wait_for SECONDS DESCRIPTION COMMAND...: run COMMAND until it succeeds, or
# fail naming DESCRIPTION once SECONDS have passed.
wait_for() {
    local seconds="$1" description="$2"
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            fail "waited ${seconds} s for ${description}"
        fi
        sleep 0.5
    done
}

# Debian's mirror as this host's apt sources name it (deb822 or one-line
# format), so the checks work behind whatever mirror the host uses.
host_debian_mirror() {
    if [[ -n "${DEPLOY_CHECK_DEBIAN_MIRROR:-}" ]]; then
        echo "$DEPLOY_CHECK_DEBIAN_MIRROR"
        return
    fi
    local mirror codename
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [[ -n "$codename" ]] || fail "not a Debian host (no VERSION_CODENAME); set DEPLOY_CHECK_DEBIAN_MIRROR"
    mirror="$(
        shopt -s nullglob
        awk -v suite="$codename" '
            # deb822 stanzas: the URI of a stanza that serves the host release.
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) serves = 1 }
            /^[[:space:]]*$/ { if (uri != "" && serves) { print uri; exit } uri = ""; serves = 0 }
            # One-line format: deb [OPTIONS] URI SUITE COMPONENTS...
            /^deb[[:space:]]/ {
                line = $0
                gsub(/\[[^]]*\]/, "", line)
                split(line, field)
                if (field[3] == suite) { print field[2]; exit }
            }
            END { if (uri != "" && serves) print uri }
        ' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list \
            2>/dev/null | head -n 1
    )"
    [[ -n "$mirror" ]] || fail "no Debian mirror in /etc/apt/sources.list{,.d}; set DEPLOY_CHECK_DEBIAN_MIRROR"
    echo "$mirror"
}

# The host's CA bundle: builds inside containers must trust what the host trusts
# (a TLS-inspecting proxy re-signs certificates).
host_ca_bundle() {
    local bundle
    for bundle in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
        if [[ -n "$bundle" && -f "$bundle" ]]; then
            echo "$bundle"
            return
        fi
    done
    fail "no CA bundle found (PIP_CERT, SSL_CERT_FILE, /etc/ssl/certs/ca-certificates.crt)"
}

# --build-arg options that give a build the host's pip index settings. Local
# (file:) indexes are left out: their folders do not exist inside the build.
host_pip_build_args() {
    local key value
    for key in index-url extra-index-url trusted-host; do
        value="$(python3 -m pip config get "global.${key}" 2>/dev/null || true)"
        case "$key" in
            index-url) value="${PIP_INDEX_URL:-$value}" ;;
            extra-index-url) value="${PIP_EXTRA_INDEX_URL:-$value}" ;;
            trusted-host) value="${PIP_TRUSTED_HOST:-$value}" ;;
        esac
        value="$(tr ' ' '\n' <<<"$value" | grep -v -E '^(file:|/|$)' | paste -s -d ' ' || true)"
        if [[ -n "$value" ]]; then
            local name="PIP_${key//-/_}"
            echo "--build-arg=${name^^}=${value}"
        fi
    done
}

# podman's settings for this kind of host: runc (crun fails on a cgroup v1
# hybrid setup) and ulimits no higher than the host grants, since an
# unprivileged-in-the-sandbox root cannot raise them.
write_containers_conf() {
    local path="$1" nofile nproc pid_max
    nofile="$(ulimit -Hn)"
    nproc="$(ulimit -Hu)"
    pid_max="$(cat /proc/sys/kernel/pid_max)"
    [[ "$nofile" == unlimited ]] && nofile=1048576
    if [[ "$nproc" == unlimited ]] || ((nproc > pid_max)); then
        nproc="$pid_max"
    fi
    cat >"$path" <<EOF
# Written by deploy/ci.sh for this host.
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "runc"
EOF
}

# ensure_tools: install what the checks need, or fail saying why not.
ensure_tools() {
    local missing=()
    local tool
    for tool in podman podman-compose buildah debootstrap runc systemd-analyze shellcheck; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if ((${#missing[@]} == 0)); then
        return
    fi
    [[ "$(id -u)" == 0 ]] || fail "missing ${missing[*]}; run as root to install them"
    command -v apt-get >/dev/null || fail "missing ${missing[*]} and no apt-get to install them"
    log "installing ${DEPLOY_PACKAGES[*]} (missing: ${missing[*]})"
    apt-get update -q >/dev/null || fail "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        "${DEPLOY_PACKAGES[@]}" >/dev/null || fail "apt-get install ${DEPLOY_PACKAGES[*]}"
}

# ensure_base_image LOGFILE: the Dockerfile's base image, made locally when
# absent (no image registry is reachable here): Debian's minimal system from
# the host's mirror with Python 3.11, like the official slim image. Cached in
# podman's storage, so only the first run pays for debootstrap.
ensure_base_image() {
    local logfile="$1" mirror rootfs
    if podman image exists "$BASE_IMAGE"; then
        log "base image ${BASE_IMAGE}: cached"
        return
    fi
    mirror="$(host_debian_mirror)"
    rootfs="$(mktemp -d /var/tmp/niftidrop-rootfs.XXXXXX)"
    log "base image ${BASE_IMAGE}: debootstrap ${BASE_SUITE} from ${mirror}"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
        "$BASE_SUITE" "$rootfs" "$mirror" >"$logfile" 2>&1; then
        tail -n 20 "$logfile" >&2
        rm -rf "$rootfs"
        fail "debootstrap ${BASE_SUITE} from ${mirror} (log: ${logfile})"
    fi
    # As in the official slim images: no package caches, lists or manuals.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    tar -C "$rootfs" -c . | podman import --quiet \
        --change 'CMD ["python3"]' \
        --change 'LABEL org.opencontainers.image.description="debootstrap stand-in for the base image"' \
        - "localhost/${BASE_IMAGE}" >/dev/null || fail "podman import of the base image"
    rm -rf "$rootfs"
}
