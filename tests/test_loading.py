"""The load-time hook (`attentiondrop_hf.hf.loading`) wraps two Transformers entry points. These tests fail loudly when
a Transformers release changes them: re-check the hook, then update what is recorded here."""

import inspect

import pytest
import torch
from testing_common import image_batch, tiny_vit
from transformers import AutoModelForImageClassification, PreTrainedModel, ViTForImageClassification

from attentiondrop_hf.hf import loading
from attentiondrop_hf.hf.plan import model_plan_of


def test_the_wrapped_entry_points_are_as_checked():
    assert loading.WRAPPED_ENTRY_POINTS_CHECKED, "a Transformers release the load hook was not checked against"
    from_pretrained = PreTrainedModel.__dict__["from_pretrained"].__func__
    from_config = PreTrainedModel.__dict__["_from_config"].__func__
    assert getattr(from_pretrained, loading._WRAPPED) and getattr(from_config, loading._WRAPPED)
    original = inspect.signature(inspect.unwrap(from_pretrained))
    assert list(original.parameters)[:2] == ["cls", "pretrained_model_name_or_path"]
    assert "config" in original.parameters and original.parameters["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    assert list(inspect.signature(inspect.unwrap(from_config)).parameters) == ["cls", "config", "kwargs"]


def test_loads_without_attentiondrop_are_untouched(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit()
    model.save_pretrained(tmp_path)
    reloaded = ViTForImageClassification.from_pretrained(tmp_path, attn_implementation="eager")
    assert reloaded.config._attn_implementation == "eager" and model_plan_of(reloaded) is None
    model.set_attn_implementation("eager")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**image_batch()).logits, model.eval()(**image_batch()).logits)


@pytest.mark.parametrize("requested, base", [("attentiondrop", "sdpa"), ("attentiondrop_eager", "eager")])
def test_both_entry_points_switch_on_over_the_requested_base(requested, base, tmp_path):
    torch.manual_seed(0)
    tiny_vit().save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, attn_implementation=requested)
    built = AutoModelForImageClassification.from_config(
        loaded.config.__class__.from_pretrained(tmp_path), attn_implementation=requested
    )
    for model in (loaded, built):
        assert model.config._attn_implementation == requested and model_plan_of(model) is not None
        assert {
            plan.base
            for plan in (
                m.__dict__["_attentiondrop_plan"]
                for m in model.modules()
                if "_attentiondrop_plan" in m.__dict__ and m is not model
            )
        } == {base}


def test_a_per_sub_config_request_is_refused():
    with pytest.raises(ValueError, match="applies to the whole model"):
        ViTForImageClassification._from_config(tiny_vit().config, attn_implementation={"": "attentiondrop"})
