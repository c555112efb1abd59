"""DPO throughput side by side: ftdist (padding-free pairs, padded pairs, precomputed reference) and TRL's DPOTrainer.

    python benchmarks/dpo_throughput.py --repeats 1     # one round of every arm (~37 min on 2 CPU cores, 1 thread)
    python benchmarks/dpo_throughput.py                 # 3 rounds, medians (~2 h)
    python benchmarks/dpo_throughput.py --tiny          # seconds: a smoke test of every arm (CI)
    python benchmarks/dpo_throughput.py --arms ftdist_packed,trl --max-steps 12 --work /tmp/dpobench

Every arm trains the same randomly initialised GPT-2 (transformers GPT2Config; "full": n_embd 256, 12 layers,
4 heads, 512 positions, a BPE vocabulary of 6144: ~11M parameters, no dropout; written once and loaded by each
arm), as its own policy AND its frozen reference, on the same JSONL of conversational pairs, with the same
tokenizer and chat template, in fp32, sdpa attention, without gradient checkpointing, with AdamW (lr 5e-5,
linear decay to 0 over the run, no warmup, no weight decay, clip norm 1.0), DPO sigmoid loss with beta 0.1,
data.max_length = DPOConfig.max_length = 512, for one epoch of optimizer steps of 8 pairs (400 pairs: 50 steps):

  ftdist_packed              ftdist.train.loop.train(cfg) in-process: the real loop and DeepSpeed engine (ZeRO-0,
                             one process), stage=dpo, data.packing=true: each micro-batch is one row of its pairs'
                             chosen and rejected sequences end to end, attention kept per sequence (segment_sdpa), no
                             padding; train.micro_batch_size=8 (a micro-batch holds up to 2 x 8 x 512 tokens: one
                             micro-batch per step here), global_batch_size=8; dpo.reference=model (the default for
                             full fine-tuning: a frozen copy, loaded at the first step, forward on every step)
  ftdist_padded              the same with data.packing=false and the default train.group_by_length=step (each
                             step's 16 rows run as up to 8-pair micro-batches of similar length, padded right)
  ftdist_packed_precomputed  ftdist_packed with dpo.reference=precomputed: the reference log-probs of all pairs are
                             computed once (packed micro-batches of 8 pairs) at the first step and cached under the
                             data cache dir (deleted before each run, so every run pays for it); the reference model
                             is then freed and no step runs it
  trl                        trl.DPOTrainer (1.16) with its defaults (padded batches in random order; its fused
                             chunked LM head for log-probs; its default optimizer, adamw_torch_fused), except what
                             every arm shares: bf16=False (fp32), gradient_checkpointing=False, learning_rate, beta,
                             max_length, per_device_train_batch_size=8 and gradient_accumulation_steps=1 (8 pairs a
                             step), use_cpu; logging_steps=1 (to read each step's loss)
  trl_padding_free           trl with DPOConfig(padding_free=True). In TRL 1.16 this option does not exist in
                             practice: DPOConfig documents it as "only supported with FlashAttention 2 or 3" and
                             "temporarily unavailable: since the DPO refactor, setting it to True warns and falls back
                             to standard padding", and DPOTrainer.__init__ does exactly that (warns, then sets
                             self.padding_free = False; its DataCollatorForPreference has no padding-free mode). So
                             nothing about CPU or sdpa is the obstacle, and no patch of ours would be TRL's option:
                             the arm builds the trainer, and if TRL turned the option off it trains nothing and the
                             table says "n/a" (its numbers would be the trl arm's again). A TRL that keeps it on is
                             trained and measured like the trl arm.

Data (held-out style, long-tailed, no network): text from a Zipf-distributed made-up vocabulary with a BPE
tokenizer trained on it (benchmarks/sft_throughput.py). Each row is {"prompt": [messages ending with a user turn],
"chosen": [assistant message], "rejected": [assistant message]}; prompt lengths lognormal (median 64 tokens,
sigma 0.8, 12..256), each response's length drawn on its own, lognormal (median 96, sigma 0.9), so chosen and
rejected of a pair differ and a batch's longest sequence is often several times its median; prompt + response is
capped near max_length (the few that still pass it are cut at 512 by every arm alike; no prompt is cut:
data.max_prompt_length = max_length). Rejected responses draw from a shifted word distribution, so there is
something for DPO to learn and the reward accuracy can rise above chance.

Measured per arm, each in its own process (so the peak RSS is its own), over the optimizer steps after the first
`--warmup` ones (every arm drops the same number; they hold ftdist's lazy reference load and the precompute): pairs
per second and real (non-pad) tokens per second of wall clock, real tokens per second of the process's CPU time,
the padding fraction of the tokens the policy processed; train seconds of the whole epoch (first step's start to
the last step's end, less the precompute), the precompute seconds (reference load + one pass over all pairs) and
their total; the peak RSS; the loss of the first step (log 2: policy = reference) and the mean loss and reward
accuracy of the last 10 steps. ftdist packed and padded run the same pairs in every step, so their per-step losses
must agree to float rounding (printed); TRL draws its own order, so only its trend compares. With --repeats N the
arms run in rotating order N times and the table shows medians. On a machine shared with other jobs the wall clock
of one arm swings with their load; compare arms within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.sft_throughput import TextSource, _mark, _window, build_tokenizer  # noqa: E402

ARMS = ("ftdist_packed", "ftdist_padded", "ftdist_packed_precomputed", "trl", "trl_padding_free")
SETTINGS = {
    # model shape, data and batch of the full run and of the smoke test
    "full": dict(n_embd=256, n_layer=12, n_head=4, vocab=6144, pairs=400, max_length=512, prompt_median=64,
                 prompt_sigma=0.8, prompt_min=12, prompt_max=256, response_median=96, response_sigma=0.9,
                 response_min=4, batch=8, micro=8, warmup=2),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab=512, pairs=24, max_length=128, prompt_median=20,
                 prompt_sigma=0.6, prompt_min=6, prompt_max=64, response_median=24, response_sigma=0.7,
                 response_min=2, batch=4, micro=2, warmup=1, tokenizer_sentences=2000),
}
LR = 5e-5
BETA = 0.1
LAST = 10  # the "final" loss and reward accuracy: means over this many last steps
TRL_PADDING_FREE_OFF = ("TRL {v} turns DPOConfig(padding_free=True) off in DPOTrainer.__init__ (warns: temporarily "
                        "unavailable after a refactor; falls back to padded batches): nothing padding-free to measure")


# -- data and model, written once into the work directory -----------------------------------------------
def prompt_messages(src: TextSource, rng: random.Random, total: int, tokens_of) -> list[dict]:
    """A prompt of roughly `total` tokens ending with a user turn: optional system message, 1-3 user turns."""
    messages, used = [], 0
    if total >= 48 and rng.random() < 0.3:
        text = src.text(rng.randint(8, 24), tokens_of)
        messages.append({"role": "system", "content": text})
        used += tokens_of(text) + 4
    turns = 1 if total < 96 else rng.choice((1, 1, 2, 3))
    n = 2 * turns - 1  # user, assistant, ..., user
    # each message costs 4 template tokens (<|role|>, newline, <|end|>, newline); the generation prompt 2
    budget = max(total - used - 4 * n - 2, n)
    weights = [rng.uniform(0.5, 1.5) for _ in range(n)]
    for k, w in enumerate(weights):
        messages.append({"role": "user" if k % 2 == 0 else "assistant",
                         "content": src.text(max(1, int(budget * w / sum(weights))), tokens_of)})
    return messages


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def _pct(xs: list[int], q: float) -> int:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def prepare_workdir(work: Path, s: dict, seed: int = 0) -> dict:
    """Tokenizer + GPT-2 weights (<work>/model) and pairs.jsonl under `work`; reused when already there."""
    meta_path = work / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    work.mkdir(parents=True, exist_ok=True)
    src = TextSource(seed, n_words=max(200, s["vocab"] // 2))
    tok = build_tokenizer(src, s["vocab"], s.get("tokenizer_sentences", 20000))
    # rejected answers: the same words, those of frequency ranks 10-24 swapped with those of ranks 25-39
    bad = TextSource(seed + 7, n_words=10)
    bad.words = src.words[:10] + src.words[25:40] + src.words[10:25] + src.words[40:]
    bad.weights = src.weights
    cache: dict[str, int] = {}

    def tokens_of(text: str) -> int:
        if text not in cache:
            cache[text] = len(tok(text, add_special_tokens=False)["input_ids"])
        return cache[text]

    def ids(messages, **kw) -> list[int]:
        return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    L = s["max_length"]
    rng = random.Random(seed + 1)
    rows, prompts, responses, seqs, truncated = [], [], [], [], 0
    for _ in range(s["pairs"]):
        p_len = _lognormal(rng, s["prompt_median"], s["prompt_sigma"], s["prompt_min"], s["prompt_max"])
        prompt = prompt_messages(src, rng, p_len, tokens_of)
        n_prompt = len(ids(prompt, add_generation_prompt=True))
        room = max(s["response_min"], L - n_prompt)
        # each response's length on its own: chosen and rejected differ; content ~3 tokens short of the turn
        c_len, r_len = (_lognormal(rng, s["response_median"], s["response_sigma"], s["response_min"], room)
                        for _ in range(2))
        chosen = [{"role": "assistant", "content": src.text(max(1, c_len - 3), tokens_of)}]
        rejected = [{"role": "assistant", "content": bad.text(max(1, r_len - 3), tokens_of)}]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        prompts.append(n_prompt)
        for resp in (chosen, rejected):
            full = len(ids(prompt + resp))
            responses.append(full - n_prompt)
            seqs.append(min(L, full))
            truncated += full > L
    with open(work / "pairs.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tok.save_pretrained(work / "model")
    # the vocabulary the model is built for (a BPE trained on made-up text may learn fewer merges)
    config = GPT2Config(vocab_size=max(len(tok), s["vocab"]), n_embd=s["n_embd"], n_layer=s["n_layer"],
                        n_head=s["n_head"], n_positions=L, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        use_cache=False)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(work / "model", safe_serialization=True)
    # padded rows of a random batch of `batch` pairs: every row as long as the batch's longest sequence
    batches = [seqs[i:i + 2 * s["batch"]] for i in range(0, len(seqs), 2 * s["batch"])]
    padded = sum(len(b) * max(b) for b in batches)
    meta = {"n_params": sum(p.numel() for p in model.parameters()), "pairs": len(rows), "tokens": sum(seqs),
            "prompt_p50": _pct(prompts, 0.5), "prompt_p90": _pct(prompts, 0.9), "prompt_max": max(prompts),
            "response_p50": _pct(responses, 0.5), "response_p90": _pct(responses, 0.9),
            "response_max": max(responses), "sequence_max": max(seqs), "truncated": truncated,
            "padding_in_file_order": 1 - sum(seqs) / padded}
    meta_path.write_text(json.dumps(meta))
    return meta


# -- the arms: each runs in its own process and returns one JSON record --------------------------------
def _steps(s: dict, a) -> int:
    epoch = s["pairs"] // s["batch"]
    return min(epoch, a.max_steps) if a.max_steps else epoch


def _result(marks: list, t_start: float, precompute_s: float, losses: list, accuracies: list, s: dict) -> dict:
    w = _window(marks, s["warmup"])
    train_s = marks[-1][0] - t_start - precompute_s
    last = slice(-min(LAST, len(losses)), None)
    return {**w, "pairs_per_s": w["timed_steps"] * s["batch"] / max(w["seconds"], 1e-9), "train_s": train_s,
            "precompute_s": precompute_s, "total_train_s": train_s + precompute_s, "steps": len(marks),
            "losses": losses, "accuracies": accuracies, "loss_first": losses[0] if losses else None,
            "loss_last": statistics.fmean(losses[last]) if losses else None,
            "acc_last": statistics.fmean(accuracies[last]) if accuracies else None}


def arm_ftdist(name: str, work: Path, s: dict, a) -> dict:
    import ftdist.train.loop as loop
    from ftdist.config import load_config
    from ftdist.run.metrics import MetricsWriter
    from ftdist.train.reference import Reference

    packing = name != "ftdist_padded"
    precomputed = name == "ftdist_packed_precomputed"
    cache = work / "cache"
    if precomputed:  # every run pays for its precompute: no reference log-probs left by an earlier run
        for f in cache.glob("ref-logps-*.pt"):
            f.unlink()
    marks: list[tuple[float, float, int, int]] = []
    losses, accuracies, pending, clock = [], [], {}, {"start": None, "precompute": 0.0}
    step_fn, log, precompute = loop.optimizer_step, MetricsWriter.log, Reference._precompute

    def counted_step(*args, **kwargs):
        if clock["start"] is None:
            clock["start"] = time.perf_counter()
        result = step_fn(*args, **kwargs)
        pending.update(result.counters)  # this step's real and processed (padded) tokens, all ranks
        return result

    def timed_precompute(self, engine):
        t0 = time.perf_counter()
        precompute(self, engine)
        clock["precompute"] += time.perf_counter() - t0

    # the loop writes one record per step (log_every=1): stamp each as it is written (the step's collate included)
    def stamped_log(self, record: dict) -> None:
        if "tokens" in record and "padding_fraction" in record and pending:
            prev = marks[-1] if marks else (0.0, 0.0, 0, 0)
            marks.append(_mark(prev[2] + int(pending["real"]), prev[3] + int(pending["padded"])))
            losses.append(record["loss"])
            accuracies.append(record["rewards/accuracies"])
            pending.clear()
        log(self, record)

    out = work / "runs" / f"{name}-{os.getpid()}-{a.seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(data=dict(
        stage="dpo", output_dir=str(out), seed=a.seed,
        model={"name_or_path": str(work / "model"), "dtype": "fp32", "attn_implementation": "sdpa",
               "gradient_checkpointing": False},
        data={"train": str(work / "pairs.jsonl"), "format": "preference", "max_length": s["max_length"],
              "max_prompt_length": s["max_length"], "packing": packing, "cache_dir": str(cache)},
        dpo={"beta": BETA, "loss_type": "sigmoid", "reference": "precomputed" if precomputed else "model"},
        train={"micro_batch_size": s["micro"], "global_batch_size": s["batch"], "group_by_length": "step",
               "max_steps": _steps(s, a), "lr": LR, "optimizer": "adamw_torch", "scheduler": "linear",
               "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "log_every": 1, "progress_bar": False,
               "eval_accuracy": False, "save_final": False},
        deepspeed={"zero_stage": 0}, checkpoint={"every_steps": 0, "keep_last": 1, "resume": "never"},
        logging={"tensorboard": False}))
    loop.optimizer_step, MetricsWriter.log, Reference._precompute = counted_step, stamped_log, timed_precompute
    try:
        loop.train(cfg)
    finally:
        loop.optimizer_step, MetricsWriter.log, Reference._precompute = step_fn, log, precompute
        if not a.keep_runs:
            shutil.rmtree(out, ignore_errors=True)  # the loop's final DeepSpeed checkpoint
    return _result(marks, clock["start"], clock["precompute"], losses, accuracies, s)


def arm_trl(name: str, work: Path, s: dict, a) -> dict:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    padding_free = name == "trl_padding_free"
    counts = {"real": 0, "processed": 0}
    marks: list[tuple[float, float, int, int]] = []
    losses, accuracies, clock = [], [], {"start": None}

    class CountingTrainer(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            ids = inputs["input_ids"]
            # padded: (2B, T) with an attention mask; a padding-free batch (one row, no mask) is all real tokens
            counts["real"] += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            counts["processed"] += ids.numel()
            return super().training_step(model, inputs, *args, **kwargs)

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if clock["start"] is None:
                clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(_mark(counts["real"], counts["processed"]))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "rewards/accuracies" in logs:
                losses.append(logs["loss"])
                accuracies.append(logs["rewards/accuracies"])

    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    ds = datasets.load_dataset("json", data_files=str(work / "pairs.jsonl"), split="train",
                               cache_dir=str(work / "hf-datasets"))
    args = DPOConfig(output_dir=str(work / "runs" / f"{name}-{os.getpid()}"), max_length=s["max_length"],
                     padding_free=padding_free, beta=BETA, learning_rate=LR, per_device_train_batch_size=s["micro"],
                     gradient_accumulation_steps=s["batch"] // s["micro"], max_steps=_steps(s, a), bf16=False,
                     gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
                     logging_steps=1, dataloader_num_workers=0, seed=a.seed, disable_tqdm=True)
    trainer = CountingTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[StepClock()])
    if padding_free and not trainer.padding_free:
        return {"unavailable": TRL_PADDING_FREE_OFF.format(v=trl.__version__)}
    trainer.train()
    r = _result(marks, clock["start"], 0.0, losses, accuracies, s)
    r["trl_optim"] = str(args.optim)
    return r


def run_arm(name: str, work: Path, s: dict, a) -> dict:
    t0 = time.perf_counter()
    r = arm_ftdist(name, work, s, a) if name.startswith("ftdist") else arm_trl(name, work, s, a)
    # ru_maxrss is in KiB on Linux
    return {"arm": name, **r, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "total_s": time.perf_counter() - t0}


# -- driver ---------------------------------------------------------------------------------------
def spawn_arm(name: str, work: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--arm", name, "--work", str(work), "--seed", str(a.seed),
           "--warmup", str(a.warmup), "--threads", str(a.threads)]
    if a.max_steps:
        cmd += ["--max-steps", str(a.max_steps)]
    if a.tiny:
        cmd.append("--tiny")
    if a.keep_runs:
        cmd.append("--keep-runs")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads),
           "TQDM_DISABLE": "1", "ACCELERATE_DISABLE_RICH": "1"}
    # the ftdist arms start a one-process gloo group; a stale launcher environment must not leak in
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"arm {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(last[len("RESULT "):])


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _per_round(results: dict, x: str, y: str, key: str = "pairs_per_s") -> list[float]:
    return [p[key] / q[key] for p, q in zip(results.get(x, []), results.get(y, []))
            if "unavailable" not in p and "unavailable" not in q]


def table(results: dict[str, list[dict]], meta: dict, s: dict, a) -> str:
    keys = ("pairs_per_s", "tokens_per_s", "tokens_per_cpu_s", "padding_fraction", "train_s", "precompute_s",
            "total_train_s", "peak_rss_mb", "loss_first", "loss_last", "acc_last")
    ran = {n: [r for r in rs if "unavailable" not in r] for n, rs in results.items()}
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in ran.items() if rs}
    steps = _steps(s, a)
    lines = [f"model: GPT-2 {meta['n_params'] / 1e6:.1f}M parameters (n_embd {s['n_embd']}, {s['n_layer']} layers, "
             f"random init), fp32, sdpa, CPU, {a.threads} torch thread(s) per arm; data: {meta['pairs']} "
             f"conversational pairs, {meta['tokens']} tokens (chosen + rejected sequences), prompt p50/p90/max "
             f"{meta['prompt_p50']}/{meta['prompt_p90']}/{meta['prompt_max']}, response p50/p90/max "
             f"{meta['response_p50']}/{meta['response_p90']}/{meta['response_max']} ({meta['truncated']} sequences "
             f"cut at max_length {s['max_length']})",
             f"{steps} optimizer steps of {s['batch']} pairs "
             f"({'one epoch' if steps * s['batch'] == meta['pairs'] else 'part of an epoch'}), "
             f"beta {BETA}, lr {LR:g}; first {s['warmup']} steps not timed; median of {a.repeats} round(s)"
             + ("; arms in one process, so peak RSS is cumulative" if a.in_process else ""),
             "",
             "| arm | pairs/s | vs trl | real tokens/s | tokens per CPU-s | padding | train s | precompute s | "
             "train+precompute s | peak RSS MB | loss step 1 | loss last 10 | reward acc last 10 | rounds (pairs/s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = med.get("trl")
    for n in ARMS:
        if n not in results or not results[n]:
            continue
        if n not in med:
            why = results[n][0]["unavailable"]
            lines.append(f"| {n} | n/a | - | - | - | - | - | - | - | {results[n][0]['peak_rss_mb']:.0f} | - | - | - "
                         f"| {why} |")
            continue
        m = med[n]
        ratio = f"{m['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else "-"
        rounds = ", ".join(f"{r['pairs_per_s']:.3f}" for r in ran[n])
        pre = f"{m['precompute_s']:.1f}" if m["precompute_s"] else "-"
        lines.append(f"| {n} | {m['pairs_per_s']:.3f} | {ratio} | {m['tokens_per_s']:.1f} | "
                     f"{m['tokens_per_cpu_s']:.1f} | {m['padding_fraction']:.1%} | {m['train_s']:.1f} | {pre} | "
                     f"{m['total_train_s']:.1f} | "
                     f"{m['peak_rss_mb']:.0f} | {_f(m['loss_first'], '.4f')} | {_f(m['loss_last'], '.4f')} | "
                     f"{_f(m['acc_last'], '.3f')} | {rounds} |")
    lines.append("")
    pairs = [(n, "trl") for n in ARMS if n != "trl" and n in med and "trl" in med]
    pairs += [("ftdist_packed", "trl_padding_free"), ("ftdist_packed", "ftdist_padded"),
              ("ftdist_packed_precomputed", "ftdist_packed")]
    for x, y in pairs:
        if x not in results or y not in results:
            continue
        if x in med and y in med:
            per = _per_round(results, x, y)
            lines.append(f"- {x} / {y} pairs/s per round: {', '.join(f'{v:.2f}' for v in per)} "
                         f"(median {statistics.median(per):.2f})")
        else:
            lines.append(f"- {x} / {y}: n/a ({y if y not in med else x} did not run: see its row)")
    # the same pairs in every step: per-step losses must agree to float rounding
    for x, y in (("ftdist_padded", "ftdist_packed"), ("ftdist_packed_precomputed", "ftdist_packed")):
        if ran.get(x) and ran.get(y):
            diffs = [max(abs(p - q) for p, q in zip(rx["losses"], ry["losses"])) for rx, ry in zip(ran[x], ran[y])]
            lines.append(f"- max |loss({x}) - loss({y})| over the steps, per round: "
                         f"{', '.join(f'{d:.1e}' for d in diffs)}")
    if "ftdist_packed" in med and "ftdist_packed_precomputed" in med:
        # the precompute always covers every pair: compare it with whole epochs (a shorter run's steps scaled up)
        per_epoch = (s["pairs"] // s["batch"]) / steps
        live, pre = med["ftdist_packed"]["train_s"] * per_epoch, med["ftdist_packed_precomputed"]
        pre_train = pre["train_s"] * per_epoch
        saved = live - pre_train
        when = (f"pays from {pre['precompute_s'] / saved:.2f} epochs over the same pairs (the cache also serves "
                f"later runs on them)" if saved > 0 else "does not pay here (no time saved per epoch)")
        lines.append(f"- precomputing the reference: {pre['precompute_s']:.1f}s once (load + one pass over all "
                     f"{meta['pairs']} pairs), then {pre_train:.1f}s per epoch instead of {live:.1f}s "
                     f"({saved / max(live, 1e-9):.0%} less)"
                     f"{'' if per_epoch == 1 else ' (epoch times scaled from the steps run)'}: {when}")
    if "ftdist_packed" in med:
        p = med["ftdist_packed"]
        checks = [f"padding {p['padding_fraction']:.1%} (< 3%: {'yes' if p['padding_fraction'] < 0.03 else 'NO'})"]
        if base:
            r = p["pairs_per_s"] / base["pairs_per_s"]
            checks.append(f"{r:.2f}x trl (>= 2x: {'yes' if r >= 2 else 'NO'})")
        if "trl_padding_free" in med:
            r = p["pairs_per_s"] / med["trl_padding_free"]["pairs_per_s"]
            checks.append(f"{r:.2f}x trl_padding_free (> 1x: {'yes' if r > 1 else 'NO'})")
        elif results.get("trl_padding_free"):
            checks.append("vs trl_padding_free: n/a (not available in this TRL)")
        lines.append("- target for ftdist_packed: " + "; ".join(checks))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model and 6 steps: checks every arm runs")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all arms, in rotating order (default 3)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--max-steps", type=int, default=0, help="stop each arm after this many steps (default: one epoch)")
    p.add_argument("--warmup", type=int, default=None, help="first steps not timed (default: 2, tiny 1)")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    # one thread: on a 2-core machine shared with other jobs, two OpenMP threads per arm stall on each other at
    # every barrier (benchmarks/sft_throughput.py)
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm (default 1)")
    p.add_argument("--seed", type=int, default=0, help="data order seed of the first round (default 0)")
    p.add_argument("--json", default=None, help="also write every run's record to this JSON file")
    p.add_argument("--keep-runs", action="store_true", help="keep the ftdist output directories")
    p.add_argument("--in-process", action="store_true",
                   help="run the arms one after another in this process (quicker start; peak RSS is then shared; "
                        "the default with --tiny)")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm in this process
    a = p.parse_args(argv)
    s = dict(SETTINGS["tiny" if a.tiny else "full"])
    s["warmup"] = a.warmup = a.warmup or s["warmup"]
    if not 1 <= s["warmup"] < _steps(s, a):
        p.error(f"--warmup must be at least 1 and below the {_steps(s, a)} steps")
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
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="dpo-throughput-")
    work = Path(a.work or tmp.name).resolve() / ("tiny" if a.tiny else "full")
    t0 = time.time()
    meta = prepare_workdir(work, s)
    print(f"work directory {work} ready in {time.time() - t0:.0f}s: {meta}", flush=True)
    results: dict[str, list[dict]] = {n: [] for n in arms}
    seed0 = a.seed
    if a.in_process:
        import torch

        torch.set_num_threads(a.threads)
        for k, v in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("TQDM_DISABLE", "1")):
            os.environ.setdefault(k, v)
        # the ftdist arms leave their one-process group behind, which TRL (accelerate) must not see: TRL goes first
        arms = sorted(arms, key=lambda n: n.startswith("ftdist"))
    for k in range(a.repeats):
        a.seed = seed0 + k
        order = arms if a.in_process else arms[k % len(arms):] + arms[:k % len(arms)]
        for name in order:
            r = run_arm(name, work, s, a) if a.in_process else spawn_arm(name, work, a)
            r["seed"] = a.seed
            results[name].append(r)
            if "unavailable" in r:
                print(f"round {k + 1} {name}: n/a: {r['unavailable']}", flush=True)
                continue
            print(f"round {k + 1} {name}: {r['pairs_per_s']:.3f} pairs/s, {r['tokens_per_s']:.1f} real tokens/s "
                  f"({r['tokens_per_cpu_s']:.1f} per CPU-s), padding {r['padding_fraction']:.1%}, train "
                  f"{r['train_s']:.1f}s" + (f" + precompute {r['precompute_s']:.1f}s" if r["precompute_s"] else "")
                  + f", loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}, reward acc {r['acc_last']:.3f}, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['total_s']:.0f}s with start-up)", flush=True)
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
