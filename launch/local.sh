#!/usr/bin/env bash
# One node, several processes: torchrun (default) or the deepspeed launcher.
#   launch/local.sh NPROC RECIPE [key=value ...]
#   LAUNCHER=deepspeed launch/local.sh 8 sft_7b model.name_or_path=/models/llama-2-7b
# One process (single-GPU dev mode, or CPU) needs no launcher: ftdist train RECIPE.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,5p' "$0"; exit 2; fi
nproc=$1; shift
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
port=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
case "${LAUNCHER:-torchrun}" in
  torchrun) exec "$PY" -m torch.distributed.run --nproc_per_node "$nproc" --master_port "$port" -m ftdist train "$@" ;;
  deepspeed) exec "$(dirname "$PY")/deepspeed" --num_gpus "$nproc" --master_port "$port" --module ftdist train "$@" ;;
  *) echo "LAUNCHER must be torchrun or deepspeed" >&2; exit 2 ;;
esac
