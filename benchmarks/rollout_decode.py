"""The hf rollout engine's decoding loop against transformers' generate, on responses of very different lengths.

    python benchmarks/rollout_decode.py              # 16 prompts x 8 samples, up to 192 new tokens, 5 rounds
    python benchmarks/rollout_decode.py --tiny       # seconds: every arm runs once (a smoke test)

The policy is the SFT-warmed GPT-2-shaped model of benchmarks/rl_throughput.py (built and cached in --work).
Sampled at temperature 1.0 with a long max_new_tokens, most responses end after ~10 tokens and a few run to
the limit, the long tail that rollouts of real tasks have. Each arm generates samples_per_prompt responses to
each of the same prompts (fp32, one process, --threads torch threads, seeded sampling), in one batch:

  generate      transformers generate on the prompts repeated G times (what the policy ran before the rollout
                engine: every sample encodes its prompt, finished rows decode padding until the longest ends)
  generate_nrs  transformers generate with num_return_sequences=G
  decode_keep   ftdist.rl.rollout.decode with finished rows kept in the batch (the prompt encoded once)
  decode        ftdist.rl.rollout.decode as the engine runs it: the prompt encoded once, finished rows leave

Measured: generated tokens (up to and including EOS) per second of wall clock; arms alternate within each round
(the first arm rotates) in one process on one loaded model; the table shows the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARMS = ("generate", "generate_nrs", "decode_keep", "decode")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples-per-prompt", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work", default="/tmp/ftdist-rl-bench", help="where the policy is built and cached")
    p.add_argument("--tiny", action="store_true", help="the tiny policy, 4 prompts x 4, 16 tokens, one round")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.rl_throughput import SETTINGS, prepare_workdir
    from ftdist.models.generate import encode_prompts
    from ftdist.rl.experience import response_mask
    from ftdist.rl.rollout import _processors, decode

    preset = "tiny" if a.tiny else "full"
    if a.tiny:
        a.prompts, a.samples_per_prompt, a.max_new_tokens, a.repeats = 4, 4, 16, 1
    work = Path(a.work) / preset
    meta = prepare_workdir(work, SETTINGS[preset], types.SimpleNamespace(threads=a.threads))
    torch.set_num_threads(a.threads)
    model_dir = work / "sft" / "final"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    from ftdist.data.tiny_task import bundled_task_dir

    rows = [json.loads(line) for line in (Path(bundled_task_dir()) / "prompts.jsonl").read_text().splitlines()]
    texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
             for r in rows[:a.prompts]]
    G = a.samples_per_prompt
    enc = encode_prompts(tok, texts)
    ids, am = enc["input_ids"], enc["attention_mask"]
    sampling = dict(do_sample=True, temperature=a.temperature, top_p=1.0, top_k=0)

    def hf(repeat_first: bool):
        if repeat_first:
            x = dict(input_ids=ids.repeat_interleave(G, 0), attention_mask=am.repeat_interleave(G, 0))
        else:
            x = dict(input_ids=ids, attention_mask=am, num_return_sequences=G)
        out = model.generate(**x, max_new_tokens=a.max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **sampling)
        return out[:, ids.size(1):]

    def ours(drop: bool):
        procs = _processors(tok, do_sample=True, temperature=a.temperature, top_p=1.0, top_k=0,
                            repetition_penalty=1.0, min_new_tokens=0, prompt_width=ids.size(1))
        tokens, _ = decode(model, ids, am, [G] * len(texts), max_new_tokens=a.max_new_tokens,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           logprob_temperature=a.temperature, processors=procs, do_sample=True, drop_finished=drop)
        return tokens

    run = {"generate": lambda: hf(True), "generate_nrs": lambda: hf(False), "decode_keep": lambda: ours(False),
           "decode": lambda: ours(True)}
    with torch.no_grad():
        for name in ARMS:  # warm-up, untimed
            torch.manual_seed(0)
            run[name]()
        rates: dict[str, list[float]] = {n: [] for n in ARMS}
        lengths: list[int] = []
        for r in range(a.repeats):
            order = ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]
            for name in order:
                torch.manual_seed(1000 + r)
                t0 = time.perf_counter()
                response = run[name]()
                dt = time.perf_counter() - t0
                n_tokens = response_mask(response, tok.eos_token_id).sum(dim=1)
                lengths += n_tokens.tolist()
                rates[name].append(float(n_tokens.sum()) / dt)
    lengths.sort()
    q = lambda f: lengths[min(len(lengths) - 1, int(f * len(lengths)))]  # noqa: E731
    print(f"`python benchmarks/rollout_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores, {a.threads} torch threads; "
          f"torch {torch.__version__}; policy {meta['n_params']:,} parameters (GPT-2 shape, fp32, SFT-warmed)")
    print(f"{len(texts)} prompts x {G} samples, max_new_tokens {a.max_new_tokens}, temperature {a.temperature}; "
          f"response lengths over all arms and rounds: median {q(0.5)}, p90 {q(0.9)}, max {lengths[-1]}, "
          f"{sum(n == a.max_new_tokens for n in lengths) / len(lengths):.1%} cut at max_new_tokens\n")
    base = statistics.median(rates["generate"])
    print("| arm | generated tokens/s (median) | vs generate | rounds |")
    print("|---|---:|---:|---|")
    for name in ARMS:
        med = statistics.median(rates[name])
        print(f"| {name} | {med:.1f} | {med / base:.2f}x | {', '.join(f'{x:.0f}' for x in rates[name])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
