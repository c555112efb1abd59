#!/usr/bin/env bash
# local_slurm.sh — a throw-away single-node Slurm cluster on this machine, for
# trying the sbatch scripts in slurm/ and for CI (tests/slurm/).
#
# Usage (as root; no systemd, no cgroups needed):
#   launch/local_slurm.sh up       install Debian packages if missing, start munged,
#                                  slurmctld and slurmd, wait until the node is idle
#   launch/local_slurm.sh down     stop the daemons that `up` started (by recorded pid);
#                                  cancels the local cluster's jobs first; packages stay
#   launch/local_slurm.sh status   print which of our daemons are alive, then sinfo;
#                                  exit status 3 when no slurmctld runs
#
# Several nodes, on the hosts of launch/local_cluster.sh (network namespaces with their own
# address and hostname; `local_cluster.sh up N` first):
#   launch/local_slurm.sh up --hosts      slurmctld on the first host, one slurmd per host
#                                         (NodeName = host name, NodeAddr = its address), config
#                                         in $FTDIST_SLURM_DIR/slurm.conf (not /etc/slurm); prints
#                                         the `export SLURM_CONF=...` that sbatch/srun/sinfo need
#   launch/local_slurm.sh down --hosts    stop them (and munged, if this mode started it)
#   launch/local_slurm.sh status --hosts
# The two modes run side by side (their own state dirs, configs and network namespaces); the
# multi-host mode's state dir defaults to /tmp/ftdist-slurm-hosts. Each node claims the CPUs of
# the machine (the hosts share its cores).
#
# Environment:
#   FTDIST_SLURM_DIR   state dir: pids, logs, spool, controller state (default /tmp/ftdist-slurm)
#   FTDIST_SLURM_WAIT  seconds `up` waits for the node to become idle (default 60)
#
# What `up` does:
#   * apt-get install -y slurmctld slurmd slurm-client munge (--no-install-recommends)
#     when a command is missing: 8-11 s with apt-get update; noninteractive, no stdin.
#     Packaged services are kept from auto-starting by a temporary /usr/sbin/policy-rc.d
#     (only when none exists; removed afterwards).
#   * creates /etc/munge/munge.key if missing; starts munged (as user munge) unless a
#     munged already answers.
#   * writes /etc/slurm/slurm.conf (where sbatch/srun/sinfo look by default) for one node
#     named `hostname -s` with CPUs=nproc, RealMemory = 95% of MemTotal, one partition
#     `debug` (Default=YES, MaxTime=INFINITE). A slurm.conf that this script did not
#     write is saved once as slurm.conf.ftdist-orig. No cgroup.conf is needed.
#   * starts slurmctld (-c: clean job state) and slurmd in the foreground (-D) under
#     nohup/setsid with logs in the state dir, records their pids, waits (bounded) until
#     sinfo shows the node idle: ~1 s when the packages are installed.
#   * `up` again: no-op (~0.05 s) while the daemons run and the config is unchanged;
#     restarts them when the generated slurm.conf changed.
#
# Facts measured on a 2-core Debian bookworm box (Slurm 22.05.8) that the config uses:
#   * TaskPlugin=task/none, SelectType=select/cons_tres (CR_CPU), no accounting and a
#     non-cgroup proctrack: the daemons run without systemd or cgroups.
#   * ProctrackType=proctrack/pgid, not proctrack/linuxproc: with linuxproc, children
#     that a batch script started in the background (`train.py & wait`) and that outlive
#     the script (its USR1 trap requeues and exits) are reparented to pid 1, escape the
#     job and keep running next to the restarted job. pgid kills them (they share the
#     batch shell's process group); it costs ~2-4 s more per requeue. Processes that
#     call setsid (e.g. `ray start`) escape either way (only cgroups would catch them).
#   * AuthInfo=cred_expire=5 and SchedulerParameters=bf_interval=1,sched_interval=2 make a
#     requeued job start again within seconds (~6 s BeginTime hold) instead of ~145 s.
#   * MinJobAge=5 lets `sbatch --wait` notice the end of a job within ~2 s.
#   * Only `--signal=B:USR1@N` (B: = deliver to the batch shell) reaches a `trap ... USR1`
#     in the batch script; without B: the signal goes to the job steps only. By hand:
#     `scancel --signal=USR1 --batch JOBID`.
#   * `sbatch -n 2` with `srun -n 2` inside fits a 2-core node: the batch step does not
#     take a CPU from its steps. Two concurrent 1-task steps (`srun -n 1 ... &` twice)
#     need `srun --exact` (or --overlap), else the second waits: "Step creation
#     temporarily disabled". OverSubscribe=YES lets jobs that ask (--oversubscribe)
#     share CPUs with other jobs.
#   * The "mpi/pmix ... can not load PMIx library" errors in the logs are harmless
#     (libpmix2 is only a Recommends; MpiDefault=none).
set -euo pipefail

HOSTS_MODE=0
[[ "${2:-}" == "--hosts" ]] && HOSTS_MODE=1
if [[ "$HOSTS_MODE" == 1 ]]; then
  STATE_DIR="${FTDIST_SLURM_DIR:-/tmp/ftdist-slurm-hosts}"
else
  STATE_DIR="${FTDIST_SLURM_DIR:-/tmp/ftdist-slurm}"
fi
CLUSTER="$(dirname "$0")/local_cluster.sh"
WAIT_S="${FTDIST_SLURM_WAIT:-60}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# written by ftdist launch/local_slurm.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "local_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
  exit "${1:-0}"
}

# pid_running PID: PID exists and is not a zombie (a reparented daemon can stay a zombie
# for seconds where pid 1 is slow to reap, e.g. in containers).
pid_running() {
  local pid="$1" stat
  [[ -n "$pid" && "$pid" =~ ^[0-9]+$ ]] || return 1
  stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat%% *}" != Z ]]
}

# pid_alive PID NAME: PID runs and its command name is NAME (guards against pid reuse).
pid_alive() {
  local pid="$1" name="$2" comm
  pid_running "$pid" || return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
  [[ "$comm" == "$name" ]]
}

# procs_named NAME: pids of running processes whose command name is NAME (no procps needed).
procs_named() {
  local f pid
  for f in /proc/[0-9]*/comm; do
    [[ "$(cat "$f" 2>/dev/null)" == "$1" ]] || continue
    pid="${f#/proc/}"; pid="${pid%/comm}"
    pid_running "$pid" && printf '%s ' "$pid"
  done
  return 0
}

# start_daemon NAME CMD...: start CMD in its own session under nohup (stdin closed,
# output to STATE_DIR/NAME.out), record its pid, and wait until nohup/setsid/setpriv
# have exec'd into NAME (so pid_alive works right away).
start_daemon() {
  local name="$1" pid i
  shift
  nohup setsid "$@" >"$STATE_DIR/$name.out" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$STATE_DIR/$name.pid.ftdist"
  for ((i = 0; i < 50; i++)); do
    pid_alive "$pid" "$name" && { log "started $name ($pid)"; return 0; }
    pid_running "$pid" || break
    sleep 0.1
  done
  tail -n 30 "$STATE_DIR/$name.out" >&2 2>/dev/null || true
  die "$name did not start (output: $STATE_DIR/$name.out)"
}

recorded_pid() { cat "$STATE_DIR/$1.pid.ftdist" 2>/dev/null || true; }

daemon_alive() { pid_alive "$(recorded_pid "$1")" "$1"; }

need_root() { [[ "$(id -u)" == 0 ]] || die "must run as root (it installs packages and starts daemons)"; }

install_packages() {
  local missing=0 cmd
  for cmd in sbatch srun sinfo scontrol slurmctld slurmd munged mungekey; do
    command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || missing=1
  done
  [[ "$missing" == 0 ]] && return 0
  command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is not available"
  log "installing ${PACKAGES[*]} (apt-get)"
  # Keep apt from starting the packaged services (they would use the wrong config and
  # hold the ports); only when no policy-rc.d exists, and removed again afterwards.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made_policy=1
  fi
  local rc=0
  {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null >/dev/null &&
      apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" </dev/null >/dev/null
  } || rc=$?
  [[ "$made_policy" == 1 ]] && rm -f "$policy"
  [[ "$rc" == 0 ]] || die "apt-get install ${PACKAGES[*]} failed (rc=$rc)"
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then return 0; fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key --force
    else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
  fi
  # munged refuses to run unless key and dirs belong to the user it runs as.
  local user=root
  getent passwd munge >/dev/null && user=munge
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown "$user:" /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  chmod 400 /etc/munge/munge.key
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  # -F: foreground, so the recorded pid is munged itself (setpriv execs, it does not fork).
  if [[ "$user" == root ]]; then
    start_daemon munged munged -F --force
  else
    start_daemon munged setpriv --reuid="$user" --regid="$user" --init-groups munged -F
  fi
  local i
  for ((i = 0; i < 50; i++)); do
    munge_works && return 0
    daemon_alive munged || break
    sleep 0.2
  done
  tail -n 30 "$STATE_DIR/munged.out" >&2 || true
  die "munged does not answer (output: $STATE_DIR/munged.out)"
}

# Sets NODE, NCPUS, REAL_MB for this machine.
probe_node() {
  local mem_kb
  NODE="$(hostname -s)"
  # GNU nproc honours OMP_NUM_THREADS (test runners set it to 1): count the CPUs themselves
  NCPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
  mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
  # "a bit under": slurmd drains a node that reports less memory than configured.
  REAL_MB=$((mem_kb * 95 / 100 / 1024))
  ((REAL_MB > 0)) || REAL_MB=1
}

# conf_common SLURMD_TIMEOUT: the settings both modes' slurm.conf share (see the facts at the top)
conf_common() {
  cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
MinJobAge=5
ReturnToService=2
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=$1
SlurmctldPort=6817
SlurmdPort=6818
EOF
}

write_conf() {
  local host="$NODE" cpus="$NCPUS" real_mb="$REAL_MB"
  cat <<EOF
$MARKER — regenerated by every 'up'; edit the script, not this file.
ClusterName=ftdist-local
SlurmctldHost=$host(127.0.0.1)
$(conf_common 60)
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmdSpoolDir=$STATE_DIR/spool
StateSaveLocation=$STATE_DIR/state
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
EOF
}

# stop_daemons NAME...: TERM the recorded pids together, wait up to 10 s, then KILL.
stop_daemons() {
  local name pid i alive
  local -a names=() pids=()
  for name in "$@"; do
    pid="$(recorded_pid "$name")"
    if pid_alive "$pid" "$name"; then
      kill -TERM "$pid" 2>/dev/null || true
      names+=("$name"); pids+=("$pid")
    fi
  done
  for ((i = 0; i < 50; i++)); do
    alive=0
    for pid in "${!pids[@]}"; do pid_alive "${pids[$pid]}" "${names[$pid]}" && alive=1; done
    [[ "$alive" == 0 ]] && break
    sleep 0.2
  done
  for i in "${!pids[@]}"; do
    if pid_alive "${pids[$i]}" "${names[$i]}"; then
      log "${names[$i]} (${pids[$i]}) did not stop on TERM; sending KILL"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
    log "stopped ${names[$i]} (${pids[$i]})"
  done
  for name in "$@"; do rm -f "$STATE_DIR/$name.pid.ftdist"; done
}

node_state() { sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n1 || true; }

cmd_up() {
  need_root
  mkdir -p "$STATE_DIR/spool" "$STATE_DIR/state"
  install_packages
  start_munge

  mkdir -p "$CONF_DIR"
  local new
  probe_node
  new="$(write_conf)"
  local changed=1
  if [[ -f "$CONF" ]] && [[ "$(cat "$CONF")" == "$new" ]]; then changed=0; fi
  if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF" && [[ ! -e "$CONF.ftdist-orig" ]]; then
    cp -p "$CONF" "$CONF.ftdist-orig"
    log "saved the existing $CONF as $CONF.ftdist-orig"
  fi
  if [[ "$changed" == 1 ]]; then
    # No cgroup.conf: Slurm 22.05 reads it only for cgroup plugins, which are not used.
    printf '%s\n' "$new" >"$CONF"
  fi

  if [[ "$changed" == 1 ]] && { daemon_alive slurmctld || daemon_alive slurmd; }; then
    log "slurm.conf changed; restarting the daemons"
    stop_daemons slurmd slurmctld
  fi

  local others
  if ! daemon_alive slurmctld; then
    others="$(procs_named slurmctld)"
    [[ -z "$others" ]] || die "a slurmctld that this script did not start is running (pid $others); stop it first"
    # -c: start from a clean job state (a local test cluster; no stale jobs from last time).
    start_daemon slurmctld slurmctld -D -c -f "$CONF"
  fi
  if ! daemon_alive slurmd; then
    others="$(procs_named slurmd)"
    [[ -z "$others" ]] || die "a slurmd that this script did not start is running (pid $others); stop it first"
    start_daemon slurmd slurmd -D -f "$CONF"
  fi

  local deadline=$((SECONDS + WAIT_S)) state=""
  while ((SECONDS < deadline)); do
    state="$(node_state)"
    [[ "$state" =~ ^(idle|mix|alloc|comp)$ ]] && break
    daemon_alive slurmctld || { tail -n 30 "$STATE_DIR/slurmctld.out" "$STATE_DIR/slurmctld.log" >&2 2>/dev/null || true; die "slurmctld exited"; }
    daemon_alive slurmd || { tail -n 30 "$STATE_DIR/slurmd.out" "$STATE_DIR/slurmd.log" >&2 2>/dev/null || true; die "slurmd exited"; }
    sleep 0.5
  done
  if ! [[ "$state" =~ ^(idle|mix|alloc|comp)$ ]]; then
    sinfo -R >&2 2>/dev/null || true
    tail -n 20 "$STATE_DIR/slurmctld.log" "$STATE_DIR/slurmd.log" >&2 2>/dev/null || true
    die "node $NODE not idle after ${WAIT_S}s (state: ${state:-unknown}); logs in $STATE_DIR"
  fi
  echo "local slurm up: node $NODE, $NCPUS cpus (partition debug; state dir $STATE_DIR)"
}

cmd_down() {
  need_root
  if daemon_alive slurmctld && command -v squeue >/dev/null; then
    if [[ -n "$(squeue -h -o %A 2>/dev/null)" ]]; then
      log "cancelling the local cluster's jobs"
      scancel --partition=debug 2>/dev/null || true
      local i
      for ((i = 0; i < 40; i++)); do
        [[ -z "$(squeue -h -t running,completing -o %A 2>/dev/null)" ]] && break
        sleep 0.25
      done
    fi
  fi
  stop_daemons slurmd slurmctld munged
  echo "local slurm down"
}

cmd_status() {
  local name
  probe_node
  for name in munged slurmctld slurmd; do
    if daemon_alive "$name"; then
      echo "$name: running (pid $(recorded_pid "$name"))"
    else
      echo "$name: not started by local_slurm.sh"
    fi
  done
  command -v sinfo >/dev/null || { echo "sinfo not installed (run: $0 up)"; exit 3; }
  # sinfo spends ~10 s (MessageTimeout) retrying when no controller runs: skip it then.
  if ! daemon_alive slurmctld && [[ -z "$(procs_named slurmctld)" ]]; then
    echo "local slurm is down (run: $0 up)"
    exit 3
  fi
  sinfo
}

# -- several nodes on the hosts of launch/local_cluster.sh ------------------------------------
cluster_hosts() { bash "$CLUSTER" hosts; }

write_conf_hosts() {
  local -a hosts=("$@")
  local h first="${hosts[0]}" mem=$((REAL_MB / ${#hosts[@]}))
  cat <<EOF
$MARKER (--hosts) — regenerated by every 'up --hosts'; edit the script, not this file.
ClusterName=ftdist-hosts
SlurmctldHost=$first($(cat "$STATE_DIR/addr-$first"))
$(conf_common 30)
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
SlurmdSpoolDir=$STATE_DIR/spool-%n
StateSaveLocation=$STATE_DIR/state
TaskProlog=$STATE_DIR/task_prolog.sh
EOF
  for h in "${hosts[@]}"; do
    echo "NodeName=$h NodeAddr=$(cat "$STATE_DIR/addr-$h") CPUs=$NCPUS RealMemory=$mem State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${hosts[*]}") Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP"
}

# the multi-host daemons' recorded pid is that of `local_cluster.sh run HOST DAEMON`, which execs into DAEMON
daemon_alive_as() { pid_alive "$(recorded_pid "$1")" "$2"; }

start_daemon_as() {  # start_daemon_as RECORD COMM CMD...: as start_daemon, the pid recorded under RECORD
  local record="$1" comm="$2" pid i
  shift 2
  nohup setsid "$@" >"$STATE_DIR/$record.out" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$STATE_DIR/$record.pid.ftdist"
  for ((i = 0; i < 100; i++)); do
    pid_alive "$pid" "$comm" && { log "started $record ($pid)"; return 0; }
    pid_running "$pid" || break
    sleep 0.1
  done
  tail -n 30 "$STATE_DIR/$record.out" >&2 2>/dev/null || true
  die "$record did not start (output: $STATE_DIR/$record.out)"
}

stop_as() {  # stop_as RECORD COMM: TERM, then KILL after 10 s
  local pid i
  pid="$(recorded_pid "$1")"
  if pid_alive "$pid" "$2"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do pid_alive "$pid" "$2" || break; sleep 0.2; done
    if pid_alive "$pid" "$2"; then kill -KILL "$pid" 2>/dev/null || true; fi
    log "stopped $1 ($pid)"
  fi
  rm -f "$STATE_DIR/$1.pid.ftdist"
}

cmd_up_hosts() {
  need_root
  local -a hosts
  mapfile -t hosts < <(cluster_hosts)
  ((${#hosts[@]} > 0)) || die "no hosts: run launch/local_cluster.sh up N first"
  mkdir -p "$STATE_DIR/state"
  install_packages
  start_munge
  probe_node
  local h addr
  for h in "${hosts[@]}"; do
    addr="$(bash "$CLUSTER" run "$h" getent hosts "$h" | awk '{print $1; exit}')"
    [[ -n "$addr" ]] || die "host $h has no address (launch/local_cluster.sh status)"
    echo "$addr" >"$STATE_DIR/addr-$h"
    mkdir -p "$STATE_DIR/spool-$h"
  done
  # every task's TMPDIR is its node's own scratch directory (node-local, as on a cluster)
  printf '#!/bin/sh\necho "export TMPDIR=%s/$SLURMD_NODENAME/tmp"\n' "${FTDIST_CLUSTER_DIR:-/tmp/ftdist-cluster}" \
    >"$STATE_DIR/task_prolog.sh"
  chmod 755 "$STATE_DIR/task_prolog.sh"
  local conf="$STATE_DIR/slurm.conf" new changed=1
  new="$(write_conf_hosts "${hosts[@]}")"
  [[ -f "$conf" && "$(cat "$conf")" == "$new" ]] && changed=0
  if [[ "$changed" == 1 ]]; then
    for h in "${hosts[@]}"; do stop_as "slurmd-$h" slurmd; done
    stop_as slurmctld slurmctld
    printf '%s\n' "$new" >"$conf"
  fi
  if ! daemon_alive_as slurmctld slurmctld; then
    start_daemon_as slurmctld slurmctld bash "$CLUSTER" run "${hosts[0]}" slurmctld -D -c -f "$conf"
  fi
  for h in "${hosts[@]}"; do
    daemon_alive_as "slurmd-$h" slurmd ||
      start_daemon_as "slurmd-$h" slurmd bash "$CLUSTER" run "$h" slurmd -D -N "$h" -f "$conf"
  done
  local deadline=$((SECONDS + WAIT_S)) states="" ready=0
  while ((SECONDS < deadline)); do
    states="$(SLURM_CONF=$conf sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)"
    ready="$(grep -cE ' (idle|mix|alloc|comp)$' <<<"$states" || true)"
    [[ "$ready" == "${#hosts[@]}" ]] && break
    daemon_alive_as slurmctld slurmctld ||
      { tail -n 30 "$STATE_DIR/slurmctld.out" "$STATE_DIR/slurmctld.log" >&2 2>/dev/null || true; die "slurmctld exited"; }
    sleep 0.5
  done
  [[ "$ready" == "${#hosts[@]}" ]] ||
    die "nodes not idle after ${WAIT_S}s: ${states:-no answer from slurmctld}; logs in $STATE_DIR"
  echo "local slurm up on ${#hosts[@]} hosts: ${hosts[*]} (controller on ${hosts[0]}); state dir $STATE_DIR"
  echo "export SLURM_CONF=$conf"
}

cmd_down_hosts() {
  need_root
  local conf="$STATE_DIR/slurm.conf" f name i
  if daemon_alive_as slurmctld slurmctld; then
    SLURM_CONF=$conf scancel --partition=debug 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
      [[ -z "$(SLURM_CONF=$conf squeue -h -t running,completing -o %A 2>/dev/null)" ]] && break
      sleep 0.25
    done
  fi
  for f in "$STATE_DIR"/slurmd-*.pid.ftdist; do
    [[ -e "$f" ]] || continue
    name="$(basename "$f" .pid.ftdist)"
    stop_as "$name" slurmd
  done
  stop_as slurmctld slurmctld
  # munged only when this mode started it and no other slurmctld (e.g. the single-node cluster) still uses it
  if daemon_alive munged && [[ -z "$(procs_named slurmctld)" ]]; then stop_daemons munged; fi
  rm -rf "${STATE_DIR:?}"/spool-* "$STATE_DIR"/addr-*
  echo "local slurm (hosts) down"
}

cmd_status_hosts() {
  local f name
  if ! daemon_alive_as slurmctld slurmctld; then
    echo "local slurm (hosts) is down (run: $0 up --hosts)"
    exit 3
  fi
  echo "slurmctld: running (pid $(recorded_pid slurmctld))"
  for f in "$STATE_DIR"/slurmd-*.pid.ftdist; do
    [[ -e "$f" ]] || continue
    name="$(basename "$f" .pid.ftdist)"
    if daemon_alive_as "$name" slurmd; then echo "$name: running (pid $(recorded_pid "$name"))"; else echo "$name: not running"; fi
  done
  SLURM_CONF="$STATE_DIR/slurm.conf" sinfo -N
}

case "${1:-}" in
  up) if [[ "$HOSTS_MODE" == 1 ]]; then cmd_up_hosts; else cmd_up; fi ;;
  down) if [[ "$HOSTS_MODE" == 1 ]]; then cmd_down_hosts; else cmd_down; fi ;;
  status) if [[ "$HOSTS_MODE" == 1 ]]; then cmd_status_hosts; else cmd_status; fi ;;
  -h | --help | help) usage 0 ;;
  *) usage 2 >&2 ;;
esac
