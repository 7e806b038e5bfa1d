"""AttentionDrop for Hugging Face Transformers (arXiv 2504.12088).

Importing the package registers the `"attentiondrop"` attention implementation (attention and mask interfaces; and
`"attentiondrop_eager"`, its eager-based twin), makes `attentiondrop` an attribute of every Transformers config, makes
loading with `attn_implementation="attentiondrop"` switch AttentionDrop on, and registers the built-in variants.
Layers, imports pointing one way: `ops` (pure torch) <- `variants` <- `config` <- `hf` (everything that touches
Transformers); `version` is a leaf.
"""

from . import variants  # noqa: E402,F401  (registers the built-in variants)
from .config import AttentionDropConfig  # noqa: E402
from .hf.attention import ATTN_IMPLEMENTATION, force_reference_path, register  # noqa: E402
from .hf.callbacks import (  # noqa: E402
    AttentionDropMonitorCallback,
    AttentionDropScheduleCallback,
    add_attentiondrop_callbacks,
)
from .hf.loading import install_load_hooks  # noqa: E402
from .hf.switch import check_attentiondrop, disable_attentiondrop, enable_attentiondrop  # noqa: E402
from .hf.trainer import (  # noqa: E402
    AttentionDropArguments,
    AttentionDropSeq2SeqTrainer,
    AttentionDropSeq2SeqTrainingArguments,
    AttentionDropTrainer,
    AttentionDropTrainingArguments,
    ConsistencyMixin,
)
from .variants import AttentionDropVariant, PerturbedCall, register_variant  # noqa: E402
from .version import __version__  # noqa: F401

register()
install_load_hooks()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionDropArguments",
    "AttentionDropConfig",
    "AttentionDropMonitorCallback",
    "AttentionDropScheduleCallback",
    "AttentionDropSeq2SeqTrainer",
    "AttentionDropSeq2SeqTrainingArguments",
    "AttentionDropTrainer",
    "AttentionDropTrainingArguments",
    "AttentionDropVariant",
    "ConsistencyMixin",
    "PerturbedCall",
    "add_attentiondrop_callbacks",
    "check_attentiondrop",
    "disable_attentiondrop",
    "enable_attentiondrop",
    "force_reference_path",
    "register_variant",
]
