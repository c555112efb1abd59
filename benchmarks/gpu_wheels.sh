#!/usr/bin/env bash
# make gpu-wheels: the wheels the GPU machine's image lacks (see benchmarks/gpu_env.py), for Python 3.12 on
# manylinux x86-64, into .gpu-wheels/ (ignored by git; carried to the GPU machine beside the tree, 64 MiB in
# all). The versions are the ones installed in .venv, so the GPU runs what CI tests. deepspeed is built
# here as a pure-Python wheel (DS_BUILD_OPS=0: its ops JIT-build on the GPU if one is ever needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DEST=${1:-.gpu-wheels}
# deepspeed, bitsandbytes and datasets, and their requirements that the image lacks or has at a version
# they may not accept (fsspec and typing-extensions are small: carried at the tested version)
PKGS="bitsandbytes datasets dill multiprocess hjson pydantic pydantic-core annotated-types typing-inspection fsspec
typing-extensions"
pins=$($PY - "$PKGS" <<'PYEOF'
import sys
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in sys.argv[1].split()))
PYEOF
)
ds=$($PY -c "from importlib.metadata import version; print(version('deepspeed'))")
tmp="$DEST.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
echo "gpu-wheels: downloading $pins"
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d "$tmp" $pins
echo "gpu-wheels: building deepspeed==$ds without ops"
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$tmp" "deepspeed==$ds"
if unzip -l "$tmp"/deepspeed-*.whl | grep -q '\.so$'; then
  echo "gpu-wheels: the deepspeed wheel holds compiled ops; expected a pure-Python wheel" >&2
  exit 1
fi
$PY benchmarks/gpu_env.py check-wheels "$tmp"
rm -rf "$DEST"
mv "$tmp" "$DEST"
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
whl=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "gpu-wheels: $DEST ready; with the tracked tree $(( (tree + whl) / 1048576 )) MiB of the 64 MiB a GPU call carries"
if (( tree + whl > 64 * 1048576 )); then
  echo "gpu-wheels: over 64 MiB" >&2
  exit 1
fi
