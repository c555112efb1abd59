# slurm/ray_cluster.sh — a Ray cluster over the job's nodes; sourced by slurm/ppo_7b.sh after
# slurm/common.sh (not submitted itself).
#
#   ftdist_ray_up     head on the first node (where the batch script runs), one worker per other
#                     node, each an `srun ... ray start --block` step; returns once the cluster
#                     reports every node; exports RAY_ADDRESS for the driver
#   ftdist_ray_down   SIGTERM to those steps: `ray start --block` then stops the Ray processes it
#                     started on its node (`ray stop` would also kill other users' Ray clusters)
#
# Environment:
#   FTDIST_RAY_HEAD_IP  the head's address (default: the first address of `hostname -I` on the
#                       first node); 127.0.0.1 keeps a one-node cluster on loopback
#   FTDIST_RAY_PORT     first of 9 consecutive ports: GCS, dashboard, client server, dashboard
#                       agent (http, grpc), runtime-env agent, metrics, node manager, object manager
#                       (default 30000 + job id % 1000 * 10, so jobs sharing a node differ)
#   FTDIST_RAY_WAIT     seconds to wait for every node to join (default 300)
# Ray's token authentication is on, with a fresh token per job that lives only in the
# environment of this job's processes. The dashboard listens on loopback only: reach it with
# `ssh -L PORT:127.0.0.1:PORT FIRST_NODE`.

FTDIST_RAY_STEPS=()

ftdist_ray_up() {
  local nodes nnodes head ip base ncpus
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  nnodes=${#nodes[@]}
  head=${nodes[0]}
  ip=${FTDIST_RAY_HEAD_IP:-$(hostname -I | awk '{print $1}')}
  base=${FTDIST_RAY_PORT:-$((30000 + SLURM_JOB_ID % 1000 * 10))}
  ncpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
  if [[ "$ip" == 127.* ]]; then
    ((nnodes == 1)) || ftdist_die "FTDIST_RAY_HEAD_IP=$ip is loopback but the job has $nnodes nodes"
    # otherwise Ray replaces a loopback address with the machine's and listens on every interface
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  fi
  RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN
  # the job's end tears the cluster down; Ray's default 30 s drain would only delay that
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_USAGE_STATS_ENABLED=0
  export RAY_ADDRESS="$ip:$base"
  local temp_dir="/tmp/ray-ftdist-$SLURM_JOB_ID"
  local ports=(--dashboard-agent-listen-port=$((base + 3)) --dashboard-agent-grpc-port=$((base + 4))
    --runtime-env-agent-port=$((base + 5)) --metrics-export-port=$((base + 6))
    --node-manager-port=$((base + 7)) --object-manager-port=$((base + 8)))
  ftdist_log "Ray head on $head ($RAY_ADDRESS), dashboard http://127.0.0.1:$((base + 1)) on $head; $nnodes node(s)"
  srun --nodes=1 --ntasks=1 -w "$head" \
    ray start --head --block --node-ip-address="$ip" --port="$base" --num-cpus="$ncpus" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port=$((base + 1)) \
      --ray-client-server-port=$((base + 2)) "${ports[@]}" --temp-dir="$temp_dir" --disable-usage-stats &
  FTDIST_RAY_STEPS+=($!)
  if ((nnodes > 1)); then
    # the workers' own addresses come from their nodes
    srun --nodes=$((nnodes - 1)) --ntasks=$((nnodes - 1)) --ntasks-per-node=1 --exclude="$head" \
      ray start --block --address="$RAY_ADDRESS" --num-cpus="$ncpus" "${ports[@]}" \
        --temp-dir="$temp_dir" --disable-usage-stats &
    FTDIST_RAY_STEPS+=($!)
  fi
  python "$FTDIST_HOME/launch/ray_wait.py" "$RAY_ADDRESS" "$nnodes" --timeout "${FTDIST_RAY_WAIT:-300}" \
    --watch-pid "${FTDIST_RAY_STEPS[@]}" || { ftdist_ray_down; ftdist_die "the Ray cluster did not come up"; }
}

ftdist_ray_down() {
  local pid i alive
  ((${#FTDIST_RAY_STEPS[@]})) || return 0
  ftdist_log "stopping the Ray cluster"
  # srun ends its step on SIGTERM: the tasks get SIGTERM, then SIGKILL after Slurm's KillWait
  kill -TERM "${FTDIST_RAY_STEPS[@]}" 2>/dev/null || true
  for ((i = 0; i < 60; i++)); do
    alive=0
    for pid in "${FTDIST_RAY_STEPS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 1
  done
  for pid in "${FTDIST_RAY_STEPS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait "${FTDIST_RAY_STEPS[@]}" 2>/dev/null || true
  FTDIST_RAY_STEPS=()
}
