"""AttentionDropConfig: every validation error names its flag; flags round-trip through config.json."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import image_batch, tiny_vit
from transformers import ViTConfig, ViTForImageClassification

from attentiondrop_hf import AttentionDropConfig, enable_attentiondrop
from attentiondrop_hf.config import VERSION_KEY

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
    ({"variant": "dropconnect"}, "`variant` must be one of ['blur', 'hard']"),
    ({"targets": ["encoder"]}, "`targets` must be roles from ['self', 'causal', 'cross']"),
    ({"targets": []}, "`targets` must be a non-empty list"),
    ({"layers": [-1]}, "`layers` must hold layer indices >= 0"),
    ({"layers": []}, "`layers` must be None (all layers) or a non-empty list"),
    ({"base_attn_implementation": "flash_attention_2"}, "`base_attn_implementation` must be one of"),
]


@pytest.mark.parametrize("flags, message", INVALID, ids=[str(flags) for flags, _ in INVALID])
def test_invalid_flags_raise_naming_the_flag(flags, message):
    with pytest.raises(ValueError) as error:
        AttentionDropConfig(**flags)
    assert message in str(error.value)


def test_unknown_flag_raises_but_newer_release_flags_are_dropped_with_a_warning():
    with pytest.raises(ValueError, match=r"unknown AttentionDrop flag\(s\) \['top_kk'\]"):
        AttentionDropConfig.from_dict({"top_kk": 3})
    with pytest.warns(UserWarning, match=r"dropping flags .* \['new_flag'\]"):
        settings = AttentionDropConfig.from_dict({"p": 0.2, "new_flag": 1, VERSION_KEY: "99.0.0"})
    assert settings.p == 0.2


def test_flags_of_another_variant_warn_that_they_are_ignored():
    with pytest.warns(UserWarning, match=r"'blur' ignores \['top_k'\]"):
        AttentionDropConfig(variant="blur", top_k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttentionDropConfig(variant="blur", blur_width=7)


def test_values_beyond_the_papers_regime_warn():
    with pytest.warns(UserWarning, match=r"p <= 0.5 and blur_width <= 9"):
        AttentionDropConfig(p=0.6)
    with pytest.warns(UserWarning, match=r"got p=0.1, blur_width=11"):
        AttentionDropConfig(variant="blur", blur_width=11)


def test_normalisation_and_dict_round_trip():
    settings = AttentionDropConfig(targets=["cross", "self"], layers=[3, 1, 3])
    assert settings.targets == ["self", "cross"] and settings.layers == [1, 3]
    assert AttentionDropConfig.from_dict(settings.to_dict()) == settings
    assert json.loads(json.dumps(settings.to_dict())) == settings.to_dict()


def test_config_attribute_validates_on_assignment_and_from_pretrained(tmp_path):
    config = ViTConfig()
    assert config.attentiondrop is None and "attentiondrop" not in config.to_diff_dict()
    with pytest.raises(ValueError, match="`p` must be in"):
        config.attentiondrop = {"p": 2}
    config.attentiondrop = {"variant": "hard", "top_k": 4}
    assert config.attentiondrop["top_k"] == 4 and config.attentiondrop["variant"] == "hard"
    tiny_vit().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`top_k` must be an integer"):
        ViTForImageClassification.from_pretrained(tmp_path, attentiondrop={"top_k": 0})


def test_layer_index_out_of_range_raises():
    with pytest.raises(ValueError, match=r"`layers` \[5\] out of range: the model has 2 layers"):
        enable_attentiondrop(tiny_vit(), layers=[5])
    model = tiny_vit()
    model.config.attentiondrop = {"layers": [2]}
    model.set_attn_implementation("attentiondrop")
    with pytest.raises(ValueError, match=r"`layers` \[2\] out of range"):
        model.train()(**image_batch())


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
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_LOAD,
            str(tmp_path / "ckpt"),
            str(tmp_path / "pixels.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1])["blur_width"] == 7
    with torch.no_grad():
        expected = model.eval()(pixel_values=pixels).logits
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
