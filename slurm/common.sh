# slurm/common.sh — sourced by the sbatch scripts in slurm/ (not submitted itself).
#
# What the scripts share:
#   ftdist_setup [ARG...]   find the checkout, activate the environment; FTDIST_ARGS = RECIPE,
#                           OVERRIDES, ARGs (the `ftdist train` arguments); rendezvous address
#   ftdist_train            start the training step (torchrun per node, or one task per GPU),
#                           forward USR1 to it, wait, requeue the job after a preemption stop
#   ftdist_run_preemptible  the same signal handling around any command (the PPO driver)
#   ftdist_finish           exit with the step's status, or requeue after a preemption stop
#
# Environment read here (each script documents the ones that apply to it):
#   FTDIST_HOME            the ftdist checkout (default: the directory sbatch was run from)
#   FTDIST_ENV             a venv or conda env to activate; default: $FTDIST_HOME/.venv when it
#                          exists; "none" keeps PATH as it is (modules loaded by the user)
#   RECIPE                 built-in recipe name or YAML path
#   OVERRIDES              recipe overrides, key=value separated by spaces; shell quoting is
#                          honoured ('data.columns={messages: conversations}'); arguments given
#                          after the script name on the sbatch line are appended
#   FTDIST_LAUNCH          auto | torchrun | srun. torchrun: one Slurm task per node starts
#                          torchrun with FTDIST_NPROC_PER_NODE processes. srun: one Slurm task
#                          per rank (per GPU), ranks from SLURM_PROCID. auto: srun when the job
#                          has more than one task per node or a single process in all, else torchrun
#   FTDIST_NPROC_PER_NODE  processes per node in torchrun mode (default: GPUs on the node, or 1)
#   FTDIST_STOP_TIMEOUT    seconds torchrun gives its ranks to checkpoint after USR1 before it
#                          kills them (default 3600: in practice the job's time limit decides)
#
# Preemption: the scripts ask for `--signal=B:USR1@GRACE --requeue`. Slurm sends USR1 to
# this batch shell GRACE seconds before the time limit (or `scancel --signal=USR1 --batch ID`
# by hand). The trap forwards USR1 to every task of the training step: ftdist ranks handle it
# (srun mode), torchrun forwards it to its ranks (--signals-to-handle). Every rank finishes
# the current step, the ranks save a checkpoint together and exit with code 3; the step ends,
# and the script runs `scontrol requeue`. The restarted job (same id, SLURM_RESTART_COUNT
# +1, log appended) resumes from the newest complete checkpoint (checkpoint.resume=auto).

ftdist_log() { echo "ftdist-slurm: $*" >&2; }
ftdist_die() { ftdist_log "error: $*"; exit 2; }

ftdist_setup() {
  FTDIST_HOME=$(cd "${FTDIST_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd)
  [[ -f "$FTDIST_HOME/ftdist/__init__.py" ]] ||
    ftdist_die "FTDIST_HOME=$FTDIST_HOME is not an ftdist checkout (submit from the checkout or set FTDIST_HOME)"
  local env=${FTDIST_ENV:-}
  if [[ -z "$env" && -d "$FTDIST_HOME/.venv" ]]; then env=$FTDIST_HOME/.venv; fi
  if [[ -n "$env" && "$env" != none ]]; then
    if [[ -f "$env/bin/activate" && ! -d "$env/conda-meta" ]]; then
      # shellcheck disable=SC1091
      source "$env/bin/activate"
    elif [[ -d "$env/conda-meta" ]]; then
      if command -v conda >/dev/null; then
        eval "$(conda shell.bash hook)" && conda activate "$env"
      else
        export PATH="$env/bin:$PATH" CONDA_PREFIX="$env"
      fi
    else
      ftdist_die "FTDIST_ENV=$env is neither a venv (bin/activate) nor a conda env (conda-meta/)"
    fi
  fi
  # the checkout wins over an installed copy, so that the job runs the code it was submitted from
  export PYTHONPATH="$FTDIST_HOME${PYTHONPATH:+:$PYTHONPATH}"
  command -v python >/dev/null || ftdist_die "no python on PATH (set FTDIST_ENV)"
  [[ -n "${RECIPE:-}" ]] || ftdist_die "RECIPE is not set"
  # OVERRIDES split with shell quoting but without eval: nothing in it is executed
  local split
  split=$(python -c 'import os, shlex; print("\n".join(shlex.split(os.environ.get("OVERRIDES", ""))))') ||
    ftdist_die "OVERRIDES could not be split (unbalanced quotes?): $OVERRIDES"
  FTDIST_ARGS=("$RECIPE")
  if [[ -n "$split" ]]; then mapfile -t -O 1 FTDIST_ARGS <<<"$split"; fi
  FTDIST_ARGS+=("$@")
  # srun does not inherit --cpus-per-task from the allocation since Slurm 22.05
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  # the same port on every node; concurrent jobs differ; a requeued job keeps it
  MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  export MASTER_ADDR MASTER_PORT
  ftdist_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST; python $(command -v python)"
}

_ftdist_gpus_on_node() {
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" && "${SLURM_GPUS_ON_NODE}" != 0 ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 1
  fi
}

# _ftdist_wait PID: wait for PID to exit even while USR1 traps interrupt `wait`; sets FTDIST_RC.
_ftdist_wait() {
  while :; do
    FTDIST_RC=0
    wait "$1" || FTDIST_RC=$?
    # `wait` returns >128 when a trap ran; the child may still be running (or a zombie)
    kill -0 "$1" 2>/dev/null || return 0
  done
}

FTDIST_STOP_REQUESTED=0

# ftdist_finish: after the step or driver ended: requeue when it stopped for a preemption.
ftdist_finish() {
  if [[ "$FTDIST_STOP_REQUESTED" == 1 && "$FTDIST_RC" != 0 ]]; then
    ftdist_log "stopped after USR1 (exit $FTDIST_RC); requeueing job $SLURM_JOB_ID to resume from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || ftdist_die "scontrol requeue $SLURM_JOB_ID failed"
    exit 0
  fi
  if [[ "$FTDIST_RC" == 0 ]]; then ftdist_log "finished"; else ftdist_log "failed (exit $FTDIST_RC)"; fi
  exit "$FTDIST_RC"
}

ftdist_train() {
  local mode=${FTDIST_LAUNCH:-auto} nnodes=${SLURM_JOB_NUM_NODES:-1} ntasks=${SLURM_NTASKS:-1}
  local nproc=${FTDIST_NPROC_PER_NODE:-$(_ftdist_gpus_on_node)}
  if [[ "$mode" == auto ]]; then
    if ((ntasks > nnodes)) || ((ntasks == 1 && nproc == 1)); then mode=srun; else mode=torchrun; fi
  fi
  trap '_ftdist_on_usr1 step' USR1
  case "$mode" in
    torchrun)
      ftdist_log "torchrun on $nnodes node(s) x $nproc process(es); rendezvous $MASTER_ADDR:$MASTER_PORT"
      # $SLURM_NODEID must expand inside each task, hence bash -c with the arguments passed through
      srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash -c 'exec python -m torch.distributed.run --nnodes "$SLURM_JOB_NUM_NODES" --node_rank "$SLURM_NODEID" \
          --nproc_per_node "$0" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
          --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${FTDIST_STOP_TIMEOUT:-3600}" \
          -m ftdist train "$@"' "$nproc" "${FTDIST_ARGS[@]}" &
      ;;
    srun)
      ftdist_log "srun: $ntasks task(s), one rank each; rendezvous $MASTER_ADDR:$MASTER_PORT"
      srun --kill-on-bad-exit=1 python -m ftdist train "${FTDIST_ARGS[@]}" &
      ;;
    *) ftdist_die "FTDIST_LAUNCH must be auto, torchrun or srun (got $mode)" ;;
  esac
  FTDIST_CHILD=$!
  _ftdist_wait "$FTDIST_CHILD"
  ftdist_finish
}

# ftdist_run_preemptible CMD...: run CMD here (the first node) with the same USR1 handling;
# sets FTDIST_RC. The caller cleans up, then calls ftdist_finish.
ftdist_run_preemptible() {
  trap '_ftdist_on_usr1 child' USR1
  "$@" &
  FTDIST_CHILD=$!
  _ftdist_wait "$FTDIST_CHILD"
  trap - USR1
}

_ftdist_on_usr1() {
  FTDIST_STOP_REQUESTED=1
  ftdist_log "USR1: asking the job to checkpoint at the end of the current step and stop"
  if [[ "$1" == step ]]; then
    # every task of the job's steps (not this batch shell): the ranks, or the torchrun agents
    scancel --signal=USR1 "$SLURM_JOB_ID" || kill -USR1 "$FTDIST_CHILD"
  else
    kill -USR1 "$FTDIST_CHILD" 2>/dev/null || true
  fi
}
