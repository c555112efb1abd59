"""LoRA/QLoRA on CPU: recipe rejections, 4-bit loading, trainable-only optimizers, adapter switching, merge math."""

import json
import logging
from pathlib import Path

import pytest
import torch

from ftdist.config import ConfigError, load_config
from ftdist.engine.optim import BNB_OPTIMIZERS, bnb_optimizer_class, build_optimizer
from ftdist.merge import MergeError, merge
from ftdist.models.adapters import adapter_disabled, apply_lora, is_peft_model
from ftdist.models.loading import ModelError, count_parameters, decay_param_groups, load_causal_lm, resolve_model_path
from ftdist.models.quant import bnb_config, quant_storage_dtype

pytestmark = pytest.mark.unit

DATA = ["data.train=x.jsonl"]
QLORA = DATA + ["model.lora.r=8", "model.quantization.load_in_4bit=true"]


@pytest.mark.parametrize("overrides,words", [
    (["model.quantization.load_in_4bit=true"], ["model.lora", "QLoRA"]),
    (["model.lora.r=8", "model.quantization.load_in_8bit=true", "model.quantization.load_in_4bit=true"],
     ["exclusive"]),
    (QLORA[1:] + ["model.dtype=bf16", "model.quantization.quant_storage=fp16"], ["quant_storage='fp16'", "'bf16'"]),
    (QLORA[1:] + ["model.dtype=bf16", "model.quantization.quant_storage=fp32"], ["quant_storage='fp32'"]),
    (QLORA[1:] + ["deepspeed.zero_stage=3", "model.quantization.quant_storage=uint8"],
     ["'uint8'", "zero_stage=3", "quant_storage='bf16'"]),
    (QLORA[1:] + ["deepspeed.zero_stage=3", "model.dtype=fp32", "model.quantization.quant_storage=bf16"],
     ["quant_storage='bf16'", "model.dtype='fp32'"]),
    (["model.lora.r=8", "model.quantization.load_in_8bit=true", "deepspeed.zero_stage=3"], ["load_in_8bit", "ZeRO-3"]),
    (["model.lora.r=0"], ["model.lora", "r=0", "r > 0"]),
    (["model.lora.dropout=1.5"], ["dropout=1.5"]),
    (["model.lora.r=8", "train.optimizer=adamw_8bit", "deepspeed.offload_optimizer=true"], ["adamw_8bit", "offload"]),
    (["model.lora.bias=some"], ["model.lora.bias", "'lora_only'"]),
    (["model.quantization.quant_type=int4"], ["quant_type", "'nf4'"]),
])
def test_invalid_lora_and_quantization_rejected_before_loading(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, DATA + overrides)
    for w in words:
        assert w in str(e.value)


def test_fp16_compute_with_bf16_training_is_allowed_with_a_warning(caplog):
    cfg = load_config(None, DATA + QLORA[1:] + ["model.dtype=bf16", "model.quantization.compute_dtype=fp16"])
    assert cfg.model.quantization.compute_dtype == "fp16"
    assert "compute_dtype='fp16' with bf16 training" in caplog.text and "overflow" in caplog.text


def test_valid_combinations_and_storage_dtype():
    cfg = load_config(None, QLORA + ["deepspeed.zero_stage=3", "model.dtype=bf16"])
    assert quant_storage_dtype(cfg.model, 3) == torch.bfloat16  # sharded like every other bf16 parameter
    assert quant_storage_dtype(cfg.model, 2) == torch.uint8
    qc = bnb_config(cfg.model, zero_stage=3)
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_use_double_quant
    assert qc.bnb_4bit_quant_storage == torch.bfloat16 and qc.bnb_4bit_compute_dtype == torch.bfloat16
    cfg = load_config(None, QLORA + ["deepspeed.zero_stage=3", "model.dtype=fp32", "model.quantization.quant_storage=fp32",
                                     "model.quantization.compute_dtype=fp32"])
    assert bnb_config(cfg.model, 3).bnb_4bit_quant_storage == torch.float32
    cfg = load_config(None, DATA + ["model.lora.r=8", "model.quantization.load_in_8bit=true"])
    assert bnb_config(cfg.model).load_in_8bit
    assert bnb_config(load_config(None, DATA).model) is None


def test_shipped_recipes():
    q = load_config("qlora_7b")
    lc, qc, t = q.model.lora, q.model.quantization, q.train
    assert (lc.r, lc.alpha, lc.dropout) == (64, 32.0, 0.1)
    assert sorted(lc.target_modules) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert qc.load_in_4bit and qc.quant_type == "nf4" and qc.double_quant
    assert t.optimizer == "paged_adamw_32bit" and t.lr == 2e-4 and t.scheduler == "cosine" and t.warmup_ratio > 0
    assert t.micro_batch_size == 2 and t.global_batch_size // t.micro_batch_size == 4  # one GPU: accumulation 4
    assert q.model.gradient_checkpointing
    assert load_config("lora_7b").model.lora is not None and load_config("lora_7b").model.quantization is None
    tiny = load_config("qlora_tiny")
    assert tiny.model.quantization.load_in_4bit and tiny.model.dtype == "fp32"
    # the 7B QLoRA recipe runs on a CPU with the tiny model: nothing in it needs CUDA
    load_config("qlora_7b", ["model.name_or_path=ftdist/tiny", "data.train=ftdist/tiny-task", "deepspeed.zero_stage=3"])


def _tiny_cfg(*extra):
    return load_config("qlora_tiny", ["model.lora.dropout=0.0", *extra]).model


def test_qlora_load_packs_linear_weights_and_counts_real_parameters():
    full = load_causal_lm(_tiny_cfg("model.quantization=null"))
    trainable, total_full = count_parameters(full)
    model = load_causal_lm(_tiny_cfg())
    import bitsandbytes as bnb

    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 4 * 7  # every projection of the 4 layers; lm_head stays full precision
    packed = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    dense_bf16 = sum(2 * torch.Size(m.weight.quant_state.shape).numel() for m in linears)
    assert packed / dense_bf16 == pytest.approx(0.25)  # 4 bits of 16 (quantisation constants not counted)
    assert count_parameters(model)[1] == total_full


def test_apply_lora_trains_only_the_adapter_and_disables_cleanly():
    torch.manual_seed(0)
    model = apply_lora(load_causal_lm(_tiny_cfg()), _tiny_cfg())
    assert is_peft_model(model) and apply_lora(model, _tiny_cfg()) is model  # idempotent
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in names)
    assert sum(".modules_to_save." in n for n in names) == 2  # the recipe's embed_tokens and lm_head
    x = torch.randint(6, 500, (2, 12))
    with torch.no_grad():
        base = model(input_ids=x).logits
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.add_(0.05)  # a non-zero adapter
        adapted = model(input_ids=x).logits
        with adapter_disabled(model):
            off = model(input_ids=x).logits
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(off, base)
    with pytest.raises(TypeError, match="peft model"):
        with adapter_disabled(torch.nn.Linear(2, 2)):
            pass


def test_eval_pass_does_not_break_4bit_gradients():
    """bitsandbytes repacks 4-bit weights for CPU inference after a no-grad eval forward; training after that
    must still send gradients through the base weights to the adapters below."""
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    model = apply_lora(load_causal_lm(cfg), cfg)
    x = torch.randint(6, 500, (2, 12))

    def grads():
        model.zero_grad()
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    after = grads()
    # the same computation before and after the repack; only the 4-bit weights' layout changed: rounding
    # (~1e-7 of gradients of size <= ~1), not a lost gradient (which would differ by the gradient itself)
    assert max(float((before[n] - after[n]).abs().max()) for n in before) < 1e-5


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "adafactor",
                                  "sgd", "lion", "rmsprop", "adagrad"])
def test_optimizers_get_only_trainable_parameters_and_no_decay_on_biases_norms(name):
    torch.manual_seed(0)
    cfg = load_config("qlora_tiny", ["model.quantization=null", "model.lora.bias=all", "train.weight_decay=0.1",
                                     f"train.optimizer={name}"])
    model = apply_lora(load_causal_lm(cfg.model), cfg.model)
    groups = decay_param_groups(model, cfg.train.weight_decay)
    opt = build_optimizer(cfg.train, groups)
    by_id = {id(p): n for n, p in model.named_parameters()}
    handed = {by_id[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(handed) == trainable and len(trainable) < len(by_id)
    for n, wd in handed.items():
        is_matrix = model.get_parameter(n).dim() >= 2 and "norm" not in n
        assert wd == (0.1 if is_matrix else 0.0), n
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randint(6, 500, (2, 12))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_paged_optimizers_fall_back_without_cuda(caplog):
    import bitsandbytes as bnb

    with caplog.at_level(logging.WARNING, logger="ftdist"):
        assert bnb_optimizer_class("paged_adamw_32bit", cuda=False) is bnb.optim.AdamW32bit
        assert bnb_optimizer_class("paged_adamw_8bit", cuda=False) is bnb.optim.AdamW8bit
    assert "paged optimizers need CUDA" in caplog.text
    assert bnb_optimizer_class("paged_adamw_32bit", cuda=True) is bnb.optim.PagedAdamW32bit
    assert set(BNB_OPTIMIZERS) == {"adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "lion"}


# -- merge ----------------------------------------------------------------------------------------


def _random_adapter(path, seed, r, targets):
    """A LoRA adapter with non-zero B (a fresh one is an exact no-op), saved in PEFT format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("ftdist/tiny"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(path)
    return path


def test_merge_equals_base_plus_adapters(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft = _random_adapter(tmp_path / "sft", 1, 8, ["q_proj", "v_proj", "down_proj"])
    dpo = _random_adapter(tmp_path / "dpo", 2, 4, "all-linear")
    merged = merge("ftdist/tiny", [str(sft), str(dpo)], str(tmp_path / "merged"), dtype="fp32")
    assert not is_peft_model(merged)
    x = torch.randint(6, 500, (2, 16))
    ref = AutoModelForCausalLM.from_pretrained(resolve_model_path("ftdist/tiny"), dtype=torch.float32)
    with torch.no_grad():
        base_logits = ref(input_ids=x).logits
        stacked = PeftModel.from_pretrained(ref, str(sft), adapter_name="sft")
        stacked.load_adapter(str(dpo), adapter_name="dpo")
        stacked.base_model.set_adapter(["sft", "dpo"])  # both deltas active at once
        want = stacked(input_ids=x).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        got = reloaded(input_ids=x).logits
    assert (want - base_logits).abs().max() > 1e-2  # the adapters matter
    # (W + BA) x against W x + B (A x): the same products summed in another order, ~1e-6 relative to logits
    # of size ~10, so ~1e-5; 1e-4 is 10x that and 100x below what the adapters change (asserted above)
    assert (got - want).abs().max() < 1e-4
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()
    assert not list((tmp_path / "merged").glob("adapter_*"))

    # bf16 output: same function up to bf16 rounding
    merged16 = merge("ftdist/tiny", [str(sft), str(dpo)], str(tmp_path / "m16"), dtype="bf16")
    assert next(merged16.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        got16 = merged16(input_ids=x).logits.float()
    assert (got16 - want).abs().max() < 0.1


def test_merge_errors_are_clear(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter = _random_adapter(tmp_path / "a", 1, 4, ["q_proj"])
    with pytest.raises(MergeError, match="no such directory"):
        merge("ftdist/tiny", [str(tmp_path / "missing")], str(tmp_path / "o"))
    with pytest.raises(MergeError, match="no adapter_config.json"):
        merge("ftdist/tiny", [str(tmp_path)], str(tmp_path / "o"))
    with pytest.raises(ModelError, match="--base: .*nobase does not exist"):
        merge(str(tmp_path / "nobase"), [str(adapter)], str(tmp_path / "o"))

    wide_cfg = AutoConfig.from_pretrained(resolve_model_path("ftdist/tiny"))
    wide_cfg.hidden_size, wide_cfg.intermediate_size = 192, 384
    AutoModelForCausalLM.from_config(wide_cfg).save_pretrained(tmp_path / "wide")
    with pytest.raises(MergeError, match="does not fit --base .*q_proj has input size 192"):
        merge(str(tmp_path / "wide"), [str(adapter)], str(tmp_path / "o"))

    quantised = tmp_path / "q4"
    quantised.mkdir()
    cfg = json.loads((tmp_path / "wide" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="quantised checkpoint"):
        merge(str(quantised), [str(adapter)], str(tmp_path / "o"))

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(MergeError, match="not empty"):
        merge("ftdist/tiny", [str(adapter)], str(tmp_path / "full"))


def test_merge_cli(tmp_path, capsys):
    from ftdist.cli import main

    adapter = _random_adapter(tmp_path / "a", 1, 4, ["q_proj"])
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert main(["merge", "--base", "ftdist/tiny", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "m2")]) == 2
    assert "ftdist: error: --adapter" in capsys.readouterr().err


def test_an_adapter_finds_its_base_from_any_directory(tmp_path, monkeypatch, capsys):
    """A base given as a relative path is recorded absolute; an adapter that names its base relatively (saved
    before) is resolved against the directory its run was started in; a missing base names the paths tried."""
    import shutil

    from ftdist.cli import main
    from ftdist.models.adapters import adapter_base

    shutil.copytree(resolve_model_path("ftdist/tiny"), tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)  # the run starts here, its recipe naming the base relatively
    cfg = _tiny_cfg("model.quantization=null", "model.name_or_path=models/base", "model.dtype=fp32")
    final = tmp_path / "runs" / "lora" / "final"
    apply_lora(load_causal_lm(cfg), cfg).save_pretrained(str(final))
    recorded = json.loads((final / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(tmp_path / "models" / "base")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Sort the digits: 2 1"}) + "\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    generate = ["generate", str(final), "--prompts", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "2"]
    assert main([*generate, "--out", "a.jsonl"]) == 0 and json.loads(Path("a.jsonl").read_text())["new_tokens"] > 0

    # an adapter written with the relative name, in a run whose config.yaml says where it was started
    (final.parent / "config.yaml").write_text("output_dir: runs/lora\n")
    (final / "adapter_config.json").write_text(json.dumps({**recorded, "base_model_name_or_path": "models/base"}))
    assert adapter_base(final) == str(tmp_path / "models" / "base")
    shutil.move(tmp_path / "models", tmp_path / "moved")
    with pytest.raises(ModelError, match=r"base 'models/base' is not found \(tried .*elsewhere/models/base, "
                                         rf"{tmp_path}/models/base, .*final/models/base; as a hub id it is not in "
                                         r"the cache, and HF_HUB_OFFLINE=1\): pass --base"):
        adapter_base(final)
    capsys.readouterr()
    assert main([*generate, "--out", "c.jsonl"]) == 2
    assert "pass --base" in capsys.readouterr().err


def test_a_run_that_named_its_model_relatively_exports_from_any_directory(tmp_path, monkeypatch):
    """export rebuilds the model from the run's config.yaml, whose model path is relative to where the run started."""
    import shutil

    from ftdist.cli import main
    from ftdist.engine.checkpoint import begin_checkpoint, commit_checkpoint
    from ftdist.run.outputs import dump_config
    from tests.helpers import load_weights, max_abs_diff

    shutil.copytree(resolve_model_path("ftdist/tiny"), tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "sft"
    run.mkdir(parents=True)
    dump_config(load_config("sft_tiny", ["output_dir=runs/sft", "model.name_or_path=models/base"]), run / "config.yaml")
    weights = load_weights(tmp_path / "models" / "base")
    tmp = begin_checkpoint(run / "checkpoints", 1, "r1")  # a ZeRO-0 engine state: the module's state dict
    (tmp / "engine").mkdir()
    torch.save({"module": weights}, tmp / "engine" / "mp_rank_00_model_states.pt")
    commit_checkpoint(tmp, run / "checkpoints", 1, {"step": 1}, 0, "r1")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["export", str(run), "--out", "exported"]) == 0
    assert max_abs_diff(load_weights(Path("exported")), weights) == 0.0


def test_lora_on_8bit_base_trains_only_the_adapter():
    cfg = load_config("qlora_tiny", ["model.quantization.load_in_4bit=false", "model.quantization.load_in_8bit=true",
                                     "model.lora.modules_to_save=[]"]).model
    model = apply_lora(load_causal_lm(cfg), cfg)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    x = torch.randint(6, 500, (2, 12))
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    assert all(g is not None for g in grads.values())
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if ".lora_B." in n)


@pytest.mark.parametrize("name,kwargs,expected", [
    ("sgd", "{momentum: 0.0, nesterov: false}", {"momentum": 0.0, "nesterov": False}),
    ("sgd", "{momentum: 0.5, nesterov: true}", {"momentum": 0.5, "nesterov": True}),
    ("lion", "{betas: [0.95, 0.98]}", {"betas": (0.95, 0.98)}),
    ("adamw_torch", "{amsgrad: true}", {"amsgrad": True, "eps": 1e-8}),  # ftdist's own defaults stay
])
def test_optimizer_kwargs_reach_the_optimizer(name, kwargs, expected):
    cfg = load_config("sft_tiny", [f"train.optimizer={name}", f"train.optimizer_kwargs={kwargs}"])
    opt = build_optimizer(cfg.train, [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0}])
    for key, value in expected.items():
        assert opt.param_groups[0][key] == value, key


def test_an_unknown_optimizer_argument_names_the_key_and_what_exists():
    from ftdist.config import ConfigError

    cfg = load_config("sft_tiny", ["train.optimizer=sgd", "train.optimizer_kwargs={momentun: 0.5}"])
    with pytest.raises(ConfigError, match=r"train.optimizer_kwargs.momentun: not an argument of train.optimizer=sgd "
                                          r"\(SGD takes: lr, momentum"):
        build_optimizer(cfg.train, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])
