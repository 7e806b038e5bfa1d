"""The variant registry: a user's variant runs end to end; bad registrations raise."""

import copy

import pytest
import torch
from conftest import image_batch, tiny_vit
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attentiondrop_hf import AttentionDropConfig, AttentionDropVariant, enable_attentiondrop, register_variant
from attentiondrop_hf.registry import get_variant


def register_scale_variant():
    @register_variant("scale")
    class ScaleLogits(AttentionDropVariant):
        """Multiply every logit by (1 - p): a temperature, equal to SDPA with a smaller `scaling`."""

        config_fields = ("p",)

        @staticmethod
        def perturb_logits(logits, attendable, config, draws, causal):
            return logits * (1 - config.p), attendable

    return ScaleLogits


def test_user_variant_runs_end_to_end():
    register_scale_variant()
    torch.manual_seed(0)
    model = enable_attentiondrop(tiny_vit(initializer_range=0.2), variant="scale", p=0.5)
    reference = copy.deepcopy(model)

    def scaled_sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling * 0.5, **kwargs)

    AttentionInterface.register("adtest_scaled", scaled_sdpa)
    AttentionMaskInterface.register("adtest_scaled", sdpa_mask)
    reference.set_attn_implementation("adtest_scaled")
    got = model.train()(**image_batch()).logits
    torch.testing.assert_close(got, reference.train()(**image_batch()).logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(got, model.eval()(**image_batch()).logits)


def test_user_variant_is_validated_and_listed():
    @register_variant("strict")
    class Strict(AttentionDropVariant):
        config_fields = ("top_k",)

        @staticmethod
        def validate(config):
            if config.top_k > 4:
                raise ValueError(f"`top_k` must be <= 4 for variant 'strict', got {config.top_k}")

        @staticmethod
        def perturb_logits(logits, attendable, config, draws, causal):
            return logits, attendable

    with pytest.raises(ValueError, match="`top_k` must be <= 4 for variant 'strict'"):
        AttentionDropConfig(variant="strict", top_k=8)
    assert AttentionDropConfig(variant="strict", top_k=2).variant == "strict"
    with pytest.raises(ValueError, match=r"`variant` must be one of \['blur', 'hard', 'strict'\]"):
        get_variant("nope")


def test_bad_registrations_raise():
    with pytest.raises(ValueError, match="variant name must match"):
        register_variant("Hard")
    with pytest.raises(ValueError, match="'hard' is already registered; pass override=True"):
        register_variant("hard")
    with pytest.raises(TypeError, match="expects a subclass of AttentionDropVariant"):
        register_variant("plain")(object)
    with pytest.raises(TypeError, match="must implement perturb_logits"):
        register_variant("empty")(type("Empty", (AttentionDropVariant,), {}))

    class UnknownFlag(AttentionDropVariant):
        config_fields = ("temperature",)
        perturb_logits = staticmethod(lambda logits, attendable, config, draws, causal: (logits, attendable))

    with pytest.raises(ValueError, match=r"declares unknown config_fields \['temperature'\]"):
        register_variant("unknown_flag")(UnknownFlag)


def test_override_replaces_a_variant():
    original = get_variant("blur")
    replacement = register_variant("blur", override=True)(type("MyBlur", (original,), {}))
    assert get_variant("blur") is replacement
