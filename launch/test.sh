#!/usr/bin/env bash
# The whole test suite: unit, dist (gloo processes), ray (a real local Ray), slurm (a local Slurm that
# launch/local_slurm.sh brings up, as root) and gpu (skipped without CUDA). Extra args go to pytest.
# Every test's duration goes to test-results/junit.xml (minutes per folder: python launch/test_times.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
mkdir -p test-results
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 --junitxml=test-results/junit.xml "$@"
