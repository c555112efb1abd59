import subprocess
import sys

import pytest
import torch

from ftdist.models.loading import decay_param_groups, enable_neftune
from tests.helpers import run_inprocess

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
    return run_inprocess(list(args))


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


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sampling_help_names_transformers_defaults_where_they_differ(command, capsys):
    """generate and chat sample with top_k 0 and answer up to 256 tokens, chat at temperature 0.7, where
    transformers' GenerationConfig takes top_k 50, max_length 20 and greedy decoding: --help says so."""
    from transformers import GenerationConfig

    from ftdist.cli import main

    library = GenerationConfig._get_default_generation_params()  # the defaults the help quotes
    assert (library["top_k"], library["max_length"], library["do_sample"]) == (50, 20, False)
    assert (library["top_p"], library["repetition_penalty"], library["temperature"]) == (1.0, 1.0, 1.0)
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "sample among the k likeliest tokens (default 0: off) (transformers default: 50)" in text
    assert "(default 256) (transformers default: max_length=20, prompt included)" in text
    assert "nucleus sampling mass (default 1.0: off, as transformers)" in text
    greedy = "(transformers default: greedy, do_sample=False)"
    assert (f"0 = greedy; > 0 samples (default 0.7) {greedy}" in text) == (command == "chat")
    assert ("0 = greedy; > 0 samples (default 0)" in text) == (command == "generate")


def test_import_ftdist_is_light():
    code = "import sys, ftdist, ftdist.config, ftdist.cli; print(' '.join(m for m in ('deepspeed', 'ray', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_generate_honours_the_sampling_keys_the_guides_use():
    """ppo.top_k, ppo.repetition_penalty and ppo.min_new_tokens reach transformers' generate."""
    from ftdist.config import load_config
    from ftdist.models.generate import generate
    from ftdist.models.loading import load_causal_lm, load_tokenizer

    cfg = load_config("sft_tiny", [])
    tok = load_tokenizer(cfg.model)
    lm = load_causal_lm(cfg.model)
    prompts = ["3 1 2 ->", "9 8 ->"]
    kw = dict(max_new_tokens=6, device="cpu")
    # min_new_tokens forbids EOS before the 6th token
    _, free = generate(lm, tok, prompts, **kw)
    _, held = generate(lm, tok, prompts, **kw, min_new_tokens=6)
    assert (held[:, :5] != tok.eos_token_id).all() and held.shape[1] == 6
    # top_k=1 sampling is greedy decoding, whatever the seed
    torch.manual_seed(0)
    _, k1 = generate(lm, tok, prompts, **kw, do_sample=True, temperature=1.0, top_k=1)
    assert torch.equal(k1, free)
    # a strong repetition penalty changes greedy decoding of a model that repeats itself
    _, rep = generate(lm, tok, prompts, max_new_tokens=12, device="cpu", min_new_tokens=12)
    _, pen = generate(lm, tok, prompts, max_new_tokens=12, device="cpu", min_new_tokens=12, repetition_penalty=50.0)
    assert max(len(set(r.tolist())) for r in pen) >= max(len(set(r.tolist())) for r in rep)
    assert not torch.equal(rep, pen)


def test_ppo_kl_estimator_defaults_by_algorithm(caplog):
    from ftdist.config import ConfigError, load_config

    assert load_config("grpo_tiny", ["ppo.kl_estimator=auto"]).ppo.kl == "k3"  # a loss term
    assert load_config("ppo_tiny", ["ppo.kl_estimator=auto"]).ppo.kl == "k1"  # a reward penalty
    assert load_config("grpo_tiny", ["ppo.kl_estimator=k1"]).ppo.kl == "k1"
    assert "zero expected gradient" in caplog.text
    for bad, words in (("ppo.top_k=-1", "ppo.top_k"), ("ppo.repetition_penalty=0", "ppo.repetition_penalty"),
                       ("ppo.min_new_tokens=999", "ppo.min_new_tokens=999 is above"), ("ppo.vf_coef=-1", "ppo.vf_coef")):
        with pytest.raises(ConfigError, match=words):
            load_config("ppo_tiny", [bad])
