"""The one table of tiny models the tests run on, and the batches they take (no Hub access).

Every row is a `ModelCase` of the same shape (PEFT's `TEST_CASES` pattern): the shared checks in the test modules
select rows by what they need (`cases(...)`). Models have two layers per stack (so `layers` can pick one), four
heads, width 32 and no dropout unless a test asks for it.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers as tf

VOCAB = 64
SHARED_DATA = os.environ.get(
    "ATTENTIONDROP_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)

_ENCODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    num_labels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
_VISION = dict(_ENCODER, image_size=16, patch_size=4)
_SEQ2SEQ = dict(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
    decoder_start_token_id=0,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,  # M2M100's default 0.05 skips layers at random in training
    decoder_layerdrop=0.0,
)
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped KV heads
    max_position_embeddings=64,
    pad_token_id=0,
)


# ---- batches ---------------------------------------------------------------------------------------------------


def image_batch(batch=3, seed=0, size=16):
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}


def text_batch(batch=3, length=9, seed=0, padded=True):
    """Token ids with right padding (id 0) in every example but the first when `padded`."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        for row in range(1, batch):
            attention_mask[row, length - 2 * row :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def seq2seq_batch(batch=3, source_len=9, target_len=6, seed=0):
    inputs = text_batch(batch, source_len, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, target_len), generator=generator)
    return inputs


def audio_batch(batch=3, seed=0, target_len=6):
    """Whisper: log-mel features [B, mel bins, 2 * positions] and decoder ids."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_features": torch.randn(batch, 8, 32, generator=generator)}
    inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, target_len), generator=generator)
    return inputs


def clip_batch(batch=3, seed=0):
    return {**text_batch(batch, 7, seed, padded=False), **image_batch(batch, seed)}


# Labels for the trainer: one row per example, the collator stacks them.
def class_labels(batch, seed=0):
    return torch.arange(batch) % 3


def token_labels(inputs, key="input_ids"):
    """Causal LM labels: the inputs, -100 where padded."""
    labels = inputs[key].clone()
    if "attention_mask" in inputs:
        labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    return labels


def seq2seq_labels(batch, target_len=6, seed=0):
    """Target tokens padded with -100 to a fixed length (different lengths per example)."""
    generator = torch.Generator().manual_seed(seed + 7)
    labels = torch.randint(2, VOCAB, (batch, target_len), generator=generator)
    for i in range(batch):
        labels[i, target_len - (i % 3) :] = -100
    return labels


# ---- trainer helpers ---------------------------------------------------------------------------------------------

# TrainingArguments for tests: on the CPU, quiet, nothing saved unless a test asks.
QUIET_TRAINING = {"report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no"}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


# ---- the table ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    """One tiny model family.

    Attributes:
        id: short name, the pytest id.
        build: `build(**config_overrides)` -> a freshly initialised model.
        inputs: `inputs(batch=3, seed=0)` -> keyword arguments of `forward` (no labels).
        roles: the attention roles the model has (`targets` that perturb all of it).
        task: "classification", "token" (seq2seq or causal LM targets), or None (no trainer rows).
        labels: `labels(inputs)` -> labels for the trainer; None when `task` is None.
        tags: what else the case exercises ("padding", "causal", "position_bias", "composite", ...).
    """

    id: str
    build: Callable[..., torch.nn.Module]
    inputs: Callable[..., dict]
    roles: tuple[str, ...]
    task: str | None = None
    labels: Callable[[dict], torch.Tensor] | None = None
    tags: frozenset = field(default_factory=frozenset)

    def rows(self, n=8, seed=0):
        """`n` single examples with labels, for a Trainer dataset (seq2seq: no decoder inputs, as in a dataset; the
        model or the trainer builds them from the labels)."""
        inputs = self.inputs(batch=n, seed=seed)
        labels = self.labels(inputs)
        inputs.pop("decoder_input_ids", None)
        return [{**{k: v[i] for k, v in inputs.items()}, "labels": labels[i]} for i in range(n)]


def _tiny(config_class, model_class, defaults):
    def build(**overrides):
        return model_class(config_class(**{**defaults, **overrides}))

    return build


def _clip(**overrides):
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB)
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    vision.update(image_size=16, patch_size=4)
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, **overrides))


def _swin(**overrides):
    config = dict(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    config.update(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    return tf.SwinForImageClassification(tf.SwinConfig(**{**config, **overrides}))


def _beit(model_class):
    def build(**overrides):
        config = dict(_VISION, use_relative_position_bias=True, drop_path_rate=0.0, **overrides)
        return model_class(tf.BeitConfig(**config))

    return build


def _by_index(key="input_ids"):
    return lambda inputs: token_labels(inputs, key)


CASES = [
    ModelCase(
        "vit",
        _tiny(tf.ViTConfig, tf.ViTForImageClassification, _VISION),
        image_batch,
        ("self",),
        "classification",
        lambda inputs: class_labels(len(inputs["pixel_values"])),
        frozenset({"vision"}),
    ),
    ModelCase(
        "deit",
        _tiny(tf.DeiTConfig, tf.DeiTForImageClassification, _VISION),
        image_batch,
        ("self",),
        tags=frozenset({"vision"}),
    ),
    ModelCase(
        "bert",
        _tiny(tf.BertConfig, tf.BertForSequenceClassification, dict(_ENCODER, vocab_size=VOCAB)),
        text_batch,
        ("self",),
        "classification",
        lambda inputs: class_labels(len(inputs["input_ids"])),
        frozenset({"padding"}),
    ),
    ModelCase(
        "marian",
        _tiny(tf.MarianConfig, tf.MarianMTModel, dict(_SEQ2SEQ, forced_eos_token_id=1)),
        seq2seq_batch,
        ("self", "causal", "cross"),
        "token",
        lambda inputs: seq2seq_labels(len(inputs["input_ids"])),
        frozenset({"padding", "causal", "seq2seq"}),
    ),
    ModelCase(
        "bart",
        _tiny(tf.BartConfig, tf.BartForConditionalGeneration, _SEQ2SEQ),
        seq2seq_batch,
        ("self", "causal", "cross"),
        tags=frozenset({"padding", "causal", "seq2seq"}),
    ),
    ModelCase(
        "llama",
        _tiny(tf.LlamaConfig, tf.LlamaForCausalLM, _DECODER),
        text_batch,
        ("causal",),
        "token",
        _by_index(),
        frozenset({"padding", "causal", "decoder_only"}),
    ),
    ModelCase(
        "t5",
        _tiny(
            tf.T5Config,
            tf.T5ForConditionalGeneration,
            dict(
                vocab_size=VOCAB,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                dropout_rate=0.0,
                pad_token_id=0,
                decoder_start_token_id=0,
            ),
        ),
        seq2seq_batch,
        ("self", "causal", "cross"),
        tags=frozenset({"padding", "causal", "seq2seq", "position_bias"}),
    ),
    ModelCase(
        "gpt2",
        _tiny(
            tf.GPT2Config,
            tf.GPT2LMHeadModel,
            dict(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=1,
                eos_token_id=1,
                pad_token_id=0,
            ),
        ),
        text_batch,
        ("causal",),
        "token",
        _by_index(),
        frozenset({"padding", "causal", "decoder_only"}),
    ),
    ModelCase(
        "bert_lm",
        _tiny(tf.BertConfig, tf.BertLMHeadModel, dict(_ENCODER, vocab_size=VOCAB, is_decoder=True)),
        text_batch,
        ("causal",),
        "token",
        _by_index(),
        frozenset({"padding", "causal", "decoder_only"}),
    ),
    ModelCase(
        "mixtral",
        _tiny(
            tf.MixtralConfig,
            tf.MixtralForCausalLM,
            dict(
                _DECODER,
                num_local_experts=4,
                num_experts_per_tok=2,
                output_router_logits=True,
                router_aux_loss_coef=0.5,
            ),
        ),
        text_batch,
        ("causal",),
        "token",
        _by_index(),
        frozenset({"padding", "causal", "decoder_only", "router"}),
    ),
    ModelCase("clip", _clip, clip_batch, ("self",), tags=frozenset({"composite", "vision"})),
    ModelCase(
        "beit",
        _beit(tf.BeitForImageClassification),
        image_batch,
        ("self",),
        "classification",
        lambda inputs: class_labels(len(inputs["pixel_values"])),
        frozenset({"vision", "mask_bias"}),
    ),
    ModelCase(
        "swin",
        _swin,
        image_batch,
        ("self",),
        "classification",
        lambda inputs: class_labels(len(inputs["pixel_values"])),
        frozenset({"vision", "mask_bias", "hierarchical"}),
    ),
    ModelCase(
        "albert",
        _tiny(
            tf.AlbertConfig,
            tf.AlbertForSequenceClassification,
            dict(_ENCODER, vocab_size=VOCAB, embedding_size=16, num_hidden_layers=3, classifier_dropout_prob=0.0),
        ),
        text_batch,
        ("self",),
        "classification",
        lambda inputs: class_labels(len(inputs["input_ids"])),
        frozenset({"padding", "shared_layers"}),
    ),
    ModelCase(
        "m2m100",
        _tiny(tf.M2M100Config, tf.M2M100ForConditionalGeneration, _SEQ2SEQ),
        seq2seq_batch,
        ("self", "causal", "cross"),
        "token",
        lambda inputs: seq2seq_labels(len(inputs["input_ids"])),
        frozenset({"padding", "causal", "seq2seq", "no_prepare_decoder_inputs"}),
    ),
    ModelCase(
        "whisper",
        _tiny(
            tf.WhisperConfig,
            tf.WhisperForConditionalGeneration,
            dict(_SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=16),
        ),
        audio_batch,
        ("self", "causal", "cross"),
        "token",
        lambda inputs: seq2seq_labels(len(inputs["input_features"])),
        frozenset({"causal", "seq2seq", "no_prepare_decoder_inputs"}),
    ),
]
CASES_BY_ID = {case.id: case for case in CASES}


def cases(*ids: str, tag: str | None = None, task: bool = False):
    """Rows of the table as pytest params: by id, by tag, or those with trainer labels."""
    chosen = [CASES_BY_ID[i] for i in ids] if ids else list(CASES)
    if tag is not None:
        chosen = [c for c in chosen if tag in c.tags]
    if task:
        chosen = [c for c in chosen if c.task is not None]
    import pytest

    return [pytest.param(case, id=case.id) for case in chosen]


def build(case_id: str, **overrides) -> torch.nn.Module:
    return CASES_BY_ID[case_id].build(**overrides)


# Initial weights ten times the default: peaked attention, so a perturbation visibly changes the outputs.
LARGE_INIT = {"initializer_range": 0.2}
LARGE_INIT_BY_CASE = {"marian": {"init_std": 0.2}, "m2m100": {"init_std": 0.2}, "whisper": {"init_std": 0.2}}


def build_peaked(case_id: str, **overrides) -> torch.nn.Module:
    """`build` with large initial weights (see `LARGE_INIT`)."""
    return build(case_id, **{**LARGE_INIT_BY_CASE.get(case_id, LARGE_INIT), **overrides})


def tiny_vit(**overrides):
    return build("vit", **overrides)


def tiny_marian(**overrides):
    return build("marian", **overrides)


def tiny_llama(**overrides):
    return build("llama", **overrides)


def write_translation_fixture(path, pairs=40):
    """A jsonl file of English-German pairs from a ten-word vocabulary: enough for a tokenizer and a few steps."""
    words_en = ["a", "dog", "runs", "the", "man", "eats", "red", "ball", "child", "plays"]
    words_de = ["ein", "hund", "rennt", "der", "mann", "isst", "rot", "ball", "kind", "spielt"]
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(pairs):
            picks = rng.integers(0, len(words_en), 5)
            pair = {"en": " ".join(words_en[i] for i in picks), "de": " ".join(words_de[i] for i in picks)}
            handle.write(json.dumps({"translation": pair}) + "\n")
    return path


def planned_attention_module(flags: dict, causal: bool = False) -> torch.nn.Module:
    """The attention module of a one-layer model set up with `flags` (ViT: bidirectional; Llama: causal, one key
    head per query head), in training mode: what `attentiondrop_attention_forward` reads (plan, config, causality)
    when it is called directly on tensors of any size."""
    from attentiondrop_hf import enable_attentiondrop
    from attentiondrop_hf.hf.plan import PLAN_ATTRIBUTE

    if causal:
        model = build("llama", num_hidden_layers=1, num_key_value_heads=_DECODER["num_attention_heads"])
    else:
        model = build("vit", num_hidden_layers=1)
    enable_attentiondrop(model, **flags)
    (module,) = [m for m in model.modules() if PLAN_ATTRIBUTE in m.__dict__ and m is not model]
    return module.train()
