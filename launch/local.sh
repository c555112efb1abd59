#!/usr/bin/env bash
# One node, several processes: torchrun (default) or the deepspeed launcher.
#   launch/local.sh NPROC RECIPE [key=value ...]
#   LAUNCHER=deepspeed launch/local.sh 8 sft_7b model.name_or_path=/models/llama-2-7b
# One process (single-GPU dev mode, or CPU) needs no launcher: ftdist train RECIPE.
# Runs in the current directory, so relative recipe paths and output_dir mean what they say.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,6p' "$0"; exit 2; fi
nproc=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python )}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# as if activated: DeepSpeed's op builds then use the environment's ninja, not a system one
[[ "$PY" == */* ]] && export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"
port=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
case "${LAUNCHER:-torchrun}" in
  torchrun) exec "$PY" -m torch.distributed.run --nproc_per_node "$nproc" --master_port "$port" -m ftdist train "$@" ;;
  deepspeed)
    ds="$(dirname "$PY")/deepspeed"
    [ -x "$ds" ] || ds=deepspeed
    exec "$ds" --num_gpus "$nproc" --master_port "$port" --module ftdist train "$@" ;;
  *) echo "LAUNCHER must be torchrun or deepspeed" >&2; exit 2 ;;
esac
