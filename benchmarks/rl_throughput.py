"""RL throughput side by side: ftdist GRPO and PPO, TRL's GRPOTrainer, and a bare PyTorch loop.

    python benchmarks/rl_throughput.py --work /tmp/rlbench             # the full comparison, 3 rounds
    python benchmarks/rl_throughput.py --repeats 1 --arms ftdist_grpo,trl_grpo,bare
    python benchmarks/rl_throughput.py --tiny                          # a smoke test of every arm (minutes)
    python benchmarks/rl_throughput.py --tiny --repeats 1 --arms ftdist_grpo,trl_grpo   # the CI smoke test
    python benchmarks/rl_throughput.py --arms ftdist_grpo,ftdist_grpo_1rank --ftdist-overrides 'ppo.top_k=0'

Every arm starts from the same policy and does the same work per iteration: draw `prompts` prompts of
ftdist's bundled digit-sorting task (ftdist/data/tiny_task.py, prompts.jsonl), sample G responses each
(temperature 0.7, top_p 1, no top-k, at most max_new_tokens, stopping at <|end|>), score them with
ftdist's rule-based `sort_reward`, and take ONE AdamW optimizer step over all prompts x G samples in
micro-batches of 8 (fp32, no gradient checkpointing, no dropout, constant learning rate, clip norm 1.0):

  ftdist_grpo  `python -m ftdist train grpo_tiny ... ppo.ref_ranks=0 deepspeed.zero_stage=0`: a local Ray
               cluster with the policy as 2 DeepSpeed ranks (each generates, scores against its frozen
               reference copy and trains on half of the samples; the README's settings for a model that fits
               on each rank) and a reward actor; rollouts by the hf rollout engine; KL to the reference (k3,
               coefficient 0.04) as a loss term; advantages = scores normalised within each prompt's group
  ftdist_ppo   `ppo_tiny` with the same settings: PPO with a critic actor (ZeRO-0) (GAE, whitened advantages), the
               KL (k3, 0.04) as a per-token reward penalty
  trl_grpo     trl.GRPOTrainer in this process (no vLLM; transformers generate), beta=0.04 (TRL's KL is k3),
               loss_type and scale_rewards at TRL's defaults ("dapo", "group"); per_device_train_batch_size=8
               and gradient_accumulation_steps=G*prompts/8, so one generation batch (steps_per_generation =
               the accumulation steps in TRL's counting, i.e. micro-batches) is one optimizer step
  bare         the floor, one process, plain PyTorch + transformers: model.generate(num_return_sequences=G)
               of the prompts, then one forward+backward of the policy (response log-probs times a stand-in
               advantage of +-1) in micro-batches of 8 and one AdamW step; no reference, no old log-probs,
               no reward
  variants     extra ftdist arms with more overrides (VARIANTS below), e.g. ftdist_grpo_1rank; pick them with
               --arms. --ftdist-overrides 'k=v k=v' adds overrides to every ftdist arm.

The policy is a randomly initialised GPT-2 (transformers GPT2Config; "full": n_embd 256, 12 layers, 4 heads,
~10M parameters) with ftdist's embedded tiny tokenizer (vocab 512, one token per digit, its chat
template), SFT-warmed ONCE with `ftdist train sft_tiny` (through ftdist's CLI in the benchmark's own process)
for `sft_steps` steps so the sampled reward starts between 0 and 1; `<work>/sft/final` is every arm's starting
policy (built once per work directory).

Measured per arm, each round in its own process (ftdist: the `ftdist train` command, its Ray daemons and
actors), over the iterations after the first `warmup`:
  samples/s and generated (response, EOS included) tokens/s of whole iterations: wall clock from the end of
      one iteration to the end of the next (ftdist: arrival of its metrics.jsonl records; TRL: on_step_end);
  the time split: ftdist from its metrics (time/generate: drawing prompts + rollouts on the policy ranks;
      time/score: reference, reward, critic and (unless the rollout recorded them) old-policy log-prob passes
      in parallel; time/train: advantages + update); TRL from timers around GRPOTrainer._generate (generate), the rest of
      _generate_and_score_completions (score: reference log-probs, rewards, advantages), the forward/backward
      of training_step plus the optimizer step (train); other = the iteration's wall clock minus the three;
  the reward mean per iteration (every arm sees the same number of samples per iteration);
  peak memory: single-process arms (trl_grpo, bare) the arm's ru_maxrss; ftdist arms the peak of the RSS
      summed over every process of the command (driver, Ray daemons, actors), which counts shared libraries
      once per process, so the peak PSS sum (proportional set size, sampled every second) is shown as well;
  end-to-end wall seconds of the arm: start-up (Ray, actors, model loads), the iterations and the exit
      (ftdist writes a final checkpoint at its last iteration; train.save_final=false, TRL save_strategy="no").
Thread counts: the single-process arms use --threads torch threads (default: every core); ftdist's actors
get what Ray gives them (OMP_NUM_THREADS = floor(ppo.cpus_per_actor), at least 1: one each in the recipes).
With --repeats N the arms run in rotating order N times; the table shows medians over rounds and each
round's value. On a machine shared with other jobs compare arms within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

ARMS = ("ftdist_grpo", "ftdist_ppo", "trl_grpo", "bare")
# extra ftdist arms: name -> (recipe, overrides on top of the shared ones)
SMALL = ["ppo.ref_ranks=0", "deepspeed.zero_stage=0"]  # the settings for a model that fits on each rank (README)
VARIANTS = {
    "ftdist_grpo_recipe": ("grpo_tiny", []),  # the recipe as written: a reference group of 1, ZeRO-2
    "ftdist_grpo_ref_group": ("grpo_tiny", ["ppo.ref_ranks=1", "deepspeed.zero_stage=0"]),
    "ftdist_grpo_zero2": ("grpo_tiny", ["ppo.ref_ranks=0", "deepspeed.zero_stage=2"]),
    # ZeRO-3 rollouts: the policy gathered once per rollout (default) against synced generate on the shards
    "ftdist_grpo_zero3": ("grpo_tiny", ["ppo.ref_ranks=0", "deepspeed.zero_stage=3"]),
    "ftdist_grpo_zero3_synced": ("grpo_tiny", ["ppo.ref_ranks=0", "deepspeed.zero_stage=3",
                                               "ppo.gather_for_rollout=false"]),
    "ftdist_grpo_1rank": ("grpo_tiny", [*SMALL, "ppo.policy_ranks=1"]),
    "ftdist_grpo_1rank_2threads": ("grpo_tiny", [*SMALL, "ppo.policy_ranks=1", "ppo.cpus_per_actor=2"]),
    "ftdist_grpo_gen32": ("grpo_tiny", [*SMALL, "ppo.generate_batch_size=32"]),
    "ftdist_grpo_async": ("grpo_tiny", [*SMALL, "ppo.async_rollouts=true"]),
}
FTDIST_RECIPES = {"ftdist_grpo": ("grpo_tiny", SMALL), "ftdist_ppo": ("ppo_tiny", SMALL), **VARIANTS}
SETTINGS = {
    # policy shape, SFT warm-up, and the work of each iteration
    "full": dict(n_embd=256, n_layer=12, n_head=4, n_positions=256, sft_steps=150, prompts=16, G=8,
                 max_new_tokens=48, max_length=128, micro=8, iterations=12, warmup=2, arm_timeout_s=2400),
    # a smoke test: the SFT warm-up only has to run (5 steps; this tiny policy samples a mean reward of 0.004 to
    # 0.02 whether warmed 0, 10 or 40 steps), and one timed iteration after the untimed first
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, sft_steps=5, prompts=4, G=4,
                 max_new_tokens=16, max_length=64, micro=8, iterations=2, warmup=1, arm_timeout_s=600),
}
LR = 1e-4  # the tiny recipes' learning rate: the reward moves within the iterations measured
TEMPERATURE = 0.7
KL_COEF = 0.04


# -- the starting policy: GPT-2 shape, ftdist's tiny tokenizer, SFT-warmed once by ftdist ---------------
def prompts_file() -> Path:
    from ftdist.data.tiny_task import bundled_task_dir

    return Path(bundled_task_dir()) / "prompts.jsonl"


def prepare_workdir(work: Path, s: dict, a) -> dict:
    """<work>/gpt2 (random init + tokenizer) and <work>/sft/final (SFT-warmed); reused when already there."""
    meta_path = work / "meta.json"
    if meta_path.exists() and (work / "sft" / "final").exists():
        return json.loads(meta_path.read_text())
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from ftdist.models.tiny import resolve_model_path

    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("ftdist/tiny"))
    config = GPT2Config(vocab_size=len(tok), n_embd=s["n_embd"], n_layer=s["n_layer"], n_head=s["n_head"],
                        n_positions=s["n_positions"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "gpt2", safe_serialization=True)
    tok.save_pretrained(work / "gpt2")
    print(f"GPT-2 policy: {n_params:,} parameters (n_embd {s['n_embd']}, {s['n_layer']} layers, "
          f"vocab {len(tok)}); SFT warm-up: {s['sft_steps']} steps of sft_tiny", flush=True)
    sft = work / "sft"
    shutil.rmtree(sft, ignore_errors=True)
    argv = ["train", "sft_tiny", f"model.name_or_path={work / 'gpt2'}", f"output_dir={sft}",
            f"train.max_steps={s['sft_steps']}", "data.eval=null", "train.progress_bar=false",
            "checkpoint.every_steps=0", "logging.tensorboard=false"]
    t0 = time.perf_counter()
    # `ftdist train` in this process, which has torch and transformers loaded already (a child would import them
    # again), with a child's environment and thread count; after it, its process group is closed and this
    # process's environment and threads are restored (the run puts back the signal handlers it replaced)
    from ftdist.cli import main as ftdist_main
    from ftdist.engine.dist import destroy_process_group

    saved = dict(os.environ)
    threads = torch.get_num_threads()
    os.environ.clear()
    os.environ.update(arm_env(a, single_process=True))
    torch.set_num_threads(a.threads)
    try:
        code = ftdist_main(argv)
        destroy_process_group()
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved)
    if code != 0:
        raise SystemExit(f"SFT warm-up failed ({code}): `ftdist {shlex.join(argv)}` (its log above)")
    meta = {"n_params": n_params, "vocab": len(tok), "sft_steps": s["sft_steps"],
            "sft_seconds": round(time.perf_counter() - t0, 1)}
    meta_path.write_text(json.dumps(meta))
    return meta


# -- measuring helpers ---------------------------------------------------------------------------------
def _proc_tree(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.Error:
        return []


def _rss_pss_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB from /proc/PID/smaps_rollup; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class MemorySampler(threading.Thread):
    """Peak summed RSS and PSS over a process and its descendants, sampled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss_kb = self.peak_pss_kb = self.peak_procs = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        pids = _proc_tree(self.pid)
        sizes = [_rss_pss_kb(p) for p in pids]
        self.peak_rss_kb = max(self.peak_rss_kb, sum(r for r, _ in sizes))
        self.peak_pss_kb = max(self.peak_pss_kb, sum(p for _, p in sizes))
        self.peak_procs = max(self.peak_procs, len(pids))

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(iters: list[dict], warmup: int) -> dict:
    """Medians of the per-iteration numbers after the warm-up iterations."""
    timed = iters[warmup:]
    out = {"timed_iterations": len(timed)}
    for k in ("wall", "generate", "score", "train", "other"):
        out[k] = _median(it.get(k) for it in timed)
    out["samples_per_s"] = _median(it["samples"] / it["wall"] for it in timed)
    out["response_tokens_per_s"] = _median(it["response_tokens"] / it["wall"] for it in timed)
    out["rewards"] = [it.get("reward") for it in iters]
    return out


def _split(it: dict) -> dict:
    """Fill in `other` = wall - generate - score - train."""
    known = sum(it.get(k) or 0.0 for k in ("generate", "score", "train"))
    it["other"] = it["wall"] - known
    return it


# -- the arms: each runs in its own process and returns one JSON record ----------------------------------
def ftdist_command(name: str, work: Path, s: dict, a, out: Path) -> list[str]:
    recipe, extra = FTDIST_RECIPES[name]
    n = s["prompts"] * s["G"]
    overrides = [
        f"model.name_or_path={work / 'sft' / 'final'}", f"output_dir={out}", f"seed={a.seed}",
        f"data.train={prompts_file()}", "data.eval=null", f"data.max_length={s['max_length']}",
        f"ppo.iterations={s['iterations']}", f"ppo.rollout_batch_size={s['prompts']}",
        f"ppo.samples_per_prompt={s['G']}", f"ppo.max_new_tokens={s['max_new_tokens']}",
        f"ppo.temperature={TEMPERATURE}", "ppo.top_p=1.0", "ppo.top_k=0", f"ppo.kl_coef={KL_COEF}",
        "ppo.kl_estimator=k3", f"ppo.mini_batch_size={n}", "ppo.ppo_epochs=1", f"train.micro_batch_size={s['micro']}",
        f"train.lr={a.lr}", "train.scheduler=constant", "train.warmup_ratio=0.0", "train.weight_decay=0.0",
        "train.max_grad_norm=1.0", "model.gradient_checkpointing=false", "ppo.eval_every=0",
        "checkpoint.every_steps=0", "checkpoint.resume=never", "train.progress_bar=false",
        "logging.tensorboard=false", "train.save_final=false",
    ]
    return [sys.executable, "-m", "ftdist", "train", recipe, *overrides, *extra, *shlex.split(a.ftdist_overrides)]


def arm_ftdist(name: str, work: Path, s: dict, a) -> dict:
    """Run `ftdist train`, stamping each metrics.jsonl record as it arrives and sampling the memory of its tree."""
    out = work / "runs" / f"{name}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ftdist_command(name, work, s, a, out)
    log_path = work / "runs" / f"{name}-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = arm_env(a, single_process=False)
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        mem = MemorySampler(proc.pid)
        mem.start()
        metrics = out / "metrics.jsonl"
        stamped: list[tuple[float, dict]] = []
        offset, buf = 0, ""
        try:
            while True:
                done = proc.poll() is not None
                if metrics.exists() and metrics.stat().st_size > offset:
                    now = time.perf_counter()
                    with open(metrics) as f:
                        f.seek(offset)
                        chunk = f.read()
                        offset = f.tell()
                    buf += chunk
                    *lines, buf = buf.split("\n")
                    stamped += [(now, json.loads(line)) for line in lines if line.strip()]
                if done:
                    break
                if time.perf_counter() - t0 > s["arm_timeout_s"]:
                    raise TimeoutError(f"{name}: no exit after {s['arm_timeout_s']}s")
                time.sleep(0.01)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # the command's own process group only
            proc.wait()
            raise
        finally:
            mem.stop()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: ftdist exited {proc.returncode}; log {log_path}:\n"
                           + log_path.read_text()[-6000:])
    # the placement record is written just before the first iteration starts
    start = next(t for t, r in stamped if any(k.startswith("placement/") for k in r))
    iters, prev = [], start
    for t, r in stamped:
        if "samples_per_s" not in r:
            continue
        n = round(r["samples_per_s"] * (r["time/generate"] + r["time/score"] + r["time/train"]))
        # records polled every 10 ms: two can arrive in one poll; the iteration took at least its own phases
        wall = max(t - prev, r["time/generate"] + r["time/score"] + r["time/train"])
        iters.append(_split({"wall": wall, "generate": r["time/generate"], "score": r["time/score"],
                             "train": r["time/train"], "samples": n, "response_tokens": r["response_len"] * n,
                             "reward": r["reward_mean"], "kl": r.get("kl"), "own_samples_per_s": r["samples_per_s"]}))
        prev = t
    if not a.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
        log_path.unlink(missing_ok=True)
    return {"iters": iters, "peak_rss_mb": mem.peak_rss_kb / 1024, "peak_pss_mb": mem.peak_pss_kb / 1024,
            "processes": mem.peak_procs, "total_s": total, "command": shlex.join(cmd)}


def _task_rows(seed: int) -> list[dict]:
    rows = [json.loads(line) for line in prompts_file().read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return rows


def arm_trl(work: Path, s: dict, a) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ftdist.data.tiny_task import sort_reward

    n = s["prompts"] * s["G"]
    clock = {"generate": 0.0, "gen_score": 0.0, "step": 0.0, "opt": 0.0}
    stamps: list[tuple[float, dict]] = []
    logged: list[dict] = []  # TRL's log of each step

    def sort_reward_trl(prompts, completions, **kwargs):
        # conversational rows: prompts and completions are message lists; the user turn holds the digits
        return sort_reward([p[-1]["content"] for p in prompts], [c[0]["content"] for c in completions])

    class TimedGRPO(GRPOTrainer):
        def _generate(self, prompts):
            t = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                clock["generate"] += time.perf_counter() - t

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                clock["gen_score"] += time.perf_counter() - t

        def training_step(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super().training_step(*args, **kwargs)
            finally:
                clock["step"] += time.perf_counter() - t

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stamps.append((time.perf_counter(), dict(clock)))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock["opt"] += time.perf_counter() - self.t_opt

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append((time.perf_counter(), dict(clock)))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                logged.append(dict(logs))

    tok = AutoTokenizer.from_pretrained(work / "sft" / "final")
    model = AutoModelForCausalLM.from_pretrained(work / "sft" / "final", dtype=torch.float32)
    ds = datasets.Dataset.from_list(_task_rows(a.seed))
    args = GRPOConfig(
        output_dir=str(work / "runs" / f"trl-{os.getpid()}"), use_cpu=True, bf16=False, fp16=False,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=a.seed,
        dataloader_num_workers=0, gradient_checkpointing=False, max_steps=s["iterations"],
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=s["micro"], gradient_accumulation_steps=n // s["micro"],
        num_generations=s["G"], max_completion_length=s["max_new_tokens"], temperature=TEMPERATURE, top_p=1.0,
        top_k=0, beta=KL_COEF, num_iterations=1)
    assert args.generation_batch_size == n, (args.generation_batch_size, n)
    trainer = TimedGRPO(model=model, reward_funcs=sort_reward_trl, args=args, train_dataset=ds,
                        processing_class=tok, callbacks=[Clock()])
    trainer.train()
    iters = []
    for (t0, c0), (t1, c1), log in zip(stamps, stamps[1:], logged):
        d = {k: c1[k] - c0[k] for k in clock}
        iters.append(_split({"wall": t1 - t0, "generate": d["generate"], "score": d["gen_score"] - d["generate"],
                             "train": d["step"] - d["gen_score"] + d["opt"], "samples": n,
                             "response_tokens": log["completions/mean_length"] * n, "reward": log["reward"],
                             "kl": log.get("kl")}))
    meta = {"loss_type": args.loss_type, "scale_rewards": args.scale_rewards,
            "steps_per_generation": args.steps_per_generation, "generation_batch_size": args.generation_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps}
    return {"iters": iters, "trl_config": meta}


def arm_bare(work: Path, s: dict, a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(work / "sft" / "final")
    model = AutoModelForCausalLM.from_pretrained(work / "sft" / "final", dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rows = _task_rows(a.seed)
    G, micro, eos, pad = s["G"], s["micro"], tok.eos_token_id, tok.pad_token_id
    tok.padding_side = "left"
    iters = []
    t_prev = time.perf_counter()
    for it in range(s["iterations"]):
        batch = rows[it * s["prompts"]:(it + 1) * s["prompts"]]
        texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in batch]
        t0 = time.perf_counter()
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        model.eval()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0,
                                 max_new_tokens=s["max_new_tokens"], num_return_sequences=G, eos_token_id=eos,
                                 pad_token_id=pad)
        P = enc["input_ids"].size(1)
        response = out[:, P:]
        # response mask: up to and including the first EOS
        after_eos = (response == eos).int().cumsum(-1) - (response == eos).int()
        resp_mask = after_eos == 0
        attn = torch.cat([enc["attention_mask"].repeat_interleave(G, 0), resp_mask.long()], dim=1)
        t1 = time.perf_counter()
        model.train()
        advantage = torch.randint(0, 2, (out.size(0),)).float() * 2 - 1  # stand-in for a scored advantage
        n_tokens = resp_mask.sum()
        for i in range(0, out.size(0), micro):
            seq, am, m = out[i:i + micro], attn[i:i + micro], resp_mask[i:i + micro]
            pos = (am.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=am, position_ids=pos).logits[:, P - 1:-1].float()
            logp = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, seq[:, P:].unsqueeze(-1)).squeeze(-1)
            loss = -(logp * m * advantage[i:i + micro, None]).sum() / n_tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        iters.append(_split({"wall": t2 - t_prev, "generate": t1 - t0, "score": 0.0, "train": t2 - t1,
                             "samples": out.size(0), "response_tokens": int(n_tokens), "reward": None}))
        t_prev = t2
    return {"iters": iters}


def run_arm(name: str, work: Path, s: dict, a) -> dict:
    t0 = time.perf_counter()
    if name in FTDIST_RECIPES:
        r = arm_ftdist(name, work, s, a)
    else:
        mem = MemorySampler(os.getpid())
        mem.start()
        r = arm_trl(work, s, a) if name == "trl_grpo" else arm_bare(work, s, a)
        mem.stop()
        mem.sample()
        # ru_maxrss is in KiB on Linux
        r.update(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 peak_pss_mb=mem.peak_pss_kb / 1024, processes=1, total_s=time.perf_counter() - t0)
    return {"arm": name, **summarise(r["iters"], s["warmup"]), **r}


# -- driver ----------------------------------------------------------------------------------------------
def arm_env(a, single_process: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "ACCELERATE_DISABLE_RICH": "1"}
    # a stale launcher environment must not leak in, nor an existing Ray cluster be joined
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"):
        env.pop(k, None)
    if single_process:
        env["OMP_NUM_THREADS"] = str(a.threads)
    else:
        env.pop("OMP_NUM_THREADS", None)  # Ray sets each actor's from its CPU share
    return env


def spawn_arm(name: str, work: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--arm", name, "--work", str(work), "--seed", str(a.seed), "--lr", str(a.lr),
           "--threads", str(a.threads), "--ftdist-overrides", a.ftdist_overrides]
    if a.tiny:
        cmd.append("--tiny")
    if a.iterations:
        cmd += ["--iterations", str(a.iterations)]
    if a.keep_runs:
        cmd.append("--keep-runs")
    proc = subprocess.run(cmd, env=arm_env(a, single_process=name not in FTDIST_RECIPES), cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"arm {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(last[len("RESULT "):])


def environment_lines(a) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        mem_gib = float("nan")
    versions = []
    for pkg in ("torch", "transformers", "trl", "deepspeed", "ray", "accelerate", "datasets"):
        try:
            versions.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            versions.append(f"{pkg} -")
    return [f"`python benchmarks/rl_throughput.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"),
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB; "
            f"python {platform.python_version()}; {', '.join(versions)}"]


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict[str, list[dict]], meta: dict, s: dict, a) -> str:
    n = s["prompts"] * s["G"]
    lines = environment_lines(a) + [
        f"policy: GPT-2 {meta['n_params'] / 1e6:.2f}M parameters (n_embd {s['n_embd']}, {s['n_layer']} layers, "
        f"{s['n_head']} heads, vocab {meta['vocab']}; random init, SFT-warmed {meta['sft_steps']} steps by ftdist), "
        f"fp32, CPU; single-process arms {a.threads} torch thread(s)",
        f"per iteration: {s['prompts']} prompts x {s['G']} samples = {n}, max_new_tokens {s['max_new_tokens']}, "
        f"temperature {TEMPERATURE}, KL k3 x {KL_COEF}, one AdamW step (lr {a.lr:g}, micro-batches of {s['micro']}); "
        f"{s['iterations']} iterations, the first {s['warmup']} not timed; median over timed iterations, then over "
        f"{a.repeats} round(s)" + (f"; ftdist overrides: {a.ftdist_overrides}" if a.ftdist_overrides else ""),
        "",
        "| arm | samples/s | vs trl_grpo | gen. tokens/s | iteration s | generate s | score s | train s | other s "
        "| reward first → last | peak RSS MB | peak PSS MB | procs | wall s | rounds (samples/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    med = {}
    for name, rs in results.items():
        if not rs:
            continue
        med[name] = {k: _median(r[k] for r in rs) for k in ("samples_per_s", "response_tokens_per_s", "wall",
                                                             "generate", "score", "train", "other", "peak_rss_mb",
                                                             "peak_pss_mb", "processes", "total_s")}
        curves = [r["rewards"] for r in rs]
        med[name]["curve"] = [_median(c[i] for c in curves) for i in range(min(map(len, curves)))]
    base = med.get("trl_grpo")
    for name, m in med.items():
        ratio = f"{m['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        curve = m["curve"]
        reward = f"{_fmt(curve[0], '.3f')} → {_fmt(curve[-1], '.3f')}" if curve and curve[0] is not None else "-"
        rounds = ", ".join(f"{r['samples_per_s']:.2f}" for r in results[name])
        lines.append(f"| {name} | {m['samples_per_s']:.2f} | {ratio} | {m['response_tokens_per_s']:.1f} | "
                     f"{m['wall']:.2f} | {_fmt(m['generate'])} | {_fmt(m['score'])} | {_fmt(m['train'])} | "
                     f"{_fmt(m['other'])} | {reward} | {m['peak_rss_mb']:.0f} | {m['peak_pss_mb']:.0f} | "
                     f"{m['processes']:.0f} | {m['total_s']:.0f} | {rounds} |")
    # paired ratios: the arms of one round ran back to back on the same machine
    pairs = []
    if "trl_grpo" in results:
        for name in results:
            if name != "trl_grpo":
                pairs.append((name, "trl_grpo"))
    if "ftdist_grpo" in results and "bare" in results:
        pairs.append(("ftdist_grpo", "bare"))
    if pairs:
        lines.append("")
        for x, y in pairs:
            per = [p["samples_per_s"] / q["samples_per_s"] for p, q in zip(results[x], results[y])]
            lines.append(f"- {x} / {y} samples/s per round: {', '.join(f'{v:.3f}' for v in per)} "
                         f"(median {statistics.median(per):.3f})")
    with_reward = [name for name in med if med[name]["curve"] and med[name]["curve"][0] is not None]
    if with_reward:
        lines += ["", "reward mean per iteration (median over rounds; every arm draws the same number of samples):",
                  "", "| iteration | samples | " + " | ".join(with_reward) + " |",
                  "|---:|---:|" + "---:|" * len(with_reward)]
        for i in range(max(len(med[name]["curve"]) for name in with_reward)):
            cells = [_fmt(med[name]["curve"][i], ".3f") if i < len(med[name]["curve"]) else "-"
                     for name in with_reward]
            lines.append(f"| {i + 1} | {(i + 1) * n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    all_arms = (*ARMS, *VARIANTS)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="a tiny model, 5 SFT warm-up steps and 2 iterations: checks every arm runs")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all arms, in rotating order (default 3)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(all_arms)}")
    p.add_argument("--iterations", type=int, default=None, help="iterations per arm (default: 12, tiny 2)")
    p.add_argument("--lr", type=float, default=LR, help=f"learning rate of every arm (default {LR:g})")
    p.add_argument("--ftdist-overrides", default="", help="extra 'key=value key=value' for every ftdist arm")
    p.add_argument("--work", default=None, help="work directory: the SFT-warmed policy is cached there "
                                                "(default: a temporary one)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the single-process arms (default: every core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first round (default 0; round k: seed + k)")
    p.add_argument("--json", default=None, help="also write every run's record to this JSON file")
    p.add_argument("--keep-runs", action="store_true", help="keep the ftdist output directories and logs")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm in this process
    a = p.parse_args(argv)
    s = dict(SETTINGS["tiny" if a.tiny else "full"])
    if a.iterations:
        s["iterations"] = a.iterations
    if not 1 <= s["warmup"] < s["iterations"]:
        p.error(f"--iterations must be above the {s['warmup']} warm-up iteration(s)")
    if a.arm:
        if a.arm not in FTDIST_RECIPES:  # an ftdist arm's process only starts and watches `ftdist train`
            import torch

            torch.set_num_threads(a.threads)
        print("RESULT " + json.dumps(run_arm(a.arm, Path(a.work), s, a)), flush=True)
        return 0
    arms = [n for n in a.arms.split(",") if n]
    unknown = set(arms) - set(all_arms)
    if unknown:
        p.error(f"--arms: unknown {sorted(unknown)}; allowed: {', '.join(all_arms)}")
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="rl-throughput-")
    work = Path(a.work or tmp.name).resolve() / ("tiny" if a.tiny else "full")
    t0 = time.time()
    meta = prepare_workdir(work, s, a)
    print(f"work directory {work} ready in {time.time() - t0:.0f}s: {meta}", flush=True)
    results: dict[str, list[dict]] = {n: [] for n in arms}
    seed0 = a.seed
    for k in range(a.repeats):
        a.seed = seed0 + k
        for name in arms[k % len(arms):] + arms[:k % len(arms)]:
            r = spawn_arm(name, work, a)
            r["seed"] = a.seed
            results[name].append(r)
            rw = [x for x in r["rewards"] if x is not None]
            print(f"round {k + 1} {name}: {r['samples_per_s']:.2f} samples/s, {r['response_tokens_per_s']:.1f} "
                  f"generated tokens/s, iteration {r['wall']:.2f}s (generate {_fmt(r['generate'])}, score "
                  f"{_fmt(r['score'])}, train {_fmt(r['train'])}, other {_fmt(r['other'])}), reward "
                  f"{_fmt(rw[0] if rw else None, '.3f')} → {_fmt(rw[-1] if rw else None, '.3f')}, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB, {r['total_s']:.0f}s end to end", flush=True)
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
