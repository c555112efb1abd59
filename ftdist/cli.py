"""`ftdist train RECIPE [key=value ...]` and the other verbs.

The same command runs as one plain process, under torchrun or the deepspeed
launcher, under srun, and inside Ray: the process group comes from the
environment (ftdist/engine/dist.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from ftdist.run.lifecycle import RunFailure

TRAIN_EPILOG = """\
RECIPE is a built-in recipe name ({recipes}) or a YAML file.
Overrides use dotted keys, e.g. train.lr=1e-4 deepspeed.zero_stage=3 model.lora.r=8.
Launch the same command with torchrun/deepspeed/srun for several processes, e.g.
  torchrun --nproc_per_node 2 -m ftdist train sft_tiny deepspeed.zero_stage=3

Recipe keys (type, default):
{keys}
"""


def _user_errors():
    from ftdist.config import ConfigError
    from ftdist.data.loading import DataError
    from ftdist.engine.engine import UnsafeCheckpointError
    from ftdist.models.loading import ModelError
    from ftdist.train.step import NonFiniteError

    return (ConfigError, DataError, ModelError, NonFiniteError, UnsafeCheckpointError)


def _fail(msg: str) -> int:
    rank = os.environ.get("RANK")
    prefix = f"ftdist: error (rank {rank}): " if rank not in (None, "0") else "ftdist: error: "
    print(prefix + msg, file=sys.stderr)
    return 2


def cmd_train(args) -> int:
    from ftdist.config import load_config

    from ftdist.engine.dist import RendezvousError

    errors = _user_errors()
    cfg = None
    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        result = run_stage(cfg, end_process_when_done=True)
        code = 3 if "stopped_at" in result else 0
    except errors as e:
        return _fail(str(e))
    except RendezvousError as e:  # the ranks never met: one line saying how many did and where
        _fail(str(e))
        return 1
    except RunFailure as e:  # the run failed (not the input): one line, the details in output_dir/error.log
        _fail(str(e))
        return 1
    except RuntimeError as e:
        if cfg is not None:
            _exit_on_collective_failure(e, cfg.dist.timeout_s)
        raise
    finally:
        _destroy_process_group()
    return code


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
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def cmd_recipes(args) -> int:
    from ftdist.config import RECIPES_DIR, builtin_recipes

    for name in builtin_recipes():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
        print(f"{name:16s} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ftdist.config import builtin_recipes, config_help

    p = argparse.ArgumentParser(prog="ftdist", description="Distributed fine-tuning of causal language models.")
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
    argv = _take_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting `key=value` overrides at the first option (`--print-config a=1`): take the rest
    if getattr(args, "command", None) == "train":
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if not ("=" in a and not a.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
