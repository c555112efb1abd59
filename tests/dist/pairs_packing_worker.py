"""One rank of tests/dist/test_preference_packing_dist.py (started by torchrun, 2 ranks, gloo).

For each stage (dpo, orpo, rm), full and LoRA, ZeRO-2 and ZeRO-3: one optimizer step (SGD) on the same step's
pairs through the real plan, collate, Task loss and step function, once with padded and once with packed pair
micro-batches, from the same starting weights (LoRA: B = 0, so the step's gradient is the B matrices'). Rank 0 writes the logged means and the trainable weights'
updates of both layouts to argv[1].
"""

import sys

import torch

from ftdist.config import load_config
from ftdist.data.batching import plan_epoch
from ftdist.engine.dist import init_distributed, run_on_main_then_others
from ftdist.engine.engine import Engine
from ftdist.models.loading import load_tokenizer
from ftdist.run.seeding import seed_everything
from ftdist.train.step import optimizer_step
from ftdist.train.task import make_task

out_file, cache = sys.argv[1], sys.argv[2]
info = init_distributed("gloo")
LR = 0.1
results = {}


def one_step(stage: str, lora: bool, zero: int, packing: bool) -> dict:
    overrides = [f"stage={stage}", "model.dtype=fp32", "data.train=ftdist/tiny-task/train_pref",
                 "data.max_length=64", "data.max_prompt_length=48", f"data.packing={str(packing).lower()}",
                 "train.global_batch_size=8", "train.micro_batch_size=2", "train.optimizer=sgd", f"train.lr={LR}",
                 "train.weight_decay=0.0", "train.max_grad_norm=0.0", "train.scheduler=constant",
                 "train.warmup_ratio=0.0", f"deepspeed.zero_stage={zero}"]
    if lora:
        overrides += ["model.lora.r=8", "model.lora.alpha=16", "model.lora.dropout=0.0"]
    if stage == "orpo":
        # orpo.nll=trl takes TRL's token mean over each micro-batch, so it depends on how a step's pairs are cut
        # into micro-batches, which packing changes; pair_mean does not (tests/unit compare both on one batch)
        overrides.append("orpo.nll=pair_mean")
    cfg = load_config(None, overrides)
    tok = load_tokenizer(cfg.model, cfg.data.chat_template)
    task = make_task(cfg, tok, info)
    run_on_main_then_others(lambda: task.prepare_data(cache, False), lambda: task.prepare_data(cache, False))
    seed_everything(cfg.seed)  # the same LoRA and reward-head initialisation for both layouts
    engine = Engine(task.build_model, cfg, info, grad_accum=2, total_steps=1)
    before = engine.trainable_state_dict()
    plans = [plan_epoch(task.train_lengths(), seed=cfg.seed, epoch=0, micro_batch_size=2, grad_accum=2,
                        world_size=info.world_size, rank=r, packing=False, capacity=64,
                        token_budget=task.micro_tokens) for r in range(info.world_size)]
    micro = [task.collate(rows, "train") for rows in plans[info.rank].steps[0]]
    real, padded = map(sum, zip(*(task.tokens(b) for b in micro)))
    result = optimizer_step(engine, micro, [task.units(b) for b in micro], lambda b: task.loss(engine, b),
                            counters={"real": real, "padded": padded})
    after = engine.trainable_state_dict()
    if getattr(task, "reference", None) is not None and task.reference.frozen is not None:
        task.reference.frozen.close()
    out = {"means": result.means, "micro_batches": len(micro), **result.counters}
    if info.is_main:
        out["update"] = {n: (after[n] - before[n]) / LR for n in before}  # the step's gradient (SGD, first step)
        out["pairs"] = sorted(row[0] for plan in plans for m in plan.steps[0] for row in m)  # every rank's
    return out


for zero in (3, 2):  # ZeRO-3 first: a ZeRO-3 reference built after ZeRO-2 engines in one process fails in
    # DeepSpeed (an ftdist process only ever has one ZeRO stage)
    for stage in ("dpo", "orpo", "rm"):
        for lora in (False, True):
            name = f"{stage}_{'lora' if lora else 'full'}_zero{zero}"
            if len(sys.argv) > 3 and name not in sys.argv[3].split(","):  # a subset, by name
                continue
            results[name] = {layout: one_step(stage, lora, zero, layout == "packed") for layout in ("padded", "packed")}
if info.is_main:
    torch.save(results, out_file)
