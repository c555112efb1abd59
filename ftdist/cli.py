"""`ftdist train RECIPE [key=value ...]` and the other verbs.

The same command runs as one plain process, under torchrun or the deepspeed
launcher, under srun, and inside Ray: the process group comes from the
environment (ftdist/engine/dist.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ftdist.errors import RunError, UserError, print_error

TRAIN_EPILOG = """\
RECIPE is a built-in recipe name ({recipes}) or a YAML file.
Overrides use dotted keys, e.g. train.lr=1e-4 deepspeed.zero_stage=3 model.lora.r=8.
Launch the same command with torchrun/deepspeed/srun for several processes, e.g.
  torchrun --nproc_per_node 2 -m ftdist train sft_tiny deepspeed.zero_stage=3

Recipe keys (type, default):
{keys}
"""


class UsageError(UserError):
    """A command line argparse cannot parse (an unknown option, a missing argument)."""


class _Parser(argparse.ArgumentParser):
    """argparse's errors as ftdist's own (one line, exit 2) instead of a usage block and SystemExit."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def cmd_train(args) -> int:
    from ftdist.config import config_yaml, load_config

    cfg = None
    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.print_config:  # with a `# <library> default: X` mark on each value that differs from it
            print(config_yaml(cfg), end="")
            return 0
        if os.environ.get("RANK", "0") == "0":  # one probe, by the process that claims output_dir next
            from ftdist.run.outputs import check_writable

            check_writable(cfg.output_dir, "output_dir", directory=True)
        result = run_stage(cfg, end_process_when_done=True)
        return 3 if "stopped_at" in result else 0
    except BaseException as e:
        # the run's error.log receives the traceback where output_dir is this run's (not a directory it refused)
        if cfg is not None and (Path(cfg.output_dir) / "run.json").exists():
            args.log_dir = cfg.output_dir
        if cfg is not None and isinstance(e, RuntimeError) and not isinstance(e, RunError):
            _exit_on_collective_failure(e, cfg.dist.timeout_s)
        raise
    finally:
        _destroy_process_group()


def run_stage(cfg, end_process_when_done: bool = False) -> dict:
    """The recipe's stage in this process: training (with its eval.suites), PPO's driver, or an evaluation.
    end_process_when_done: several training ranks end their processes inside train(), once finished
    (run/lifecycle.py)."""
    if cfg.stage == "ppo":  # one controller process; its ranks are Ray actors
        from ftdist.rl.entry import train

        return train(cfg)
    if cfg.stage == "eval":
        from ftdist.evaluate import run_recipe

        return run_recipe(cfg)
    from ftdist.eval.training import suite_evaluator
    from ftdist.train.loop import train

    return train(cfg, end_process_when_done=end_process_when_done, suite_eval=suite_evaluator(cfg))


def _exit_on_collective_failure(exc: RuntimeError, timeout_s: int) -> None:
    """A dead or hung rank: one line naming it instead of a traceback from inside torch, then exit
    at once (tearing down a process group with a broken peer aborts or hangs)."""
    from ftdist.engine.dist import collective_failure

    msg = collective_failure(exc, timeout_s)
    if msg is None:
        return
    import torch.distributed as dist

    print(f"ftdist: error (rank {dist.get_rank()}): {msg}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _destroy_process_group() -> None:
    from ftdist.engine.dist import destroy_process_group

    destroy_process_group()


def cmd_recipes(args) -> int:
    from ftdist.config import RECIPES_DIR, builtin_recipes

    for name in builtin_recipes():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
        print(f"{name:16s} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ftdist.config import builtin_recipes, config_help

    p = _Parser(prog="ftdist", description="Distributed fine-tuning of causal language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a recipe: train (sft, rm, dpo, orpo, ppo) or evaluate (stage: eval)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=TRAIN_EPILOG.format(recipes=", ".join(builtin_recipes()), keys=config_help()))
    t.add_argument("recipe", help="built-in recipe name or path to a recipe YAML")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides with dotted keys")
    t.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.set_defaults(func=cmd_recipes)

    from ftdist import merge
    from ftdist.plan import cli as plan_cli

    pl = sub.add_parser("plan", help="predict per-GPU memory and recommend a ZeRO/offload configuration",
                        parents=[plan_cli.build_parser()], add_help=False)
    pl.set_defaults(func=plan_cli.run)
    m = sub.add_parser("merge", help="merge LoRA adapters into a 16/32-bit base model",
                       parents=[merge.build_parser()], add_help=False)
    m.set_defaults(func=merge.run)
    from ftdist import export

    e = sub.add_parser("export", help="write a run's checkpoint (any step) as a Hugging Face model or PEFT adapter",
                       parents=[export.build_parser()], add_help=False)
    e.set_defaults(func=export.run)
    from ftdist import infer

    g = sub.add_parser("generate", help="generate answers to a file of prompts (batched; split over ranks)",
                       parents=[infer.build_parser()], add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=infer.__doc__)
    g.set_defaults(func=infer.run)
    c = sub.add_parser("chat", help="chat with a model in the terminal (streamed answers, /reset, /system)",
                       parents=[infer.build_chat_parser()], add_help=False)
    c.set_defaults(func=infer.run_chat)
    from ftdist import evaluate

    ev = sub.add_parser("eval", help="evaluate models side by side: perplexity, exact match, multiple choice",
                        parents=[evaluate.build_parser()], add_help=False,
                        formatter_class=argparse.RawDescriptionHelpFormatter, description=evaluate.__doc__)
    ev.set_defaults(func=evaluate.run)
    return p


def _take_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher passes --local_rank=N before the verb; LOCAL_RANK carries it from here on."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def main(argv=None) -> int:
    """Every verb runs inside one error boundary: ftdist's own errors (UserError: exit 2, RunError: exit 1) end as
    one line, any other exception as one line naming it and the file its traceback went to (exit 1); the
    traceback goes to the run's error.log where the command has a run directory (args.log_dir)."""
    argv = _take_local_rank(list(sys.argv[1:] if argv is None else argv))
    args = argparse.Namespace(command=argv[0] if argv else None)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # argparse stops collecting `key=value` overrides at the first option (`--print-config a=1`): take the rest
        if getattr(args, "command", None) == "train":
            args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
            extra = [a for a in extra if not ("=" in a and not a.startswith("-"))]
        if extra:
            raise UsageError(f"ftdist {args.command}: unrecognized arguments: {' '.join(extra)} "
                             f"(see ftdist {args.command} --help)")
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (UserError, RunError) as e:
        _write_traceback(e, args, argv, temp_file=False)
        print_error(str(e))
        return e.exit_code
    except Exception as e:  # not one of ftdist's: still one line, what failed and where its traceback is
        where = _write_traceback(e, args, argv, temp_file=True)
        if isinstance(e, OSError) and e.filename:  # a read-only or full file system, a missing permission
            what = f"{e.filename}: {e.strerror}"
        else:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            what = f"`ftdist {args.command or ''}` failed: {type(e).__name__}: {first}"
        print_error(f"{what} ({f'the traceback is in {where}' if where else 'its traceback could not be saved'})")
        return 1


def _write_traceback(exc: BaseException, args, argv: list[str], temp_file: bool):
    """Append the traceback to the run's error.log (args.log_dir, when the command has one and it exists), else
    (temp_file) to a new temporary file; returns the file, or None where nothing was written."""
    import datetime
    import socket
    import tempfile
    import traceback

    header = (f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {socket.gethostname()} "
              f"pid {os.getpid()} rank {os.environ.get('RANK', '0')}: ftdist {' '.join(argv)}\n")
    text = header + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    log_dir = getattr(args, "log_dir", None)
    if log_dir and os.path.isdir(log_dir):
        path = Path(log_dir) / "error.log"
        try:
            with open(path, "a") as f:  # one write per process: ranks appending at once do not interleave lines
                f.write(text)
            return path
        except OSError:
            pass
    if not temp_file:
        return None
    try:
        fd, name = tempfile.mkstemp(prefix="ftdist-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError:  # no writable temporary directory either
        return None
    return name


if __name__ == "__main__":
    raise SystemExit(main())
