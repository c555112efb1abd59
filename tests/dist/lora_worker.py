"""Run under torchrun by test_lora_dist.py: a few real LoRA/QLoRA steps through Engine and SFTTask, then
every rank writes the adapter weights it holds (gathered under ZeRO-3) and rank 0 exports the adapter.

    torchrun --nproc_per_node 2 tests/dist/lora_worker.py OUT_DIR ZERO_STAGE [key=value ...]
"""

import os
import sys

import torch

from ftdist.config import load_config
from ftdist.data.batching import plan_epoch
from ftdist.engine.dist import barrier, init_distributed
from ftdist.engine.engine import Engine
from ftdist.models.loading import load_tokenizer
from ftdist.run.seeding import seed_everything
from ftdist.train.step import optimizer_step
from ftdist.train.task import make_task

STEPS, MICRO, ACCUM = 4, 4, 2


def main(out: str, stage: int, overrides: list[str]) -> None:
    cfg = load_config("qlora_tiny", [f"output_dir={out}", f"deepspeed.zero_stage={stage}", "data.max_length=64",
                                     "data.eval=null", f"train.micro_batch_size={MICRO}",
                                     f"train.global_batch_size={MICRO * ACCUM * 2}", *overrides])
    info = init_distributed("gloo")
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    task = make_task(cfg, tokenizer, info)
    cache = os.path.join(out, "cache")
    if info.is_main:
        task.prepare_data(cache, False)
    barrier()
    if not info.is_main:
        task.prepare_data(cache, False)
    plan = plan_epoch(task.train_lengths(), seed=cfg.seed, epoch=0, micro_batch_size=MICRO, grad_accum=ACCUM,
                      world_size=info.world_size, rank=info.rank, packing=False, capacity=task.capacity)
    engine = Engine(task.build_model, cfg, info, grad_accum=ACCUM, total_steps=STEPS)
    losses = []
    for step in plan.steps[:STEPS]:
        micro = [task.collate(rows, "train") for rows in step]
        result = optimizer_step(engine, micro, [task.units(b) for b in micro], lambda b: task.loss(engine, b))
        losses.append(result.means["loss"])

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    base = next(p for n, p in engine.module.named_parameters() if n.endswith("q_proj.base_layer.weight"))
    held = {"base_shard_numel": int(getattr(base, "ds_tensor", base).numel()),
            "base_numel": int(getattr(base, "ds_numel", base.numel()))}
    with engine.gathered([p for _, p in named]):
        live = {n: p.detach().clone() for n, p in named}
    torch.save({"live": live, "losses": losses, **held}, os.path.join(out, f"rank{info.rank}.pt"))
    engine.export_hf(os.path.join(out, "final"), tokenizer)
    barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
