"""The speed benchmarks run end to end in their tiny modes and print a table with every arm.

No timing is asserted: on shared CI machines a timing says nothing. What is checked is that each
arm really trained (tokens counted, a throughput), and that the packed arms process no padding
while TRL's padded default does.
"""

import re
import sys

import pytest

from tests.helpers import ROOT, run_group

pytestmark = pytest.mark.dist


def _run(script: str, *args: str) -> str:
    proc = run_group([sys.executable, str(ROOT / "benchmarks" / script), *args], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def _table(out: str) -> dict[str, list[str]]:
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| arm")
            and not line.startswith("| gradient")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def test_sft_throughput_tiny_has_every_arm():
    """benchmarks/sft_throughput.py --tiny: every arm trains, the packed arms pad nothing and TRL's default pads."""
    table = _table(_run("sft_throughput.py", "--tiny", "--repeats", "1"))
    assert list(table) == ["ftdist", "ftdist_unpacked", "ftdist_unpacked_plain", "trl", "trl_packing", "bare"]
    padding = {arm: float(cells[4].rstrip("%")) for arm, cells in table.items()}
    for arm, cells in table.items():
        assert float(cells[0]) > 0 and float(cells[2]) > 0, (arm, cells)  # tokens/s, tokens per CPU-s
    assert padding["ftdist"] == padding["bare"] == padding["trl_packing"] == 0.0
    assert padding["trl"] > 5.0  # padded batches of mixed lengths
    # the same steps' rows: split by length (train.group_by_length=step) never pads more than one micro-batch
    assert padding["ftdist_unpacked"] < padding["ftdist_unpacked_plain"]


def test_dpo_throughput_tiny_has_every_arm():
    """benchmarks/dpo_throughput.py --tiny: every arm trains, and packed and padded pairs train the same losses."""
    out = _run("dpo_throughput.py", "--tiny", "--repeats", "1")
    table = _table(out)
    assert list(table) == ["ftdist_packed", "ftdist_padded", "ftdist_packed_precomputed", "trl", "trl_padding_free"]
    trained = {arm: cells for arm, cells in table.items() if cells[0] != "n/a"}
    assert set(trained) >= {"ftdist_packed", "ftdist_padded", "ftdist_packed_precomputed", "trl"}
    padding = {arm: float(cells[4].rstrip("%")) for arm, cells in trained.items()}
    for arm, cells in trained.items():
        assert float(cells[0]) > 0 and float(cells[2]) > 0, (arm, cells)  # pairs/s, real tokens/s
        assert float(cells[9]) == pytest.approx(0.6931, abs=1e-4), (arm, cells)  # step 1: policy = reference, ln 2
    assert padding["ftdist_packed"] == padding["ftdist_packed_precomputed"] == 0.0
    assert padding["ftdist_padded"] > 0 and padding["trl"] > 5.0  # pairs of mixed lengths, padded
    assert float(table["ftdist_packed_precomputed"][6]) > 0  # the precompute pass is timed on its own
    # the same pairs in every step: packed and padded train the same losses. Their per-pair numbers differ by
    # fp32 rounding (~1e-6 relative, tests/unit/test_preference_packing.py) and six AdamW steps carry that into
    # the weights, at most ~10x per step where a gradient entry is ~0 (tests/helpers.py on Adam): 1e-4 of a loss
    # of ~0.69 holds that with room, while a step on other pairs or a wrong pooling moves it by >1e-3
    diff = float(re.search(r"max \|loss\(ftdist_padded\) - loss\(ftdist_packed\)\| over the steps, per round: "
                           r"([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4


@pytest.fixture(scope="module")
def gpu_sft_both(tmp_path_factory):
    """One run of gpu_sft.py --tiny for both comparisons (--compare both): the model and data are built once, the
    packed run without checkpointing that both compare against is trained once, and each setting's `ftdist train`
    runs in the script's process (--in-process: the script is under test here, not the launch of ftdist)."""
    import json

    work = tmp_path_factory.mktemp("gpu_sft")
    out = _run("gpu_sft.py", "--tiny", "--in-process", "--compare", "both", "--work", str(work),
               "--json", str(work / "r.json"))
    return out, json.loads((work / "r.json").read_text())["results"]


@pytest.mark.parametrize("compare", ["ckpt", "packing"])
def test_gpu_sft_tiny_reports_both_settings(gpu_sft_both, compare):
    """benchmarks/gpu_sft.py --tiny (gpu_check.sh's sft_mfu and packing on the CPU) reports both settings."""
    import torch

    out, every = gpu_sft_both
    assert len(every) == 3
    rows = [every[0], every[1] if compare == "ckpt" else every[2]]
    if compare == "ckpt":
        assert [(r["gradient_checkpointing"], r["packing"]) for r in rows] == [(False, True), (True, True)]
    else:
        assert [(r["gradient_checkpointing"], r["packing"]) for r in rows] == [(False, True), (False, False)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["timed_steps"] >= 1
        if r["packing"]:
            # best fit closes a row only when no sample left fits its gap, so each row of 128 tokens wastes less
            # than the shortest sample (16 tokens in the tiny setting)
            assert r["padding_fraction"] < 16 / 128
    if compare == "packing":
        # one sample per row, padded to the longest of its micro-batch (lognormal lengths, median 40, up to 128)
        assert rows[1]["padding_fraction"] > rows[0]["padding_fraction"]
        if torch.cuda.is_available():
            assert r["peak_memory_gb"] > 0 and (r["mfu"] is None or 0 < r["mfu"] < 1)
        else:
            assert r["mfu"] is None and r["peak_memory_gb"] is None
    if not torch.cuda.is_available():
        assert "no GPU" in out


def test_gpu_zero_check_matches_a_plain_bf16_loop_on_cpu(tmp_path):
    """benchmarks/gpu_checks.py zero, as gpu_check.sh runs it on a GPU, on the CPU: ZeRO-2 and ZeRO-3 on one rank
    (gloo here, NCCL there) against a plain loop with bf16 weights and fp32 master weights, over 3 steps (6 in
    gpu_check.sh): the fewest over which the loss drops by more than 5x the allowed difference, as the check
    itself requires."""
    import json

    out = _run("gpu_checks.py", "zero", "--tiny", "--steps", "3", "--work", str(tmp_path),
               "--json", str(tmp_path / "r.jsonl"))
    rec = json.loads((tmp_path / "r.jsonl").read_text())
    assert out.strip().splitlines()[-1].startswith("PASS zero:") and rec["ok"]
    losses = rec["losses"]
    assert rec["steps"] == len(losses["zero2"]) == len(losses["zero3"]) == len(losses["plain"]) == 3
    # the check's own bound (4 bf16 roundings of the loss), recomputed here from the losses it reports
    for name in ("zero2", "zero3"):
        assert max(abs(a - b) / b for a, b in zip(losses[name], losses["plain"])) <= 4 * 2.0 ** -8
    assert losses["plain"][-1] < 0.8 * losses["plain"][0]  # the updates are large enough to be seen


def test_tokenize_throughput_tiny_compares_both_arms():
    """benchmarks/tokenize_throughput.py --tiny: both arms at 1 and 2 processes, with the same token count."""
    out = _run("tokenize_throughput.py", "--tiny")
    rows = [line for line in out.splitlines() if line.startswith("| 100 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["1", "2"]  # one and two processes
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0, r  # rows/s of both arms
    # the same work: the template closes every turn with EOS (ftdist inserts none) and both arms truncate at
    # 1024 tokens, so every run prints the same token count
    counts = {line.split(", ")[4] for line in out.splitlines() if line.startswith("100 rows")}
    assert len(counts) == 1 and counts.pop().endswith(" tokens"), out


def test_generate_throughput_tiny_runs_both_arms():
    """benchmarks/generate_throughput.py --tiny: both arms run and, greedy, generate the same tokens."""
    out = _run("generate_throughput.py", "--tiny")
    table = _table(out)
    assert list(table) == ["ftdist", "plain"]
    # greedy on the same model and prompts: both arms generate exactly the same tokens
    assert table["ftdist"][0] == table["plain"][0] and int(table["ftdist"][0]) > 0
    assert float(table["ftdist"][1]) > 0 and float(table["plain"][1]) > 0


def test_rl_throughput_and_rollout_decode_tiny(tmp_path):
    """ftdist GRPO (Ray actor groups) and TRL's GRPOTrainer on the same SFT-warmed policy, then the decoding
    benchmark on that policy (built once in the work directory); one round of each arm. One torch thread for the
    single-process parts (SFT warm-up, TRL, decoding; ftdist's actors get one each anyway): on a shared 2-core
    machine two OpenMP threads spin on each other. About a minute on a quiet machine, most of it start-up: the SFT
    warm-up's `ftdist train`, Ray with the policy's two ranks and the reward actor, TRL."""
    out = _run("rl_throughput.py", "--tiny", "--repeats", "1", "--threads", "1", "--arms", "ftdist_grpo,trl_grpo",
               "--work", str(tmp_path))
    table = {k: v for k, v in _table(out).items() if k in ("ftdist_grpo", "trl_grpo")}
    assert list(table) == ["ftdist_grpo", "trl_grpo"], out[-3000:]
    for cells in table.values():
        assert float(cells[0]) > 0 and float(cells[2]) > 0  # samples/s and generated tokens/s of timed iterations
        assert re.fullmatch(r"[0-9.]+ → [0-9.]+", cells[8])  # a reward mean at the first and last iteration
    table = _table(_run("rollout_decode.py", "--tiny", "--threads", "1", "--work", str(tmp_path)))
    assert list(table) == ["generate", "generate_nrs", "decode_keep", "decode"]
    assert all(float(cells[0]) > 0 for cells in table.values())
