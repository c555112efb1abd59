#!/usr/bin/env bash
# Submit a recipe to a running Ray cluster as a Ray job (`ray job submit`, Jobs API).
#   RAY_ADDRESS=http://127.0.0.1:8265 launch/ray_submit.sh RECIPE [key=value ...]
#   FTDIST_RAY_WORKERS=16 launch/ray_submit.sh sft_7b output_dir=/shared/runs/sft_7b
#
# The checkout is uploaded as the job's working_dir (files ignored by git, .git, .venv and
# runs/ stay behind), and the job runs `python launch/ray_train.py RECIPE ...` on the cluster:
# SFT/RM/DPO as a Ray Train TorchTrainer whose workers resume from the newest ftdist checkpoint
# after a failure, PPO as its driver. The cluster's Python (the environment `ray start` ran in)
# must have ftdist's dependencies installed.
#
# Environment:
#   RAY_ADDRESS                 the cluster's dashboard address (required), e.g. http://HEAD:8265
#   FTDIST_RAY_WORKERS          training workers (default: the cluster's GPUs, else 2)
#   FTDIST_RAY_CPUS_PER_WORKER  CPUs per worker (default 1)
#   FTDIST_RAY_MAX_FAILURES     worker-group restarts from the newest checkpoint (default 3)
#   FTDIST_RAY_PYTHON           the Python on the cluster (default: python)
#   FTDIST_RAY_SUBMIT_ARGS      extra `ray job submit` arguments, e.g. "--no-wait --submission-id sft-1"
# Every FTDIST_* variable is passed to the job. output_dir must be on a filesystem that every node
# sees; a relative one resolves against the current directory (FTDIST_SUBMIT_DIR).
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then sed -n '2,22p' "$0"; exit 2; fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address, e.g. http://127.0.0.1:8265}"
export FTDIST_SUBMIT_DIR=${FTDIST_SUBMIT_DIR:-$PWD}
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RAY=${RAY:-$( [ -x .venv/bin/ray ] && echo .venv/bin/ray || echo ray )}
runtime_env=$("$PY" - <<'EOF'
import json, os

env = {k: v for k, v in os.environ.items() if k.startswith("FTDIST_") and k != "FTDIST_RAY_SUBMIT_ARGS"}
# Ray also leaves out .git, .venv and whatever .gitignore names
print(json.dumps({"working_dir": ".", "excludes": ["runs", "outputs"], "env_vars": env}))
EOF
)
read -r -a extra <<<"${FTDIST_RAY_SUBMIT_ARGS:-}"
# `ray job submit` quotes each argument after -- into the entrypoint's shell command line
exec "$RAY" job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env" "${extra[@]}" \
  -- "${FTDIST_RAY_PYTHON:-python}" launch/ray_train.py "$@"
