"""TRL trainers as bare instances, for the tests that check ftdist's losses against TRL's own code.

TRL computes its losses inside trainer methods, not free functions, and building a real trainer
needs datasets, TrainingArguments and an Accelerator. `bare(Trainer, ...)` makes an instance with
`object.__new__` and sets only the attributes the methods read; the accelerator is a stand-in whose
gather is the identity, as on one process. If a TRL upgrade reads a new attribute, the tests fail
with an AttributeError naming it.
"""

from collections import defaultdict

import torch


class OneProcessAccelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def unwrap_model(self, model):
        return model


def bare(trainer_cls, **attrs):
    trainer = object.__new__(trainer_cls)
    trainer.__dict__.update(accelerator=OneProcessAccelerator(), _total_train_tokens=0, _tp_size=1,
                            _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, **attrs)
    return trainer
