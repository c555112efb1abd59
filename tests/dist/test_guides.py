"""The fine-tuning guides' configurations, verbatim (tests/guides/*.yaml): each loads (`--print-config`) and runs
a few steps on the tiny model, with only the model, the data location and the sizes overridden. The data are
local stand-ins with the guides' columns: UltraChat and UltraFeedback as Hub-style repositories loaded by name
and split, rated pairs with a status column, math prompts with an in_gsm8k_train column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ROOT, read_metrics, run_ftdist
from tests.unit.test_data import _hub_layout

pytestmark = pytest.mark.dist

GUIDES = ROOT / "tests" / "guides"
SMALL = ["model.name_or_path=ftdist/tiny", "train.max_steps=2", "train.progress_bar=false", "train.log_every=1",
         "data.max_length=128", "logging.tensorboard=false", "checkpoint.every_steps=0"]
ENV = {"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "HF_DATASETS_OFFLINE": "1"}


def _pairs(n: int) -> list[dict]:
    from ftdist.data.loading import resolve_data_path

    rows = [json.loads(x) for x in Path(resolve_data_path("ftdist/tiny-task/train_pref")).read_text().splitlines()[:n]]
    # UltraFeedback's columns: scores 1-10 and a status; every fourth pair a tie, every third a low-rated chosen
    return [{**r, "score_chosen": 5.0 if i % 3 == 0 else 9.0, "score_rejected": 3.0 if i % 4 else 9.0,
             "status": "tie" if i % 4 == 0 else "ok"} for i, r in enumerate(rows)]


def _pref_repo(root: Path) -> str:
    (root / "data").mkdir(parents=True)
    for split, n in (("train_prefs", 48), ("test_prefs", 8)):
        (root / "data" / f"{split}-00000-of-00001.jsonl").write_text(
            "\n".join(json.dumps(r) for r in _pairs(n)) + "\n")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_prefs\n"
                                    "    path: data/train_prefs-*\n  - split: test_prefs\n    path: data/test_prefs-*\n"
                                    "---\n")
    return str(root)


@pytest.mark.parametrize("guide", sorted(p.stem for p in GUIDES.glob("*.yaml")))
def test_guide_loads_as_written(guide):
    proc = run_ftdist(1, str(GUIDES / f"{guide}.yaml"), ["--print-config"], timeout=120)
    assert "stage:" in proc.stdout


def _run(tmp_path: Path, guide: str, *overrides: str) -> list[dict]:
    out = tmp_path / "run"
    run_ftdist(1, str(GUIDES / f"{guide}.yaml"), [f"output_dir={out}", *SMALL, *overrides], timeout=600, env=ENV)
    return [r for r in read_metrics(out) if "loss" in r]


def test_zephyr_sft_on_a_hub_style_dataset_by_name_and_split(tmp_path):
    repo = str(_hub_layout(tmp_path / "ultrachat_200k"))
    steps = _run(tmp_path, "sft_zephyr_ultrachat", f"data.train={repo}", f"data.eval={repo}",
                 "train.global_batch_size=8", "train.micro_batch_size=4", "deepspeed.zero_stage=2")
    assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] > 0 for r in steps)


def test_zephyr_dpo_with_filters_and_full_length_prompts(tmp_path):
    repo = _pref_repo(tmp_path / "ultrafeedback_binarized")
    steps = _run(tmp_path, "dpo_zephyr_ultrafeedback", f"data.train={repo}", f"data.eval={repo}",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "deepspeed.zero_stage=2",
                 "data.max_prompt_length=128")
    assert [r["step"] for r in steps] == [1, 2] and all("rewards/margins" in r for r in steps)


def test_qlora_on_a_base_model_with_chatml(tmp_path):
    steps = _run(tmp_path, "qlora_tinyllama_chatml", "data.train=ftdist/tiny-task", "train.global_batch_size=4",
                 "train.micro_batch_size=2", "train.warmup_steps=1")
    assert [r["step"] for r in steps] == [1, 2]
    config = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert config["r"] == 64
    assert "<|im_start|>" in (tmp_path / "run" / "final" / "tokenizer_config.json").read_text() + \
        "".join(p.read_text() for p in (tmp_path / "run" / "final").glob("*.jinja"))


def test_reward_model_with_the_score_difference_loss(tmp_path):
    data = tmp_path / "rated_pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _pairs(48)) + "\n")
    steps = _run(tmp_path, "rm_score_diff", f"data.train={data}", "train.global_batch_size=4",
                 "train.micro_batch_size=2", "data.max_prompt_length=64")
    assert [r["step"] for r in steps] == [1, 2] and all("accuracy" in r for r in steps)


@pytest.mark.ray
def test_grpo_with_the_guides_sampling_keys(tmp_path):
    from ftdist.data.tiny_task import bundled_task_dir

    rows = [json.loads(x) for x in (Path(bundled_task_dir()) / "prompts.jsonl").read_text().splitlines()[:24]]
    data = tmp_path / "math_prompts.jsonl"
    data.write_text("\n".join(json.dumps({**r, "in_gsm8k_train": i % 3 == 0}) for i, r in enumerate(rows)) + "\n")
    out = tmp_path / "run"
    run_ftdist(1, str(GUIDES / "grpo_gsm8k.yaml"),
               [f"output_dir={out}", "model.name_or_path=ftdist/tiny", "model.dtype=fp32", f"data.train={data}",
                "data.max_length=64", "ppo.iterations=2", "ppo.rollout_batch_size=4", "ppo.samples_per_prompt=4",
                "ppo.mini_batch_size=16", "ppo.max_new_tokens=8", "ppo.cpus_per_actor=0.5", "train.progress_bar=false",
                "logging.tensorboard=false", "checkpoint.every_steps=0"], timeout=600, env=ENV)
    records = [r for r in read_metrics(out) if "reward_mean" in r]
    assert [r["step"] for r in records] == [1, 2] and all(r["kl"] >= 0 for r in records)  # k3 is >= 0
