"""Workarounds for Transformers bugs, each with its upstream report and the versions it applies to.

Remove an entry once the oldest supported Transformers release has the fix.
"""

import os

import torch
import transformers
from packaging.version import Version
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

__all__ = [
    "BRANCHES_ON_THE_IMPLEMENTATION_NAME",
    "TRAINER_RELOADS_LEGACY_KEYS_WRONGLY",
    "reload_weights_through_from_pretrained",
]

# huggingface/transformers#43701: Transformers 5.x saves some models (ViT among them) under their legacy Hub key
# names and renames them back in `from_pretrained`; the Trainer's resume and best-model paths call `load_state_dict`
# on the raw keys and leave those weights unloaded, with only a warning. Seen on 5.0 through 5.24 (the newest
# release checked); re-check when raising the upper bound of `transformers` in setup.cfg.
TRAINER_RELOADS_LEGACY_KEYS_WRONGLY = Version("5.0") <= Version(transformers.__version__) < Version("6")


def reload_weights_through_from_pretrained(
    model: torch.nn.Module, checkpoint: str | None, sharded_state: bool
) -> bool:
    """Load `checkpoint`'s weights into `model` through `from_pretrained` (which renames legacy keys) where #43701
    applies. Returns False where it does not apply and the Trainer's own loading should run.

    Args:
        sharded_state (`bool`): FSDP or DeepSpeed hold the weights; their own loaders must run.
    """
    if (
        not TRAINER_RELOADS_LEGACY_KEYS_WRONGLY
        or sharded_state
        or checkpoint is None
        or not isinstance(model, PreTrainedModel)
        or not any(os.path.isfile(os.path.join(checkpoint, n)) for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))
    ):
        return False
    reloaded = type(model).from_pretrained(checkpoint, dtype=model.dtype)
    model.load_state_dict(reloaded.state_dict())  # strict: every key must match
    return True


# Model types whose modeling code builds its attention mask by comparing the implementation's name with "sdpa":
# under "attentiondrop" it builds eager's float mask instead, and eval would not equal the stock model (GLM-5-Next's
# sparse-attention mask: logits off by about 1 in a tiny model). Checked on Transformers 5.24 (the sweep of
# tests/test_architectures.py finds them); AttentionDrop refuses them.
BRANCHES_ON_THE_IMPLEMENTATION_NAME = {
    "glm5_next_text": "it builds its sparse-attention mask in SDPA's format only for an implementation named 'sdpa'",
}
