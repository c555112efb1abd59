"""Tokenising multi-turn conversations: ftdist's data preparation against TRL SFTTrainer's, side by side.

    python benchmarks/tokenize_throughput.py                   # 10k / 50k / 100k conversations, 1 and 2 processes
    python benchmarks/tokenize_throughput.py --rows 2000 --procs 1,2   # a quick look
    python benchmarks/tokenize_throughput.py --tiny            # seconds: a smoke test of both arms (CI), in one process

The same JSONL file of generated chats (1-3 user/assistant turns, some with a system prompt, lengths
lognormal), the same BPE tokenizer and chat template, read from disk by each arm:

  ftdist  ftdist.data.tokenize.tokenize_sft with data.num_proc=P, into a fresh cache directory: read the file,
          render the chat template, assistant-only labels, truncation to max_length, the row counts, the
          tokenised dataset saved to disk
  trl     datasets.load_dataset("json") and SFTTrainer's own preprocessing (`_prepare_dataset`, what its
          constructor runs) with dataset_num_proc=P and its defaults: the chat template rendered and tokenised
          once per row, truncation; its loss then covers every token (assistant-only masks need a template with
          {% generation %} markers), so ftdist does more work per row

Measured per run, each in its own process: rows per second from reading the file to the finished dataset
(imports and TRL's trainer set-up not counted), and the peak resident memory of the process and its worker
processes together during that time, and its anonymous part (sampled every 50 ms from /proc; both include
what each arm had imported: TRL's arm holds torch, transformers' trainer and a tiny model; RSS also counts the
pages of memory-mapped Arrow files read, which the anonymous part leaves out). The arms run in
rotating order. Timings on a shared machine swing; compare the arms within one run. With --in-process (the
default of --tiny) every run shares one process instead: a quicker start, and each peak then includes what the
runs before it left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MAX_LENGTH = 1024
TINY_ROWS = 100  # row 30 of the stream is longer than MAX_LENGTH: --tiny truncates too
ARMS = ("ftdist", "trl")


def write_data(work: Path, rows: int, seed: int = 0) -> Path:
    """rows chats into work/data-{rows}.jsonl (the first rows of one seeded stream), and the tokenizer."""
    from sft_throughput import TextSource, build_tokenizer

    path = work / f"data-{rows}.jsonl"
    if path.exists():
        return path
    src = TextSource(seed, 3000)
    if not (work / "tokenizer").exists():
        build_tokenizer(src, 4096, sentences=5000).save_pretrained(work / "tokenizer")
    rng = random.Random(seed)

    def text(words: int) -> str:
        out = []
        while sum(len(s.split()) for s in out) < words:
            out.append(src.sentence())
        return " ".join(out)

    with open(path, "w") as f:
        for _ in range(rows):
            messages = [{"role": "system", "content": text(rng.randint(5, 15))}] if rng.random() < 0.3 else []
            for _ in range(rng.choice((1, 1, 2, 3))):
                messages.append({"role": "user", "content": text(int(rng.lognormvariate(3.0, 0.6)))})
                messages.append({"role": "assistant", "content": text(int(rng.lognormvariate(4.2, 0.8)))})
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


class PeakRSS:
    """Peak resident memory of this process plus its children, sampled in a thread: all of it (`peak`), and its
    anonymous part (`peak_anon`: the heap, Python objects; without the pages of memory-mapped Arrow files, which
    count as resident while read but are the page cache's to drop)."""

    def __init__(self, every_s: float = 0.05):
        import psutil

        self.proc, self.peak, self.peak_anon, self.every_s = psutil.Process(), 0, 0, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _anon_bytes(pid: int) -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = anon = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    anon += self._anon_bytes(p.pid)
                except (psutil.Error, OSError):
                    pass
            self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_arm(arm: str, data: Path, work: Path, procs: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    scratch = Path(tempfile.mkdtemp(dir=work, prefix=f"run-{arm}-"))
    # set-up outside the timed part: imports, and for TRL the trainer (built on one row; its constructor would
    # otherwise prepare the whole dataset, timed below with the same call)
    if arm == "ftdist":
        from ftdist.config import load_config
        from ftdist.data.tokenize import tokenize_sft

        cfg = load_config(data={"data": {"train": str(data), "max_length": MAX_LENGTH, "num_proc": procs}})
    else:
        import datasets
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from trl import SFTConfig, SFTTrainer

        model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1,
                                             vocab_size=len(tok))).to(torch.float32)
        args = SFTConfig(output_dir=str(scratch / "out"), max_length=MAX_LENGTH, dataset_num_proc=procs,
                         report_to=[], use_cpu=True)
        one = datasets.Dataset.from_list([json.loads(open(data).readline())])
        trainer = SFTTrainer(model=model, args=args, train_dataset=one, processing_class=tok)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if arm == "ftdist":
            ds, stats = tokenize_sft(str(data), tok, cfg.data, str(scratch / "cache"))
            rows, tokens = stats.rows, stats.tokens
        else:
            raw = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(scratch / "hf"))
            ds = trainer._prepare_dataset(raw, tok, args, False, None, "train")
            rows, tokens = len(ds), sum(len(x) for x in ds["input_ids"])
        seconds = time.perf_counter() - t0
    del ds
    shutil.rmtree(scratch, ignore_errors=True)  # the tokenised copy of 100k conversations is ~1 GB
    return {"arm": arm, "rows": rows, "tokens": tokens, "procs": procs, "seconds": seconds,
            "rows_per_s": rows / seconds, "peak_rss_mb": mem.peak / 2**20, "peak_anon_mb": mem.peak_anon / 2**20}


ARM_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}


def spawn(arm: str, data: Path, work: Path, procs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ARM_ENV}
    cmd = [sys.executable, __file__, "--arm", arm, "--data", str(data), "--work", str(work), "--procs", str(procs)]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"arm {arm} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


def table(results: list[dict]) -> str:
    lines = ["| conversations | processes | ftdist rows/s | TRL rows/s | ftdist / TRL | ftdist s | TRL s | "
             "ftdist peak RSS MB (anonymous) | TRL peak RSS MB (anonymous) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keyed = {(r["arm"], r["n"], r["procs"]): r for r in results}
    for n, p in sorted({(r["n"], r["procs"]) for r in results}):
        f, t = keyed.get(("ftdist", n, p)), keyed.get(("trl", n, p))
        if not (f and t):
            continue
        lines.append(f"| {n:,} | {p} | {f['rows_per_s']:.0f} | {t['rows_per_s']:.0f} | "
                     f"{f['rows_per_s'] / t['rows_per_s']:.2f}x | {f['seconds']:.1f} | {t['seconds']:.1f} | "
                     f"{f['peak_rss_mb']:.0f} ({f['peak_anon_mb']:.0f}) | {t['peak_rss_mb']:.0f} ({t['peak_anon_mb']:.0f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="10000,50000,100000", help="comma-separated conversation counts")
    p.add_argument("--procs", default="1,2", help="comma-separated process counts (data.num_proc / dataset_num_proc)")
    p.add_argument("--tiny", action="store_true",
                   help=f"{TINY_ROWS} conversations, 1 and 2 processes, --in-process: checks both arms run")
    p.add_argument("--work", default=None, help="work directory (data and tokenizer are reused from it)")
    p.add_argument("--json", default=None, help="also write every run's record to this JSON file")
    p.add_argument("--in-process", action="store_true",
                   help="run the arms one after another in this process (quicker start; the peak RSS is then "
                        "shared; the default with --tiny)")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.arm:
        print("RESULT " + json.dumps(run_arm(a.arm, Path(a.data), Path(a.work), int(a.procs))), flush=True)
        return 0
    sizes = [TINY_ROWS] if a.tiny else [int(x) for x in a.rows.split(",")]
    if a.in_process or a.tiny:
        os.environ.update(ARM_ENV)  # what a spawned arm gets, before anything imports torch or the HF libraries
    procs = [int(x) for x in a.procs.split(",")]
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="tokenize-throughput-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    paths = {n: write_data(work, n) for n in sizes}
    print(f"data ready in {time.time() - t0:.0f}s under {work}", flush=True)
    results, k = [], 0
    for n in sizes:
        for pr in procs:
            order = ARMS if k % 2 == 0 else ARMS[::-1]
            k += 1
            for arm in order:
                r = {**(run_arm(arm, paths[n], work, pr) if a.in_process or a.tiny else spawn(arm, paths[n], work, pr)),
                     "n": n}
                results.append(r)
                print(f"{n} rows, {pr} process(es), {arm}: {r['rows_per_s']:.0f} rows/s, {r['seconds']:.1f}s, "
                      f"{r['tokens']} tokens, peak RSS {r['peak_rss_mb']:.0f} MB ({r['peak_anon_mb']:.0f} MB "
                      f"anonymous)", flush=True)
    print()
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
