"""`ftdist generate` and `ftdist chat`: answers of a trained model to a file of prompts (batched, with the
usual sampling options), or in an interactive chat.

    ftdist generate runs/sft/final --prompts prompts.jsonl --out answers.jsonl
    ftdist generate runs/lora/final --prompts p.jsonl --out a.jsonl --temperature 0.7 --top-p 0.9 -n 4 --seed 1
    torchrun --nproc_per_node 2 -m ftdist generate runs/sft --step 400 --prompts p.jsonl --out a.jsonl

MODEL is a Hugging Face model directory, a run's output_dir (its final/, or with --step a checkpoint, exported
first with `ftdist export`), a LoRA adapter directory (its base from adapter_config.json, or --base), or
'ftdist/tiny'. Prompts: any data file ftdist reads (JSONL, JSON, CSV, Parquet, a datasets directory) with a
`prompt` column (text, used as it is; or a list of messages, rendered with the chat template and its generation
prompt) or a `messages` column (a final assistant turn is left out: it is the reference). Generation is
batched with left padding and the KV cache; launched with several ranks, each generates its share of the
prompts and rank 0 writes every answer in prompt order.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ftdist.errors import UserError

log = logging.getLogger("ftdist")


class InferError(UserError):
    pass


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, run output_dir, LoRA adapter directory, or 'ftdist/tiny'")
    p.add_argument("--step", default=None,
                   help="with a run output_dir: a checkpoint step (or 'latest') instead of its final/ model")
    p.add_argument("--base", default=None, help="a LoRA adapter's base model (default: the one its config names)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "auto"), default="auto",
                   help="weights' dtype (default: bf16 on a GPU, fp32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftdist generate", description="Generate answers to a file of prompts.")
    add_model_args(p)
    p.add_argument("--prompts", required=True, help="data file with a 'prompt' or 'messages' column")
    p.add_argument("--out", required=True, help="output JSON Lines file: one row per prompt and sample")
    add_sampling_args(p, temperature=0.0)
    p.add_argument("-n", "--num-return-sequences", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="keep the last N tokens of a longer prompt (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    """Where a default differs from transformers' generate (GenerationConfig's: greedy, top_k 50, top_p 1.0,
    repetition_penalty 1.0, max_length 20 tokens in all), the help names transformers' as config/schema.py does."""
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated at most per answer (default "
                   "256) (transformers default: max_length=20, prompt included)")
    sampled = " (transformers default: greedy, do_sample=False)" if temperature > 0 else ""
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy; > 0 samples (default {temperature:g}){sampled}")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off, as transformers)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k likeliest tokens (default 0: off) (transformers default: 50)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="as transformers (default 1.0: off, as transformers)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def build_chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftdist chat", description="Chat with a model in the terminal: its chat "
                                "template, answers streamed as they are generated, the conversation kept. "
                                "Commands: /reset (clear the history), /system TEXT (set the system prompt; "
                                "/system alone removes it), /exit or Ctrl-D (quit).")
    add_model_args(p)
    add_sampling_args(p, temperature=0.7)
    p.add_argument("--system", default=None, help="system prompt to start with")
    return p


# -- the model ---------------------------------------------------------------------------------
def resolve_model_dir(model: str, step: Optional[str], scratch: str) -> str:
    """A directory from_pretrained can read (a model or a PEFT adapter): a run's final/ or exported checkpoint."""
    from ftdist.models.loading import resolve_model_path

    path = Path(resolve_model_path(model))
    if not path.exists():
        raise InferError(f"{model}: no such model directory")
    if (path / "config.yaml").exists() and not (path / "config.json").exists():  # a run's output_dir
        if step is None:
            if not (path / "final").is_dir():
                raise InferError(f"{model}: a run without final/ (still training, or train.save_final=false): "
                                 f"pass --step N or --step latest")
            return str(path / "final")
        from ftdist.export import export

        return str(export(str(path), step, os.path.join(scratch, "model")))
    if step is not None:
        raise InferError(f"--step {step}: {model} is not a run's output_dir (no config.yaml)")
    if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
        raise InferError(f"{model}: neither a model (config.json) nor a LoRA adapter (adapter_config.json)")
    return str(path)


def load_model(model: str, step: Optional[str] = None, base: Optional[str] = None, dtype: str = "auto",
               device=None, scratch: Optional[str] = None):
    """(model in eval mode on `device`, tokenizer) for inference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftdist.models.loading import check_model_source, load_failure

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    path = Path(resolve_model_dir(model, step, scratch or tempfile.mkdtemp(prefix="ftdist-model-")))
    loading = path  # the directory being read, named when it fails
    try:
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            from ftdist.models.adapters import adapter_base

            base_path = check_model_source(adapter_base(path, base), "--base" if base else f"{model}: its base")
            loading = Path(base_path)
            lm = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype)
            loading = path
            lm = PeftModel.from_pretrained(lm, str(path), is_trainable=False)
            tok_dir = path if (path / "tokenizer_config.json").exists() else Path(base_path)
        else:
            lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
            tok_dir = path
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except UserError:
        raise
    except Exception as e:  # OSError, a damaged safetensors file, a pickle refused by the weights-only loader, ...
        raise InferError(f"{model}: cannot be loaded: {load_failure(loading, e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.to(device).eval(), tokenizer


# -- the prompts -------------------------------------------------------------------------------
def load_prompts(path: str, tokenizer) -> list[tuple[object, str]]:
    """[(the prompt as the file gives it, the text the model continues)]."""
    from ftdist.data.formats import RowProblem, normalize_messages
    from ftdist.data.loading import DataError, load_rows
    from ftdist.data.templates import render_chat

    try:
        rows = load_rows(path)
    except DataError as e:
        raise InferError(str(e)) from None
    column = "prompt" if "prompt" in rows.column_names else "messages" if "messages" in rows.column_names else None
    if column is None:
        raise InferError(f"{path}: no 'prompt' or 'messages' column (columns: {', '.join(rows.column_names)})")
    out = []
    for i, row in enumerate(rows):
        value = row[column]
        if isinstance(value, str):
            out.append((value, value))
            continue
        try:
            messages = normalize_messages(value)
        except RowProblem as e:
            raise InferError(f"{path}: row {i + 1}: {e}") from None
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise InferError(f"{path}: row {i + 1}: no prompt before the assistant turn")
        if getattr(tokenizer, "chat_template", None) is None:
            raise InferError(f"{path}: row {i + 1} is a conversation and the model's tokenizer has no chat template")
        try:  # a template that fails on every row (a syntax error) is a DataError: one line naming it
            out.append((value, render_chat(tokenizer, messages, tokenize=False, add_generation_prompt=True)))
        except RowProblem as e:  # the template raised for this conversation
            raise InferError(f"{path}: row {i + 1}: {e}") from None
    return out


# -- the command -------------------------------------------------------------------------------
def inference_process():
    """(rank, world size, device) of an inference command: one process, or one of several ranks launched by
    torchrun/srun (each holding a whole copy of the model); logging set up for it."""
    import torch

    from ftdist.engine.dist import init_distributed
    from ftdist.run.logs import setup_logging

    info = init_distributed() if "RANK" in os.environ else None
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    setup_logging(rank == 0)
    if not torch.cuda.is_available():
        return rank, world, torch.device("cpu")
    return rank, world, torch.device(f"cuda:{info.local_rank}" if info else "cuda")


def run(args) -> int:
    from ftdist.engine.dist import gather_to_main
    from ftdist.models.generate import generate
    from ftdist.run.outputs import check_writable, write_whole

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InferError(f"--out {out} exists (use --overwrite)")
    check_writable(args.out, "--out", directory=False)
    rank, world, device = inference_process()
    with tempfile.TemporaryDirectory(prefix="ftdist-generate-") as scratch:
        model, tok = load_model(args.model, args.step, args.base, args.dtype, device, scratch)
        prompts = load_prompts(args.prompts, tok)
        records = _generate_share(model, tok, prompts, args, rank, world, device, generate)
    everything = gather_to_main(records)
    if rank == 0:
        rows = sorted((r for part in everything for r in part), key=lambda r: (r["index"], r["sample"]))
        write_whole(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{len(rows)} answers to {len(prompts)} prompts written to {out}")
    return 0


def _generate_share(model, tok, prompts, args, rank: int, world: int, device, generate) -> list[dict]:
    """This rank's prompts (every world-th), in batches of prompts of similar length (less left padding, and
    answers of similar length finish together instead of the batch decoding on for its longest one); one
    record per prompt and sample (rank 0 puts them back in prompt order)."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(args.seed + rank)
    # tokenised once to sort by length (a stable sort: equal lengths keep prompt order)
    mine = sorted(range(rank, len(prompts), world), key=lambda i: len(tok(prompts[i][1], add_special_tokens=False)
                                                                         ["input_ids"]))
    sample = args.temperature > 0
    records, new_tokens, t0 = [], 0, time.time()
    bar = tqdm(total=len(mine) * args.num_return_sequences, desc="generating", unit="answer",
               disable=rank != 0 or not sys.stderr.isatty() and os.environ.get("FTDIST_PROGRESS") != "1")
    for start in range(0, len(mine), args.batch_size):
        batch = [i for i in mine[start:start + args.batch_size] for _ in range(args.num_return_sequences)]
        _, response = generate(model, tok, [prompts[i][1] for i in batch], max_new_tokens=args.max_new_tokens,
                               device=device, max_prompt_tokens=args.max_prompt_length, do_sample=sample,
                               temperature=args.temperature if sample else 1.0, top_p=args.top_p,
                               top_k=args.top_k, repetition_penalty=args.repetition_penalty)
        response = response.cpu()
        for k, (i, ids) in enumerate(zip(batch, response.tolist())):
            ended = tok.eos_token_id in ids
            ids = ids[:ids.index(tok.eos_token_id)] if ended else ids
            new_tokens += len(ids) + int(ended)
            records.append({"index": i, "sample": k % args.num_return_sequences, "prompt": prompts[i][0],
                            "response": tok.decode(ids, skip_special_tokens=True), "new_tokens": len(ids),
                            "finish_reason": "eos" if ended else "length"})
        bar.update(len(batch))
        bar.set_postfix(tok_s=int(new_tokens / max(time.time() - t0, 1e-9)))
    bar.close()
    return records


# -- the chat ----------------------------------------------------------------------------------
CHAT_HELP = "/reset clears the history, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits"


def run_chat(args) -> int:
    import torch
    from transformers import TextStreamer

    from ftdist.data.formats import RowProblem
    from ftdist.data.templates import render_chat
    from ftdist.models.generate import generate
    from ftdist.run.logs import setup_logging

    setup_logging(True)
    with tempfile.TemporaryDirectory(prefix="ftdist-chat-") as scratch:
        model, tok = load_model(args.model, args.step, args.base, args.dtype, None, scratch)
    if getattr(tok, "chat_template", None) is None:
        raise InferError(f"{args.model}: the tokenizer has no chat template")
    if hasattr(sys.stdin, "reconfigure"):
        # bytes that are not UTF-8 (a terminal in another encoding) come through as lone surrogates, refused below
        sys.stdin.reconfigure(errors="surrogateescape")
    torch.manual_seed(args.seed)
    device = next(model.parameters()).device
    system, history = args.system, []
    sample = args.temperature > 0
    print(f"ftdist chat with {args.model}: {CHAT_HELP}", flush=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if any("\udc80" <= c <= "\udcff" for c in text):
            print("(that line is not UTF-8 text and was left out: set the terminal to UTF-8)", flush=True)
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            system, history = text[len("/system"):].strip() or None, []
            print(f"(system prompt {'set' if system else 'removed'}; history cleared)", flush=True)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}: {CHAT_HELP})", flush=True)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            prompt = render_chat(tok, messages, tokenize=False, add_generation_prompt=True)
        except RowProblem as e:  # the template refuses this conversation (e.g. no system role): the chat goes on
            history.pop()
            print(f"(that line was left out: {e}; /reset or /system may help)", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        try:
            _, response = generate(model, tok, [prompt], max_new_tokens=args.max_new_tokens, device=device,
                                   do_sample=sample, temperature=args.temperature if sample else 1.0,
                                   top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                   streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n(answer interrupted)", flush=True)
            history.pop()
            continue
        ids = response[0].tolist()
        ids = ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
        history.append({"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)})
