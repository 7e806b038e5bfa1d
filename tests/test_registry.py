"""The variant registry: a user's variant brings its own flag and runs end to end; bad registrations raise."""

import copy
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from testing_common import image_batch, tiny_vit
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attentiondrop_hf import AttentionDropConfig, AttentionDropVariant, enable_attentiondrop, register_variant
from attentiondrop_hf.hf.plan import model_plan_of
from attentiondrop_hf.variants import get_variant, registered_variants
from attentiondrop_hf.variants.base import is_number


@dataclass
class TemperatureOptions:
    temperature: float = field(default=2.0, metadata={"help": "temperature: divide every logit by this (> 0)."})

    def __post_init__(self):
        if not is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"`temperature` must be a number > 0, got {self.temperature!r}")


def register_temperature_variant():
    """The README's example: a variant with a flag of its own."""

    @register_variant("temperature")
    class Temperature(AttentionDropVariant):
        options_class = TemperatureOptions

        @staticmethod
        def is_identity(options):
            return options.temperature == 1.0

        @staticmethod
        def perturb_logits(logits, attendable, options, draws, call):
            return logits / options.temperature, attendable

        @staticmethod
        def describe(options):
            return f"every logit divided by {options.temperature}."

    return Temperature


def test_user_variant_with_its_own_flag_runs_end_to_end_and_round_trips(tmp_path):
    register_temperature_variant()
    torch.manual_seed(0)
    model = enable_attentiondrop(tiny_vit(initializer_range=0.2), variant="temperature", temperature=4.0)
    assert model.config.attentiondrop["temperature"] == 4.0
    reference = copy.deepcopy(model)

    def scaled_sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling / 4, **kwargs)

    AttentionInterface.register("adtest_scaled", scaled_sdpa)
    AttentionMaskInterface.register("adtest_scaled", sdpa_mask)
    reference.set_attn_implementation("adtest_scaled")
    got = model.train()(**image_batch()).logits
    torch.testing.assert_close(got, reference.train()(**image_batch()).logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(got, model.eval()(**image_batch()).logits)

    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, attn_implementation="attentiondrop")
    assert model_plan_of(reloaded).settings.options == TemperatureOptions(temperature=4.0)


def test_user_variant_flags_are_validated_and_other_variants_flags_warn():
    register_temperature_variant()
    with pytest.raises(ValueError, match=r"`temperature` must be a number > 0, got -1"):
        AttentionDropConfig(variant="temperature", temperature=-1)
    with pytest.warns(UserWarning, match=r"'hard' ignores \['temperature'\]"):
        AttentionDropConfig(variant="hard", temperature=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttentionDropConfig(variant="hard", temperature=2.0)  # at its default
    with pytest.raises(ValueError, match=r"`variant` must be one of \['blur', 'blur2d', 'hard', 'temperature'\]"):
        get_variant("nope")


def test_variant_validate_sees_the_common_flags():
    @register_variant("self_only")
    class SelfOnly(AttentionDropVariant):
        @staticmethod
        def validate(config):
            if config.targets is not None and config.targets != ["self"]:
                raise ValueError(f"variant 'self_only' perturbs self-attention only, got targets {config.targets}")

        @staticmethod
        def perturb_logits(logits, attendable, options, draws, call):
            return logits, attendable

    with pytest.raises(ValueError, match=r"perturbs self-attention only, got targets \['causal'\]"):
        AttentionDropConfig(variant="self_only", targets=["causal"])
    assert AttentionDropConfig(variant="self_only").variant == "self_only"


def test_bad_registrations_raise():
    with pytest.raises(ValueError, match="variant name must match"):
        register_variant("Hard")
    with pytest.raises(ValueError, match="'hard' is already registered; pass override=True"):
        register_variant("hard")
    with pytest.raises(TypeError, match="expects a subclass of AttentionDropVariant"):
        register_variant("plain")(object)
    with pytest.raises(TypeError, match="must implement perturb_logits"):
        register_variant("empty")(type("Empty", (AttentionDropVariant,), {}))

    def variant_with(options_class):
        body = {
            "options_class": options_class,
            "perturb_logits": staticmethod(lambda logits, attendable, options, draws, call: (logits, attendable)),
        }
        return type("WithOptions", (AttentionDropVariant,), body)

    @dataclass
    class Undocumented:
        strength: float = 1.0

    @dataclass
    class TakesCommonFlag:
        targets: float = field(default=1.0, metadata={"help": "clashes with a common flag"})

    @dataclass
    class TakesHardFlag:
        p: float = field(default=0.1, metadata={"help": "clashes with hard's `p`"})

    cases = [
        (dict, TypeError, "options_class must be a dataclass"),
        (Undocumented, ValueError, r"options \['strength'\] need metadata"),
        (TakesCommonFlag, ValueError, r"options \['targets'\] are common AttentionDrop flags"),
        (TakesHardFlag, ValueError, r"options already belong to other variants: \{'p': 'hard'\}"),
    ]
    for options_class, error, message in cases:
        with pytest.raises(error, match=message):
            register_variant("bad_options")(variant_with(options_class))
    assert "bad_options" not in registered_variants()


def test_override_replaces_a_variant_and_keeps_its_flags():
    original = get_variant("blur")
    replacement = register_variant("blur", override=True)(type("MyBlur", (original,), {}))
    assert get_variant("blur") is replacement
    assert AttentionDropConfig(variant="blur", blur_width=7).options.blur_width == 7
