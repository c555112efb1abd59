"""A user's mistakes and a cluster's faults against the run directory: ftdist refuses what would lose data,
verifies what it resumes, and stops on non-finite numbers. One tiny process per run (about 5 s each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, ftdist_cmd, read_metrics, run_ftdist

pytestmark = pytest.mark.faults

BASE = ["data.eval=null", "train.progress_bar=false", "train.log_every=1", "checkpoint.every_steps=2"]


def _train(out: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_ftdist(1, "sft_tiny", [f"output_dir={out}", *BASE, *overrides], timeout=300, check=check)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ftdist: error")]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def _user_dir(root: Path) -> Path:
    d = root / "mine"
    for rel, text in {"checkpoints/step-7/weights.bin": "seven", "checkpoints/step-100/notes.txt": "hundred",
                      "checkpoints/.tmp-step-9/part.bin": "nine", "config.yaml": "my: config\n",
                      "final/model.safetensors": "not a model", "tokenizer.json": "{}"}.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


def test_an_unrelated_non_empty_output_dir_is_refused_and_left_alone(tmp_path):
    d = _user_dir(tmp_path)
    before = _tree(d)
    line = _one_line_error(_train(d, "train.max_steps=2", check=False))
    assert f"output_dir={d} is not empty and is not an ftdist run directory" in line
    assert "overwrite_output_dir=true" in line
    assert _tree(d) == before  # nothing written, nothing deleted


def test_with_consent_ftdist_writes_there_but_prunes_only_its_own_checkpoints(tmp_path):
    d = _user_dir(tmp_path)
    _train(d, "overwrite_output_dir=true", "train.max_steps=6", "checkpoint.keep_last=1")
    for rel in ("checkpoints/step-7/weights.bin", "checkpoints/step-100/notes.txt", "checkpoints/.tmp-step-9/part.bin",
                "tokenizer.json"):
        assert (d / rel).exists(), rel
    ours = sorted(p.name for p in (d / "checkpoints").iterdir() if (p / "manifest.json").exists())
    assert ours == ["step-6"]  # step-2 and step-4 pruned; the user's step-7 and step-100 are not ours
    assert json.loads((d / "run.json").read_text())["run_id"]


def test_a_second_run_into_a_live_runs_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FTDIST_HANG_AFTER_CHECKPOINT": "2"}
    first = subprocess.Popen(ftdist_cmd(1, "sft_tiny", [f"output_dir={out}", *BASE, "train.max_steps=4"]), cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "step-2" / "manifest.json").exists():
            assert first.poll() is None and time.time() < deadline, "the first run did not reach its checkpoint"
            time.sleep(0.2)
        metrics_before = (out / "metrics.jsonl").read_text()
        line = _one_line_error(_train(out, "train.max_steps=4", "train.lr=1e-2", check=False))
        assert f"output_dir={out} is in use by another run" in line and f"pid {first.pid}" in line
        assert (out / "metrics.jsonl").read_text() == metrics_before
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    # the holder is dead now (same host, its pid is gone): the next run takes the lock over and resumes
    again = _train(out, "train.max_steps=4")
    assert "taking over the lock" in again.stderr and "resumed from" in again.stderr and "step-2" in again.stderr


def _run_of(checkpoint: Path) -> str:
    return json.loads((checkpoint / "manifest.json").read_text())["run_id"]


def test_resume_never_in_a_used_directory_is_refused_or_kept_apart(tmp_path):
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    _train(out, "train.max_steps=4", "checkpoint.keep_last=1")  # leaves step-4
    old = _run_of(ckpts / "step-4")
    line = _one_line_error(_train(out, "train.max_steps=4", "checkpoint.resume=never", "checkpoint.keep_last=1",
                                  check=False))
    assert "holds checkpoints of another run (step-4)" in line and "overwrite_output_dir=true" in line
    assert _run_of(ckpts / "step-4") == old
    # with consent: a new run; the old run's step-4 is moved aside when the new one writes its own step-4
    _train(out, "train.max_steps=4", "checkpoint.resume=never", "checkpoint.keep_last=1", "overwrite_output_dir=true")
    new = _run_of(ckpts / "step-4")
    aside = [p for p in ckpts.iterdir() if p.name.startswith("step-4.superseded-")]
    assert new != old and len(aside) == 1 and _run_of(aside[0]) == old
    resumed = _train(out, "train.max_steps=4", "checkpoint.keep_last=1")
    assert "step-4 at step 4" in resumed.stderr and _run_of(ckpts / "step-4") == new


def test_a_changed_recipe_or_data_is_refused_on_resume(tmp_path):
    data = tmp_path / "data.jsonl"
    from ftdist.data.loading import resolve_data_path

    data.write_text(Path(resolve_data_path("ftdist/tiny-task")).read_text())
    out = tmp_path / "run"
    _train(out, "train.max_steps=2", f"data.train={data}")
    line = _one_line_error(_train(out, "train.max_steps=4", "train.lr=0.5", f"data.train={data}", check=False))
    assert "the recipe changed since" in line and "train.lr: " in line and "train.max_steps: 2 -> 4" in line
    # safe keys may change; the same data under another path is the same data
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(data.read_bytes())
    ok = _train(out, "train.max_steps=2", f"data.train={moved}", "train.log_every=5", "checkpoint.keep_last=3")
    assert "resumed from" in ok.stderr
    with open(moved, "a") as f:
        f.write(data.read_text().splitlines()[0] + "\n")
    line = _one_line_error(_train(out, "train.max_steps=2", f"data.train={moved}", check=False))
    assert "is not the data" in line and "checkpoint.resume_with_new_data=true" in line
    ok = _train(out, "train.max_steps=2", f"data.train={moved}", "checkpoint.resume_with_new_data=true")
    assert "data.train changed since" in ok.stderr


@pytest.fixture(scope="module")
def died_after_step_4(tmp_path_factory) -> Path:
    """A run directory as if the run had died right after its step-4 checkpoint (checkpoints at 2 and 4)."""
    import shutil

    out = tmp_path_factory.mktemp("died") / "run"
    _train(out, "train.max_steps=6", "checkpoint.keep_last=0")
    shutil.rmtree(out / "checkpoints" / "step-6")
    shutil.rmtree(out / "final")
    (out / ".lock").unlink(missing_ok=True)
    return out


@pytest.mark.parametrize("victim", ["engine/mp_rank_00_model_states.pt", "trainer_state.json", "rng/rank0.pt"])
def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tmp_path, died_after_step_4, victim):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(died_after_step_4, out)
    # its step-4 checkpoint then got damaged
    path = out / "checkpoints" / "step-4" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the size stays, the sha256 does not
    path.write_bytes(bytes(data))
    line = _one_line_error(_train(out, "train.max_steps=6", f"checkpoint.resume={out / 'checkpoints' / 'step-4'}",
                                  check=False))
    assert "step-4 is damaged" in line and victim in line
    resumed = _train(out, "train.max_steps=6")
    assert f"skipping damaged checkpoint {out / 'checkpoints' / 'step-4'}: {victim}" in resumed.stderr
    assert "step-2 at step 2" in resumed.stderr
    assert "done: 4 steps, " in resumed.stderr and "(resumed at step 2; 6 of 6 done in all)" in resumed.stderr
    # the first run's records after step 2 are dropped on resume: every step is logged once
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_non_finite_step_stops_the_run_before_anything_of_it_is_saved(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, "train.max_steps=8", "checkpoint.every_steps=1", "checkpoint.keep_last=0", "train.lr=1e3",
                  "train.warmup_ratio=0",
                  "train.max_grad_norm=0", check=False)
    line = _one_line_error(proc)
    step = int(line.split("step ")[1].split(":")[0])
    assert step >= 2 and ("grad_norm=" in line or "loss=" in line)
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert saved == list(range(1, step))  # every step before the bad one, not the bad one
    assert not (out / "final").exists()


class _RunsCode:
    """What a crafted checkpoint file would carry: unpickling it calls os.system."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path):
    import hashlib

    import torch

    out = tmp_path / "run"
    _train(out, "train.max_steps=2")
    step = out / "checkpoints" / "step-2"  # resuming it runs no step, but loads every file
    marker = tmp_path / "pwned"
    victim = "engine/mp_rank_00_model_states.pt"
    torch.save({"module": _RunsCode(str(marker))}, step / victim)
    # whoever can write the file can write the manifest too: its sha256 is made to match
    manifest = json.loads((step / "manifest.json").read_text())
    data = (step / victim).read_bytes()
    manifest["files"][victim] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))
    line = _one_line_error(_train(out, "train.max_steps=2", check=False))
    assert victim in line and "refused to load" in line and "never runs code" in line
    assert not marker.exists()


def test_ctrl_c_finishes_the_step_saves_and_exits_3(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(ftdist_cmd(1, "sft_tiny", [f"output_dir={out}", *BASE, "train.max_steps=2000",
                                                        "checkpoint.every_steps=0"]),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() or len([r for r in read_metrics(out) if "loss" in r]) < 2:
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, err[-4000:]
    assert "Ctrl-C: finishing this step" in err and "Traceback" not in err
    step = int(err.split("checkpoint saved at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{step}" / "manifest.json").exists()
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-1] == step


@pytest.mark.parametrize("zero", [0, 2])  # ZeRO-0 fp32 skips in the Engine, ZeRO-2 in DeepSpeed's optimizer
def test_skip_mode_skips_non_finite_updates_and_stops_after_n_in_a_row(tmp_path, zero):
    out = tmp_path / "run"
    proc = _train(out, "train.max_steps=20", "checkpoint.every_steps=1", "checkpoint.keep_last=0", "train.lr=1e3",
                  "train.warmup_ratio=0", "train.max_grad_norm=0", "train.on_nonfinite=skip",
                  "train.max_nonfinite_steps=3", f"deepspeed.zero_stage={zero}", check=False)
    line = _one_line_error(proc)
    assert "(3 steps in a row)" in line
    assert proc.stderr.count("update skipped (train.on_nonfinite=skip)") == 2  # the first two; the third stops
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["skipped_steps"] for r in records[-2:]] == [1, 2]
    # a skipped step changes no weight: the checkpoints before and after the two skipped steps hold the same model
    import torch

    from ftdist.engine.engine import safe_checkpoint_load

    def weights(step):
        return safe_checkpoint_load(str(out / "checkpoints" / f"step-{step}" / "engine" / "mp_rank_00_model_states.pt"),
                                    "cpu")["module"]

    last = records[-1]["step"]
    before, after = weights(last - 2), weights(last)
    assert all(torch.equal(before[k], after[k]) for k in before)


ADAM_LR, ADAM_EPS = 1e-3, 0.1  # sft_tiny's lr; eps >> gradient rounding keeps Adam well-conditioned (helpers.py)


def _universal_state(ckpt: Path, scratch: Path, key: str) -> dict:
    """{parameter name: its `key` state (fp32, exp_avg, exp_avg_sq)} of a checkpoint, whatever its ranks."""
    import torch

    from ftdist.engine.universal import to_universal, weights_only_torch_load

    out = {}
    with weights_only_torch_load():
        for f in (to_universal(ckpt / "engine", scratch) / "engine" / "zero").rglob(f"{key}.pt"):
            v = torch.load(f)
            out[f.parent.name] = v["param"] if isinstance(v, dict) else v
    return out


@pytest.mark.parametrize("zero,saved_ranks,ranks", [(2, 1, 2), (3, 2, 1)])
def test_resume_on_another_number_of_ranks_reshards_the_state(tmp_path, zero, saved_ranks, ranks):
    from tests.helpers import adam_tolerance, load_weights, max_abs, max_abs_diff

    run = [*BASE, "train.max_steps=4", "checkpoint.keep_last=0", f"deepspeed.zero_stage={zero}",
           f"train.adam_eps={ADAM_EPS}", f"train.lr={ADAM_LR}"]
    first, second = tmp_path / "first", tmp_path / "second"
    run_ftdist(saved_ranks, "sft_tiny", [f"output_dir={first}", *run], timeout=300)
    # the same run continued from its step-2 checkpoint on another number of ranks
    proc = run_ftdist(ranks, "sft_tiny", [f"output_dir={second}", *run,
                                          f"checkpoint.resume={first / 'checkpoints' / 'step-2'}"], timeout=300)
    assert f"was saved by {saved_ranks} ranks: converted to DeepSpeed's universal checkpoint for {ranks}" in proc.stderr
    assert not (second / "cache" / "universal").exists()  # the converted copy is gone once loaded
    a = {r["step"]: r for r in read_metrics(first) if "loss" in r}
    b = {r["step"]: r for r in read_metrics(second) if "loss" in r}
    assert sorted(b) == [3, 4] and [b[s]["lr"] for s in (3, 4)] == [a[s]["lr"] for s in (3, 4)]  # the schedule

    # Steps 3-4 of both runs start from the same weights and Adam moments and see the same rows; the ranks only
    # regroup the sums, so the weights differ by rounding (tests/helpers.adam_tolerance). Adam state that was
    # lost or misplaced (moments, step counts, per-group weight decay) moves them by a fraction of the update.
    # The largest gradient entry of steps 3-4 is bounded by the second moments at step 4:
    # v_4 = (1 - b2) * sum_t b2^(4-t) g_t^2 >= (1 - b2) * b2^3 * g_t^2.
    v4 = _universal_state(first / "checkpoints" / "step-4", tmp_path / "u4", "exp_avg_sq")
    grad = (max(float(v.max()) for v in v4.values()) / ((1 - 0.999) * 0.999 ** 3)) ** 0.5
    final_a, final_b = load_weights(first / "final"), load_weights(second / "final")
    tol = adam_tolerance(ADAM_LR, ADAM_EPS, grad, max_abs(final_a), steps=2)
    assert max_abs_diff(final_a, final_b) < tol
    # ...and steps 3-4 moved the weights far more than that, so a wrong resume could not hide under it
    at_2 = _universal_state(first / "checkpoints" / "step-2", tmp_path / "u2", "fp32")
    assert max_abs_diff({k: final_a[k] for k in at_2}, {k: v.view_as(final_a[k]) for k, v in at_2.items()}) > 100 * tol


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_checkpoints_before(tmp_path, died_after_step_4):
    """The command line, with DeepSpeed's own writes failing on a real full disk (a tmpfs with room for half a
    checkpoint more than the run already holds)."""
    import shutil

    from tests.helpers import small_disk

    held = sum(p.stat().st_size for p in died_after_step_4.rglob("*") if p.is_file())
    step4 = sum(p.stat().st_size for p in (died_after_step_4 / "checkpoints" / "step-4").rglob("*") if p.is_file())
    with small_disk(tmp_path / "disk", held + step4 // 2) as disk:
        out = disk / "run"
        shutil.copytree(died_after_step_4, out)
        before = _tree(out / "checkpoints")
        proc = _train(out, "train.max_steps=6", check=False)  # resumes at step 4; the step-6 checkpoint fails
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ftdist: error")]
        assert len(lines) == 1, proc.stderr[-4000:]
        assert lines[0].startswith(f"ftdist: error: {out / 'checkpoints' / 'step-6'}: no space left on the device "
                                   f"while writing the checkpoint of step 6 ("), lines[0]
        assert " needed" in lines[0] and "the checkpoints before it and final/ are as they were" in lines[0]
        assert _tree(out / "checkpoints") == before  # step-2 and step-4 as they were; no partial step-6 left
