#!/bin/bash
# PPO of a 7B model on Slurm: a Ray cluster over the job's nodes (head on the first node, a worker
# on each other node), the PPO driver against it, then the cluster is torn down. The recipe places
# its four roles on one node of 8 GPUs; with --nodes=N raise its ppo.*_ranks to use them.
#
#   sbatch slurm/ppo_7b.sh                                     (from the ftdist checkout)
#   OVERRIDES="model.name_or_path=runs/sft_7b/final ppo.reward_model=runs/rm_7b/final data.train=/data/prompts.jsonl" sbatch slurm/ppo_7b.sh
#   OVERRIDES="ppo.policy_ranks=8 ppo.critic_ranks=4 ..." sbatch --nodes=2 slurm/ppo_7b.sh
#
# Settings: the #SBATCH lines below (any of them can be overridden on the sbatch command line)
# and these environment variables, which sbatch passes to the job:
#   RECIPE            built-in recipe name or YAML path (default: ppo_7b)
#   OVERRIDES         key=value overrides separated by spaces, shell quoting honoured
#   FTDIST_ENV        venv or conda env to activate on every node (default: .venv of the checkout)
#   FTDIST_HOME       the ftdist checkout (default: the directory sbatch was run from)
#   FTDIST_DRIVER     a shell command to run against the cluster instead of
#                     `python -m ftdist train RECIPE OVERRIDES` (RAY_ADDRESS is set for it)
#   FTDIST_RAY_HEAD_IP, FTDIST_RAY_PORT, FTDIST_RAY_WAIT: see slurm/ray_cluster.sh
# The cluster is up when every node has joined (not after a fixed sleep); the driver finds it
# through RAY_ADDRESS. output_dir must be on a filesystem that every node sees.
#
# Preemption: 10 minutes before the time limit Slurm sends USR1 (--signal=B:USR1@600) and the driver
# gets it: a driver that handles USR1 checkpoints first, one that does not stops at once. Either
# way the cluster is stopped and the job requeues itself (--requeue) to resume from the newest
# complete checkpoint (checkpoint.every_steps). By hand: scancel --signal=USR1 --batch JOBID.
# Output goes to ftdist-ppo-7b-JOBID.out in the submit directory, appended across restarts.
#SBATCH --job-name=ftdist-ppo-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
RECIPE=${RECIPE:-ppo_7b}
source "${FTDIST_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" ||
  { echo "slurm/common.sh not found: submit from the ftdist checkout or set FTDIST_HOME" >&2; exit 2; }
ftdist_setup "$@"
source "$FTDIST_HOME/slurm/ray_cluster.sh"
trap ftdist_ray_down EXIT
ftdist_ray_up
if [[ -n "${FTDIST_DRIVER:-}" ]]; then
  ftdist_run_preemptible bash -c "$FTDIST_DRIVER"
else
  ftdist_run_preemptible python -m ftdist train "${FTDIST_ARGS[@]}"
fi
ftdist_ray_down
ftdist_finish
