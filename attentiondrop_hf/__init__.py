"""AttentionDrop for Hugging Face Transformers (arXiv 2504.12088).

Importing the package registers the `"attentiondrop"` attention implementation (attention and mask interfaces),
makes `attentiondrop` an attribute of every Transformers config, and registers the built-in variants "hard" and
"blur". Layers, imports pointing one way: `ops` (pure torch) <- `variants` <- `config` <- `hf` (everything that
touches Transformers).
"""

__version__ = "0.2.0"

from . import variants  # noqa: E402,F401  (registers the built-in variants)
from .config import AttentionDropConfig  # noqa: E402
from .hf.attention import ATTN_IMPLEMENTATION, force_reference_path, register  # noqa: E402
from .hf.switch import check_attentiondrop, disable_attentiondrop, enable_attentiondrop  # noqa: E402
from .hf.trainer import (  # noqa: E402
    AttentionDropSeq2SeqTrainer,
    AttentionDropSeq2SeqTrainingArguments,
    AttentionDropTrainer,
    AttentionDropTrainingArguments,
    ConsistencyArguments,
    ConsistencyMixin,
)
from .variants import AttentionDropVariant, PerturbedCall, register_variant  # noqa: E402

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionDropConfig",
    "AttentionDropSeq2SeqTrainer",
    "AttentionDropSeq2SeqTrainingArguments",
    "AttentionDropTrainer",
    "AttentionDropTrainingArguments",
    "AttentionDropVariant",
    "ConsistencyArguments",
    "ConsistencyMixin",
    "PerturbedCall",
    "check_attentiondrop",
    "disable_attentiondrop",
    "enable_attentiondrop",
    "force_reference_path",
    "register_variant",
]
