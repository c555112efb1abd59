"""The GPU machine's Python environment: what its image lacks, and whether the carried wheels fit it.

    python benchmarks/gpu_env.py check-wheels DIR     every requirement of every wheel in DIR is met by another
                                                      wheel there or by a package of the GPU image (exit 1 if not)
    python benchmarks/gpu_env.py check-installed DIR  on the GPU machine, after installing DIR: each requirement
                                                      against the installed version (one line per conflict)
    python benchmarks/gpu_env.py versions             the versions the checks run with, and the GPU

The GPU machine (Python 3.12, x86-64, no package index) has torch 2.11 with CUDA 13, transformers, peft,
accelerate, pyarrow, pandas, tensorboard and pytest, but not deepspeed, bitsandbytes, datasets, trl or ray.
`make gpu-wheels` carries what ftdist's GPU checks need of the missing ones (trl and ray are not needed:
no check imports them).
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

# the packages of the GPU machine's image ('cuda'), as listed for it on 2026-11-17
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio interface-meta iniconfig jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash
yarl zipp""".split()

# what the GPU checks import that the image lacks: the wheelhouse holds these and their missing requirements
NEEDED = ["deepspeed", "bitsandbytes", "datasets"]
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wheel_meta(path: Path) -> tuple[str, str, list]:
    """(name, version, [Requirement]) of a wheel, requirements of its extras left out."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    name = version = ""
    reqs = []
    for line in text.splitlines():
        if line.startswith("Name: "):
            name = line[6:].strip()
        elif line.startswith("Version: "):
            version = line[9:].strip()
        elif line.startswith("Requires-Dist: "):
            req = Requirement(line[15:].strip())
            if req.marker is None or req.marker.evaluate(TARGET):
                reqs.append(req)
        elif not line.strip():
            break
    return name, version, reqs


def check_wheels(folder: Path) -> int:
    wheels = {}
    for w in sorted(folder.glob("*.whl")):
        name, version, reqs = wheel_meta(w)
        wheels[norm(name)] = (version, reqs, w.name)
    problems = [f"{n}: not in {folder} and not on the GPU image" for n in NEEDED if norm(n) not in wheels]
    image = {norm(n) for n in IMAGE}
    unsure = set()
    for name, (version, reqs, file) in wheels.items():
        for req in reqs:
            r = norm(req.name)
            if r in wheels:
                if not req.specifier.contains(wheels[r][0], prereleases=True):
                    problems.append(f"{file} needs {req}, the wheelhouse has {r} {wheels[r][0]}")
            elif r in image:
                if str(req.specifier):
                    unsure.add(f"{r}{req.specifier}")
            else:
                problems.append(f"{file} needs {req}: neither in {folder} nor on the GPU image")
    size = sum(w.stat().st_size for w in folder.glob("*.whl"))
    for p in problems:
        print(f"gpu-wheels: {p}")
    print(f"gpu-wheels: {len(wheels)} wheels, {size / 2**20:.1f} MiB; "
          + ("complete" if not problems else f"{len(problems)} problem(s)")
          + (f"; versions the image must have (checked there): {', '.join(sorted(unsure))}" if unsure else ""))
    return 1 if problems else 0


def check_installed(folder: Path) -> int:
    """On the GPU machine, after the wheels are installed: every requirement against what is importable."""
    from importlib.metadata import PackageNotFoundError, version

    bad = 0
    for w in sorted(folder.glob("*.whl")):
        name, _, reqs = wheel_meta(w)
        for req in reqs:
            try:
                have = version(req.name)
            except PackageNotFoundError:
                print(f"env: {name} needs {req}: not installed")
                bad += 1
                continue
            if not req.specifier.contains(have, prereleases=True):
                print(f"env: {name} needs {req}, found {have}")
                bad += 1
    print(f"env: requirements of the carried wheels: {'all met' if not bad else f'{bad} not met'}")
    return 1 if bad else 0


def versions() -> int:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    for name in ("transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "datasets", "flash-attn",
                 "pyarrow"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} -")
    gpu = (f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
           if torch.cuda.is_available() else "no GPU")
    print(f"versions: {gpu}; " + ", ".join(parts))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-wheels"] and len(argv) == 2:
        return check_wheels(Path(argv[1]))
    if argv[:1] == ["check-installed"] and len(argv) == 2:
        return check_installed(Path(argv[1]))
    if argv == ["versions"]:
        return versions()
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
