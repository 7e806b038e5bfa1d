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


def test_from_config_keeps_the_config_it_is_given_as_transformers_does():
    """README: `from_config` does not copy its config (stock behaviour too: a later model built from that object uses
    the implementation the first request wrote on it), so a later model built from it is regularized too."""
    config = tiny_vit().config.__class__(**tiny_vit().config.to_dict())
    first = AutoModelForImageClassification.from_config(config, attn_implementation="attentiondrop")
    later = AutoModelForImageClassification.from_config(config)
    assert first.config is config and later.config is config
    assert model_plan_of(later) is not None
    later.train()
    torch.manual_seed(0)
    assert not torch.equal(later(**image_batch()).logits, later(**image_batch()).logits)
    stock = tiny_vit().config.__class__(**tiny_vit().config.to_dict())
    AutoModelForImageClassification.from_config(stock, attn_implementation="eager")
    assert AutoModelForImageClassification.from_config(stock).config._attn_implementation == "eager"
