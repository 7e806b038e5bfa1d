"""`config.attentiondrop` on every Transformers config: the flags as a plain dict, validated when set, parsed once.

Declaring `attentiondrop` on `PretrainedConfig` makes it a config attribute: `from_pretrained(...,
attentiondrop={...})` then routes the kwarg to the config instead of the model's `__init__`, the flags are saved in
config.json, and configs that never set them serialise nothing new.

- **Validated when set, parsed once.** The stored value is an `AttentionDropFlags`, a `dict` (so config.json and
  `to_dict()` see plain JSON) that re-validates on every change, in place or by assignment, and keeps the parsed
  `AttentionDropConfig` in `.settings`: an attention call reads it without building anything.
- **Lazy for unknown variants.** A checkpoint trained with a user's variant must load, for inference, in a process
  that never registered it: such flags are kept as they are and validated when a perturbed call needs them.
- **Composite models.** Setting the flags on a config with sub-configs (CLIP, SigLIP, VisionEncoderDecoder, VLMs)
  sets them on every sub-config too: the attention modules read their own sub-config.
"""

import copy
from typing import Any

from transformers import PreTrainedConfig

from ..config import BASE_IMPLEMENTATIONS, AttentionDropConfig
from ..variants import UnknownVariantError

__all__ = ["AttentionDropFlags", "base_implementation_of", "install_config_attribute", "set_progress", "settings_of"]


class AttentionDropFlags(dict):
    """The value of `config.attentiondrop`: every flag, validated, with the parsed config in `settings`.

    Attributes:
        settings (`AttentionDropConfig` or `None`): the parsed flags; `None` while `variant` names a variant this
            process has not registered (see `settings_of`).
        in_composite (`bool`): set on a sub-config by its composite parent; such a config's modules are only part of
            the model, so whether the targets match anything is checked on the whole model, not per config.
        progress (`float` or `None`): the fraction of the training steps done, set by
            `AttentionDropScheduleCallback` (`set_progress`) for a strength `schedule`; never saved.
        scaled_options (`dict`): the variant's options at each strength factor in use at this progress.
    """

    def __init__(self, flags: dict[str, Any], in_composite: bool = False):
        super().__init__()
        self.in_composite = in_composite
        self.progress, self.scaled_options = None, {}
        self._assign(dict(flags))

    def _assign(self, flags: dict[str, Any]) -> None:
        try:
            settings = AttentionDropConfig.from_dict(flags)
        except UnknownVariantError:
            settings = None
        else:
            flags = settings.to_dict()
        dict.clear(self)
        dict.update(self, flags)
        self.settings, self.scaled_options = settings, {}

    # Every change validates the changed copy first: an invalid edit raises and leaves the flags as they were.
    def __setitem__(self, key, value):
        self._assign({**self, key: value})

    def __delitem__(self, key):
        changed = dict(self)
        del changed[key]
        self._assign(changed)

    def update(self, *args, **kwargs):
        changed = dict(self)
        changed.update(*args, **kwargs)
        self._assign(changed)

    def __ior__(self, other):
        self.update(other)
        return self

    def pop(self, key, *default):
        changed = dict(self)
        value = changed.pop(key, *default)
        self._assign(changed)
        return value

    def popitem(self):
        changed = dict(self)
        item = changed.popitem()
        self._assign(changed)
        return item

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def clear(self):
        self._assign({})

    # Copies (config.to_dict deep-copies the config) share the parsed settings instead of parsing again.
    def __copy__(self):
        return self._copy_with(dict(self))

    def __deepcopy__(self, memo):
        return self._copy_with(copy.deepcopy(dict(self), memo))

    def _copy_with(self, items: dict) -> "AttentionDropFlags":
        duplicate = AttentionDropFlags.__new__(AttentionDropFlags)
        dict.update(duplicate, items)
        duplicate.settings, duplicate.in_composite = self.settings, self.in_composite
        duplicate.progress, duplicate.scaled_options = self.progress, {}
        return duplicate

    def __reduce__(self):
        return AttentionDropFlags, (dict(self), self.in_composite)


_DEFAULT_SETTINGS: list[AttentionDropConfig] = []


def settings_of(config: PreTrainedConfig) -> AttentionDropConfig:
    """The parsed flags of a model config (the defaults when unset).

    Raises `UnknownVariantError` for flags whose variant is still not registered: the one place a checkpoint's
    custom variant must be known is a perturbed (training) call.
    """
    flags = config.__dict__.get("attentiondrop")
    if flags is None:
        if not _DEFAULT_SETTINGS:
            _DEFAULT_SETTINGS.append(AttentionDropConfig())
        return _DEFAULT_SETTINGS[0]
    if flags.settings is None:
        flags._assign(dict(flags))  # the variant may have been registered since the flags were loaded
        if flags.settings is None:
            AttentionDropConfig.from_dict(flags)  # raises the UnknownVariantError that names what is registered
    return flags.settings


def set_progress(config: PreTrainedConfig, progress: float) -> None:
    """Record how far training is (the fraction of steps done), for the strength `schedule` of the config's flags."""
    flags = config.__dict__.get("attentiondrop")
    if flags is not None and flags.progress != progress:
        flags.progress, flags.scaled_options = progress, {}


def base_implementation_of(config: PreTrainedConfig) -> str:
    """What runs when nothing is perturbed: readable without the variant (inference never needs the plugin)."""
    flags = config.__dict__.get("attentiondrop")
    if flags is None:
        return "sdpa"
    if flags.settings is not None:
        return flags.settings.base_attn_implementation
    base = flags.get("base_attn_implementation", "sdpa")
    return base if base in BASE_IMPLEMENTATIONS else "sdpa"


def sub_configs(config: PreTrainedConfig) -> list[PreTrainedConfig]:
    """The direct sub-configs of a composite config (text/vision towers, encoder/decoder)."""
    found = []
    for key in getattr(config, "sub_configs", {}) or {}:
        sub_config = getattr(config, key, None)
        if isinstance(sub_config, PreTrainedConfig) and not any(sub_config is c for c in found):
            found.append(sub_config)
    return found


def _store(config: PreTrainedConfig, flags: AttentionDropFlags | None) -> None:
    if flags is None:
        config.__dict__.pop("attentiondrop", None)
    else:
        config.__dict__["attentiondrop"] = flags
    for sub_config in sub_configs(config):
        part = None if flags is None else flags._copy_with(dict(flags))
        if part is not None:
            part.in_composite = True
        _store(sub_config, part)


class _ConfigAttribute:
    """`PretrainedConfig.attentiondrop`: `None` until set; setting a dict validates it and stores every flag."""

    def __get__(self, config, owner=None):
        return None if config is None else config.__dict__.get("attentiondrop")

    def __set__(self, config, flags):
        _store(config, None if flags is None else AttentionDropFlags(flags))

    def __delete__(self, config):
        _store(config, None)


def install_config_attribute() -> None:
    """Make `attentiondrop` an attribute of every Transformers config (idempotent)."""
    if not isinstance(PreTrainedConfig.__dict__.get("attentiondrop"), _ConfigAttribute):
        PreTrainedConfig.attentiondrop = _ConfigAttribute()
