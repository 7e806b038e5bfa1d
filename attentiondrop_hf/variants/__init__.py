"""Built-in AttentionDrop variants; they register on import exactly as a user's variant does."""

from .blur import BlurredAttentionSmoothing
from .hard import HardAttentionMasking

__all__ = ["BlurredAttentionSmoothing", "HardAttentionMasking"]
