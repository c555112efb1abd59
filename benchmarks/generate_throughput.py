"""`ftdist generate` against a plain transformers generate loop: the same model, prompts, batch size and tokens.

    python benchmarks/generate_throughput.py            # 128 prompts, batch 8, 64 new tokens, 3 rounds
    python benchmarks/generate_throughput.py --tiny     # seconds: both arms run (CI)

Both arms load the embedded tiny model (ftdist/tiny, fp32, CPU, one torch thread) and answer the bundled task's
eval prompts rendered with its chat template, greedily (so both generate exactly the same tokens), in batches
of --batch-size with left padding and the KV cache:

  ftdist  ftdist.infer: the `ftdist generate` command's own generation and record writing (model loading not
          timed)
  plain   tokenizer(batch, padding left) -> model.generate -> batch_decode, the loop a user would write

Measured: generated tokens per second of wall clock from the first batch to the last, after one untimed
batch (the first generate call of a process sets things up); each arm in its own process, the arms in
rotating order, the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARMS = ("ftdist", "plain")


def prompts(n: int) -> list[list[dict]]:
    import random

    from ftdist.data.tiny_task import make_example

    rng = random.Random(0)
    return [make_example(rng)["messages"][:-1] for _ in range(n)]


def run_arm(arm: str, n: int, batch: int, new: int) -> dict:
    import torch

    from ftdist.infer import load_model

    torch.set_num_threads(1)
    model, tok = load_model("ftdist/tiny", dtype="fp32", device=torch.device("cpu"))
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts(n)]
    # one untimed batch first, the same for both arms: the first generate call of a process sets things up
    tok.padding_side = "left"
    with torch.no_grad():
        enc = tok(texts[:batch], return_tensors="pt", padding=True, add_special_tokens=False)
        model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    tok.padding_side = "right"
    t0 = time.perf_counter()
    if arm == "ftdist":
        from ftdist.infer import _generate_share
        from ftdist.models.generate import generate

        args = argparse.Namespace(seed=0, temperature=0.0, num_return_sequences=1, batch_size=batch,
                                  max_new_tokens=new, max_prompt_length=None, top_p=1.0, top_k=0,
                                  repetition_penalty=1.0)
        records = _generate_share(model, tok, [(t, t) for t in texts], args, 0, 1, torch.device("cpu"), generate)
        tokens = sum(r["new_tokens"] + (r["finish_reason"] == "eos") for r in records)
    else:
        tok.padding_side = "left"
        tokens = 0
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)[:, enc["input_ids"].size(1):]
                tok.batch_decode(out, skip_special_tokens=True)
                for row in out.tolist():  # up to and including the first EOS
                    tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    seconds = time.perf_counter() - t0
    return {"arm": arm, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="16 prompts, 16 new tokens, one round")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tiny:
        a.prompts, a.max_new_tokens, a.repeats = 16, 16, 1
    if a.arm:
        print("RESULT " + json.dumps(run_arm(a.arm, a.prompts, a.batch_size, a.max_new_tokens)), flush=True)
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for k in range(a.repeats):
        for arm in (ARMS if k % 2 == 0 else ARMS[::-1]):
            cmd = [sys.executable, __file__, "--arm", arm, "--prompts", str(a.prompts), "--batch-size",
                   str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens)]
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-4000:]}")
            r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
            results[arm].append(r)
            print(f"round {k + 1} {arm}: {r['tokens']} tokens in {r['seconds']:.2f}s, {r['tokens_per_s']:.0f} tokens/s",
                  flush=True)
    med = {arm: statistics.median(r["tokens_per_s"] for r in rs) for arm, rs in results.items()}
    print()
    print(f"{a.prompts} prompts, batch {a.batch_size}, {a.max_new_tokens} new tokens at most, greedy, "
          f"median of {a.repeats} round(s)")
    print("| arm | generated tokens | tokens/s | ftdist / arm | rounds (tokens/s) |")
    print("|---|---:|---:|---:|---|")
    for arm in ARMS:
        rounds = ", ".join(f"{r['tokens_per_s']:.0f}" for r in results[arm])
        print(f"| {arm} | {results[arm][0]['tokens']} | {med[arm]:.0f} | {med['ftdist'] / med[arm]:.2f}x | {rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
