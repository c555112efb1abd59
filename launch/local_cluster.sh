#!/usr/bin/env bash
# local_cluster.sh — a throw-away multi-host cluster on this one machine: each host is a Linux
# network namespace with its own address on a bridge, its own hostname and its own node-local
# scratch directory; the file system (output_dir, data, the code) is shared, as NFS/Lustre is on
# a real cluster. For trying multi-node launches (torchrun, Slurm, Ray) and for tests/multinode/.
#
# Usage (as root):
#   launch/local_cluster.sh up [N]        create N hosts (default 2): ftnode1..ftnodeN at
#                                         10.77.0.11.., joined by the bridge ftbr0 (10.77.0.1)
#   launch/local_cluster.sh down          stop every process on the hosts, remove exactly what
#                                         `up` made (namespaces, bridge, /etc/netns entries, state)
#   launch/local_cluster.sh status        the hosts, their addresses and process counts;
#                                         exit status 3 when no cluster is up
#   launch/local_cluster.sh run HOST CMD...   run CMD on HOST (in its namespace, hostname HOST,
#                                         TMPDIR = its scratch directory), in the foreground
#   launch/local_cluster.sh hosts         the host names, one per line
#   launch/local_cluster.sh sshd          an sshd on every host (root, key login only, with a key pair
#                                         of its own; installs openssh-server and pdsh when missing) for
#                                         launchers that ssh into the hosts (the deepspeed launcher's
#                                         pdsh); prints the PDSH_SSH_ARGS_APPEND that uses the key
#
# Environment:
#   FTDIST_CLUSTER_DIR   state and per-host scratch (default /tmp/ftdist-cluster; host K's
#                        TMPDIR is $FTDIST_CLUSTER_DIR/ftnodeK/tmp)
#   FTDIST_CLUSTER_NET   the first three octets of the subnet (default 10.77.0)
#
# Name resolution: `ip netns exec` shows each namespace /etc/netns/NS/hosts as its /etc/hosts;
# `up` writes one per host naming every host (and `ftgw`, the bridge's address in the machine's
# own namespace), so `ftnode1` resolves to 10.77.0.11 on every host. Only these addresses are
# used: the hosts have no route beyond the bridge. `up` again with the same N is a no-op; with
# another N it rebuilds the cluster. Every step is bounded; a failed `up` removes what it made.
set -euo pipefail

STATE_DIR="${FTDIST_CLUSTER_DIR:-/tmp/ftdist-cluster}"
NET="${FTDIST_CLUSTER_NET:-10.77.0}"
BRIDGE=ftbr0
PREFIX=ftnode
STATE="$STATE_DIR/hosts"

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
  exit "${1:-0}"
}

need_root() {
  [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, veth pairs and a bridge)"
  command -v ip >/dev/null || die "the ip command (iproute2) is missing"
}

hosts() { [[ -f "$STATE" ]] && cat "$STATE" || true; }

address_of() {  # ftnodeK -> NET.(10+K)
  local k="${1#"$PREFIX"}"
  [[ "$k" =~ ^[0-9]+$ ]] || die "unknown host '$1' (hosts: $(hosts | tr '\n' ' '))"
  echo "$NET.$((10 + k))"
}

ns_of() { echo "ft-$1"; }

up() {
  local n="${1:-2}"
  [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 50 ]] || die "up N: N must be 1..50, got '$n'"
  need_root
  if [[ -f "$STATE" && "$(wc -l <"$STATE")" -eq "$n" ]] && all_present; then
    log "$n host(s) already up"
    return 0
  fi
  [[ -f "$STATE" ]] && down
  mkdir -p "$STATE_DIR"
  trap 'log "up failed: removing what was made"; down >/dev/null 2>&1 || true' ERR
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  : >"$STATE"
  local k host ns names="127.0.0.1 localhost"$'\n'"$NET.1 ftgw"
  for k in $(seq 1 "$n"); do names+=$'\n'"$NET.$((10 + k)) $PREFIX$k"; done
  for k in $(seq 1 "$n"); do
    host="$PREFIX$k"; ns="$(ns_of "$host")"
    echo "$host" >>"$STATE"  # recorded first: `down` removes a half-made host too
    ip netns add "$ns"
    ip link add "$host-v" type veth peer name eth0 netns "$ns"
    ip link set "$host-v" master "$BRIDGE"
    ip link set "$host-v" up
    ip netns exec "$ns" ip addr add "$(address_of "$host")/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip link set lo up
    mkdir -p "/etc/netns/$ns" "$STATE_DIR/$host/tmp"
    printf '%s\n' "$names" >"/etc/netns/$ns/hosts"
  done
  trap - ERR
  wait_reachable
  log "$n host(s) up: $(hosts | tr '\n' ' ')(bridge $BRIDGE $NET.1/24)"
}

all_present() {
  local host
  ip link show "$BRIDGE" >/dev/null 2>&1 || return 1
  for host in $(hosts); do
    ip netns exec "$(ns_of "$host")" true 2>/dev/null || return 1
  done
}

wait_reachable() {
  # every host reaches every other over TCP within 10 s (a listener on one, a connect from the next)
  local host next deadline py
  py=$(command -v python3) || return 0
  for host in $(hosts); do
    next=$(hosts | awk -v h="$host" '$0 != h {print; exit}')
    [[ -n "$next" ]] || return 0
    deadline=$((SECONDS + 10))
    until ip netns exec "$(ns_of "$next")" "$py" -c "
import socket, sys, threading
srv = socket.socket(); srv.bind(('$(address_of "$next")', 0)); srv.listen(1)
port = srv.getsockname()[1]
threading.Thread(target=srv.accept, daemon=True).start()
import subprocess
sys.exit(subprocess.run(['ip', 'netns', 'exec', '$(ns_of "$host")', sys.executable, '-c',
    'import socket; socket.create_connection((\"$(address_of "$next")\", %d), timeout=3)' % port]).returncode)
" 2>/dev/null; do
      ((SECONDS < deadline)) || die "$host cannot reach $next at $(address_of "$next") within 10 s"
      sleep 0.5
    done
  done
}

stop_processes() {  # every process in the host's namespace: TERM, then KILL after 5 s
  local ns="$1" pids deadline
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  [[ -z "$pids" ]] && return 0
  kill -TERM $pids 2>/dev/null || true
  deadline=$((SECONDS + 5))
  while pids=$(ip netns pids "$ns" 2>/dev/null) && [[ -n "$pids" ]] && ((SECONDS < deadline)); do sleep 0.2; done
  [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
  return 0
}

sshd_up() {
  need_root
  [[ -f "$STATE" ]] || die "no cluster (launch/local_cluster.sh up N first)"
  if ! command -v sshd >/dev/null && [[ ! -x /usr/sbin/sshd ]] || ! command -v pdsh >/dev/null; then
    command -v apt-get >/dev/null || die "sshd or pdsh missing and apt-get not available"
    log "installing openssh-server pdsh (apt-get)"
    local policy=/usr/sbin/policy-rc.d made=0
    [[ -e "$policy" ]] || { printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made=1; }
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server pdsh \
        </dev/null >/dev/null 2>&1 ||
      { apt-get update -qq </dev/null >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server pdsh \
          </dev/null >/dev/null 2>&1; }; } || { [[ "$made" == 1 ]] && rm -f "$policy"; die "apt-get install failed"; }
    [[ "$made" == 1 ]] && rm -f "$policy"
  fi
  local dir="$STATE_DIR/ssh" host deadline
  mkdir -p "$dir" /run/sshd && chmod 700 "$dir"
  [[ -f "$dir/id" ]] || ssh-keygen -q -t ed25519 -N '' -f "$dir/id"
  [[ -f "$dir/host_key" ]] || ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
  cp "$dir/id.pub" "$dir/authorized_keys" && chmod 600 "$dir/authorized_keys"
  for host in $(hosts); do
    if [[ -f "$dir/sshd-$host.pid" ]] && kill -0 "$(cat "$dir/sshd-$host.pid")" 2>/dev/null; then continue; fi
    cat >"$dir/sshd-$host.conf" <<EOF
ListenAddress $(address_of "$host")
Port 22
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $dir/sshd-$host.pid
SetEnv TMPDIR=$STATE_DIR/$host/tmp
EOF
    nohup setsid bash "$0" run "$host" "$(command -v sshd || echo /usr/sbin/sshd)" -D -e -f "$dir/sshd-$host.conf" \
      >"$dir/sshd-$host.log" 2>&1 </dev/null &
    deadline=$((SECONDS + 10))
    until grep -q "Server listening" "$dir/sshd-$host.log" 2>/dev/null; do
      ((SECONDS < deadline)) || die "sshd on $host did not start: $(tail -n 3 "$dir/sshd-$host.log" 2>/dev/null)"
      sleep 0.2
    done
  done
  log "sshd on $(hosts | tr '\n' ' ')(key $dir/id)"
  echo "export PDSH_SSH_ARGS_APPEND=\"-i $dir/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR\""
}

down() {
  need_root
  local host ns
  for host in $(hosts); do
    ns="$(ns_of "$host")"
    stop_processes "$ns"
    ip netns del "$ns" 2>/dev/null || true
    ip link del "$host-v" 2>/dev/null || true
    rm -rf "/etc/netns/$ns" "${STATE_DIR:?}/$host"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -rf "${STATE_DIR:?}/ssh"
  rm -f "$STATE"
  rmdir "$STATE_DIR" 2>/dev/null || true
  log "down"
}

status() {
  local host ns n
  if [[ ! -f "$STATE" ]]; then
    log "no cluster (launch/local_cluster.sh up N)"
    return 3
  fi
  for host in $(hosts); do
    ns="$(ns_of "$host")"
    if ip netns exec "$ns" true 2>/dev/null; then
      n=$(ip netns pids "$ns" 2>/dev/null | wc -l)
      echo "$host $(address_of "$host") up, $n process(es), TMPDIR $STATE_DIR/$host/tmp"
    else
      echo "$host $(address_of "$host") MISSING"
    fi
  done
}

run() {
  [[ $# -ge 2 ]] || die "run HOST CMD...: give a host and a command"
  local host="$1"; shift
  hosts | grep -qx "$host" || die "no host '$host' (hosts: $(hosts | tr '\n' ' '))"
  need_root
  # `ip netns exec` mounts a fresh /sys for the namespace, without the machine's cgroup file systems:
  # mount them again as they are here (daemons such as slurmd read them), then exec CMD in a UTS
  # namespace of its own: `hostname` is HOST in CMD and everything it starts
  local cgroups
  cgroups=$(awk '$3 == "cgroup" || $3 == "cgroup2" {print $3, $2, $4}' /proc/mounts | grep ' /sys/fs/cgroup' || true)
  exec ip netns exec "$(ns_of "$host")" unshare --uts -- /bin/sh -c '
    if [ -n "$3" ] && [ -d /sys/fs/cgroup ]; then
      mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup 2>/dev/null &&
        echo "$3" | while read -r fs dir opts; do
          mkdir -p "$dir" && mount -t "$fs" -o "$opts" "$fs" "$dir" 2>/dev/null || true
        done
    fi
    hostname "$1" && export TMPDIR="$2" && shift 3 && exec "$@"' \
    sh "$host" "$STATE_DIR/$host/tmp" "$cgroups" "$@"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  run) shift; run "$@" ;;
  hosts) hosts ;;
  sshd) sshd_up ;;
  -h|--help|help) usage 0 ;;
  *) usage 2 ;;
esac
