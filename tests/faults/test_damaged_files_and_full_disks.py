"""Files a run reads back that were damaged or crafted, and a disk that fills up while a run writes: each ends
as one error naming the file (and, for a full disk, the space), and nothing saved before is lost. In process,
on the functions the training loop and the PPO driver call; a full disk is a real one (a small tmpfs)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from tests.helpers import fill_disk, small_disk

pytestmark = pytest.mark.faults


class _RunsCode:
    """What a crafted file would carry: unpickling it calls os.system."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_reference_cache_is_refused_and_a_damaged_one_is_computed_again(tmp_path, caplog):
    from ftdist.engine.engine import UnsafeCheckpointError
    from tests.unit.test_preference_trl_e2e import _chat_rows, _task

    def reference():  # a new run on the same pairs: it finds the cache
        task, engine, batch = _task(tmp_path, _chat_rows(), stage="dpo", model={"name_or_path": "ftdist/tiny"},
                                    dpo={"reference": "precomputed"})
        return task, (lambda: task.reference.logps(engine, batch)), task.reference._cache_file("train", task.train)

    _, logps, cache = reference()
    fresh = logps()
    assert cache.exists()

    marker = tmp_path / "pwned"
    torch.save({"table": _RunsCode(str(marker))}, cache)
    _, logps, _ = reference()
    with pytest.raises(UnsafeCheckpointError, match=f"^{cache}: refused to load") as e:
        logps()
    assert "\n" not in str(e.value) and not marker.exists()

    cache.write_bytes(cache.read_bytes()[:100])  # cut short, as by a full disk or a copy that stopped
    _, logps, _ = reference()
    with caplog.at_level(logging.WARNING, logger="ftdist"):
        torch.testing.assert_close(logps(), fresh, rtol=0, atol=0)  # the same forward again: the same numbers
    assert f"{cache}: damaged reference log-probs cache" in caplog.text
    assert torch.load(cache, weights_only=True).shape == (len(_chat_rows()), 2)  # written again, whole


def test_a_crafted_or_damaged_rng_state_is_named(tmp_path):
    from ftdist.engine.checkpoint import CheckpointError, restore_rng
    from ftdist.engine.engine import UnsafeCheckpointError
    from ftdist.run.seeding import rng_state

    good = tmp_path / "rank0.pt"
    torch.manual_seed(1)
    torch.save(rng_state(), good)
    expected = torch.rand(3)
    torch.manual_seed(2)
    restore_rng(good)
    assert torch.equal(torch.rand(3), expected)

    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"torch": _RunsCode(str(marker))}, crafted)
    with pytest.raises(UnsafeCheckpointError, match=f"^{crafted}: refused to load"):
        restore_rng(crafted)
    assert not marker.exists()

    for name, content in {"garbage.pt": b"not a torch file", "other.pt": None}.items():
        path = tmp_path / name
        if content is None:
            torch.save({"weights": torch.zeros(2)}, path)  # a torch file, but not an RNG state
        else:
            path.write_bytes(content)
        with pytest.raises(CheckpointError, match=f"^{path}: damaged: not a"):
            restore_rng(path)


def _checkpoint(root, step: int, run_id: str = "r1"):
    """A complete checkpoint as commit_checkpoint writes it, with one engine file."""
    from ftdist.engine.checkpoint import begin_checkpoint, commit_checkpoint

    tmp = begin_checkpoint(root, step, run_id)
    (tmp / "engine").mkdir()
    (tmp / "engine" / "state.pt").write_bytes(b"x" * 1000)
    return commit_checkpoint(tmp, root, step, {"step": step}, keep_last=0, run_id=run_id)


def test_a_damaged_checkpoint_says_which_file_and_what_is_wrong(tmp_path, caplog):
    from ftdist.engine.checkpoint import CheckpointError, checkpoint_problem, find_latest, read_trainer_state

    root = tmp_path / "checkpoints"
    first, second = _checkpoint(root, 2), _checkpoint(root, 4)
    assert checkpoint_problem(second) is None and read_trainer_state(second) == {"step": 4}

    state = second / "trainer_state.json"
    size = state.stat().st_size
    state.write_text("garbage")  # another size than its manifest records
    assert checkpoint_problem(second) == f"damaged: trainer_state.json is 7 bytes, its manifest records {size}"
    with caplog.at_level(logging.WARNING, logger="ftdist"):
        assert find_latest(root, "r1", verify=True) == first
    assert f"skipping damaged checkpoint {second}: trainer_state.json is 7 bytes" in caplog.text
    assert "no valid manifest" not in caplog.text
    with pytest.raises(CheckpointError, match=f"^{state}: damaged: unreadable \\(JSONDecodeError"):
        read_trainer_state(second)

    state.write_text("g" * size)  # the same size: only the sha256 differs
    assert checkpoint_problem(second) == "damaged: trainer_state.json does not match its manifest (sha256)"
    assert checkpoint_problem(second, verify=False) is None  # the quick check sees sizes only
    (second / "engine" / "state.pt").unlink()
    assert checkpoint_problem(second) == "damaged: engine/state.pt is missing"
    (second / "manifest.json").unlink()
    assert checkpoint_problem(second).startswith("incomplete: no valid manifest.json")


def test_export_names_a_damaged_step_and_lists_only_the_others(tmp_path):
    """export/eval/generate --step: a damaged step is described (checkpoint_problem) and left out of the steps
    offered instead; it used to be listed among the complete ones."""
    from ftdist.export import ExportError, find_checkpoint

    root = tmp_path / "checkpoints"
    first, second = _checkpoint(root, 2), _checkpoint(root, 4)
    assert find_checkpoint(tmp_path, "latest") == second and find_checkpoint(tmp_path, "2") == first
    state = second / "trainer_state.json"
    size = state.stat().st_size
    state.write_text("g" * size)  # the same size: only its sha256 tells
    for step in ("4", "latest"):
        with pytest.raises(ExportError) as e:
            find_checkpoint(tmp_path, step)
        assert str(e.value) == (f"{second}: damaged: trainer_state.json does not match its manifest (sha256); "
                                f"export another step (complete: 2)")
    state.write_text("garbage")  # another size: not complete by the quick check either
    with pytest.raises(ExportError) as e:
        find_checkpoint(tmp_path, "4")
    assert str(e.value) == (f"{second}: damaged: trainer_state.json is 7 bytes, its manifest records {size}; "
                            f"export another step (complete: 2)")
    assert find_checkpoint(tmp_path, "latest") == first  # the newest complete one
    with pytest.raises(ExportError, match=r"--step 9: .* has no checkpoint of that step \(complete: 2\)$"):
        find_checkpoint(tmp_path, "9")


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_one_before(tmp_path):
    """The loop's and the PPO driver's checkpoint writes (checkpoint_space around them), with torch.save's own
    short-write error on a real full disk."""
    from ftdist.engine.checkpoint import begin_checkpoint, checkpoint_space, damaged_file, list_checkpoints
    from ftdist.run.disk import DiskFullError, fmt_bytes

    with small_disk(tmp_path / "disk", 1 << 20) as disk:
        root = disk / "checkpoints"
        first = _checkpoint(root, 2)
        before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
        fill_disk(disk, leave_bytes=64 << 10)
        with pytest.raises(DiskFullError) as e:
            with checkpoint_space(root, 4):
                tmp = begin_checkpoint(root, 4, "r1")
                torch.save(torch.zeros(256 << 10), tmp / "engine.pt")  # 1 MiB into 64 KiB
        msg = str(e.value)
        assert msg.startswith(f"{root / 'step-4'}: no space left on the device while writing the checkpoint of "
                              f"step 4 (") and "\n" not in msg
        # the space needed is the step-2 checkpoint's size (from its manifest)
        needed = sum(len(b) for p, b in before.items() if p.name != "manifest.json")
        assert f"about {fmt_bytes(needed)} needed" in msg, msg
        # the free space said is what there is once the partial files went (their handles closed): 64 KiB
        assert f"({fmt_bytes(shutil.disk_usage(disk).free)} free, " in msg and 60 << 10 < shutil.disk_usage(disk).free
        assert "the checkpoints before it and final/ are as they were" in msg
        assert [p.name for _, p in list_checkpoints(root)] == ["step-2"] and not (root / ".tmp-step-4").exists()
        assert damaged_file(first) is None and {p: p.read_bytes() for p in before} == before


def test_a_full_disk_while_recording_the_recipe_keeps_the_one_before(tmp_path):
    """config.yaml is written aside and renamed: on a full disk the recorded recipe of the run is kept whole (it
    used to be truncated in place, and a resume then had no recipe to compare with)."""
    import yaml

    from ftdist.config import load_config
    from ftdist.run.disk import DiskFullError
    from ftdist.run.outputs import dump_config

    with small_disk(tmp_path / "disk", 256 << 10) as disk:
        path = disk / "config.yaml"
        dump_config(load_config("sft_tiny"), path)
        before = path.read_text()
        fill_disk(disk)  # no 4 KiB page left
        # a longer recipe: more than the page the old text holds (written in place, it would be cut off there)
        longer = load_config("sft_tiny", ["eval.suites=[" + ", ".join(f"perplexity=held-out/part-{i:03d}.jsonl"
                                                                       for i in range(80)) + "]"])
        assert len(yaml.safe_dump(longer.to_dict(), sort_keys=False)) > 4096 > len(before)
        with pytest.raises(DiskFullError) as e:
            dump_config(longer, path)
        assert str(e.value).startswith(f"{path}: no space left on the device while writing config.yaml ("), e.value
        assert path.read_text() == before and sorted(p.name for p in disk.iterdir()) == ["config.yaml", "filler"]


def test_a_full_disk_while_exporting_keeps_the_final_model_before(tmp_path):
    from safetensors.torch import save_file

    from ftdist.engine.checkpoint import export_final
    from ftdist.engine.dist import DistInfo
    from ftdist.run.disk import DiskFullError

    class OneRank:
        info = DistInfo(0, 1, 0, "gloo")

    def export(d):
        os.makedirs(d, exist_ok=True)
        save_file({"w": torch.ones(256 << 10)}, os.path.join(d, "model.safetensors"))  # 1 MiB

    with small_disk(tmp_path / "disk", 4 << 20) as disk:
        final = disk / "final"
        export_final(OneRank(), export, final)
        kept = (final / "model.safetensors").read_bytes()
        fill_disk(disk, leave_bytes=256 << 10)
        with pytest.raises(DiskFullError) as e:
            export_final(OneRank(), export, final)
        msg = str(e.value)
        assert msg.startswith(f"{final}: no space left on the device while writing the final model (")
        assert "\n" not in msg
        assert f"about {len(kept) / 1024 ** 2:.1f} MiB needed" in msg  # the final/ it would replace
        assert (final / "model.safetensors").read_bytes() == kept and not (disk / ".tmp-final").exists()


def test_a_full_disk_while_taking_the_lock_on_restart_leaves_no_lock(tmp_path):
    from ftdist.run import rundir
    from ftdist.run.disk import DiskFullError

    with small_disk(tmp_path / "disk", 256 << 10) as disk:
        out = disk / "run"
        run_id = rundir.claim(str(out), overwrite=False)
        identity = (out / "run.json").read_bytes()
        fill_disk(disk)
        assert rundir.claim(str(out), overwrite=False) == run_id  # a restart reads run.json, writes nothing
        with pytest.raises(DiskFullError, match=f"^{out / '.lock'}: no space left on the device while writing the "
                                                f"run's lock \\(0 bytes free\\); nothing in output_dir was changed"):
            rundir.lock(str(out), run_id)
        assert not (out / ".lock").exists() and (out / "run.json").read_bytes() == identity
        with pytest.raises(DiskFullError, match=f"^{disk / 'new' / 'run.json'}: no space left .* the run's identity"):
            rundir.claim(str(disk / "new"), overwrite=False)
        assert not (disk / "new" / ".run.json.tmp").exists()
