"""SFT throughput side by side: ftdist, TRL SFTTrainer (defaults, and with packing), and a bare PyTorch loop.

    python benchmarks/sft_throughput.py                 # the full comparison, 3 rounds (~11 min on 2 CPU cores)
    python benchmarks/sft_throughput.py --repeats 1     # one round
    python benchmarks/sft_throughput.py --tiny          # seconds: a smoke test of every arm (CI)
    python benchmarks/sft_throughput.py --setting longtail --arms ftdist,ftdist_unpacked,trl,trl_packing --repeats 1
                                                        # a 9M GPT-2 on 400 long-tailed chats, one epoch (~25 min)

Every arm trains the same randomly initialised Llama (weights written once and loaded by each
arm), on the same JSONL of chat samples, with the same tokenizer and chat template, in fp32,
without gradient checkpointing, with AdamW at the same learning rate, for the same number of
optimizer steps of the same effective batch in samples:

  ftdist       ftdist.train.loop.train(cfg): the real loop and DeepSpeed engine (ZeRO-0, one process),
               data.packing=true (best-fit rows of max_length tokens)
  ftdist_unpacked        the same with data.packing=false and the recipe default train.group_by_length=step,
               one micro-batch size = the step's samples (each step's rows run as micro-batches of similar length)
  ftdist_unpacked_plain  the same with train.group_by_length=false (one padded micro-batch per step)
  trl          trl.SFTTrainer with its defaults (padded batches in random order), except fp32 and no
               gradient checkpointing, which every arm shares
  trl_packing  the same with packing=True (TRL's best-fit packing, padding-free rows)
  bare         a plain PyTorch loop over ftdist's own packed batches: no DeepSpeed, no Trainer; the floor

A packed row holds several samples, so packed arms take `rows per step` rows chosen to hold the
same number of samples per step on average as the unpacked arm's batch.

Data: generated text from a Zipf-distributed made-up vocabulary, with a BPE tokenizer trained on
it (no network needed); conversation lengths are lognormal, clipped to 32..max_length tokens.

Measured per arm, each in its own process (so the peak RSS is its own): real (non-pad) tokens per
second of wall clock and per second of the process's CPU time, over the optimizer steps after the
first `--warmup` ones (every arm drops the same number); the padding fraction of the tokens the model
processed; the peak RSS. With --repeats N the arms run in rotating order N times and the table shows
medians. On a machine shared with other jobs the wall clock of one arm swings with their load while
its CPU time stays within a few percent; compare arms within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

ARMS = ("ftdist", "ftdist_unpacked", "ftdist_unpacked_plain", "trl", "trl_packing", "bare")
SETTINGS = {
    # model shape, data and schedule of the full run and of the smoke test
    "full": dict(hidden=512, intermediate=1536, layers=6, heads=8, kv_heads=4, vocab=8192, samples=3000,
                 max_length=1024, min_length=32, median_length=170, sigma=0.85, batch=8, micro=4, steps=8, warmup=2),
    # held-out shape: a GPT-2-shaped model (learned positions, tied embeddings, MHA with head size 64) on
    # chats whose answers are lognormal with a heavy tail (sigma 1.1), one epoch at the recipe's default
    # micro-batch size (4 rows) and steps of 8 samples
    "longtail": dict(arch="gpt2", hidden=256, layers=6, heads=4, vocab=16384, samples=400, max_length=1024,
                     min_length=24, median_length=140, sigma=1.1, batch=8, micro=4, unpacked_micro=4, steps=50,
                     warmup=2),
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, samples=200,
                 max_length=128, min_length=16, median_length=40, sigma=0.7, batch=4, micro=2, steps=3, warmup=1,
                 tokenizer_sentences=2000),
}
LR = 1e-4


# -- data, tokenizer and model, written once into the work directory ---------------------------------
def _make_words(rng: random.Random, n: int) -> list[str]:
    onsets = ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "st", "tr", "pl", "kr", "sh"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    codas = ["", "", "n", "r", "s", "l", "t", "m"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))))
    return sorted(words)


class TextSource:
    """Sentences of Zipf-distributed made-up words: enough structure for BPE, no real corpus needed."""

    def __init__(self, seed: int, n_words: int):
        self.rng = random.Random(seed)
        self.words = _make_words(self.rng, n_words)
        self.rng.shuffle(self.words)
        self.weights = [1.0 / (r + 1) ** 1.1 for r in range(len(self.words))]

    def sentence(self) -> str:
        ws = self.rng.choices(self.words, self.weights, k=self.rng.randint(4, 18))
        return ws[0].capitalize() + " " + " ".join(ws[1:]) + self.rng.choice((".", ".", ".", "?", "!"))

    def text(self, n_tokens: int, tokens_of) -> str:
        """About n_tokens tokens of sentences (tokens_of counts a sentence's tokens)."""
        out, n = [], 0
        while n < n_tokens:
            s = self.sentence()
            out.append(s)
            n += tokens_of(" " + s)
        return " ".join(out)


def build_tokenizer(src: TextSource, vocab: int, sentences: int = 20000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ftdist.models.tiny import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((src.sentence() for _ in range(sentences)), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 extra_special_tokens=list(ROLE_TOKENS), model_max_length=1 << 16,
                                 padding_side="right", clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def conversation(src: TextSource, rng: random.Random, total: int, tokens_of) -> list[dict]:
    """A chat of roughly `total` tokens: optional system prompt, 1-3 turns, answers longer than questions."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": src.text(rng.randint(8, 24), tokens_of)})
    turns = 1 if total < 128 else rng.choice((1, 1, 2, 3))
    # each message costs 4 template tokens: <|role|>, newline, <|end|>, newline
    budget = max(total - sum(tokens_of(m["content"]) + 4 for m in messages) - 8 * turns, 2 * turns)
    for _ in range(turns):
        share = budget / turns
        q = max(1, int(share * rng.uniform(0.15, 0.4)))
        messages.append({"role": "user", "content": src.text(q, tokens_of)})
        messages.append({"role": "assistant", "content": src.text(max(1, int(share) - q), tokens_of)})
    return messages


def prepare_workdir(work: Path, s: dict, seed: int = 0) -> dict:
    """Tokenizer, model weights and data.jsonl under `work`; reused when already there."""
    meta_path = work / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work.mkdir(parents=True, exist_ok=True)
    src = TextSource(seed, n_words=max(200, s["vocab"] // 2))
    tok = build_tokenizer(src, s["vocab"], s.get("tokenizer_sentences", 20000))
    cache: dict[str, int] = {}

    def tokens_of(text: str) -> int:
        if text not in cache:
            cache[text] = len(tok(text, add_special_tokens=False)["input_ids"])
        return cache[text]

    rng = random.Random(seed + 1)
    lengths, rows = [], []
    for _ in range(s["samples"]):
        # lognormal: most conversations short, a long tail up to (and clipped at) max_length
        total = int(min(s["max_length"], max(s["min_length"], rng.lognormvariate(math.log(s["median_length"]),
                                                                               s["sigma"]))))
        messages = conversation(src, rng, total, tokens_of)
        rows.append({"messages": messages})
        lengths.append(min(s["max_length"], len(tok.apply_chat_template(messages, tokenize=True,
                                                                        return_dict=True)["input_ids"])))
    with open(work / "data.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tok.save_pretrained(work / "model")
    # the vocabulary the model is built for (a BPE trained on made-up text may learn fewer merges)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               use_cache=False)
    if s.get("arch") == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=max(len(tok), s["vocab"]), n_embd=s["hidden"], n_layer=s["layers"],
                            n_head=s["heads"], n_positions=s["max_length"], **ids)
        model_class = GPT2LMHeadModel
    else:
        config = LlamaConfig(vocab_size=max(len(tok), s["vocab"]), hidden_size=s["hidden"],
                             intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                             num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                             max_position_embeddings=s["max_length"], tie_word_embeddings=False, **ids)
        model_class = LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_class(config).to(getattr(torch, s.get("save_dtype", "float32")))
    model.save_pretrained(work / "model", safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    lengths.sort()
    meta = {"n_params": n_params, "samples": len(rows), "tokens": sum(lengths),
            "length_p50": lengths[len(lengths) // 2], "length_p90": lengths[int(0.9 * len(lengths))],
            "length_max": lengths[-1], "length_mean": sum(lengths) / len(lengths),
            "clipped": sum(n >= s["max_length"] for n in lengths)}
    meta_path.write_text(json.dumps(meta))
    return meta


def rows_per_step(work: Path, s: dict, seed: int) -> tuple[int, float]:
    """Packed rows per step holding on average `batch` samples, and the samples per packed row."""
    from ftdist.data.batching import epoch_rows

    lengths = json.loads((work / "lengths.json").read_text())
    rows = epoch_rows(lengths, seed, 0, True, s["max_length"])
    per_row = len(lengths) / len(rows)
    return max(1, round(s["batch"] / per_row)), per_row


# -- the arms: each runs in its own process and returns one JSON record --------------------------------
def _mark(real: int, processed: int) -> tuple[float, float, int, int]:
    """(wall clock, CPU time of this process, cumulative real tokens, cumulative processed tokens)."""
    return time.perf_counter(), time.process_time(), real, processed


def _window(marks: list[tuple[float, float, int, int]], warmup: int) -> dict:
    """Throughput between the end of step `warmup` and the end of the last step (marks: one per step)."""
    (t0, c0, r0, p0), (t1, c1, r1, p1) = marks[warmup - 1], marks[-1]
    real, processed = r1 - r0, p1 - p0
    steps = [(round(b[0] - a[0], 3), round(b[1] - a[1], 3), b[2] - a[2]) for a, b in zip(marks, marks[1:])]
    return {"seconds": t1 - t0, "cpu_seconds": c1 - c0, "real_tokens": real, "processed_tokens": processed,
            "steps_wall_cpu_tokens": steps,
            "timed_steps": len(marks) - warmup, "tokens_per_s": real / max(t1 - t0, 1e-9),
            "tokens_per_cpu_s": real / max(c1 - c0, 1e-9), "padding_fraction": 1 - real / max(processed, 1)}


def arm_ftdist(work: Path, s: dict, a, packing: bool = True, group_by_length="step") -> dict:
    from ftdist.config import load_config
    from ftdist.train.loop import train
    from ftdist.run.metrics import MetricsWriter

    # the loop writes one record per step (log_every=1); stamp each as it is written
    marks: list[tuple[float, float, int, int]] = []
    log = MetricsWriter.log

    def stamped_log(self, record: dict) -> None:
        if "tokens" in record and "padding_fraction" in record:
            step_real = record["tokens"] - (marks[-1][2] if marks else 0)
            step_processed = round(step_real / max(1 - record["padding_fraction"], 1e-9))
            marks.append(_mark(record["tokens"], (marks[-1][3] if marks else 0) + step_processed))
        log(self, record)

    # unpacked: one micro-batch of the whole step's samples (micro = global batch, the case in which only a
    # split of the step's rows by length can cut padding)
    rows = rows_per_step(work, s, a.seed)[0] if packing else s["batch"]
    micro = 1 if packing else s.get("unpacked_micro", rows)
    out = work / "runs" / f"ftdist-{'packed' if packing else group_by_length}-{os.getpid()}"
    cfg = load_config(data=dict(
        stage="sft", output_dir=str(out), seed=a.seed,
        model={"name_or_path": str(work / "model"), "dtype": "fp32", "attn_implementation": "sdpa"},
        data={"train": str(work / "data.jsonl"), "max_length": s["max_length"], "packing": packing,
              "cache_dir": str(work / "cache")},
        train={"micro_batch_size": micro, "global_batch_size": rows,
               "group_by_length": group_by_length, "max_steps": s["steps"], "lr": LR,
               "scheduler": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0,
               "log_every": 1, "progress_bar": False},
        deepspeed={"zero_stage": 0}, checkpoint={"every_steps": 0, "keep_last": 1, "resume": "never"},
        logging={"tensorboard": False}))
    MetricsWriter.log = stamped_log
    try:
        train(cfg)
    finally:
        MetricsWriter.log = log
    return {**_window(marks, s["warmup"]), "rows_per_step": rows}


def arm_trl(work: Path, s: dict, a, packing: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows, _ = rows_per_step(work, s, a.seed)
    counts = {"real": 0, "processed": 0}
    marks: list[tuple[float, float, int, int]] = []

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            ids = inputs["input_ids"]
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            counts["real"] += real
            counts["processed"] += ids.numel()
            return super().training_step(model, inputs, *args, **kwargs)

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(_mark(counts["real"], counts["processed"]))

    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    ds = datasets.load_dataset("json", data_files=str(work / "data.jsonl"), split="train")
    micro = 1 if packing else s["micro"]
    per_step = rows if packing else s["batch"]
    args = SFTConfig(output_dir=str(work / "runs" / f"trl-{os.getpid()}"), max_length=s["max_length"],
                     packing=packing, per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
                     max_steps=s["steps"], learning_rate=LR, bf16=False, gradient_checkpointing=False,
                     use_cpu=True, report_to="none", save_strategy="no", dataloader_num_workers=0,
                     seed=a.seed, disable_tqdm=True)
    trainer = CountingTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                              callbacks=[StepClock()])
    trainer.train()
    return {**_window(marks, s["warmup"]), "rows_per_step": per_step}


def arm_bare(work: Path, s: dict, a) -> dict:
    import torch
    from transformers import get_scheduler

    from ftdist.algos.sft import sft_loss_sum
    from ftdist.config import load_config
    from ftdist.data.batching import TokenData, collate_rows, plan_epoch
    from ftdist.data.tokenize import tokenize_sft
    from ftdist.models.forward import causal_logits
    from ftdist.models.loading import load_causal_lm, load_tokenizer

    rows, _ = rows_per_step(work, s, a.seed)
    cfg = load_config(data=dict(model={"name_or_path": str(work / "model"), "dtype": "fp32",
                                       "attn_implementation": "sdpa"},
                                data={"train": str(work / "data.jsonl"), "max_length": s["max_length"],
                                      "packing": True}))
    torch.manual_seed(a.seed)
    tok = load_tokenizer(cfg.model)
    ds, _ = tokenize_sft(cfg.data.train, tok, cfg.data, str(work / "cache"))
    data = TokenData(ds)
    model = load_causal_lm(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=s["steps"])
    plan = plan_epoch(data.lengths, seed=a.seed, epoch=0, micro_batch_size=1, grad_accum=rows, world_size=1,
                      rank=0, packing=True, capacity=s["max_length"])
    marks, real, processed = [], 0, 0
    for step in range(s["steps"]):
        micro = [collate_rows(r, data, tok.pad_token_id, s["max_length"], True) for r in plan.steps[step]]
        units = sum(b.n_target_tokens for b in micro)
        for b in micro:
            loss_sum, _ = sft_loss_sum(causal_logits(model, b, "sdpa", torch.float32), b.labels)
            (loss_sum / units).backward()
            real += b.n_tokens
            processed += b.n_padded
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        marks.append(_mark(real, processed))
    return {**_window(marks, s["warmup"]), "rows_per_step": rows}


def run_arm(name: str, work: Path, s: dict, a) -> dict:
    t0 = time.perf_counter()
    if name == "ftdist":
        r = arm_ftdist(work, s, a)
    elif name.startswith("ftdist_unpacked"):
        r = arm_ftdist(work, s, a, packing=False, group_by_length=False if name.endswith("_plain") else "step")
    elif name == "bare":
        r = arm_bare(work, s, a)
    else:
        r = arm_trl(work, s, a, packing=name == "trl_packing")
    # ru_maxrss is in KiB on Linux
    return {"arm": name, **r, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "total_s": time.perf_counter() - t0}


# -- driver ---------------------------------------------------------------------------------------
def write_lengths(work: Path, s: dict) -> None:
    """Token lengths as ftdist tokenises the data: the packed arms size their steps from them."""
    if (work / "lengths.json").exists():
        return
    from ftdist.config import load_config
    from ftdist.data.tokenize import tokenize_sft
    from ftdist.models.loading import load_tokenizer

    cfg = load_config(data=dict(model={"name_or_path": str(work / "model")},
                                data={"train": str(work / "data.jsonl"), "max_length": s["max_length"]}))
    ds, _ = tokenize_sft(cfg.data.train, load_tokenizer(cfg.model), cfg.data, str(work / "cache"))
    (work / "lengths.json").write_text(json.dumps([len(x) for x in ds["input_ids"]]))


def spawn_arm(name: str, work: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--arm", name, "--work", str(work), "--seed", str(a.seed),
           "--steps", str(a.steps), "--warmup", str(a.warmup)]
    cmd += ["--setting", a.setting]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads), "TQDM_DISABLE": "1",
           "ACCELERATE_DISABLE_RICH": "1"}
    # the ftdist arm starts a one-process gloo group; a stale launcher environment must not leak in
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"arm {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(last[len("RESULT "):])


def table(results: dict[str, list[dict]], meta: dict, s: dict, a) -> str:
    keys = ("tokens_per_s", "tokens_per_cpu_s", "padding_fraction", "peak_rss_mb")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in results.items() if rs}
    arch = "GPT-2" if s.get("arch") == "gpt2" else "Llama"
    lines = [f"model: {arch} {meta['n_params'] / 1e6:.1f}M parameters (random init), fp32, sdpa, CPU, "
             f"{a.threads} thread(s) per arm; data: {meta['samples']} chat samples, {meta['tokens']} tokens, length "
             f"p50 {meta['length_p50']} / p90 {meta['length_p90']} / max {meta['length_max']} "
             f"({meta['clipped']} clipped at {s['max_length']})",
             f"{s['steps']} optimizer steps of {s['batch']} samples (packed arms: rows of {s['max_length']} tokens "
             f"holding as many on average), first {s['warmup']} steps not timed; median of {a.repeats} round(s)"
             + ("; arms in one process, so peak RSS is cumulative" if a.in_process else ""),
             "",
             "| arm | real tokens/s | ftdist / arm | real tokens per CPU-s | ftdist / arm | padding | peak RSS MB "
             "| rounds (tokens/s) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    base = med.get("ftdist")
    for n in ARMS:
        if n not in med:
            continue
        m = med[n]
        ratio = f"{base['tokens_per_s'] / m['tokens_per_s']:.2f}x" if base else "-"
        cpu_ratio = f"{base['tokens_per_cpu_s'] / m['tokens_per_cpu_s']:.2f}x" if base else "-"
        rounds = ", ".join(f"{r['tokens_per_s']:.0f}" for r in results[n])
        lines.append(f"| {n} | {m['tokens_per_s']:.1f} | {ratio} | {m['tokens_per_cpu_s']:.1f} | {cpu_ratio} | "
                     f"{m['padding_fraction']:.1%} | {m['peak_rss_mb']:.0f} | {rounds} |")
    if base and "bare" in med:
        # the same batches in the same round: the fairest pair in the table
        paired = [f["tokens_per_s"] / b["tokens_per_s"] for f, b in zip(results["ftdist"], results["bare"])]
        paired_cpu = [f["tokens_per_cpu_s"] / b["tokens_per_cpu_s"] for f, b in zip(results["ftdist"], results["bare"])]
        lines += ["", f"ftdist / bare loop per round: wall {', '.join(f'{x:.3f}' for x in paired)} "
                      f"(median {statistics.median(paired):.3f}); CPU time "
                      f"{', '.join(f'{x:.3f}' for x in paired_cpu)} (median {statistics.median(paired_cpu):.3f})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model and a few steps: checks every arm runs")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="full",
                   help="model and data: full (27M Llama, 3000 chats), longtail (11M GPT-2, 400 chats with "
                        "heavy-tailed answers, one epoch), tiny (same as --tiny)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all arms, in rotating order (default 3)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default: 8, tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="first steps not timed (default: 2, tiny 1)")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    # one thread: on a 2-core machine shared with other jobs, two OpenMP threads per arm stall on each
    # other at every barrier, and a step's wall time then swings 3x (measured)
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm (default 1)")
    p.add_argument("--seed", type=int, default=0, help="data order seed of the first round (default 0)")
    p.add_argument("--json", default=None, help="also write every run's record to this JSON file")
    p.add_argument("--in-process", action="store_true",
                   help="run the arms one after another in this process (quicker start; peak RSS is then shared; "
                        "the default with --tiny)")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm in this process
    a = p.parse_args(argv)
    a.tiny = a.tiny or a.setting == "tiny"
    a.setting = "tiny" if a.tiny else a.setting
    s = dict(SETTINGS[a.setting])
    s["steps"] = a.steps = a.steps or s["steps"]
    s["warmup"] = a.warmup = a.warmup or s["warmup"]
    if not 1 <= s["warmup"] < s["steps"]:
        p.error("--warmup must be at least 1 and below --steps")
    if a.arm:
        import torch

        torch.set_num_threads(a.threads)
        print("RESULT " + json.dumps(run_arm(a.arm, Path(a.work), s, a)), flush=True)
        return 0
    a.in_process = a.in_process or a.tiny
    arms = [n for n in a.arms.split(",") if n]
    unknown = set(arms) - set(ARMS)
    if unknown:
        p.error(f"--arms: unknown {sorted(unknown)}; allowed: {', '.join(ARMS)}")
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="sft-throughput-")
    work = Path(a.work or tmp.name) / a.setting
    t0 = time.time()
    meta = prepare_workdir(work, s)
    write_lengths(work, s)
    print(f"work directory {work} ready in {time.time() - t0:.0f}s: {meta}", flush=True)
    results: dict[str, list[dict]] = {n: [] for n in arms}
    seed0 = a.seed
    if a.in_process:
        import torch

        torch.set_num_threads(a.threads)
        # the ftdist arm leaves its process group behind: it goes last
        arms = sorted(arms, key=lambda n: n == "ftdist")
    for k in range(a.repeats):
        a.seed = seed0 + k
        order = arms if a.in_process else arms[k % len(arms):] + arms[:k % len(arms)]
        for name in order:
            r = run_arm(name, work, s, a) if a.in_process else spawn_arm(name, work, a)
            r["seed"] = a.seed
            results[name].append(r)
            print(f"round {k + 1} {name}: {r['tokens_per_s']:.1f} real tokens/s ({r['tokens_per_cpu_s']:.1f} per CPU-s), "
                  f"padding {r['padding_fraction']:.1%}, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['real_tokens']} tokens in {r['seconds']:.1f}s "
                  f"({r['total_s']:.0f}s with start-up)", flush=True)
    a.seed = seed0
    print()
    print(table(results, meta, s, a))
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "settings": s, "results": results}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
