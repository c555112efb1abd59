import pytest

from ftdist.config import ConfigError, builtin_recipes, config_help, load_config

pytestmark = pytest.mark.unit

BASE = ["data.train=x.jsonl"]


def test_overrides_and_types():
    cfg = load_config("sft_tiny", ["train.lr=1e-4", "deepspeed.zero_stage=3", "model.lora.r=8",
                                   "data.columns={messages: conversations}", "train.epochs=2"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.deepspeed.zero_stage == 3 and cfg.model.lora.r == 8 and cfg.model.lora.alpha == 16.0
    assert cfg.data.columns == {"messages": "conversations"} and cfg.train.epochs == 2.0


@pytest.mark.parametrize("overrides,words", [
    (["train.lrr=1"], ["train.lrr", "did you mean 'train.lr'"]),
    (["trian.lr=1"], ["trian", "did you mean 'train'"]),
    (["train.lr=fast"], ["train.lr", "'fast'", "float"]),
    (["train.scheduler=cosin"], ["train.scheduler", "'cosin'", "'cosine'"]),
    (["train.micro_batch_size=3", "train.global_batch_size=16"], ["global_batch_size=16", "micro_batch_size=3"]),
    (["deepspeed.zero_stage=5"], ["deepspeed.zero_stage", "0, 1, 2, 3"]),
    (["deepspeed.offload_params=true"], ["offload_params", "zero_stage=3"]),
    (["model.gradient_checkpointing=maybe"], ["model.gradient_checkpointing", "bool"]),
    (["model.quantization.load_in_4bit=true"], ["model.lora", "QLoRA"]),
    (["train.lr"], ["key=value"]),
    (["data.format=xml"], ["data.format", "'messages'"]),
    # values that used to pass validation and fail deep inside torch or c10d
    (["train.lr=.nan"], ["train.lr", "nan", "finite"]),
    (["train.lr=.inf"], ["train.lr", "inf", "finite"]),
    (["train.epochs=.nan", "train.max_steps=-1"], ["train.epochs", "finite"]),
    (["train.adam_beta1=1.5"], ["train.adam_beta1", "1.5", "0 <= x < 1"]),
    (["train.adam_eps=0"], ["train.adam_eps", "> 0"]),
    (["dist.timeout_s=0"], ["dist.timeout_s", "> 0"]),
    (["train.max_grad_norm=-1"], ["train.max_grad_norm", ">= 0"]),
    (["train.weight_decay=-0.1"], ["train.weight_decay", ">= 0"]),
    (["train.eval_every=-2"], ["train.eval_every", ">= 0"]),
    (["checkpoint.every_steps=-1"], ["checkpoint.every_steps", ">= 0"]),
])
def test_bad_config_names_key_value_and_allowed(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + overrides)
    for w in words:
        assert w in str(e.value)


def test_a_key_given_twice_in_a_recipe_names_both_lines(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: sft\ntrain:\n  lr: 1.0e-4\n  micro_batch_size: 2\n  lr: 1.0e-2\n")
    with pytest.raises(ConfigError, match=r"r.yaml: line 5: key 'lr' is given twice .*first on line 3"):
        load_config(str(recipe), BASE)


def test_unknown_recipe_suggests():
    with pytest.raises(ConfigError, match="did you mean 'sft_tiny'"):
        load_config("sft_tin")


def test_builtin_recipes_load_and_start_with_launch_command():
    from ftdist.config import RECIPES_DIR

    names = builtin_recipes()
    assert {"sft_tiny", "sft_7b"} <= set(names)
    for name in names:
        load_config(name)
        assert (RECIPES_DIR / f"{name}.yaml").read_text().startswith("# ")


def test_help_lists_every_public_key():
    text = config_help()
    for key in ["stage", "output_dir", "seed", "model.name_or_path", "model.dtype", "model.attn_implementation",
                "model.gradient_checkpointing", "model.trust_remote_code", "data.train", "data.eval", "data.format",
                "data.columns", "data.max_length", "data.packing", "data.train_on_prompt", "train.micro_batch_size",
                "train.global_batch_size", "train.epochs", "train.max_steps", "train.lr", "train.scheduler",
                "train.warmup_ratio", "train.weight_decay", "train.max_grad_norm", "train.optimizer",
                "train.label_smoothing", "train.neftune_alpha", "train.log_every", "train.eval_every",
                "deepspeed.config", "deepspeed.zero_stage", "deepspeed.offload_optimizer",
                "deepspeed.offload_params", "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.resume"]:
        assert f"  {key} (" in text or f"  {key}:" in text, key


def test_ds_config_auto_fields_filled():
    from ftdist.engine.engine import build_ds_config

    cfg = load_config("sft_tiny", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                                   "model.dtype=bf16", "train.max_grad_norm=0.5"])
    ds = build_ds_config(cfg, world_size=2, grad_accum=1)
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"]
    assert "auto" not in str(ds)


def test_fp16_without_a_gpu_is_a_config_error():
    import torch

    from ftdist.engine.engine import build_ds_config

    cfg = load_config("sft_tiny", ["model.dtype=fp16"])
    if torch.cuda.is_available():
        assert build_ds_config(cfg, world_size=1, grad_accum=1)["fp16"]["enabled"] is True
    else:
        with pytest.raises(ConfigError, match="model.dtype=fp16 needs a GPU"):
            build_ds_config(cfg, world_size=1, grad_accum=1)


def test_readme_documents_every_key():
    from pathlib import Path

    from ftdist.config import config_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("<!-- keys:start -->")[1].split("<!-- keys:end -->")[0].strip()
    assert table == config_markdown(), "README key table is stale: run python launch/readme_keys.py"


@pytest.mark.parametrize("overrides,refused", [
    ([], False),  # adamw_torch: the universal checkpoint holds its whole state
    (["train.optimizer=paged_adamw_32bit"], False),
    (["deepspeed.offload_optimizer=true"], False),  # DeepSpeed's CPU Adam: the same state
    (["train.optimizer=sgd"], True),  # momentum buffers
    (["train.optimizer=lion"], True),
    (["train.optimizer=adamw_8bit"], True),  # quantised states
    (["train.optimizer=adafactor"], True),  # factored second moments
])
def test_which_optimizers_can_resume_on_another_number_of_ranks(overrides, refused):
    from ftdist.engine.universal import reshard_refusal

    cfg = load_config("sft_tiny", overrides)
    why = reshard_refusal(cfg)
    assert (why is not None) == refused
    if refused:
        assert f"train.optimizer={cfg.train.optimizer}" in why


def test_warmup_steps_or_ratio_and_schedule_arguments():
    assert load_config("sft_tiny", []).train.warmup(1000) == 50  # the recipe's warmup_ratio 0.05
    assert load_config("sft_tiny", ["train.warmup_ratio=null"]).train.warmup(1000) == 30  # the default, 3%
    assert load_config("sft_tiny", ["train.warmup_ratio=null", "train.warmup_steps=7"]).train.warmup(1000) == 7
    with pytest.raises(ConfigError, match="train.warmup_ratio=0.1 and train.warmup_steps=7: give one of them"):
        load_config("sft_tiny", ["train.warmup_steps=7", "train.warmup_ratio=0.1"])  # both on the command line


def test_a_command_line_warmup_replaces_the_recipes_other_one(tmp_path):
    """sft_tiny sets train.warmup_ratio: 0.05. As in transformers (warmup_steps wins over a ratio), a warmup key on
    the command line replaces the recipe's other one, with a note; both non-zero in one place stays an error."""
    steps = load_config("sft_tiny", ["train.warmup_steps=5"])
    assert (steps.train.warmup_steps, steps.train.warmup_ratio, steps.train.warmup(1000)) == (5, None, 5)
    assert steps.notes == ("train.warmup_steps=5 from the command line replaces the recipe's train.warmup_ratio=0.05",)
    off = load_config("sft_tiny", ["train.warmup_steps=0"])
    assert off.train.warmup(1000) == 0  # no warmup: the recipe's ratio is gone, not the 3% default
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  warmup_steps: 10\n")
    assert load_config(str(recipe), BASE + ["train.warmup_ratio=0"]).train.warmup(1000) == 0
    recipe.write_text("train:\n  warmup_steps: 10\n  warmup_ratio: 0\n")  # the same place, one of them 0
    assert load_config(str(recipe), BASE).train.warmup(1000) == 10
    recipe.write_text("train:\n  warmup_steps: 10\n  warmup_ratio: 0.1\n")
    with pytest.raises(ConfigError, match="train.warmup_ratio=0.1 and train.warmup_steps=10: give one of them"):
        load_config(str(recipe), BASE)


def test_a_constant_schedule_with_a_warmup_warms_up():
    """transformers' constant schedule ignores num_warmup_steps: a warmup the recipe sets becomes
    constant_with_warmup (noted); without one it stays constant."""
    import torch
    from transformers import get_scheduler

    cfg = load_config("sft_tiny", ["train.scheduler=constant", "train.warmup_ratio=null", "train.warmup_steps=4"])
    assert cfg.train.scheduler == "constant_with_warmup" and cfg.train.warmup(10) == 4
    assert cfg.notes[-1].startswith("train.scheduler=constant with train.warmup_steps=4: the learning rate warms up")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(cfg.train.scheduler, opt, num_warmup_steps=cfg.train.warmup(10), num_training_steps=10)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # linear over 4 steps (k / 4), then constant
    plain = load_config("sft_tiny", ["train.scheduler=constant", "train.warmup_ratio=0"])
    assert plain.train.scheduler == "constant" and plain.notes == ()
    cfg = load_config("sft_tiny", ["train.scheduler=cosine_with_restarts", "train.scheduler_kwargs={num_cycles: 3}"])
    assert cfg.train.scheduler_kwargs == {"num_cycles": 3}
    with pytest.raises(ConfigError, match=r"train.scheduler_kwargs.num_cycle: not an argument of the "
                                          r"cosine_with_restarts schedule \(it takes: num_cycles\)"):
        load_config("sft_tiny", ["train.scheduler=cosine_with_restarts", "train.scheduler_kwargs={num_cycle: 3}"])


def test_the_schedule_follows_scheduler_kwargs():
    """cosine_with_restarts with num_cycles=2 restarts half way (it used to run as one plain cosine)."""
    import torch
    from transformers import get_scheduler

    cfg = load_config("sft_tiny", ["train.scheduler=cosine_with_restarts", "train.scheduler_kwargs={num_cycles: 2}",
                                   "train.warmup_ratio=0"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(cfg.train.scheduler, opt, num_warmup_steps=cfg.train.warmup(10), num_training_steps=10,
                          scheduler_specific_kwargs=cfg.train.scheduler_kwargs)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and lrs[5] == 1.0 and lrs[4] < 0.2  # two cycles of 5 steps


@pytest.mark.parametrize("spelled,canonical", [("bfloat16", "bf16"), ("float32", "fp32"), ("torch.float16", "fp16")])
def test_dtype_names_as_transformers_spells_them(spelled, canonical):
    cfg = load_config("qlora_tiny", [f"model.dtype={spelled}", f"model.quantization.compute_dtype={spelled}"])
    assert cfg.model.dtype == canonical and cfg.model.quantization.compute_dtype == canonical


def test_old_checkpoints_default_warmup_is_not_a_recipe_change():
    from ftdist.config import resume_changes

    now = load_config("sft_tiny", ["train.warmup_ratio=null"]).to_dict()
    before = {**now, "train": {k: v for k, v in now["train"].items() if k not in ("warmup_steps", "scheduler_kwargs")}}
    before["train"]["warmup_ratio"] = 0.03
    assert resume_changes(before, now) == []
    now["train"]["warmup_steps"] = 5
    now["train"]["warmup_ratio"] = None
    assert [c[0] for c in resume_changes(before, now)] == ["train.warmup_ratio", "train.warmup_steps"]


def test_max_length_null_is_the_models_maximum():
    import json

    from ftdist.models.loading import resolve_max_length
    from ftdist.models.tiny import resolve_model_path

    cfg = load_config("sft_tiny", ["data.max_length=null"])
    assert cfg.data.max_length is None
    limit = json.loads(open(f"{resolve_model_path('ftdist/tiny')}/config.json").read())["max_position_embeddings"]
    assert resolve_max_length(cfg).data.max_length == limit
    assert resolve_max_length(load_config("sft_tiny", [])).data.max_length == 128  # a number stays
    # the combinations a number must satisfy are checked once the maximum is known
    pref = load_config("dpo_tiny", ["data.max_length=null", f"data.max_prompt_length={limit + 1}"])
    with pytest.raises(ConfigError, match="data.max_prompt_length"):
        resolve_max_length(pref)


def test_resume_safe_keys_are_whole_keys_or_sections():
    """data.train may name another path (its content is compared), data.train_on_prompt changes the training;
    group_by_length step/false hold the same rows per step (a split only), epoch does not."""
    from ftdist.config import resume_changes

    base = load_config("sft_tiny").to_dict()

    def changed(section, key, value):
        now = {**base, section: {**base[section], key: value}}
        return [c[0] for c in resume_changes(base, now)]

    assert changed("data", "train", "other.jsonl") == [] and changed("checkpoint", "every_steps", 7) == []
    assert changed("data", "train_on_prompt", True) == ["data.train_on_prompt"]
    assert changed("data", "num_proc", 2) == []
    assert changed("train", "group_by_length", False) == []
    assert changed("train", "group_by_length", "epoch") == ["train.group_by_length"]


@pytest.mark.parametrize("recipe,overrides,words", [
    ("sft_tiny", ["data.columns={score_diff: my_col}"], ["data.columns.score_diff", "allowed: messages"]),
    ("rm_tiny", ["data.columns={score_diff: my_col}"],
     ["data.columns.score_diff: preference rows (stage=rm)", "prompt, chosen, rejected, system, score_chosen, "
                                                             "score_rejected, margin"]),
    ("sft_tiny", ["data.format=alpaca", "data.columns={instruction: q, answer: a}"],
     ["data.columns.answer", "alpaca rows", "instruction, input, output, system"]),
    ("sft_tiny", ["data.columns={conversations: messages}"], ["the mapping goes from the role to your column: "
                                                             "{messages: conversations}"]),
    ("sft_tiny", ["data.train=[{path: a.jsonl, format: text, columns: {txt: body}}]"],
     ["data.train[0].columns.txt", "text rows", "allowed: text"]),
    ("sft_tiny", ["data.max_samples=-3"], ["data.max_samples: got -3, must be >= 0"]),
    (None, BASE + ["data.columns={messages: a, messages: b}"], ["data.columns={messages: a, messages: b}",
                                                                "key 'messages' is given twice"]),
])
def test_data_keys_that_would_do_nothing_are_refused(recipe, overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(recipe, overrides)
    for w in words:
        assert w in str(e.value)


def test_preference_roles_are_accepted():
    cfg = load_config("rm_tiny", ["data.columns={score_chosen: a, score_rejected: b, margin: m, prompt: q}"])
    assert cfg.data.columns == {"score_chosen": "a", "score_rejected": "b", "margin": "m", "prompt": "q"}


@pytest.mark.parametrize("content,words", [
    (None, ["a directory, not a recipe"]),
    (b"\x00\x01PK\x03\x04binary", ["binary content, not YAML text"]),
    (b"train:\n  lr: [1, 2\n", ["line 3, column 1: not valid YAML"]),
])
def test_a_recipe_that_is_no_yaml_text_is_one_line(tmp_path, content, words):
    path = tmp_path / "recipe.yaml"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))
    for w in words:
        assert w in str(e.value)


def test_print_config_marks_values_that_differ_from_the_library_defaults():
    """ftdist keeps its own defaults where they differ from peft's, bitsandbytes', transformers' and TRL's, and
    says so: a comment on each such value in --print-config, the library default in --help and the README."""
    import yaml

    from ftdist.config.load import config_yaml

    cfg = load_config("qlora_tiny", ["model.lora.r=8", "train.scheduler=constant", "train.warmup_steps=3"])
    text = config_yaml(cfg)
    assert yaml.safe_load(text) == cfg.to_dict()  # comments only: the same recipe
    lines = text.splitlines()
    assert "    target_modules: all-linear  # peft default: the architecture's attention projections, e.g. [q_proj, " \
           "v_proj] for Llama" in lines
    assert "    quant_type: nf4  # bitsandbytes default: fp4" in lines
    assert "    double_quant: true  # bitsandbytes default: false" in lines
    assert "  keep_last: 2  # transformers default: all (save_total_limit=None)" in lines
    assert "    r: 8" in lines  # equal to peft's: no mark
    assert "    compute_dtype: fp32" in lines  # qlora_tiny computes in fp32, as bitsandbytes does by default
    assert not any("top_k" in line and "#" in line for line in lines)  # ppo keys in an sft recipe: not marked
    assert lines[0] == "# train.warmup_steps=3 from the command line replaces the recipe's train.warmup_ratio=0.05"
    assert lines[1].startswith("# train.scheduler=constant with train.warmup_steps=3")
    grpo = config_yaml(load_config("grpo_tiny")).splitlines()
    assert "  top_k: 0  # transformers default: 50 (generate)" in grpo
    help_text = config_help()
    assert "(peft default: the architecture's attention projections" in help_text
    assert "(bitsandbytes default: fp32)" in help_text and "(transformers default: 50 (generate))" in help_text


def test_the_print_config_command_prints_the_marks(capsys):
    """`ftdist train RECIPE --print-config` prints config_yaml's text (library-default marks included), still the
    same recipe when read back as YAML."""
    import yaml

    from ftdist.cli import main

    assert main(["train", "sft_tiny", "--print-config", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "  keep_last: 2  # transformers default: all (save_total_limit=None)" in out.splitlines()
    assert yaml.safe_load(out) == load_config("sft_tiny", ["train.lr=0.5"]).to_dict()
