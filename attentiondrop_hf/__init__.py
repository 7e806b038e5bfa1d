"""AttentionDrop for Hugging Face Transformers (arXiv 2504.12088).

Importing the package registers the `"attentiondrop"` attention implementation (attention and mask interfaces) and
the built-in variants "hard" and "blur".
"""

__version__ = "0.1.0"

from . import variants  # noqa: E402,F401  (registers the built-in variants)
from .config import AttentionDropConfig  # noqa: E402
from .integration import ATTN_IMPLEMENTATION, force_reference_path, register  # noqa: E402
from .model import disable_attentiondrop, enable_attentiondrop  # noqa: E402
from .registry import AttentionDropVariant, PerturbedCall, register_variant  # noqa: E402
from .trainer import (  # noqa: E402
    AttentionDropSeq2SeqTrainer,
    AttentionDropSeq2SeqTrainingArguments,
    AttentionDropTrainer,
    AttentionDropTrainingArguments,
)

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionDropConfig",
    "AttentionDropSeq2SeqTrainer",
    "AttentionDropSeq2SeqTrainingArguments",
    "AttentionDropTrainer",
    "AttentionDropTrainingArguments",
    "AttentionDropVariant",
    "PerturbedCall",
    "disable_attentiondrop",
    "enable_attentiondrop",
    "force_reference_path",
    "register_variant",
]
