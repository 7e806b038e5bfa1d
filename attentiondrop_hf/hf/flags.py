"""`config.attentiondrop`: the flags as plain data on every Transformers config.

Declaring `attentiondrop = None` on `PreTrainedConfig` makes it a config attribute: `from_pretrained(...,
attentiondrop={...})` then routes the kwarg to the config instead of the model's `__init__`, the flags are saved in
config.json (a checkpoint loads in stock Transformers, without this package), and configs that never set them
serialise nothing new. Nothing is parsed or cached here: the flags are read when AttentionDrop is switched on
(`hf.switch`), which validates them and builds the model's plan.
"""

from transformers import PreTrainedConfig

__all__ = ["install_config_attribute"]


def install_config_attribute() -> None:
    """Make `attentiondrop` an attribute of every Transformers config (idempotent)."""
    if "attentiondrop" not in PreTrainedConfig.__dict__:
        PreTrainedConfig.attentiondrop = None
