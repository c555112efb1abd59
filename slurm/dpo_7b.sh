#!/bin/bash
# DPO of a 7B model on Slurm: one node x 8 GPUs (LoRA; the reference is the adapter switched off).
#
#   sbatch slurm/dpo_7b.sh                                     (from the ftdist checkout)
#   OVERRIDES="model.name_or_path=runs/sft_7b/final data.train=/data/pairs.jsonl" sbatch slurm/dpo_7b.sh
#   sbatch --ntasks-per-node=8 --cpus-per-task=8 slurm/dpo_7b.sh   (one task per GPU instead of torchrun)
#
# Settings: the #SBATCH lines below (any of them can be overridden on the sbatch command line)
# and these environment variables, which sbatch passes to the job:
#   RECIPE                 built-in recipe name or YAML path (default: dpo_7b)
#   OVERRIDES              key=value overrides separated by spaces, shell quoting honoured
#   FTDIST_ENV             venv or conda env to activate (default: .venv of the checkout; "none": PATH as is)
#   FTDIST_HOME            the ftdist checkout (default: the directory sbatch was run from)
#   FTDIST_LAUNCH          auto (default) | torchrun | srun: with one task per node (as below) each
#                          task starts torchrun; with one task per GPU each task is one rank
#   FTDIST_NPROC_PER_NODE  ranks per node under torchrun (default: the node's GPUs)
# The rendezvous is the first host of the node list, port 20000 + job id % 20000.
#
# Preemption: 10 minutes before the time limit Slurm sends USR1 (--signal=B:USR1@600); every
# rank finishes its step, the checkpoint is saved, and the job requeues itself (--requeue) and
# resumes from the newest complete checkpoint. Same by hand: scancel --signal=USR1 --batch JOBID.
# Output goes to ftdist-dpo-7b-JOBID.out in the submit directory, appended across restarts.
#SBATCH --job-name=ftdist-dpo-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
RECIPE=${RECIPE:-dpo_7b}
source "${FTDIST_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" ||
  { echo "slurm/common.sh not found: submit from the ftdist checkout or set FTDIST_HOME" >&2; exit 2; }
ftdist_setup "$@"
ftdist_train
