#!/usr/bin/env bash
# The GPU proof in one command, for the short moments a GPU machine is lent:
#
#   make gpu-wheels                                  # here, once: .gpu-wheels/ (what the GPU image lacks)
#   bash benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine, with .gpu-wheels carried along
#   bash benchmarks/gpu_check.sh --dry OUT_DIR       # here, without a GPU: every step that needs no CUDA
#
# Steps (each prints one line starting PASS, FAIL, INFO or SKIP, and appends one JSON record to
# OUT_DIR/results.jsonl; the full output goes to OUT_DIR/gpu_check.log):
#   env       install .gpu-wheels offline into a scratch target, check their requirements, print versions
#   zero      ZeRO-2 and ZeRO-3 on one rank (NCCL) against a plain PyTorch loop, bf16 (gpu_checks.py zero)
#   gpu_tests the gpu-marked tests (QLoRA single-GPU dev mode with the real paged optimizer)
#   sft_mfu   gpu_sft.py: TinyLlama-1.1B shape, bf16, packed 2048-token rows, checkpointing off and on
#   qlora     peak memory of QLoRA on that shape against `ftdist plan` (within 15%) (gpu_checks.py qlora)
#   generate  the PPO policy's generate call: generated tokens/s for a batch of prompts
#   packing   packed against padded rows of the same data (gpu_sft.py --compare packing)
# The whole run stays within GPU_CHECK_BUDGET_S seconds (default 470): a step that would start later is
# recorded as SKIP. The dry mode runs the tiny CPU version of every check, with trl and ray made
# unimportable as on the GPU image, and installs the wheels for Python 3.12 without importing them.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: bash benchmarks/gpu_check.sh [--dry] OUT_DIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
LOG=$OUT/gpu_check.log
RES=$OUT/results.jsonl
: > "$LOG"
: > "$RES"
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
WHEELS=$ROOT/.gpu-wheels
SCRATCH=${GPU_CHECK_SCRATCH:-${TMPDIR:-/tmp}/ftdist-gpu-check}
rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$LOG"; }

# record NAME VERDICT LINE: one JSON record for a step that did not write its own
record() {
  "$PY" - "$1" "$2" "$3" >> "$RES" <<'PYEOF'
import json, sys
name, verdict, line = sys.argv[1:]
print(json.dumps({"check": name, "ok": verdict in ("PASS", "INFO"), "verdict": verdict, "line": line}))
PYEOF
}

# step NAME TIMEOUT_S CMD...: run CMD (which appends its own record to $RES and prints its result line
# last), bounded by its timeout and by what is left of the budget
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 20 )); then
    say "SKIP $name: the ${BUDGET}s budget is spent"
    record "$name" SKIP "SKIP $name: the ${BUDGET}s budget is spent"
    return
  fi
  (( limit > left )) && limit=$left
  local before t0 rc
  before=$(wc -l < "$RES")
  t0=$(date +%s)
  echo "=== $name: $*" >> "$LOG"
  # bash -c: a step may be one of the functions below (exported with the variables they use)
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$SCRATCH/$name.out" 2>&1
  rc=$?
  cat "$SCRATCH/$name.out" >> "$LOG"
  if (( $(wc -l < "$RES") > before )); then
    say "$(tail -n 1 "$RES" | "$PY" -c 'import json, sys; print(json.loads(sys.stdin.read())["line"])') [$(( $(date +%s) - t0 ))s]"
  else
    local why="exit $rc"
    (( rc == 124 || rc == 137 )) && why="timed out after ${limit}s"
    local last
    last=$(grep -v '^\s*$' "$SCRATCH/$name.out" | tail -n 1 | cut -c1-300)
    say "FAIL $name: $why: $last"
    record "$name" FAIL "FAIL $name: $why: $last"
  fi
}

# -- env: the wheels the image lacks, installed offline ---------------------------------------------------
if (( DRY )); then
  PY=$ROOT/.venv/bin/python
  [ -x "$PY" ] || PY=python3
  if [ ! -d "$WHEELS" ]; then
    bash benchmarks/gpu_wheels.sh >> "$LOG" 2>&1 || { say "FAIL env: make gpu-wheels failed (see $LOG)"; exit 1; }
  fi
  # the wheels must install for the GPU machine's Python 3.12 from the folder alone (no index)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SCRATCH/site312" --python-version 3.12 \
    --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux2014_x86_64 "$WHEELS"/*.whl >> "$LOG" 2>&1
  rc=$?
  "$PY" benchmarks/gpu_env.py check-wheels "$WHEELS" > "$SCRATCH/env.out" 2>&1
  rc2=$?
  cat "$SCRATCH/env.out" >> "$LOG"
  # trl and ray are not on the GPU image: no check may import them
  mkdir -p "$SCRATCH/block"
  cat > "$SCRATCH/block/sitecustomize.py" <<'PYEOF'
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("trl", "ray"):
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image)")
sys.meta_path.insert(0, _Missing())
PYEOF
  export PYTHONPATH=$SCRATCH/block
  versions=$("$PY" benchmarks/gpu_env.py versions 2>>"$LOG")
  if (( rc == 0 && rc2 == 0 )); then
    line="INFO env (dry): $(ls "$WHEELS"/*.whl | wc -l) wheels installed for Python 3.12 into a scratch target; $(tail -n 1 "$SCRATCH/env.out" | sed 's/^gpu-wheels: //'); checks run here with trl and ray unimportable; $versions"
    say "$line"; record env INFO "$line"
  else
    line="FAIL env (dry): pip exit $rc, requirements check exit $rc2 (see gpu_check.log)"
    say "$line"; record env FAIL "$line"
  fi
  TINY=(--tiny)
else
  PY=python3
  if [ ! -d "$WHEELS" ]; then
    say "FAIL env: $WHEELS is missing: run make gpu-wheels here first and carry .gpu-wheels"
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SCRATCH/site" \
    "$WHEELS"/*.whl >> "$LOG" 2>&1
  rc=$?
  export PYTHONPATH=$SCRATCH/site
  "$PY" benchmarks/gpu_env.py check-installed "$WHEELS" > "$SCRATCH/env.out" 2>&1
  cat "$SCRATCH/env.out" >> "$LOG"
  versions=$("$PY" benchmarks/gpu_env.py versions 2>>"$LOG")
  "$PY" -m pip list 2>/dev/null > "$OUT/pip_list.txt"
  nvidia-smi >> "$LOG" 2>&1
  verdict=INFO
  (( rc != 0 )) && verdict=FAIL
  line="$verdict env: pip exit $rc; $(tail -n 1 "$SCRATCH/env.out" | sed 's/^env: //'); $versions"
  say "$line"; record env "$verdict" "$line"
  TINY=()
fi

# -- the checks ------------------------------------------------------------------------------------------
W=$SCRATCH/work
mkdir -p "$W"
export PY SCRATCH RES DRY W
step zero 90 "$PY" benchmarks/gpu_checks.py zero "${TINY[@]}" --work "$W" --json "$RES"

gpu_tests() {
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tee "$SCRATCH/pytest.out"
  local summary verdict
  summary=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$SCRATCH/pytest.out" | tail -n 1 | tr -d '=' | xargs)
  verdict=PASS
  grep -qE 'failed|error' <<< "$summary" && verdict=FAIL
  grep -qE 'passed' <<< "$summary" || { [ "$verdict" = PASS ] && verdict=INFO; }
  record gpu_tests "$verdict" "$verdict gpu_tests: $summary"
  [ "$verdict" != FAIL ]
}
export -f record gpu_tests
step gpu_tests 120 gpu_tests

sft() {  # sft ckpt|packing
  local extra=(--steps 16 --warmup 6)
  (( DRY )) && extra=(--tiny)
  "$PY" benchmarks/gpu_sft.py "${extra[@]}" --compare "$1" --work "$W/sft" --json "$SCRATCH/sft_$1.json" &&
    "$PY" benchmarks/gpu_checks.py sft-record "$SCRATCH/sft_$1.json" "$1" --json "$RES"
}
export -f sft
step sft_mfu 200 sft ckpt
step qlora 100 "$PY" benchmarks/gpu_checks.py qlora "${TINY[@]}" --work "$W/sft" --json "$RES"
step generate 60 "$PY" benchmarks/gpu_checks.py generate "${TINY[@]}" --work "$W/sft" --json "$RES"
step packing 120 sft packing

cp "$SCRATCH"/sft_*.json "$OUT"/ 2>/dev/null
failed=$(grep -c '"ok": false' "$RES")
say "gpu_check: $(wc -l < "$RES") records in $RES, $failed failed, $(( $(date +%s) - START ))s"
(( failed == 0 ))
