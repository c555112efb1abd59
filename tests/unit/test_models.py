import subprocess
import sys

import pytest
import torch

from ftdist.models.loading import decay_param_groups, enable_neftune

pytestmark = pytest.mark.unit


@pytest.fixture()
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, attention_bias=True))


def test_no_weight_decay_on_biases_and_norms(model):
    groups = decay_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    undecayed = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(not n.endswith(".bias") and "norm" not in n for n in decayed)
    assert "model.layers.0.self_attn.q_proj.bias" in undecayed and "model.norm.weight" in undecayed
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "lm_head.weight" in decayed
    model.lm_head.weight.requires_grad_(False)
    assert "lm_head.weight" not in {names[id(p)] for g in decay_param_groups(model, 0.1) for p in g["params"]}


def test_neftune_noise_only_in_training_with_the_right_scale(model):
    ids = torch.randint(0, 64, (2, 10))
    emb = model.get_input_embeddings()
    clean = emb(ids).detach()
    enable_neftune(model, alpha=5.0)
    model.train()
    noisy = emb(ids).detach()
    bound = 5.0 / (10 * 32) ** 0.5
    delta = (noisy - clean).abs()
    assert 0 < delta.max() <= bound + 1e-6 and delta.mean() > bound / 4
    model.eval()
    assert torch.equal(emb(ids), clean)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "ftdist", *args], capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    out = _run("train", "sft_tiny", "train.lrr=1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown key 'train.lrr'; did you mean 'train.lr'?" in out.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                   '{"messages": [{"role": "wizard", "content": "x"}]}\n')
    out = _run("train", "sft_tiny", f"data.train={bad}", "data.eval=null", f"output_dir={tmp_path / 'run'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{bad}: row 2: messages[0]: unknown role 'wizard'" in out.stderr


def test_cli_help_and_python_m():
    out = _run("train", "--help")
    assert out.returncode == 0 and "train.global_batch_size" in out.stdout and "checkpoint.resume" in out.stdout
    shown = _run("train", "sft_tiny", "--print-config", "train.lr=0.5")  # overrides after the option too
    assert shown.returncode == 0 and "lr: 0.5" in shown.stdout, shown.stderr
    recipes = _run("recipes")
    assert recipes.returncode == 0 and "sft_tiny" in recipes.stdout


def test_import_ftdist_is_light():
    code = "import sys, ftdist, ftdist.config, ftdist.cli; print(' '.join(m for m in ('deepspeed', 'ray', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
