"""Tiny models built from configs (no Hub access) and registry hygiene shared by the tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AttentionInterface,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    DeiTConfig,
    DeiTForImageClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import attentiondrop_hf  # noqa: E402,F401
from attentiondrop_hf.registry import registered_variants  # noqa: E402

torch.set_num_threads(2)

VOCAB = 64
SHARED_DATA = os.environ.get(
    "ATTENTIONDROP_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)


# Two layers (so `layers` can pick one), four heads, width 32, no dropout: small, deterministic models.
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
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
)


def _tiny(config_class, model_class, defaults, overrides):
    return model_class(config_class(**{**defaults, **overrides}))


def tiny_vit(**overrides):
    return _tiny(ViTConfig, ViTForImageClassification, _VISION, overrides)


def tiny_deit(**overrides):
    return _tiny(DeiTConfig, DeiTForImageClassification, _VISION, overrides)


def tiny_bert(**overrides):
    defaults = dict(_ENCODER, vocab_size=VOCAB, max_position_embeddings=64)
    return _tiny(BertConfig, BertForSequenceClassification, defaults, overrides)


def tiny_marian(**overrides):
    defaults = dict(_SEQ2SEQ, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1)
    return _tiny(MarianConfig, MarianMTModel, defaults, overrides)


def tiny_bart(**overrides):
    return _tiny(BartConfig, BartForConditionalGeneration, _SEQ2SEQ, overrides)


def tiny_llama(**overrides):
    defaults = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped KV heads
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return _tiny(LlamaConfig, LlamaForCausalLM, defaults, overrides)


def tiny_t5(**overrides):
    """Relative position bias enters the logits: the key-blur fast path cannot apply."""
    defaults = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    return _tiny(T5Config, T5ForConditionalGeneration, defaults, overrides)


def image_batch(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}


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


@pytest.fixture(autouse=True)
def restore_registries():
    """Tests may register variants and attention functions; put every registry back afterwards."""
    variants = dict(registered_variants())
    attention = dict(AttentionInterface._global_mapping)
    masks = dict(AttentionMaskInterface._global_mapping)
    yield
    registered_variants().clear()
    registered_variants().update(variants)
    AttentionInterface._global_mapping.clear()
    AttentionInterface._global_mapping.update(attention)
    AttentionMaskInterface._global_mapping.clear()
    AttentionMaskInterface._global_mapping.update(masks)
