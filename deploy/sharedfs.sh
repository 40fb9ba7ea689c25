#!/usr/bin/env bash
# Brings up, and tears down, a real shared file system mounted several times on
# this host, each mount a separate client with its own caches, as separate hosts
# would have (README, "Many instances, one spool"):
#
#   deploy/sharedfs.sh up gluster DIR [MOUNTS]   GlusterFS: glusterd in a network
#       namespace of its own, on 127.0.0.2 of its loopback, one brick in DIR/brick,
#       FUSE-mounted MOUNTS times (default 2) at DIR/mount1, DIR/mount2, ...
#   deploy/sharedfs.sh up sshfs DIR [MOUNTS]     sshfs: an sshd on 127.0.0.1 with
#       its own configuration and keys, serving DIR/export, mounted MOUNTS times
#       with dir_cache=no (and the options in SHAREDFS_SSHFS_OPTIONS, e.g.
#       disable_hardlink for a file system without hard links)
#   deploy/sharedfs.sh down DIR                  unmounts and stops everything
#       that `up` started in DIR, then removes DIR; safe to run twice
#
# Run as root on Debian; the packages are installed with apt-get when missing.
# `up` prints the mount points, one per line, and nothing else on stdout.
set -euo pipefail

MOUNTS_DEFAULT=2
GLUSTER_ADDRESS=127.0.0.2
WAIT_SECONDS="${SHAREDFS_WAIT:-60}"

fail() {
    echo "sharedfs: FAILED: $*" >&2
    exit 1
}

# need PACKAGE COMMAND: install PACKAGE with apt-get unless COMMAND exists.
need() {
    local package="$1" command="$2"
    command -v "$command" >/dev/null 2>&1 && return
    echo "sharedfs: installing $package" >&2
    if ! apt-get install -y -qq "$package" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
    fi
}

# wait_for DESCRIPTION COMMAND...: run COMMAND until it succeeds, or fail.
wait_for() {
    local description="$1"
    shift
    local deadline=$((SECONDS + WAIT_SECONDS))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "waited ${WAIT_SECONDS} s for ${description}"
        sleep 0.2
    done
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# record DIR LINE: remember what to undo, newest last (read back by `down`).
record() {
    echo "$2" >>"$1/undo"
}

gluster_up() {
    local dir="$1" mounts="$2"
    need iproute2 ip
    need procps pgrep
    need glusterfs-server glusterd
    need glusterfs-client glusterfs
    # The gluster command reaches glusterd through one socket per host.
    ! pgrep -x glusterd >/dev/null || fail "a glusterd runs on this host already"
    local netns volume
    netns="niftidrop-gl-$(basename "$dir")"
    volume="niftidrop"
    mkdir -p "$dir/brick" "$dir/glusterd" "$dir/log"
    ip netns add "$netns"
    record "$dir" "netns $netns"
    ip netns exec "$netns" ip link set lo up
    # glusterd refuses a brick on 127.0.0.1 or localhost; 127.0.0.2 of this
    # namespace's own loopback is an address no other host has.
    ip netns exec "$netns" ip addr add "$GLUSTER_ADDRESS/8" dev lo
    sed "s|option working-directory .*|option working-directory $dir/glusterd|" \
        /etc/glusterfs/glusterd.vol >"$dir/glusterd.vol"
    # -N: one process that stays in the foreground of its own session, whose pid
    # file `down` reads (a daemonized glusterd would leave its parent behind).
    ip netns exec "$netns" setsid glusterd -N -f "$dir/glusterd.vol" \
        -l "$dir/log/glusterd.log" -p "$dir/glusterd.pid" </dev/null >/dev/null 2>&1 &
    record "$dir" "socket /var/run/glusterd.socket"
    record "$dir" "pidfile $dir/glusterd.pid"
    wait_for "glusterd" ip netns exec "$netns" gluster --mode=script pool list
    ip netns exec "$netns" gluster --mode=script volume create "$volume" \
        "$GLUSTER_ADDRESS:$dir/brick" force >/dev/null
    record "$dir" "volume $netns $volume"
    ip netns exec "$netns" gluster --mode=script volume start "$volume" >/dev/null
    local number mount
    for ((number = 1; number <= mounts; number++)); do
        mount="$dir/mount$number"
        mkdir -p "$mount"
        # Only the client's network is the namespace's: the mount is on this host.
        nsenter --net="/var/run/netns/$netns" glusterfs --volfile-server="$GLUSTER_ADDRESS" \
            --volfile-id="$volume" -l "$dir/log/mount$number.log" "$mount"
        record "$dir" "mount $mount"
        wait_for "the mount at $mount" mountpoint -q "$mount"
        echo "$mount"
    done
}

sshfs_up() {
    local dir="$1" mounts="$2"
    need openssh-server /usr/sbin/sshd
    need sshfs sshfs
    local port
    port="$(free_port)"
    mkdir -p "$dir/export" "$dir/ssh" /run/sshd
    chmod 700 "$dir/ssh"
    ssh-keygen -q -t ed25519 -N "" -f "$dir/ssh/host_key"
    ssh-keygen -q -t ed25519 -N "" -f "$dir/ssh/client_key"
    cp "$dir/ssh/client_key.pub" "$dir/ssh/authorized_keys"
    cat >"$dir/ssh/sshd_config" <<EOF
ListenAddress 127.0.0.1:$port
HostKey $dir/ssh/host_key
PidFile $dir/ssh/sshd.pid
AuthorizedKeysFile $dir/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
EOF
    /usr/sbin/sshd -f "$dir/ssh/sshd_config" -E "$dir/ssh/sshd.log"
    record "$dir" "pidfile $dir/ssh/sshd.pid"
    wait_for "sshd" test -s "$dir/ssh/sshd.pid"
    local number mount
    for ((number = 1; number <= mounts; number++)); do
        mount="$dir/mount$number"
        mkdir -p "$mount"
        # dir_cache=no: without it a listing may be 20 s old; the spool needs fresh ones.
        sshfs "root@127.0.0.1:$dir/export" "$mount" -p "$port" \
            -o "IdentityFile=$dir/ssh/client_key,StrictHostKeyChecking=no" \
            -o "UserKnownHostsFile=/dev/null,LogLevel=ERROR,dir_cache=no,reconnect" \
            ${SHAREDFS_SSHFS_OPTIONS:+-o "$SHAREDFS_SSHFS_OPTIONS"}
        record "$dir" "mount $mount"
        wait_for "the mount at $mount" mountpoint -q "$mount"
        echo "$mount"
    done
}

# stop_pidfile FILE: stop the process whose pid FILE holds, and wait for it to go.
stop_pidfile() {
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 0
    kill "$pid" 2>/dev/null || return 0
    local deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    local dir="$1"
    [[ -f "$dir/undo" ]] || { rm -rf "$dir"; return; }
    local kind a b
    # Newest first: mounts, then the volume, the servers, the namespace.
    tac "$dir/undo" | while read -r kind a b; do
        case "$kind" in
            mount) umount "$a" 2>/dev/null || umount -l "$a" 2>/dev/null || true ;;
            volume)
                ip netns exec "$a" gluster --mode=script volume stop "$b" force >/dev/null 2>&1 || true
                ip netns exec "$a" gluster --mode=script volume delete "$b" >/dev/null 2>&1 || true
                # The brick process outlives its volume for a moment: end it with the rest.
                pkill -f "glusterfsd .*$dir/brick" 2>/dev/null || true
                ;;
            pidfile) stop_pidfile "$a" ;;
            socket) rm -f "$a" ;;
            netns) ip netns delete "$a" 2>/dev/null || true ;;
        esac
    done
    rm -rf "$dir"
}

main() {
    [[ $# -ge 2 ]] || fail "usage: $0 up gluster|sshfs DIR [MOUNTS] | down DIR"
    local command="$1" dir
    ((EUID == 0)) || fail "run as root (mounts, network namespaces, servers)"
    case "$command" in
        up)
            [[ $# -ge 3 ]] || fail "usage: $0 up gluster|sshfs DIR [MOUNTS]"
            dir="$(realpath -m "$3")"
            [[ ! -e "$dir/undo" ]] || fail "$dir is in use: run '$0 down $dir' first"
            mkdir -p "$dir"
            # Whatever fails half-way is undone: nothing is left running.
            UP_DONE=0
            trap '((UP_DONE)) || down "$dir"' EXIT
            case "$2" in
                gluster) gluster_up "$dir" "${4:-$MOUNTS_DEFAULT}" ;;
                sshfs) sshfs_up "$dir" "${4:-$MOUNTS_DEFAULT}" ;;
                *) fail "unknown file system '$2' (gluster or sshfs)" ;;
            esac
            # shellcheck disable=SC2034  # read by the EXIT trap
            UP_DONE=1
            ;;
        down) down "$(realpath -m "$2")" ;;
        *) fail "unknown command '$command' (up or down)" ;;
    esac
}

main "$@"
