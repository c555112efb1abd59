"""benchmarks/gpu_env.py: the wheelhouse carried to the GPU machine is checked for completeness here."""

import sys
import zipfile

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_env  # noqa: E402

pytestmark = pytest.mark.unit


def _wheel(folder, name, version, requires=()):
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
            *(f"Requires-Dist: {r}" for r in requires), "", "the description"]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(meta))
    return path


def _complete(folder):
    _wheel(folder, "deepspeed", "0.19.8", ["hjson", "torch>=2.0.0", "pydantic>=2.0.0"])
    _wheel(folder, "hjson", "3.1.0")
    _wheel(folder, "pydantic", "2.14.4")
    _wheel(folder, "bitsandbytes", "0.50.2", ["torch<3,>=2.4", 'pywin32; sys_platform == "win32"'])
    _wheel(folder, "datasets", "5.2.0", ["dill<0.4.2,>=0.3.0", "pyarrow>=24.0.0", "s3fs; extra == 's3'"])
    _wheel(folder, "dill", "0.4.1")


def test_a_complete_wheelhouse_passes_and_names_what_the_image_must_have(tmp_path, capsys):
    _complete(tmp_path)
    assert gpu_env.check_wheels(tmp_path) == 0
    out = capsys.readouterr().out
    # requirements met by the image are listed with their versions (checked on the GPU machine); markers for
    # other platforms and extras are not requirements
    assert "complete" in out and "pyarrow>=24.0.0" in out and "pywin32" not in out and "s3fs" not in out


def test_a_missing_requirement_or_a_wrong_version_is_named(tmp_path, capsys):
    _complete(tmp_path)
    (tmp_path / "hjson-3.1.0-py3-none-any.whl").unlink()
    (tmp_path / "dill-0.4.1-py3-none-any.whl").unlink()
    _wheel(tmp_path, "dill", "0.4.3")
    assert gpu_env.check_wheels(tmp_path) == 1
    out = capsys.readouterr().out
    assert "needs hjson: neither in" in out
    assert "needs dill<0.4.2,>=0.3.0, the wheelhouse has dill 0.4.3" in out


def test_a_needed_package_missing_from_the_wheelhouse_is_named(tmp_path, capsys):
    _complete(tmp_path)
    (tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl").unlink()
    assert gpu_env.check_wheels(tmp_path) == 1
    assert "bitsandbytes: not in" in capsys.readouterr().out
