#!/usr/bin/env bash
# The numerics tests under emulated CPUs: torch's vector kernels and MKL restricted to AVX2, then to SSE4.2
# (the host's own kernels are what `make test` uses). A tolerance that only holds on one CPU fails here.
#   bash launch/test_cpu_variants.sh            # the default selection below
#   bash launch/test_cpu_variants.sh tests/dist/test_sft_equivalence.py
set -euo pipefail
cd "$(dirname "$0")/.."
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/unit tests/dist/test_sft_equivalence.py tests/dist/test_preference_dist.py
                                 tests/dist/test_checkpoint_resume.py tests/dist/test_lora_dist.py)
status=0
for variant in avx2 sse4_2; do
  case $variant in
    avx2) env=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2) ;;
    sse4_2) env=(ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41) ;;
  esac
  echo "== $variant: ${env[*]}"
  env "${env[@]}" bash launch/test.sh "${tests[@]}" || status=1
done
exit $status
