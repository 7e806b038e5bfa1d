"""One training step of the consistency Trainer, run by test_trainer.py alone or under torch.distributed.run.

Usage: distributed_step.py OUTPUT_DIR PER_DEVICE_BATCH. Writes log.json (the step's log) and weights.pt on rank 0.
"""

import json
import os
import sys

import torch
from test_trainer import make_trainer, register_copy_dependent_variant, vit_model, vit_rows

output_dir, per_device_batch = sys.argv[1], int(sys.argv[2])
register_copy_dependent_variant()
trainer = make_trainer(
    vit_model(variant="cooler_second_copy"),
    output_dir,
    vit_rows(8),
    per_device_train_batch_size=per_device_batch,
    max_steps=1,
    logging_steps=1,
    # Plain SGD: an update proportional to the gradient. Adam would turn the rounding noise of an exactly-zero
    # gradient (the key bias) into a full-size step that differs between the two layouts.
    optim="sgd",
    **({"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}),
)
trainer.train()
if trainer.is_world_process_zero():
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "log.json"), "w") as handle:
        json.dump(trainer.state.log_history[0], handle)
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save(weights, os.path.join(output_dir, "weights.pt"))
