"""LoRA/QLoRA with 2 gloo ranks under ZeRO-2 and ZeRO-3, and as one plain process: adapters saved in PEFT
format equal the live weights, every rank holds the same adapter, resume continues identically, the loss
falls, and the merged model answers like base + adapter."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, _free_port, load_weights, max_abs_diff, read_metrics, run_ftdist, run_group

pytestmark = pytest.mark.dist

COMMON = ["data.max_length=64", "data.eval=null", "train.micro_batch_size=4", "train.global_batch_size=16",
          "train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep_last=0", "train.progress_bar=false",
          "train.log_every=1"]
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"}


def _peft_names(sd: dict) -> dict:
    """Live/engine parameter names -> the names PEFT writes (adapter name dropped)."""
    return {k.replace(".modules_to_save.default.", ".").replace(".default.", "."): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def zero3_qlora(tmp_path_factory):
    run = tmp_path_factory.mktemp("z3") / "run"
    run_ftdist(2, "qlora_tiny", [f"output_dir={run}", "deepspeed.zero_stage=3", *COMMON])
    return run


def _worker(tmp_path, stage: int, *overrides: str):
    out = tmp_path / f"w{stage}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "dist" / "lora_worker.py"), str(out), str(stage), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = run_group(cmd, 300, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return out, ranks


@pytest.mark.parametrize("stage,overrides", [(2, ["model.quantization=null"]), (3, [])], ids=["zero2-lora", "zero3-qlora"])
def test_adapter_identical_on_ranks_and_export_equals_live(tmp_path, stage, overrides):
    out, (r0, r1) = _worker(tmp_path, stage, *overrides)
    assert r0["live"].keys() == r1["live"].keys()
    assert all(torch.equal(r0["live"][k], r1["live"][k]) for k in r0["live"])
    saved = load_weights(out / "final")
    live = _peft_names(r0["live"])
    # lora_A and lora_B of 28 projections, and the recipe's modules_to_save (embed_tokens, lm_head)
    assert saved.keys() == live.keys() and len(saved) == 4 * 7 * 2 + 2
    assert all(v.numel() > 0 and v.shape == live[k].shape for k, v in saved.items())
    assert max_abs_diff(saved, live) == 0.0
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if ".lora_B." in k)  # trained, not the zero init
    assert ADAPTER_FILES <= {p.name for p in (out / "final").iterdir()}
    assert not list((out / "final").glob("model*.safetensors"))
    if stage == 3:  # the 4-bit base really is sharded: each rank holds half of every packed weight
        assert r0["base_shard_numel"] * 2 == r0["base_numel"] == r1["base_shard_numel"] * 2
    assert r0["losses"] == r1["losses"] and r0["losses"][-1] < r0["losses"][0]


def test_zero3_qlora_adapter_matches_engine_checkpoint_and_loss_falls(zero3_qlora):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for step_dir, adapter_dir in ((zero3_qlora / "checkpoints" / "step-6", zero3_qlora / "final"),
                                  (zero3_qlora / "checkpoints" / "step-3", zero3_qlora / "checkpoints/step-3/adapter")):
        engine = _peft_names(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="engine"))
        saved = load_weights(adapter_dir)
        assert saved.keys() == engine.keys() and len(saved) == 58
        assert all(v.numel() > 0 for v in saved.values())
        assert max_abs_diff(saved, engine) == 0.0  # the same fp32 values, copied from the live parameters
    cfg = json.loads((zero3_qlora / "final" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["base_model_name_or_path"] == "ftdist/tiny"
    assert not list((zero3_qlora / "final").glob("model*.safetensors"))
    # the frozen 4-bit base is not copied into every checkpoint
    engine_bytes = sum(p.stat().st_size for p in (zero3_qlora / "checkpoints" / "step-6" / "engine").rglob("*") if p.is_file())
    assert engine_bytes < 10 * sum(v.numel() * 4 for v in saved.values())
    losses = [r["loss"] for r in read_metrics(zero3_qlora) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5


def test_zero3_qlora_resume_continues_identically(zero3_qlora, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zero3_qlora, run)
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "final")
    out = run_ftdist(2, "qlora_tiny", [f"output_dir={run}", "deepspeed.zero_stage=3", *COMMON])
    assert "resumed from" in out.stderr and "step-3" in out.stderr
    assert max_abs_diff(load_weights(run / "final"), load_weights(zero3_qlora / "final")) == 0.0
    straight = {r["step"]: r["loss"] for r in read_metrics(zero3_qlora) if "loss" in r}
    # the copied log held steps 1-6; the resumed run drops those after its checkpoint and logs them again, once
    logged = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    resumed = logged[3:]
    assert all(r["loss"] == straight[r["step"]] for r in resumed)


def test_merged_model_answers_like_base_plus_adapter(zero3_qlora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftdist.data.tiny_task import bundled_task_dir
    from ftdist.merge import merge
    from ftdist.models.loading import resolve_model_path

    merged = merge(None, [str(zero3_qlora / "final")], str(tmp_path / "merged"), dtype="fp32")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("ftdist/tiny"), dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(zero3_qlora / "final"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    tok.padding_side = "left"
    rows = [json.loads(line) for line in (Path(bundled_task_dir()) / "eval.jsonl").read_text().splitlines()[:32]]
    prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def answers(model):
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    got, want = answers(merged.eval()), answers(with_adapter.eval())
    with with_adapter.disable_adapter():
        plain = answers(with_adapter)
    assert sum(a != b for a, b in zip(want, plain)) > len(rows) // 2  # the adapter changed what the model says
    assert got == want
    refs = [r["messages"][-1]["content"] for r in rows]
    accuracy = [sum(a.strip() == ref for a, ref in zip(x, refs)) for x in (got, want)]
    assert accuracy[0] == accuracy[1]


def test_qlora_7b_recipe_runs_as_one_plain_process_on_cpu(tmp_path):
    """Dev mode: no launcher, no DeepSpeed edits; the 7B recipe with the tiny model on a CPU."""
    run = tmp_path / "run"
    out = run_ftdist(1, "qlora_7b", [f"output_dir={run}", "model.name_or_path=ftdist/tiny", "data.train=ftdist/tiny-task",
                                     "data.max_length=64", "train.max_steps=3", "train.progress_bar=false",
                                     "train.log_every=1", "checkpoint.every_steps=0"])
    assert "trainable" in out.stderr and "parameters" in out.stderr
    assert "paged optimizers need CUDA" in out.stderr
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert ADAPTER_FILES <= {p.name for p in (run / "final").iterdir()}
    cfg = json.loads((run / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 64 and cfg["lora_alpha"] == 32 and len(cfg["target_modules"]) == 7
