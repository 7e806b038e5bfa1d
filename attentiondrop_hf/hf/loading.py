"""The load-time way in: `from_pretrained(..., attn_implementation="attentiondrop")` and `from_config(...)` are the
stock load followed by `enable_attentiondrop`, with the same checks at the same moment (at load).

Transformers hands a plugin the requested implementation only inside `PreTrainedModel.__init__`, before the modules
exist, and calls `__init__` again for every sub-model of a composite model; there is no public hook after a load.
So the two load entry points, `PreTrainedModel.from_pretrained` and `PreTrainedModel._from_config` (which
`AutoModel*.from_config` calls), are wrapped: when AttentionDrop is requested, the model is loaded with the base the
model would have chosen itself (or `base_attn_implementation`, or eager for `"attentiondrop_eager"`), which also
keeps models that pick attention classes by implementation name at `__init__` (Falcon, GPT-Neo) loadable, and then
switched on. A sub-model built while its parent loads sees the base, never "attentiondrop".

Checked against Transformers 5.0 to 5.25 (`WRAPPED_ENTRY_POINTS_CHECKED`); `tests/test_loading.py` fails when the
wrapped methods change their signature.
"""

import functools
from collections.abc import Callable, Iterator
from typing import Any

import transformers
from packaging.version import Version
from transformers import PreTrainedConfig, PreTrainedModel

from ..config import AttentionDropConfig
from .attention import BASE_OF_IMPLEMENTATION
from .flags import install_config_attribute
from .switch import switch_on

__all__ = ["WRAPPED_ENTRY_POINTS_CHECKED", "install_load_hooks"]

WRAPPED_ENTRY_POINTS_CHECKED = Version("5.0") <= Version(transformers.__version__) <= Version("5.25.99")
_WRAPPED = "_attentiondrop_wrapped"


def _requested(kwargs: dict, config: Any) -> str | None:
    """The AttentionDrop implementation a load asks for (in `attn_implementation=` or on the config), or `None`."""
    if "attn_implementation" in kwargs:
        requested = kwargs["attn_implementation"]
    elif isinstance(config, PreTrainedConfig):
        requested = config._attn_implementation_internal
    else:
        return None
    if isinstance(requested, dict):
        if any(v in BASE_OF_IMPLEMENTATION for v in _leaves(requested)):
            raise ValueError(
                "attn_implementation='attentiondrop' applies to the whole model; choose the attention it perturbs "
                "with the `targets` and `layers` flags instead of a per-sub-config dict"
            )
        return None
    return requested if requested in BASE_OF_IMPLEMENTATION else None


def _leaves(mapping: dict) -> Iterator[Any]:
    for value in mapping.values():
        yield from _leaves(value) if isinstance(value, dict) else (value,)


def _plain(flags: AttentionDropConfig | dict[str, Any] | None) -> dict[str, Any] | None:
    """Flags as the plain dict config.json saves (an `AttentionDropConfig` is accepted too)."""
    return flags.to_dict() if isinstance(flags, AttentionDropConfig) else flags


def _base_to_load(requested: str, flags: dict | None) -> str | None:
    """What the stock load runs: the flags' base, eager for "attentiondrop_eager", else the model's own (`None`)."""
    chosen = flags.get("base_attn_implementation") if isinstance(flags, dict) else None
    if requested != "attentiondrop" and chosen not in (None, BASE_OF_IMPLEMENTATION[requested]):
        raise ValueError(
            f"attn_implementation={requested!r} runs {BASE_OF_IMPLEMENTATION[requested]!r} as its base, but the flags "
            f"say base_attn_implementation={chosen!r}"
        )
    return chosen if requested == "attentiondrop" else BASE_OF_IMPLEMENTATION[requested]


def _switched_on(
    loaded: PreTrainedModel | tuple[PreTrainedModel, dict[str, Any]], requested: str
) -> PreTrainedModel | tuple[PreTrainedModel, dict[str, Any]]:
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
    flags = dict(model.config.attentiondrop or {})
    if requested != "attentiondrop":
        flags["base_attn_implementation"] = BASE_OF_IMPLEMENTATION[requested]
    switch_on(model, AttentionDropConfig.from_dict(flags))
    return loaded


def _wrap_from_pretrained(original: Callable[..., Any]) -> classmethod:
    @functools.wraps(original)
    def from_pretrained(cls: type[PreTrainedModel], *args: Any, **kwargs: Any) -> Any:
        requested = _requested(kwargs, kwargs.get("config"))
        if requested is None:
            return original(cls, *args, **kwargs)
        config = kwargs.get("config")
        if "attentiondrop" in kwargs:
            kwargs["attentiondrop"] = _plain(kwargs["attentiondrop"])
        flags = kwargs.get("attentiondrop", config.attentiondrop if isinstance(config, PreTrainedConfig) else None)
        kwargs["attn_implementation"] = _base_to_load(requested, flags)
        return _switched_on(original(cls, *args, **kwargs), requested)

    return classmethod(from_pretrained)


def _wrap_from_config(original: Callable[..., Any]) -> classmethod:
    @functools.wraps(original)
    def _from_config(cls: type[PreTrainedModel], config: PreTrainedConfig, **kwargs: Any) -> PreTrainedModel:
        if "attentiondrop" in kwargs:  # a config attribute, not an argument of the model's __init__
            config.attentiondrop = _plain(kwargs.pop("attentiondrop"))
        requested = _requested(kwargs, config)
        if requested is None:
            return original(cls, config, **kwargs)
        kwargs["attn_implementation"] = _base_to_load(requested, config.attentiondrop)
        return _switched_on(original(cls, config, **kwargs), requested)

    return classmethod(_from_config)


def install_load_hooks() -> None:
    """Make `attentiondrop` a config attribute and wrap the two load entry points (idempotent)."""
    install_config_attribute()
    for name, wrap in (("from_pretrained", _wrap_from_pretrained), ("_from_config", _wrap_from_config)):
        current = PreTrainedModel.__dict__[name]
        if not getattr(current.__func__, _WRAPPED, False):
            wrapped = wrap(current.__func__)
            setattr(wrapped.__func__, _WRAPPED, True)
            setattr(PreTrainedModel, name, wrapped)
