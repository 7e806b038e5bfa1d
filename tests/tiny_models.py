"""A zoo of tiny, randomly initialised models: one per model type that Transformers' auto mappings offer.

`tiny_models()` walks `CONFIG_MAPPING_NAMES` and, for each model type, picks one head class from the auto model
mappings (`HEADS_PREFERENCE`: heads whose loss takes integer labels first), shrinks the default config (two layers per
stack, width 32, four heads, vocabulary 99, 32x32 images, short audio, no dropout, a few experts), makes a
deterministic batch the model accepts, and keeps the case only if an eval forward and two training forwards run,
give finite numbers (a finite `loss` when there are labels) and agree with each other. Every model type it cannot
keep is returned with the reason, so a test that runs over the zoo knows what it did not cover. Everything is built
from configs: no Hub access, no remote code, no tokenizer or processor files.

    cases, skipped = tiny_models()
    for case in cases:
        model = build(case, attn_implementation="eager")
        loss = model(**case.make_inputs()).loss  # None for base models: their batches have no labels

Batches hold 3 rows. Text rows are 10 tokens, right-padded to lengths 10, 7 and 4 (so `padded` is true), end with the
end-of-sequence token where the model has one and hold no other special token; models that splice image features
into the text get their image placeholder tokens at the start of each row. Labels follow the head: class ids, token
ids (-100 on padding and image tokens) or decoder targets. Images and audio are random, unpadded tensors.

The walk runs on one CPU thread (restored afterwards): on a busy machine, tiny matrix products spread over two threads
were a thousand times slower. Only torch, transformers and the standard library are used. Run this file to see what
is kept and why the rest is not.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import re
import textwrap
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.models.auto import configuration_auto, modeling_auto

BATCH = 3
SEQ = 10
VOCAB = 99
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
FFN = 64
LAYERS = 2
IMAGE = 32
PATCH = 8
NUM_LABELS = 3
EXPERTS = 4
TOP_K = 2
AUDIO_SAMPLES = 2000  # raw waveform length: a few frames after the usual 320x convolutional down-sampling
AUDIO_FRAMES = 32  # spectrogram frames

# Head mappings in order of preference, with the task that decides the labels. Heads whose loss takes integer
# class or token labels come first: the consumer compares a trainer's loss with the model's own `loss`.
HEADS_PREFERENCE = (
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "sequence-classification"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio-classification"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal-lm"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "seq2seq-lm"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "image-text-to-text"),
    ("MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES", "image-text-to-text"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "masked-lm"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "speech-seq2seq"),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "ctc"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
    ("MODEL_MAPPING_NAMES", "base"),
)
# At most this many head classes are tried per model type before it is skipped (a third one never rescued a model
# type, and failures are what cost time).
MAX_HEADS_TRIED = 2
# A case whose shrunk model is still bigger than this is skipped: some widths are not in the config's fields.
MAX_PARAMETERS = 3_000_000
# Model types whose shrunk model is still over MAX_PARAMETERS (measured with Transformers 5.24), skipped without
# building them: initialising them costs up to seconds each.
NOT_TINY = {
    model_type: "not tiny after shrinking: " + why
    for why, model_types in {
        "widths double at each of 6 down-sampling stages (~260M parameters)": (
            "vibevoice",
            "vibevoice_asr",
            "vibevoice_acoustic_tokenizer",
            "vibevoice_acoustic_tokenizer_encoder",
            "vibevoice_acoustic_tokenizer_decoder",
        ),
        "its sliding-attention layers keep full-size projections (~38M parameters)": ("dots3_note", "dots3_note_text"),
        "convolutional backbone / codec widths stay large (3M-27M parameters)": (
            "bark",
            "dac",
            "deimv2",
            "edgetam_video",
            "encodec",
            "fastspeech2_conformer",
            "fastspeech2_conformer_with_hifigan",
            "janus",
            "mask2former",
            "neucodec",
            "pe_audio_encoder",
            "pp_doclayout_v3",
            "pp_doclayout_v4",
            "pp_ocrv5_mobile_rec",
            "rt_detr",
            "rt_detr_v2",
            "sam2",
            "sam2_hiera_det_model",
            "sam2_video",
            "sam2_vision_model",
            "tvp",
            "univnet",
            "uvdoc",
            "xcodec",
            "xcodec2",
        ),
    }.items()
    for model_type in model_types
}


@dataclass
class TinyModel:
    """One tiny architecture: how to build it and a batch it accepts."""

    id: str  # the model type, e.g. "bert"
    model_class: type  # the PreTrainedModel class built, e.g. BertForSequenceClassification
    config: PreTrainedConfig  # the tiny config (callers deep-copy it before use: `build` does)
    make_inputs: Callable[[], dict]  # a fresh, deterministic batch; has `labels` when the head takes them
    kind: str  # "encoder", "decoder", "encoder-decoder", "vision", "audio", "multimodal", ...
    padded: bool  # whether make_inputs() has padding (an attention_mask with zeros)


def build(case: TinyModel, seed: int = 0, **kwargs) -> PreTrainedModel:
    """A fresh model for `case`: same seed, same weights. `kwargs` go to `_from_config` (e.g. attn_implementation)."""
    config = copy.deepcopy(case.config)
    torch.manual_seed(seed)
    return case.model_class._from_config(config, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Config shrinking


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) for v in value)


_LAYER_NAMES = {"num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth", "num_blocks", "encoder_depth"}
_HIDDEN_NAMES = {
    "hidden_size",
    "d_model",
    "n_embd",
    "n_embed",
    "emb_dim",
    "embed_dim",
    "dim",
    "hidden_dim",
    "embedding_size",
    "embedding_dim",
    "word_embed_proj_dim",
    "projection_dim",
    "proj_dim",
    "d_embed",
    "model_dim",
    "text_embed_dim",
    "vision_embed_dim",
    "hidden_sizes",
    "embed_dims",
    "hidden_dims",
    "dims",
    "widths",
    "conv_dim",
    "mamba_d_ssm",
}
_HEAD_NAMES = {"num_attention_heads", "num_heads", "n_head", "n_heads", "attention_heads", "encoder_attention_heads"}
_KV_HEAD_NAMES = {"num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads", "multi_query_group_num"}
_FFN_NAMES = {"intermediate_size", "ffn_dim", "d_ff", "n_inner", "ffn_hidden_size", "dim_feedforward", "mlp_dim"}
_POSITION_NAMES = {
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "max_target_positions",
    "max_source_positions",
    "max_seq_len",
    "max_sequence_length",
}
_EXPERT_NAMES = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"}
_TOPK_NAMES = {"num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "router_topk", "moe_k"}
_STATE_NAMES = {"state_size", "d_state", "mamba_d_state", "ssm_state_size"}


def _is_layer_count(name: str) -> bool:
    if any(part in name for part in ("conv", "feat_extract", "pos", "adapter")):
        return False  # convolutional feature extractors etc. have their own per-layer lists
    return name in _LAYER_NAMES or (name.endswith("_layers") and not name.endswith("_only_layers"))


def _shrunk_int(name: str, value: int) -> int:
    """The tiny value for the integer config field `name` (a flat table of rules on field names)."""
    if _is_layer_count(name):
        return min(value, LAYERS) if value > 0 else value
    if name in _HIDDEN_NAMES or "hidden_size" in name or name.endswith(("_embed_dim", "_d_model", "embedding_size")):
        return min(value, HIDDEN)
    if name.endswith(("channels", "channel", "_feature_size", "filters")) and name != "num_channels":
        return min(value, HIDDEN)  # convolutional widths
    if name in _KV_HEAD_NAMES or name.endswith("key_value_heads"):
        return min(value, KV_HEADS)
    if name in _HEAD_NAMES or name.endswith(("attention_heads", "_n_heads", "_num_heads")):
        return min(value, HEADS)
    if name.endswith("head_dim") or name in ("d_kv", "kv_channels", "attention_head_dim", "head_size", "d_head"):
        return min(value, HIDDEN // HEADS)
    if name == "dim_head":
        return min(value, HIDDEN // HEADS)
    if name.endswith("lora_rank"):
        return min(value, 16)
    if name == "rotary_dim":
        return min(value, HIDDEN // HEADS // 2)
    if name.endswith("layer_period"):  # e.g. Jamba: one attention / expert layer every `period` layers
        return min(value, LAYERS)
    if name.endswith("layer_offset"):
        return min(value, LAYERS - 1)
    if name in _FFN_NAMES or name.endswith(("_intermediate_size", "_ffn_dim")) or name in ("d_inner", "dim_ff"):
        return min(value, FFN)
    if "vocab" in name or (name.startswith("num_") and name.endswith("_labels") and name != "num_labels"):
        return min(value, VOCAB)
    if name == "num_embeddings":  # vector-quantiser codebooks
        return min(value, 64)
    if name == "mm_tokens_per_image":  # Gemma 3 pools the image patches down to this many tokens
        return min(value, 4)
    if name in _POSITION_NAMES:
        return min(value, 64)
    if name in _EXPERT_NAMES:
        return min(value, EXPERTS)
    if name in _TOPK_NAMES:
        return min(value, TOP_K)
    if name in ("n_shared_experts", "num_shared_experts", "n_group", "topk_group", "first_k_dense_replace"):
        return min(value, 1)
    if name in _STATE_NAMES:
        return min(value, 16)
    if name.endswith("n_groups"):
        return 1
    if name == "image_size":
        return min(value, IMAGE)
    if name == "patch_size":
        return min(value, PATCH)
    return value


def _shrunk_value(name: str, value):
    """The tiny value for the config field `name` currently set to `value`, or `value` itself."""
    if isinstance(value, float) and (
        "dropout" in name
        or "drop_prob" in name
        or name.endswith("_pdrop")
        or "drop_path" in name
        or "layerdrop" in name
        or name in ("mask_time_prob", "mask_feature_prob", "router_jitter_noise", "jitter_noise")
    ):
        return 0.0  # no randomness in training mode: the consumer compares losses across runs
    if name == "apply_spec_augment" and value is True:
        return False
    if isinstance(value, float) and name in ("depth_multiplier", "width_multiplier", "width_coefficient"):
        return min(value, 0.25)  # MobileNet / EfficientNet channel multipliers
    if isinstance(value, float) and name == "depth_coefficient":
        return min(value, 1.0)
    if _is_int(value):
        return _shrunk_int(name, value)
    if _int_list(value):
        if name in ("image_size", "input_size") and len(value) == 2:
            return [min(v, IMAGE) for v in value]
        if name == "patch_size" and len(value) == 2:
            return [min(v, PATCH) for v in value]
        if name == "depths" or name.endswith("_depths"):
            return [min(v, LAYERS) for v in value]
        shrunk = [_shrunk_int(name, v) for v in value]
        return shrunk if shrunk != list(value) else value
    return value


_STAGE_LISTS = ("depths", "hidden_sizes", "embed_dims")

# Fields set by model type, after the generic rules.
_OVERRIDES = {
    # Hybrids whose first two layers would have no attention layer (theirs sit further down the stack): with these,
    # the two tiny layers hold one of each kind.
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    # Models that only work with as many key/value heads as query heads (ESMC's config says so; Moonshine's
    # cross-attention assumes it).
    "esmc": {"num_key_value_heads": HEADS},
    "moonshine": {"encoder_num_key_value_heads": HEADS, "decoder_num_key_value_heads": HEADS},
}


def _divisor(width: int, heads: int) -> int:
    """The largest head count <= `heads` that divides `width`."""
    return max(h for h in range(1, max(heads, 1) + 1) if width % h == 0)


def _truncate(values: list, length: int) -> list:
    """The first `length` per-layer entries, keeping each kind of layer (e.g. one full-attention layer) present."""
    kept = list(values[:length])
    for value in values:
        if value not in kept and length > 1:
            kept[-1] = value
            break
    return kept


def _fix_heads(kwargs: dict, merged: dict, original: dict) -> None:
    """Head counts that divide the (shrunk) widths they split, and key/value heads that divide the heads.

    Key/value heads are grouped (KV_HEADS of them for 4 query heads) wherever the config has them, even where the
    default config has as many as query heads, except for multi-head latent attention, which needs them equal.
    """
    hidden = merged.get("hidden_size", merged.get("d_model", merged.get("embed_dim", HIDDEN)))
    explicit_head_dim = _is_int(merged.get("head_dim")) or _is_int(merged.get("d_kv"))
    for name, value in merged.items():
        if not (name in _HEAD_NAMES or name.endswith("attention_heads")):
            continue
        if _is_int(value) and _is_int(hidden) and not explicit_head_dim and hidden % value:
            kwargs[name] = _divisor(hidden, value)
        elif _int_list(value):
            # Hierarchical vision models: one head count per stage; stage widths double unless listed.
            widths = next(
                (
                    merged[k]
                    for k in ("hidden_sizes", "embed_dims", "hidden_dims", "dims", "embed_dim")
                    if _int_list(merged.get(k)) and len(merged[k]) == len(value)
                ),
                [hidden * 2**i for i in range(len(value))] if _is_int(hidden) else None,
            )
            if widths:
                kwargs[name] = [_divisor(w, h) for w, h in zip(widths, value)]
    for name, kv in merged.items():
        if not (name in _KV_HEAD_NAMES or name.endswith("key_value_heads")) or not _is_int(kv):
            continue
        heads_name = next(
            (
                n
                for n in (name.replace("key_value", "attention"), name.replace("kv_", ""), "num_attention_heads")
                if _is_int(merged.get(n)) and n != name
            ),
            None,
        )
        if heads_name is None:
            continue
        heads = kwargs.get(heads_name, merged[heads_name])
        # Multi-head latent attention (DeepSeek-V3 style) needs as many key/value heads as query heads.
        if original.get(name) == original.get(heads_name) and _is_int(merged.get("kv_lora_rank")):
            kwargs[name] = heads
        elif heads % kv:
            kwargs[name] = _divisor(heads, kv)


def _shrink(config: PreTrainedConfig, token_ids: dict[int, int], top: bool) -> PreTrainedConfig:
    """A tiny copy of `config` (sub-configs included), built again through its class so derived fields follow."""
    fields = _config_fields(config)
    current = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    kwargs = {}
    layer_counts = {}  # old count -> new count, to cut the per-layer lists
    for name, value in current.items():
        if name in ("transformers_version", "architectures", "dtype"):
            continue
        if isinstance(value, PreTrainedConfig):
            kwargs[name] = _shrink(value, token_ids, top=False)
            continue
        new = _remap_token_ids(name, _shrunk_value(name, value), token_ids)
        if _is_int(value) and any(_int_list(current.get(k)) and len(current[k]) == value for k in _STAGE_LISTS):
            new = value  # the number of stages of a hierarchical model (one entry per stage in `depths`)
        if _is_int(value) and _is_layer_count(name) and new != value and value > LAYERS:
            layer_counts[value] = new
        field = fields.get(name)
        if new is not value and new != value:
            kwargs[name] = new
        elif not top and field is not None and field.default is not None and value is not None:
            # Sub-configs are rebuilt from their class: keep what the parent set (its `init_kwargs`). Fields that
            # default to None are left out so that `__post_init__` derives them again.
            kwargs[name] = value
    for name, value in current.items():
        # Per-layer lists (layer types, per-layer sizes, ...) follow the new layer count.
        if isinstance(value, (list, tuple)) and len(value) in layer_counts and not name.endswith("depths"):
            kwargs[name] = _truncate([_shrunk_value(name, v) for v in value], layer_counts[len(value)])
        # Lists of layer indices must point at layers that still exist.
        elif _int_list(value) and "layer" in name and layer_counts and not _is_layer_count(name):
            count = min(layer_counts.values())
            if any(v >= count for v in value):
                kwargs[name] = [min(v, count - 1) for v in value]
    for name in ("head_dim", "vocab_size"):
        # Some defaults leave these unset although the modeling code reads them.
        if name in fields and current.get(name, 0) is None and (top or name == "head_dim"):
            kwargs[name] = HIDDEN // HEADS if name == "head_dim" else VOCAB
    _fix_heads(kwargs, {**current, **kwargs}, current)
    _fix_model_specific(type(config), kwargs, {**current, **kwargs})
    kwargs.update(_OVERRIDES.get(getattr(config, "model_type", ""), {}))
    return type(config)(**kwargs)


def _fix_model_specific(config_class: type, kwargs: dict, merged: dict) -> None:
    """Constraints between fields that the generic rules cannot know about."""
    hidden = merged.get("hidden_size")
    # Mamba-2 mixers: heads x head size must equal the expanded width.
    if _is_int(merged.get("expand")) and _is_int(merged.get("num_heads")) and _is_int(merged.get("head_dim")):
        if _is_int(hidden):
            kwargs["head_dim"] = hidden * merged["expand"] // merged["num_heads"]
    # Windowed hierarchical models (Swin): every stage must hold at least one whole window, so use 2x2 windows and
    # an image just big enough for the last stage.
    depths, patch = merged.get("depths"), merged.get("patch_size")
    if _is_int(merged.get("window_size")) and _int_list(depths) and _is_int(patch):
        kwargs["window_size"] = 2
        kwargs["image_size"] = patch * 2 * 2 ** (len(depths) - 1)
    rope = merged.get("rope_parameters")
    if "mrope_section" in getattr(config_class, "ignore_keys_at_rope_validation", ()):
        # The modeling code falls back to a full-size section when the config has none: give it a tiny one.
        rope = dict(rope or {"rope_type": "default"})
        rope.setdefault("mrope_section", [16, 24, 24])
    if isinstance(rope, dict):
        kwargs["rope_parameters"] = _fix_rope(rope, merged)
    if _int_list(merged.get("image_grid_pinpoints")) or isinstance(merged.get("image_grid_pinpoints"), list):
        kwargs["image_grid_pinpoints"] = [[IMAGE, IMAGE]]  # LLaVA-NeXT tiles: one tile of the tiny image size


def _fix_rope(rope: dict, merged: dict) -> dict:
    """Multimodal RoPE sections must add up to half the rotated head size."""
    rope = copy.deepcopy(rope)
    for params in [rope, *[v for v in rope.values() if isinstance(v, dict)]]:
        section = params.get("mrope_section")
        if not _int_list(section):
            continue
        head_dim = merged.get("head_dim")
        if not _is_int(head_dim):
            hidden, heads = merged.get("hidden_size"), merged.get("num_attention_heads")
            head_dim = hidden // heads if _is_int(hidden) and _is_int(heads) else HIDDEN // HEADS
        if _is_int(merged.get("qk_rope_head_dim")):
            head_dim = merged["qk_rope_head_dim"]
        rotated = int(head_dim * params.get("partial_rotary_factor", merged.get("partial_rotary_factor", 1.0)))
        half = rotated // 2
        scaled = [max(1, v * half // sum(section)) for v in section]
        scaled[0] += half - sum(scaled)
        params["mrope_section"] = scaled
    return rope


def _config_fields(config: PreTrainedConfig) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}


_TOKEN_FIELD = re.compile(r"(_token_id|_token_ids|_token_index|_id)$")


def _remap_token_ids(name: str, value, token_ids: dict[int, int]):
    """Special token ids beyond the tiny vocabulary are mapped to the top of it (the same id everywhere)."""
    if not _TOKEN_FIELD.search(name):
        return value
    if _is_int(value) and value >= VOCAB:
        if value not in token_ids:
            token_ids[value] = VOCAB - 1 - len(token_ids)
        return token_ids[value]
    if _int_list(value) and any(v >= VOCAB for v in value):
        return [_remap_token_ids(name, v, token_ids) for v in value]
    return value


def _all_token_ids(config: PreTrainedConfig, found: set[int] | None = None) -> set[int]:
    """Every special token id in `config` and its sub-configs (kept out of the random text)."""
    found = set() if found is None else found
    for name, value in vars(config).items():
        if isinstance(value, PreTrainedConfig):
            _all_token_ids(value, found)
        elif _TOKEN_FIELD.search(name):
            if _is_int(value) and 0 <= value < VOCAB:
                found.add(value)
            elif _int_list(value):
                found.update(v for v in value if 0 <= v < VOCAB)
    return found


def tiny_config(model_type: str, task: str = "base") -> PreTrainedConfig:
    """The default config of `model_type`, shrunk (see the module docstring); a new object on each call."""
    config = copy.deepcopy(_tiny_config(model_type))
    if task in ("sequence-classification", "image-classification", "audio-classification", "token-classification"):
        config.num_labels = NUM_LABELS
    return config


@functools.cache
def _tiny_config(model_type: str) -> PreTrainedConfig:
    """The shrunk config, with the pad / decoder-start ids that batches and losses need (shared: copy it)."""
    config_class = configuration_auto.CONFIG_MAPPING[model_type]
    config = _shrink(config_class(), {}, top=True)
    used = _all_token_ids(config)
    free = sorted(set(range(VOCAB)) - used)
    text = _text_config(config)
    if text is not None and getattr(text, "pad_token_id", 0) is None:
        # Sequence-classification heads find the last real token through the pad id, and need one for batches.
        text.pad_token_id = free.pop(0)
    if text is not None and text is not config and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(text, "pad_token_id", None)
    for sub in {id(c): c for c in (config, text) if c is not None}.values():
        if getattr(sub, "classifier_dropout", None) is None:
            sub.classifier_dropout = 0.0  # heads fall back to a dropout of 0.1 when it is unset
    if getattr(config, "is_encoder_decoder", False):
        # Configs leave the decoder start to the generation config, but training shifts labels with it.
        decoder = getattr(config, "decoder", None)
        decoder = decoder if isinstance(decoder, PreTrainedConfig) else text or config
        for name in ("pad_token_id", "decoder_start_token_id"):
            if getattr(config, name, None) is None:
                value = getattr(decoder, name, None)
                if value is None:
                    value = getattr(decoder, "bos_token_id", None) if name == "decoder_start_token_id" else None
                if value is None:
                    value = getattr(decoder, "pad_token_id", None)
                setattr(config, name, value if value is not None else free.pop(0))
    return config


def _text_config(config: PreTrainedConfig) -> PreTrainedConfig | None:
    try:
        return config.get_text_config(decoder=True)
    except ValueError:  # several candidate text configs (e.g. MusicGen): use the decoder
        decoder = getattr(config, "decoder", None)
        return decoder if isinstance(decoder, PreTrainedConfig) else None


# ----------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class _BatchSpec:
    """What a case's batch holds, beyond what the model class and config say."""

    model_type: str
    config: PreTrainedConfig
    model_class: type
    task: str
    image_tokens: int = 0  # image placeholder tokens per row, for models that splice image features into the text
    decoder_inputs: bool = False  # pass decoder_input_ids (for encoder-decoders that do not derive them from labels)


def _lengths() -> list[int]:
    """Rows of different lengths: the first row is full, the others are right-padded."""
    return [SEQ - 3 * (i % 3) for i in range(BATCH)]


def _vocab(config: PreTrainedConfig) -> int:
    text = _text_config(config) or config
    vocab = getattr(text, "vocab_size", None)
    return min(vocab, VOCAB) if _is_int(vocab) else VOCAB


def _random_text(config: PreTrainedConfig, gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Random token ids that are no special token of the config."""
    specials = _all_token_ids(config)
    allowed = torch.tensor([i for i in range(_vocab(config)) if i not in specials])
    return allowed[torch.randint(len(allowed), shape, generator=gen)]


def _image_token_id(config: PreTrainedConfig):
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if _is_int(value):
            return value
    return None


def _image_prefix(config: PreTrainedConfig, count: int) -> torch.Tensor:
    """The image placeholder tokens that start each row, between vision start / end tokens where the model has them."""
    if not count:
        return torch.zeros(0, dtype=torch.long)
    ids = [_image_token_id(config)] * count
    start, end = getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None)
    if _is_int(start) and _is_int(end):
        ids = [start, *ids, end]
    return torch.tensor(ids)


def _text_inputs(spec: _BatchSpec, gen: torch.Generator) -> dict:
    config = spec.config
    text = _text_config(config) or config
    prefix = len(_image_prefix(config, spec.image_tokens))
    input_ids = _random_text(config, gen, (BATCH, prefix + SEQ))
    attention_mask = torch.ones(BATCH, prefix + SEQ, dtype=torch.long)
    eos = getattr(text, "eos_token_id", None)
    eos = eos[0] if _int_list(eos) else eos
    pad_id = getattr(text, "pad_token_id", None)
    image = _image_prefix(config, spec.image_tokens)
    for row, length in enumerate(_lengths()):
        length += prefix
        attention_mask[row, length:] = 0
        input_ids[row, :prefix] = image
        if _is_int(eos) and 0 <= eos < _vocab(config):
            input_ids[row, length - 1] = eos  # BART-style classification heads pool at the end-of-sequence token
        if _is_int(pad_id) and 0 <= pad_id < _vocab(config):
            input_ids[row, length:] = pad_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _vision_config(config: PreTrainedConfig) -> PreTrainedConfig:
    for name in ("vision_config", "encoder", "backbone_config", "image_config"):
        sub = getattr(config, name, None)
        if isinstance(sub, PreTrainedConfig):
            return _vision_config(sub)
    return config


def _image_size(config: PreTrainedConfig) -> tuple[int, int]:
    size = getattr(config, "image_size", IMAGE)
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    if isinstance(size, dict):
        return int(size.get("height", IMAGE)), int(size.get("width", IMAGE))
    return (int(size), int(size)) if _is_int(size) else (IMAGE, IMAGE)


def _pixel_values(config: PreTrainedConfig, gen: torch.Generator, params) -> dict:
    """Images as the model takes them: (batch, channels, height, width), or with a frame / tile axis."""
    vision = _vision_config(config)
    if "image_grid_thw" in params or "grid_thw" in params:
        return _patch_grid(vision, gen, params)
    channels = getattr(vision, "num_channels", 3)
    height, width = _image_size(vision)
    frames = getattr(vision, "num_frames", None)
    if _is_int(frames):  # video models take (batch, frames, channels, height, width)
        return {"pixel_values": torch.randn(BATCH, frames, channels, height, width, generator=gen)}
    tiles = 2 if "image_grid_pinpoints" in vars(config) else 1 if "pixel_attention_mask" in params else 0
    shape = (BATCH, tiles, channels, height, width) if tiles else (BATCH, channels, height, width)
    batch = {"pixel_values": torch.randn(*shape, generator=gen)}
    if "image_sizes" in params and (tiles == 2 or getattr(vision, "model_type", "") == "pixtral"):
        batch["image_sizes"] = torch.tensor([[height, width]] * BATCH)  # tiled (LLaVA-NeXT) or any-size (Pixtral)
    return batch


def _patch_grid(vision: PreTrainedConfig, gen: torch.Generator, params) -> dict:
    """Qwen2-VL-style images: all patches of the batch flattened in one matrix, with each image's patch grid."""
    patch = vision.patch_size if _is_int(vision.patch_size) else vision.patch_size[0]
    temporal = getattr(vision, "temporal_patch_size", 1)
    temporal = temporal if _is_int(temporal) else 1
    merge = getattr(vision, "spatial_merge_size", 1)
    merge = merge if _is_int(merge) else 1
    channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", None) or 3
    side = max(merge, IMAGE // patch // merge * merge)
    pixels = torch.randn(BATCH * side * side, channels * temporal * patch * patch, generator=gen)
    grid = torch.tensor([[1, side, side]] * BATCH)
    if "image_grid_thw" in params:
        return {"pixel_values": pixels, "image_grid_thw": grid}
    return {"hidden_states" if "hidden_states" in params else "pixel_values": pixels, "grid_thw": grid}


def _audio_inputs(main: str, config: PreTrainedConfig, gen: torch.Generator) -> dict:
    audio = getattr(config, "audio_config", None) or getattr(config, "encoder", None) or config
    if main == "input_values":
        return {"input_values": torch.randn(BATCH, AUDIO_SAMPLES, generator=gen)}
    mel = getattr(audio, "num_mel_bins", None)
    if _is_int(mel):  # Whisper-style (batch, mel bins, frames): two frames per encoder position
        frames = 2 * getattr(audio, "max_source_positions", AUDIO_FRAMES // 2)
        return {"input_features": torch.randn(BATCH, mel, frames, generator=gen)}
    size = getattr(audio, "input_feat_per_channel", None) or getattr(audio, "feature_size", None) or 80
    size *= getattr(audio, "input_channels", 1)
    return {"input_features": torch.randn(BATCH, AUDIO_FRAMES, size, generator=gen)}


def _make_batch(spec: _BatchSpec) -> dict:
    """A fresh batch for the case (the same tensors on every call: the generator is seeded by the model type)."""
    gen = torch.Generator().manual_seed(zlib.crc32(spec.model_type.encode()))
    config, model_class, task = spec.config, spec.model_class, spec.task
    params = inspect.signature(model_class.forward).parameters
    main = model_class.main_input_name
    batch: dict = {}
    if "grid_thw" in params:  # vision towers of Qwen2-VL-style models (whatever their `main_input_name` says)
        batch.update(_pixel_values(config, gen, params))
    elif main == "input_ids" and ("input_ids" in params or "pixel_values" not in params):
        batch.update(_text_inputs(spec, gen))
        if "attention_mask" not in params:
            del batch["attention_mask"]
        if "pixel_values" in params and (spec.image_tokens or task == "base"):
            batch.update(_pixel_values(config, gen, params))
        if "mm_token_type_ids" in params and spec.image_tokens:  # 1 marks image tokens (multimodal RoPE)
            batch["mm_token_type_ids"] = (batch["input_ids"] == _image_token_id(config)).int()
        if "bbox" in params:  # layout models: one box (x0, y0, x1, y1) per token, on a 0-1000 grid
            corner = torch.randint(0, 500, (BATCH, batch["input_ids"].shape[1], 2), generator=gen)
            batch["bbox"] = torch.cat([corner, corner + 100], dim=-1)
    elif main in ("pixel_values", "input_ids"):  # some vision towers inherit `main_input_name = "input_ids"`
        batch.update(_pixel_values(config, gen, params))
    elif main in ("input_values", "input_features"):
        batch.update(_audio_inputs(main, config, gen))
    elif main == "inputs" and isinstance(getattr(config, "encoder", None), PreTrainedConfig):
        # Speech encoder-decoders take whatever their encoder takes: raw audio for wav2vec2-style encoders.
        raw = _is_int(getattr(config.encoder, "num_feat_extract_layers", None))
        batch.update(_audio_inputs("input_values" if raw else "input_features", config, gen))
    else:
        raise NotImplementedError(f"main input {main!r} is not one the zoo makes")
    if "noise" in params and "pixel_values" in batch and batch["pixel_values"].dim() == 4:
        # ViT-MAE masks patches at random unless given the noise that ranks them.
        vision = _vision_config(config)
        height, width = _image_size(vision)
        patch = getattr(vision, "patch_size", PATCH)
        batch["noise"] = torch.rand(BATCH, (height // patch) * (width // patch), generator=gen)
    labels = _labels(spec, batch, gen)
    if labels is not None:
        batch["labels"] = labels
        if spec.decoder_inputs:
            start = getattr(config, "decoder_start_token_id", None)
            start = start if _is_int(start) else 0
            batch["decoder_input_ids"] = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], 1)
    return batch


def _labels(spec: _BatchSpec, batch: dict, gen: torch.Generator):
    config, task = spec.config, spec.task
    if task in ("sequence-classification", "image-classification", "audio-classification"):
        return torch.randint(NUM_LABELS, (BATCH,), generator=gen)
    if task == "token-classification":
        labels = torch.randint(NUM_LABELS, batch["input_ids"].shape, generator=gen)
        labels[batch.get("attention_mask", labels) == 0] = -100
        return labels
    if task == "ctc":
        return _random_text(config, gen, (BATCH, 2))
    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    if task in ("seq2seq-lm", "speech-seq2seq") or (encoder_decoder and task == "image-text-to-text"):
        return _random_text(config, gen, (BATCH, SEQ - 2))
    if task in ("causal-lm", "masked-lm", "image-text-to-text") and "input_ids" in batch:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        labels[:, : len(_image_prefix(config, spec.image_tokens))] = -100
        return labels
    return None


# ----------------------------------------------------------------------------------------------------------------
# Enumeration and checks


def _kind(model_type: str, model: PreTrainedModel, batch: dict) -> str:
    """What the case is, for test ids and reports: its input modality, and for text its attention pattern."""
    config = model.config
    if "pixel_values" in batch and "input_ids" in batch:
        modality = "multimodal"
    elif "grid_thw" in batch:
        modality = "vision"
    elif "pixel_values" in batch:
        modality = "video" if _is_int(getattr(_vision_config(config), "num_frames", None)) else "vision"
    elif "input_values" in batch or "input_features" in batch:
        modality = "audio"
    else:
        modality = ""
    # Encoder-decoder configs also serve encoder-only heads (e.g. Whisper's audio classification).
    has_decoder = any(name.split(".")[-1] == "decoder" for name, _ in model.named_modules() if name.count(".") < 2)
    if getattr(config, "is_encoder_decoder", False) and has_decoder:
        return f"{modality}-encoder-decoder" if modality else "encoder-decoder"
    if modality:
        return modality
    causal = model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return "decoder" if causal and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES else "encoder"


def _candidates(model_type: str, config_class: type) -> list[tuple[str, str]]:
    """Head class names for `model_type` in order of preference, with their task."""
    preference = list(HEADS_PREFERENCE)
    if _default_is_encoder_decoder(config_class):
        # An encoder-decoder's `...ForCausalLM` is its decoder alone: prefer the whole model.
        causal = preference.pop(3)
        preference.insert(4, causal)
    found, seen = [], set()
    for mapping_name, task in preference:
        mapping = getattr(modeling_auto, mapping_name, None)
        if not mapping or model_type not in mapping:
            continue
        names = mapping[model_type]
        name = names[0] if isinstance(names, (list, tuple)) else names
        if name not in seen:
            seen.add(name)
            found.append((name, task))
    return found


def _default_is_encoder_decoder(config_class: type) -> bool:
    field = {f.name: f for f in dataclasses.fields(config_class)}.get("is_encoder_decoder")
    return bool(field is not None and field.default is True)


def _finite(output) -> bool:
    """Whether every floating tensor in a model output (nested tuples/dicts included) is finite."""
    if isinstance(output, torch.Tensor):
        return not output.is_floating_point() or bool(torch.isfinite(output).all())
    if isinstance(output, dict):
        return all(_finite(v) for v in output.values())
    if isinstance(output, (list, tuple)):
        return all(_finite(v) for v in output)
    return True


def _same(first, second) -> bool:
    """Whether two model outputs hold the same tensors (nested tuples/dicts included)."""
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and first.shape == second.shape and torch.equal(first, second)
    if isinstance(first, dict):
        return (
            isinstance(second, dict)
            and first.keys() == second.keys()
            and all(_same(v, second[k]) for k, v in first.items())
        )
    if isinstance(first, (list, tuple)):
        return isinstance(second, (list, tuple)) and len(first) == len(second) and all(map(_same, first, second))
    return True


def _reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if message.endswith(":") and len(lines) > 1:  # validation errors put the reason on the next line
        message = f"{message} {lines[1]}"
    return f"{type(error).__name__}: {message[:200]}".strip()


def _check(case: TinyModel, model: PreTrainedModel | None = None) -> PreTrainedModel:
    """Raise unless an eval forward and a training forward (with a finite loss when labels are given) both work.

    `model`, when given, is `build(case)` made earlier (and not trained since). Returns the model checked.
    """
    model = build(case) if model is None else model
    size = sum(p.numel() for p in model.parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"not tiny after shrinking: {size:,} parameters")
    model.eval()
    with torch.no_grad():
        output = model(**case.make_inputs())
    if not _finite(output):
        raise FloatingPointError("eval forward is not finite")
    model.train()
    batch = case.make_inputs()
    output = model(**batch)
    if "labels" in batch:
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is None:
            raise ValueError("training forward with labels returned no loss")
        if not torch.isfinite(loss).all():
            raise FloatingPointError("training loss is not finite")
    elif not _finite(output):
        raise FloatingPointError("training forward is not finite")
    # Nothing random may remain in training mode (sampled patches, noise, a dropout the config does not reach):
    # the consumer compares losses of separate forwards.
    if not _same(output, model(**case.make_inputs())):
        raise ValueError("training forward is not deterministic (two forwards on the same batch differ)")
    return model


# Inputs of the towers of multimodal models (not of bare embeddings such as VisualBERT's `visual_embeds`).
_MODALITY_INPUTS = (
    "pixel_values",
    "pixel_values_videos",
    "flattened_patches",
    "image_pixel_values",
    "input_features",
    "input_values",
    "audio_values",
    "audio_input_features",
    "protein_input_ids",
)
_IMAGE_FEATURES = re.compile(r"image tokens do not match.*features:?\s*(\d+)", re.IGNORECASE | re.DOTALL)


def _probe_image_tokens(spec: _BatchSpec) -> tuple[list[int], PreTrainedModel]:
    """How many image placeholder tokens a row may need: run once with one and read the model's complaint.

    Models report the image features either as rows or as numbers (rows x width): both counts are returned, with
    the model built for the probe (to be checked next rather than built again).
    """
    probe = dataclasses.replace(spec, image_tokens=1)  # some models only look at images when tokens ask for them
    case = TinyModel(spec.model_type, spec.model_class, spec.config, functools.partial(_make_batch, probe), "", True)
    model = build(case).eval()
    try:
        with torch.no_grad():
            model(**case.make_inputs())
    except Exception as error:
        match = _IMAGE_FEATURES.search(str(error))
        if not match:
            raise
        features = int(match.group(1))
        width = getattr(_text_config(spec.config) or spec.config, "hidden_size", None)
        counts = [features // BATCH] if features % BATCH == 0 else []
        if _is_int(width) and features % (BATCH * width) == 0:
            counts.append(features // (BATCH * width))
        if counts:
            return counts, model
        raise
    return [1], model


def _case(model_type: str, class_name: str, task: str) -> TinyModel:
    model_class = getattr(transformers, class_name)
    config = tiny_config(model_type, task)
    spec = _BatchSpec(model_type, config, model_class, task)
    params = inspect.signature(model_class.forward).parameters
    variants, model = [spec], None
    if model_class.main_input_name == "input_ids" and "pixel_values" in params and _image_token_id(config) is not None:
        counts, model = _probe_image_tokens(spec)
        variants = [dataclasses.replace(spec, image_tokens=n) for n in counts]
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        variants += [dataclasses.replace(v, decoder_inputs=True) for v in variants]
    for i, variant in enumerate(variants):
        batch = _make_batch(variant)
        unused = [name for name in _MODALITY_INPUTS if name in params]
        if unused and not any(name in batch for name in _MODALITY_INPUTS):
            # A multimodal model fed text alone would leave its other towers out of every check.
            raise NotImplementedError(f"the zoo makes no {unused[0]} for it (text-only inputs)")
        case = TinyModel(
            id=model_type,
            model_class=model_class,
            config=config,
            make_inputs=functools.partial(_make_batch, variant),
            kind="",
            padded=bool((batch.get("attention_mask", torch.ones(1)) == 0).any()),
        )
        try:
            case.kind = _kind(model_type, _check(case, model if i == 0 else None), batch)
            return case
        except Exception:
            if i == len(variants) - 1:
                raise
    raise AssertionError("unreachable")


def _try_model_type(model_type: str) -> TinyModel | str:
    """The kept case for `model_type`, or the reason it is skipped."""
    try:
        config_class = configuration_auto.CONFIG_MAPPING[model_type]
    except Exception as error:  # missing optional package, ...
        return f"config: {_reason(error)}"
    if model_type in NOT_TINY:
        return NOT_TINY[model_type]
    candidates = _candidates(model_type, config_class)
    if not candidates:
        return "no model class in the auto mappings"
    try:
        _tiny_config(model_type)
    except Exception as error:  # the same for every head: no need to try them all
        return f"config: {_reason(error)}"
    first_reason = None
    for class_name, task in candidates[:MAX_HEADS_TRIED]:
        try:
            return _case(model_type, class_name, task)
        except Exception as error:
            if first_reason is None:
                first_reason = f"{class_name}: {_reason(error)}"
    return first_reason


@contextlib.contextmanager
def _walk_settings():
    """One thread, and no logging or warnings (they say nothing actionable here), while the zoo is walked."""
    logger = logging.getLogger("transformers")
    level = logger.level
    threads = torch.get_num_threads()
    logger.setLevel(logging.ERROR)
    # One thread: these matrices are tiny, and on a busy machine waiting for the other threads costs 1000x more.
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(threads)
        logger.setLevel(level)


@functools.cache
def tiny_models() -> tuple[list[TinyModel], dict[str, str]]:
    """(cases that build and run, {model_type: reason} for every model type that was skipped)."""
    kept, skipped = [], {}
    with _walk_settings():
        for model_type in configuration_auto.CONFIG_MAPPING_NAMES:
            result = _try_model_type(model_type)
            if isinstance(result, TinyModel):
                kept.append(result)
            else:
                skipped[model_type] = result
    return kept, skipped


def _main() -> None:
    """Print what the zoo keeps and, grouped by reason, what it skips."""
    start = time.perf_counter()
    kept, skipped = tiny_models()
    elapsed = time.perf_counter() - start
    total = len(kept) + len(skipped)
    print(f"{len(kept)} kept, {len(skipped)} skipped, of {total} model types, in {elapsed:.1f}s")
    kinds: dict[str, list[str]] = {}
    for case in kept:
        kinds.setdefault(case.kind, []).append(case.id)
    for kind, ids in sorted(kinds.items(), key=lambda item: -len(item[1])):
        indent = {"initial_indent": f"{len(ids):4d} {kind}: ", "subsequent_indent": " " * 6}
        print(textwrap.fill(", ".join(ids), 119, break_on_hyphens=False, **indent))
    print("\nskipped, by reason:")
    reasons: dict[str, list[str]] = {}
    for model_type, reason in skipped.items():
        head, _, rest = reason.partition(": ")
        # "SomeModelForX: ValueError: ..." groups with the same error from other model classes.
        reasons.setdefault(rest if head[:1].isupper() and head.isidentifier() and rest else reason, []).append(
            model_type
        )
    for reason, types in sorted(reasons.items(), key=lambda item: (-len(item[1]), item[0])):
        print(f"{len(types):4d} {reason[:160]}")
        print(
            textwrap.fill(
                ", ".join(types), 119, break_on_hyphens=False, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
        )


if __name__ == "__main__":
    _main()
