"""ftdist.plan: parameter counts, memory theory reference points, ZeRO arithmetic, recommend, recipe."""

import subprocess
import sys

import pytest
import yaml

from ftdist import plan
from ftdist.plan import ModelShape, estimate, recommend

pytestmark = pytest.mark.unit

SEVEN_B = plan.PRESETS["7b"][0]
ONE_B = plan.PRESETS["1b"][0]


def _llama(shape: ModelShape, device=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                      num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                      num_key_value_heads=shape.num_kv_heads, vocab_size=shape.vocab_size,
                      tie_word_embeddings=shape.tie_embeddings, head_dim=shape.head_dim,
                      attention_bias=shape.attention_bias)
    with torch.device(device or "cpu"):
        return LlamaForCausalLM(cfg)


def test_preset_counts_equal_hand_computed():
    # Llama-2-7B: embed + lm_head 2*32000*4096; per layer q,k,v,o 4*4096^2, gate/up/down
    # 3*4096*11008, two norms 2*4096; final norm 4096
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert SEVEN_B.n_params() == 2 * 32000 * 4096 + 32 * per_layer + 4096 == 6_738_415_616
    # TinyLlama 1.1B: GQA with 4 kv heads of 64 dims -> k, v are 2048 x 256
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048
    assert ONE_B.n_params() == 2 * 32000 * 2048 + 22 * per_layer + 2048 == 1_100_048_384
    assert ONE_B.linear_params() == 22 * (per_layer - 2 * 2048)
    # LoRA r=8 on all seven: r*(in+out) each
    lora = 8 * ((2048 + 2048) * 2 + (2048 + 256) * 2 + (2048 + 5632) * 3)
    assert ONE_B.lora_params(8) == 22 * lora
    assert plan.PRESETS["70b"][0].n_params() == 68_976_648_192
    assert plan.PRESETS["13b"][0].n_params() == 13_015_864_320


@pytest.mark.parametrize("shape", [
    ModelShape(64, 176, 3, 4, 2, 500),  # GQA, untied
    ModelShape(48, 128, 2, 4, 4, 300, tie_embeddings=True),  # MHA, tied
    ModelShape(64, 160, 2, 4, 1, 256, head_dim=32, attention_bias=True),  # head_dim != h/heads, biases
])
def test_counts_equal_real_transformers_model(shape):
    import torch

    model = _llama(shape)
    assert shape.n_params() == sum(p.numel() for p in model.parameters())
    linear = sum(p.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
                 for p in m.parameters())
    assert shape.linear_params() == linear


def test_lora_count_equals_peft():
    from peft import LoraConfig, get_peft_model

    shape = ModelShape(64, 176, 3, 4, 2, 500)
    model = get_peft_model(_llama(shape), LoraConfig(r=4, target_modules=list(plan.LINEAR_TARGETS)))
    assert shape.lora_params(4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["1b", "7b", "13b", "70b"])
def test_presets_equal_transformers_on_meta(name):
    shape = plan.PRESETS[name][0]
    assert shape.n_params() == sum(p.numel() for p in _llama(shape, "meta").parameters())


def test_from_hf_config_dir(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000).to_json_file(str(tmp_path / "config.json"))
    assert ModelShape.from_hf_config_dir(str(tmp_path)) == ONE_B
    assert ModelShape.resolve(str(tmp_path)) == ONE_B
    with pytest.raises(ValueError, match="neither a preset"):
        ModelShape.resolve("no-such-model")


def test_adam_reference_points_7b():
    psi = SEVEN_B.n_params()
    full = estimate(SEVEN_B, "full", optimizer="adamw")
    assert full.optimizer_state == 8 * psi  # m + v in fp32
    assert full.optimizer_state == pytest.approx(56e9, rel=0.2)  # the "56 GB" rule: 7e9 x 8
    assert full.master_weights == 4 * psi  # separate line item
    eight = estimate(SEVEN_B, "full", optimizer="adamw_8bit")
    assert eight.optimizer_state == pytest.approx(2 * psi, rel=0.02)
    assert eight.optimizer_state == pytest.approx(14e9, rel=0.2)


def test_one_b_load_reference_points():
    fp32, bf16 = plan.weights_bytes(ONE_B, "fp32"), plan.weights_bytes(ONE_B, "bf16")
    nf4 = plan.weights_bytes(ONE_B, "nf4")
    assert fp32 == pytest.approx(4e9, rel=0.2)  # "~4 GB in fp32": 4.40 GB
    assert bf16 == pytest.approx(2.2e9, rel=0.2)
    # 969M linear weights at 0.5159 B (NF4 + double-quantised constants) + 131M params in bf16
    q = ONE_B.linear_params()
    assert nf4 == pytest.approx(q * (0.5 + 1 / 64 + 4 / (64 * 256)) + (ONE_B.n_params() - q) * 2)
    # "~1 GB at 4 bits": 0.76 GB, i.e. 24% under 1 GB, because embeddings and lm_head stay in bf16
    # (a 1 GB figure needs them in fp32, as peft's prepare_model_for_kbit_training does)
    assert 0.7e9 < nf4 <= 1.0e9
    no_dq = plan.weights_bytes(ONE_B, "nf4", double_quant=False)  # fp32 absmax per 64 block
    assert no_dq == pytest.approx(nf4 + q * (4 / 64 - 1 / 64 - 4 / (64 * 256)))
    assert no_dq == pytest.approx(1e9, rel=0.2)


def test_zero_stages_divide_by_world_size():
    psi, n = SEVEN_B.n_params(), 4
    kw = dict(world_size=n, seq_len=512)
    s0, s1, s2, s3 = (estimate(SEVEN_B, "full", zero_stage=z, **kw) for z in range(4))
    assert (s0.weights, s0.gradients, s0.master_weights + s0.optimizer_state) == (2 * psi, 2 * psi, 12 * psi)
    assert (s1.weights, s1.gradients, s1.master_weights + s1.optimizer_state) == (2 * psi, 2 * psi, 12 * psi / 4)
    assert (s2.weights, s2.gradients, s2.optimizer_state) == (2 * psi, 2 * psi / 4, 8 * psi / 4)
    # ds_configs/zero3.json: the last 1e9/2 parameters stay gathered from forward to backward (more than
    # one 202M-parameter layer), plus the 5e7 prefetch bucket, in bf16
    gathered = 2 * (1e9 / 2 + 5e7)
    assert s3.weights == pytest.approx(2 * psi / 4 + gathered)
    assert (s3.gradients, s3.master_weights) == (2 * psi / 4, 4 * psi / 4)
    assert s0.activations == s3.activations  # ZeRO does not touch activations
    assert s0.total == pytest.approx(16 * psi + s0.activations)

    off2 = estimate(SEVEN_B, "full", zero_stage=2, offload_optimizer=True, **kw)
    assert (off2.gradients, off2.master_weights, off2.optimizer_state) == (0, 0, 0)
    # fp32 params, grads, m, v, and the bf16 partition micro-batches accumulate into
    assert off2.cpu_bytes == pytest.approx((4 + 4 + 8 + 2) * psi / 4)
    off1 = estimate(SEVEN_B, "full", zero_stage=1, offload_optimizer=True, **kw)
    assert off1.gradients == 2 * psi  # ZeRO-1 keeps full gradients on the GPU
    off3 = estimate(SEVEN_B, "full", zero_stage=3, offload_optimizer=True, offload_params=True, **kw)
    assert off3.weights == pytest.approx(gathered)
    # bf16 weight partition; fp32 master, gradient, m, v; the bf16 gradient accumulation partition
    assert off3.cpu_bytes == pytest.approx(2 * psi / 4 + (16 + 2) * psi / 4)

    fp32 = estimate(SEVEN_B, "full", dtype="fp32", **kw)
    assert (fp32.weights, fp32.gradients, fp32.master_weights, fp32.optimizer_state) == (4 * psi, 4 * psi, 0, 8 * psi)
    # DeepSpeed's ZeRO optimizers step a cloned fp32 partition even when the model is fp32
    fp32_z2 = estimate(SEVEN_B, "full", dtype="fp32", zero_stage=2, **kw)
    assert (fp32_z2.gradients, fp32_z2.master_weights, fp32_z2.optimizer_state) == (psi, psi, 2 * psi)
    with pytest.raises(ValueError, match="zero_stage=3"):
        estimate(SEVEN_B, "full", zero_stage=2, offload_optimizer=True, offload_params=True)
    with pytest.raises(ValueError, match="cannot be offloaded"):
        estimate(SEVEN_B, "full", zero_stage=2, offload_optimizer=True, optimizer="adamw_8bit")


def test_zero3_gathered_parameters_follow_reuse_distance():
    h, v, layer = SEVEN_B.hidden_size, SEVEN_B.vocab_size, SEVEN_B.layer_params()
    # nothing kept for reuse and no prefetch: one unit, here a decoder layer (202M > the 131M embedding)
    assert plan.zero3_gathered_params(SEVEN_B, prefetch_bucket=0, max_reuse_distance=0) == layer
    assert layer > v * h
    # a 2e8 reuse distance keeps 1e8 parameters: less than a layer, so still one layer (+ bucket)
    assert plan.zero3_gathered_params(SEVEN_B, prefetch_bucket=1e7, max_reuse_distance=2e8) == layer + 1e7
    # max_live_parameters caps what is kept
    assert plan.zero3_gathered_params(SEVEN_B, prefetch_bucket=0, max_reuse_distance=2e10,
                                      max_live_parameters=3e8) == 3e8
    # a small model is held whole
    assert plan.zero3_gathered_params(plan.PRESETS["1b"][0]) == 5.5e8
    tiny = plan.ModelShape(512, 2048, 8, 8, 4, 16384)
    assert plan.zero3_gathered_params(tiny) == tiny.n_params()


def test_lora_and_qlora_state():
    psi, a = SEVEN_B.n_params(), SEVEN_B.lora_params(16)
    lora = estimate(SEVEN_B, "lora", lora_r=16)
    assert lora.trainable_params == a
    assert (lora.weights, lora.gradients, lora.master_weights, lora.optimizer_state) == (
        2 * psi + 2 * a, 2 * a, 4 * a, 8 * a)
    qlora = estimate(SEVEN_B, "qlora", lora_r=16)
    assert qlora.weights == pytest.approx(plan.weights_bytes(SEVEN_B, "nf4") + 2 * a)
    assert qlora.gradients == lora.gradients and qlora.activations == lora.activations


def test_activations_hand_computed_and_checkpointing():
    h, i, v, layers, t = 4096, 11008, 32000, 32, 2048
    norm = 4 * h + 2 * 2 * h + 4  # bf16: fp32 input copy, normalised x, weighted output, rsqrt
    layer = 2 * norm + 2 * (2 * h + 2 * h) + 4 * 32 + 4 * 2 * i  # norms, q k v out, lse, MLP
    head = norm + v * (2 + 4)  # final norm, bf16 logits + fp32 log-softmax
    no_ckpt = estimate(SEVEN_B, "full", seq_len=t).activations
    assert no_ckpt == t * (layers * layer + head + 8 * v)
    ckpt = estimate(SEVEN_B, "full", seq_len=t, gradient_checkpointing=True).activations
    assert ckpt == t * max(layers * 2 * h + head + 8 * v, layers * 2 * h + 2 * v + layer)
    assert ckpt < no_ckpt / 5
    assert estimate(SEVEN_B, "full", seq_len=t, micro_batch=2).activations == 2 * no_ckpt
    eager = estimate(SEVEN_B, "full", seq_len=t, attention="eager").activations
    assert eager == no_ckpt + t * layers * (32 * t * (4 + 2) - 4 * 32)  # (B, heads, T, T) probabilities


def test_lora_activations_hand_computed():
    h, i, v, layers, t, r = 4096, 11008, 32000, 32, 2048, 16
    # frozen norms keep only the fp32 input copy + rsqrt; frozen linears save no inputs;
    # each adapter keeps its lora_A output (r) and a dropout copy of its input + 1-byte mask
    ins = 6 * h + i  # in_features: q, k, v, o, gate, up: h each; down: i
    layer = 2 * (4 * h + 4) + 2 * (2 * h + 2 * h) + 4 * 32 + 3 * 2 * i + 7 * 2 * r + (2 + 1) * ins
    head = 4 * h + 4 + v * (2 + 4)
    lora = estimate(SEVEN_B, "lora", seq_len=t, lora_r=r, lora_dropout=0.05).activations
    assert lora == t * (layers * layer + head + 8 * v)
    no_dropout = estimate(SEVEN_B, "lora", seq_len=t, lora_r=r, lora_dropout=0.0).activations
    # without dropout the adapters share the norm outputs and the gate*up product
    assert no_dropout == t * (layers * (layer - 3 * ins + 2 * h + 2 * h + 2 * i) + head + 8 * v)


def test_recommend_plenty_of_memory_picks_stage_0():
    rec = recommend(ONE_B, nodes=1, gpus_per_node=8, gpu_memory_gb=80, seq_len=2048)
    c = rec.choice.estimate
    assert (c.zero_stage, c.offload_optimizer, c.offload_params, c.gradient_checkpointing) == (0, False, False, False)
    assert len(rec.candidates) == 2 * (1 + 2 + 2 + 3) and all(x.fits for x in rec.candidates[:4])


def test_recommend_tight_memory_goes_up_the_ladder():
    rec = recommend(SEVEN_B, nodes=1, gpus_per_node=8, gpu_memory_gb=24, seq_len=2048)
    c = rec.choice.estimate
    assert c.zero_stage >= 2 and c.total <= 24e9 * 0.85
    faster = rec.candidates[:rec.candidates.index(rec.choice)]
    assert faster and not any(x.fits for x in faster)
    big = recommend(plan.PRESETS["70b"][0], nodes=1, gpus_per_node=8, gpu_memory_gb=80).choice.estimate
    assert (big.zero_stage, big.offload_optimizer) == (3, True)
    # host memory too small for offloaded 70B state on one node: nothing fits
    assert recommend(plan.PRESETS["70b"][0], 1, 8, 80, cpu_memory_gb=512).choice is None


def test_format_table_marks_choice():
    rec = recommend(SEVEN_B, nodes=2, gpus_per_node=8, gpu_memory_gb=40)
    text = plan.format_table(rec)
    header = text.splitlines()[1].split()
    assert header == ["zero", "offload", "grad-ckpt", "weights", "grads", "master", "optimizer", "activations",
                      "total", "cpu/node", "fits"]
    marked = [line for line in text.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and f"{rec.choice.estimate.total / 1e9:.1f}" in marked[0]


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_emit_recipe_parses(method):
    rec = recommend(SEVEN_B, 1, 8, 24, method=method, lora_r=64)
    base = {"model.name_or_path": "meta-llama/Llama-2-7b-hf", "data.train": "train.jsonl"}
    text = plan.emit_recipe(rec.choice, base, path="r.yaml")
    assert text.splitlines()[0] == "# ftdist train r.yaml"
    r = yaml.safe_load(text)
    c = rec.choice.estimate
    assert r["stage"] == "sft" and r["model"]["name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert r["data"] == {"max_length": 2048, "train": "train.jsonl"}
    assert r["deepspeed"] == {"zero_stage": c.zero_stage, "offload_optimizer": c.offload_optimizer,
                              "offload_params": c.offload_params}
    assert r["model"]["gradient_checkpointing"] == c.gradient_checkpointing
    assert (r["train"]["micro_batch_size"], r["data"]["max_length"]) == (1, 2048)
    if method == "qlora":
        assert r["model"]["lora"]["r"] == 64 and r["model"]["quantization"]["load_in_4bit"] is True
    else:
        assert "lora" not in r["model"] and "quantization" not in r["model"]
    from ftdist.config import load_config  # the recipe is valid for `ftdist train`

    cfg = load_config(data=r)
    assert (cfg.deepspeed.zero_stage, cfg.model.gradient_checkpointing) == (c.zero_stage, c.gradient_checkpointing)
    with pytest.raises(ValueError, match="name_or_path"):
        plan.emit_recipe(rec.choice, {})


def test_cli_run(tmp_path, capsys):
    out = tmp_path / "r.yaml"
    assert plan.main(["--model", "7b", "--method", "qlora", "--gpus-per-node", "1", "--gpu-memory-gb", "24",
                      "--emit-recipe", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recommended: ZeRO-0" in printed and out.exists()
    r = yaml.safe_load(out.read_text())
    assert r["model"]["lora"]["r"] == 64 and r["model"]["name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert plan.main(["--model", "nope"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert all(a.help for a in plan.build_parser()._actions)


@pytest.mark.parametrize("flag,value,allowed", [("--gpu-memory-gb", "-3", "> 0"), ("--seq-len", "0", ">= 1"),
                                                 ("--micro-batch", "0", ">= 1"), ("--headroom", "1.5", "headroom < 1")])
def test_cli_rejects_bad_numbers_naming_the_flag(flag, value, allowed, capsys):
    assert plan.main(["--model", "7b", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: got" in err and allowed in err


def test_import_does_not_load_torch():
    code = "import sys, ftdist.plan; sys.exit(any(m in sys.modules for m in ('torch', 'deepspeed', 'ray')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
