"""AttentionDropConfig and `config.attentiondrop`: every validation error names its flag; the flags are plain data on
the config, validated when AttentionDrop is switched on (at load), read by composite models from their top config,
and round-trip through config.json."""

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from testing_common import build, image_batch, tiny_vit
from transformers import ViTConfig, ViTForImageClassification

from attentiondrop_hf import AttentionDropConfig, check_attentiondrop, enable_attentiondrop
from attentiondrop_hf.config import VERSION_KEY
from attentiondrop_hf.hf.plan import attention_modules, plan_of
from attentiondrop_hf.variants import HardOptions, UnknownVariantError

INVALID = [
    ({"p": 1.5}, "`p` must be in [0, 1]"),
    ({"p": -0.1}, "`p` must be in [0, 1]"),
    ({"p": float("nan")}, "`p` must be in [0, 1]"),
    ({"p": True}, "`p` must be in [0, 1]"),
    ({"top_k": 0}, "`top_k` must be an integer >= 1"),
    ({"top_k": 2.5}, "`top_k` must be an integer >= 1"),
    ({"hard_fill": "neg_inf"}, "`hard_fill` must be 'zero' or 'mask'"),
    ({"variant": "blur", "blur_width": 4}, "`blur_width` must be an odd integer >= 3"),
    ({"variant": "blur", "blur_width": 1}, "`blur_width` must be an odd integer >= 3"),
    ({"variant": "blur", "blur_sigma_min": -1.0}, "`blur_sigma_min` must be a finite number >= 0"),
    ({"variant": "blur", "blur_sigma_max": float("inf")}, "`blur_sigma_max` must be a finite number >= 0"),
    ({"variant": "blur", "blur_sigma_min": 2.0, "blur_sigma_max": 1.0}, "must not exceed `blur_sigma_max`"),
    ({"variant": "blur", "blur_sigma_per": "head"}, "`blur_sigma_per` must be 'example' or 'batch'"),
    ({"variant": "dropconnect"}, "`variant` must be one of ['blur', 'blur2d', 'hard']"),
    ({"targets": ["encoder"]}, "`targets` must be roles from ['self', 'causal', 'cross']"),
    ({"targets": []}, "`targets` must be None (the default roles) or a non-empty list"),
    ({"layers": [-1]}, "`layers` must hold layer indices >= 0"),
    ({"layers": []}, "`layers` must be None (all layers) or a non-empty list"),
    (
        {"base_attn_implementation": "flash_attention_2"},
        "`base_attn_implementation` must be None (the model's own) or",
    ),
    ({"top_kk": 3}, "unknown AttentionDrop flag(s) ['top_kk']"),
    ({"options": 3}, "`options` of variant 'hard' must be a HardOptions or a dict"),
    ({"options": {"p": 0.2}, "top_k": 3}, "either as `options` or by name, not both"),
]


@pytest.mark.parametrize("flags, message", INVALID, ids=[str(flags) for flags, _ in INVALID])
def test_invalid_flags_raise_naming_the_flag(flags, message):
    with pytest.raises(ValueError) as error:
        AttentionDropConfig(**flags)
    assert message in str(error.value)


def test_options_by_name_as_a_dict_or_as_the_variant_dataclass_are_the_same():
    by_name = AttentionDropConfig(p=0.2, top_k=3)
    assert by_name == AttentionDropConfig(options={"p": 0.2, "top_k": 3})
    assert by_name == AttentionDropConfig(options=HardOptions(p=0.2, top_k=3))
    assert by_name.options == HardOptions(p=0.2, top_k=3)
    assert by_name.to_dict() == {
        "variant": "hard",
        "targets": None,
        "layers": None,
        "base_attn_implementation": None,
        "schedule": "constant",
        "schedule_warmup": 0.1,
        "depth_rule": "uniform",
        "p": 0.2,
        "top_k": 3,
        "hard_fill": "zero",
        VERSION_KEY: by_name.to_dict()[VERSION_KEY],
    }


def test_unknown_flag_raises_but_newer_release_flags_are_dropped_with_a_warning():
    with pytest.raises(ValueError, match=r"unknown AttentionDrop flag\(s\) \['top_kk'\]"):
        AttentionDropConfig.from_dict({"top_kk": 3})
    with pytest.warns(UserWarning, match=r"dropping flags .* \['new_flag'\]"):
        settings = AttentionDropConfig.from_dict({"p": 0.2, "new_flag": 1, VERSION_KEY: "99.0.0"})
    assert settings.options.p == 0.2


def test_flags_of_another_variant_warn_that_they_are_ignored():
    with pytest.warns(UserWarning, match=r"'blur' ignores \['top_k'\]"):
        AttentionDropConfig(variant="blur", top_k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttentionDropConfig(variant="blur", blur_width=7, top_k=8)  # another variant's flag at its default: silent


def test_values_beyond_the_papers_regime_warn():
    with pytest.warns(UserWarning, match=r"p <= 0.5 .* got p=0.6"):
        AttentionDropConfig(p=0.6)
    with pytest.warns(UserWarning, match=r"blur_width <= 9 .* got blur_width=11"):
        AttentionDropConfig(variant="blur", blur_width=11)


def test_normalisation_and_dict_round_trip():
    settings = AttentionDropConfig(targets=["cross", "self"], layers=[3, 1, 3])
    assert settings.targets == ["self", "cross"] and settings.layers == [1, 3]
    assert AttentionDropConfig.from_dict(settings.to_dict()) == settings
    assert json.loads(json.dumps(settings.to_dict())) == settings.to_dict()


def test_default_targets_are_self_attention_and_the_causal_attention_of_decoder_only_stacks():
    settings = AttentionDropConfig()
    assert settings.targets_role("self", decoder_only_stack=False)
    assert settings.targets_role("causal", decoder_only_stack=True)
    assert not settings.targets_role("causal", decoder_only_stack=False)  # a seq2seq decoder: the paper leaves it
    assert not settings.targets_role("cross", decoder_only_stack=False)
    explicit = AttentionDropConfig(targets=["self"])
    assert not explicit.targets_role("causal", decoder_only_stack=True)


def test_config_attribute_is_plain_data_validated_when_switched_on(tmp_path):
    config = ViTConfig()
    assert config.attentiondrop is None and "attentiondrop" not in config.to_diff_dict()
    config.attentiondrop = {"variant": "blur", "blur_width": 7}
    assert type(config.attentiondrop) is dict  # nothing parsed or cached on the config
    assert json.loads(config.to_json_string())["attentiondrop"]["blur_width"] == 7
    tiny_vit().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`top_k` must be an integer"):
        ViTForImageClassification.from_pretrained(
            tmp_path, attn_implementation="attentiondrop", attentiondrop={"top_k": 0}
        )
    config.attentiondrop = {"p": 2}
    with pytest.raises(ValueError, match="`p` must be in"):
        ViTForImageClassification._from_config(config, attn_implementation="attentiondrop")


def test_flags_edited_after_switching_on_take_effect_when_the_trainer_checks_them():
    """The attention reads the plan; `check_attentiondrop` (which every AttentionDrop trainer calls when built)
    switches on again with the flags found on the config."""
    torch.manual_seed(0)
    base = tiny_vit()
    model = enable_attentiondrop(copy.deepcopy(base), variant="hard", p=0.5)
    model.config.attentiondrop["p"] = 0.0
    assert check_attentiondrop(model)
    torch.manual_seed(1)
    got = model.train()(**image_batch()).logits
    torch.manual_seed(1)
    assert torch.equal(got, base.train()(**image_batch()).logits)


def test_composite_models_read_the_flags_of_their_top_config(tmp_path):
    clip = build("clip")
    clip.save_pretrained(tmp_path)
    loaded = type(clip).from_pretrained(tmp_path, attn_implementation="attentiondrop", attentiondrop={"p": 0.3})
    assert loaded.config.attentiondrop == AttentionDropConfig(p=0.3).to_dict()
    for config in (loaded.config.text_config, loaded.config.vision_config):
        assert config.attentiondrop is None and config._attn_implementation == "attentiondrop"  # one home: the top
    plans = [plan_of(module) for module in attention_modules(loaded).values()]
    assert len(plans) == 4 and all(plan.perturbed and plan.model.settings.options.p == 0.3 for plan in plans)


def test_a_checkpoint_with_an_unregistered_variant_loads_and_evaluates(tmp_path):
    """Inference never depends on the plugin: the variant must be known only to switch AttentionDrop on."""
    model = tiny_vit()
    model.config.attentiondrop = {"variant": "mine", "mine_strength": 2.0}  # as a checkpoint would hold
    model.save_pretrained(tmp_path)
    loaded = ViTForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.attentiondrop["variant"] == "mine"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**image_batch()).logits, model.eval()(**image_batch()).logits)
    with pytest.raises(UnknownVariantError, match=r"must be one of \['blur', 'blur2d', 'hard'\], got 'mine'"):
        ViTForImageClassification.from_pretrained(tmp_path, attn_implementation="attentiondrop")


def test_layer_index_out_of_range_raises_up_front():
    with pytest.raises(ValueError, match=r"`layers` \[5\] out of range: the targeted stacks .* at most 2 layers"):
        enable_attentiondrop(tiny_vit(), layers=[5])


STOCK_LOAD = """
import json, sys, torch
from transformers import AutoModelForImageClassification
assert "attentiondrop_hf" not in sys.modules
model = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()
assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
with torch.no_grad():
    logits = model(pixel_values=torch.load(sys.argv[2])).logits
torch.save(logits, sys.argv[3])
print(json.dumps(model.config.attentiondrop))
"""


def test_checkpoint_round_trip_and_stock_transformers_load(tmp_path):
    model = enable_attentiondrop(tiny_vit(), variant="blur", blur_width=7, blur_sigma_max=2.0, layers=[1])
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["attentiondrop"]["variant"] == "blur" and saved["attentiondrop"]["blur_width"] == 7
    assert "attn_implementation" not in saved and "_attn_implementation" not in saved

    # Reloaded with the plugin: flags back on the config.
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "ckpt", attn_implementation="attentiondrop")
    assert reloaded.config.attentiondrop == model.config.attentiondrop

    # Reloaded by stock transformers in a fresh interpreter: loads, runs on SDPA, same eval logits.
    pixels = image_batch()["pixel_values"]
    torch.save(pixels, tmp_path / "pixels.pt")
    command = [sys.executable, "-c", STOCK_LOAD, str(tmp_path / "ckpt"), str(tmp_path / "pixels.pt")]
    result = subprocess.run([*command, str(tmp_path / "out.pt")], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1])["blur_width"] == 7
    with torch.no_grad():
        expected = model.eval()(pixel_values=pixels).logits
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
