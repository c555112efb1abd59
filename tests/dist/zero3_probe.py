"""Run under torchrun: build the model inside ftdist's ZeRO-3 init context and report what each rank holds."""

import json
import sys

import torch

from ftdist.config import load_config
from ftdist.engine.dist import init_distributed
from ftdist.engine.engine import model_init_context
from ftdist.models.loading import load_causal_lm

cfg = load_config("sft_tiny", ["deepspeed.zero_stage=3", "model.dtype=fp32", "train.global_batch_size=32"])
info = init_distributed("gloo")
with model_init_context(cfg, info.world_size, grad_accum=1):
    model = load_causal_lm(cfg.model)
held = sum(p.ds_tensor.numel() for p in model.parameters())
full = sum(p.ds_numel for p in model.parameters())
visible = sum(p.numel() for p in model.parameters())
with open(sys.argv[1] + f".{info.rank}", "w") as f:
    json.dump({"held": held, "full": full, "visible": visible, "world": info.world_size}, f)
torch.distributed.destroy_process_group()
