"""Shared checks over the model table (`testing_common.CASES`): AttentionDrop switched on in tiny models of every
family the plugin accepts, compared with the same weights under stock attention."""

import copy

import pytest
import torch
from testing_common import (
    build,
    build_peaked,
    cases,
    image_batch,
    seq2seq_batch,
    text_batch,
    tiny_llama,
    tiny_vit,
)
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    FSMTConfig,
    FSMTForConditionalGeneration,
    ViTForImageClassification,
)

from attentiondrop_hf import check_attentiondrop, disable_attentiondrop, enable_attentiondrop, force_reference_path
from attentiondrop_hf.hf import attention as attention_glue
from attentiondrop_hf.hf.plan import PLAN_ATTRIBUTE, attention_modules, find_sites, plan_of

VARIANTS = {
    "hard": {"variant": "hard", "p": 0.5, "top_k": 3},
    "blur": {"variant": "blur", "blur_sigma_min": 0.5, "blur_sigma_max": 2.0},
}
# More candidates / a wider kernel than the test sequences are long.
WIDE_KERNELS = {"hard": {"top_k": 8}, "blur": {"blur_width": 9}}
# Layers of each stack per case (two per stack, except where the model says otherwise).
STACK_LAYERS = {"albert": [0], "swin": [0, 1, 2, 3]}


def twins(case, seed=0, roles=None, **flags):
    """The same weights twice: stock SDPA, and AttentionDrop on `roles` (every role the model has by default).
    Large initial weights make attention peaked, so that a perturbation visibly changes the outputs."""
    torch.manual_seed(seed)
    base = build_peaked(case.id)
    targets = list(case.roles if roles is None else roles)
    return base, enable_attentiondrop(copy.deepcopy(base), targets=targets, **flags)


def logits_of(model, inputs, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    outputs = model(**inputs, **kwargs)
    return outputs.logits if "logits" in outputs else outputs.logits_per_image


@pytest.fixture(params=["fast", "reference"])
def path(request):
    """Run a test through the fast paths (default dispatch) and through the forced logit-space reference."""
    with force_reference_path(request.param == "reference"):
        yield request.param


@pytest.mark.parametrize("case", cases())
def test_roles_and_layers_detected(case):
    sites = find_sites(case.build())
    assert sorted({site.role for site in sites.values()}) == sorted(case.roles)
    for role in case.roles:
        layers = sorted({site.layer for site in sites.values() if site.role == role})
        assert layers == STACK_LAYERS.get(case.id, [0, 1])
    assert all(site.shared == (case.id == "albert") for site in sites.values())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", cases())
def test_eval_is_bitwise_the_base_implementation(case, variant):
    base, model = twins(case, **VARIANTS[variant])
    with torch.no_grad():
        assert torch.equal(logits_of(model.eval(), case.inputs()), logits_of(base.eval(), case.inputs()))


@pytest.mark.parametrize("case", cases("vit", "marian", "llama", "beit"))
def test_eval_is_bitwise_the_eager_base(case):
    base, model = twins(case, **VARIANTS["hard"], base_attn_implementation="eager")
    base.set_attn_implementation("eager")
    with torch.no_grad():
        assert torch.equal(logits_of(model.eval(), case.inputs()), logits_of(base.eval(), case.inputs()))


@pytest.mark.parametrize("flags", [{"variant": "hard", "p": 0.0}, {"variant": "blur", "blur_sigma_max": 0.0}])
@pytest.mark.parametrize("case", cases())
def test_identity_flags_equal_the_base_in_training(case, flags):
    base, model = twins(case, **flags)
    assert torch.equal(logits_of(model.train(), case.inputs(), seed=1), logits_of(base.train(), case.inputs(), seed=1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", cases())
def test_training_passes_differ_and_the_seed_reproduces(case, variant):
    base, model = twins(case, **VARIANTS[variant])
    model.train()
    inputs = case.inputs()
    first, second, again = (logits_of(model, inputs, seed=s) for s in (1, 2, 1))
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, logits_of(base.train(), inputs, seed=1))
    assert torch.equal(first, again)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", cases())
def test_every_parameter_that_learns_without_the_plugin_learns_with_it(case, variant):
    """A perturbed training step gives a gradient to every parameter the stock step gives one to (BEiT's and Swin's
    relative position bias tables start at zero: their gradient must not depend on their value)."""

    def learning(model):
        model.zero_grad()
        logits = logits_of(model.train(), case.inputs(), seed=1)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    base, model = twins(case, **VARIANTS[variant])
    assert learning(model) == learning(base)


@pytest.mark.parametrize("case", cases(tag="decoder_only"))
def test_default_targets_perturb_decoder_only_models(case):
    """No silent no-op: with the default targets a language model's causal self-attention is regularized."""
    torch.manual_seed(0)
    base = case.build()
    model = enable_attentiondrop(copy.deepcopy(base), **VARIANTS["hard"])
    assert model.config.attentiondrop["targets"] is None
    inputs = case.inputs()
    assert not torch.allclose(logits_of(model.train(), inputs, seed=1), logits_of(base.train(), inputs, seed=1))


def change_padded_tokens(inputs):
    changed = dict(inputs)
    padding = inputs["attention_mask"] == 0
    assert padding.any()
    changed["input_ids"] = inputs["input_ids"].masked_fill(padding, 7)
    return changed


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", cases(tag="padding"))
def test_padded_token_content_changes_no_valid_output(case, variant, path):
    _, model = twins(case, **VARIANTS[variant])
    model.train()
    inputs = case.inputs()
    logits = logits_of(model, inputs, seed=3)
    changed = logits_of(model, change_padded_tokens(inputs), seed=3)
    if "decoder_only" in case.tags:  # compare the positions that are not padding
        valid = inputs["attention_mask"].bool()
        logits, changed = logits[valid], changed[valid]
    if "router" in case.tags:  # experts batch the tokens routed to them: other tokens change the rounding
        torch.testing.assert_close(changed, logits, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(changed, logits)  # exactly: a masked key contributes an exact 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", cases("marian", "llama", "gpt2", "t5"))
def test_future_tokens_change_no_earlier_output(case, variant, path):
    """Positions before t are unchanged when the tokens from t on change: no leak of the future."""
    _, model = twins(case, **{**VARIANTS[variant], **WIDE_KERNELS[variant]})
    model.train()
    seq2seq = "seq2seq" in case.tags
    inputs = seq2seq_batch(target_len=8) if seq2seq else text_batch(length=8, padded=False)
    field = "decoder_input_ids" if seq2seq else "input_ids"
    cut = 4
    changed = dict(inputs)
    changed[field] = inputs[field].clone()
    changed[field][:, cut:] = torch.randint(2, 60, changed[field][:, cut:].shape)
    before, after = logits_of(model, inputs, seed=5), logits_of(model, changed, seed=5)
    assert torch.equal(after[:, :cut], before[:, :cut])  # exactly: a leak through a blurred key is tiny
    assert not torch.allclose(after[:, cut:], before[:, cut:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_identical_examples_in_a_batch_are_perturbed_differently(variant, path):
    _, model = twins(build_case("vit"), **VARIANTS[variant])
    pixels = image_batch(batch=1)["pixel_values"].expand(2, -1, -1, -1)
    logits = logits_of(model.train(), {"pixel_values": pixels}, seed=0)
    assert not torch.allclose(logits[0], logits[1])


def test_one_sigma_per_batch_blurs_identical_examples_identically(path):
    _, model = twins(build_case("vit"), **VARIANTS["blur"], blur_sigma_per="batch")
    pixels = image_batch(batch=1)["pixel_values"].expand(2, -1, -1, -1)
    logits = logits_of(model.train(), {"pixel_values": pixels}, seed=0)
    torch.testing.assert_close(logits[0], logits[1])


def build_case(case_id):
    return cases(case_id)[0].values[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", cases("vit", "marian", "llama"))
def test_activation_checkpointing_replays_the_masks(case, variant, path):
    def gradients(model):
        model.zero_grad()
        logits = logits_of(model.train(), case.inputs(), seed=11)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    dropout = {"vit": {"attention_probs_dropout_prob": 0.1}}.get(case.id, {"attention_dropout": 0.1})
    model = enable_attentiondrop(case.build(**dropout), targets=list(case.roles), **VARIANTS[variant])
    plain = gradients(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = gradients(model)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_output_attentions_returns_the_perturbed_probabilities():
    _, model = twins(build_case("vit"), variant="hard", p=1.0, top_k=2, hard_fill="mask")
    attentions = model.train()(**image_batch(), output_attentions=True).attentions
    assert len(attentions) == 2
    for probs in attentions:
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        assert torch.equal((probs == 0).sum(-1), torch.full(probs.shape[:-1], 2))  # the two largest removed


def test_attention_weights_are_asked_for_per_call():
    """Transformers' `config.output_attentions` setter accepts only "eager": the README's way is the per-call
    `output_attentions=True`, which gives the base's weights in eval (over an eager base: bit for bit the stock
    eager weights) and the perturbed weights in training."""
    torch.manual_seed(0)
    base = tiny_vit()
    base.set_attn_implementation("eager")
    config = copy.deepcopy(base.config)
    model = ViTForImageClassification._from_config(config, attn_implementation="attentiondrop_eager")
    model.load_state_dict(base.state_dict())
    with pytest.raises(ValueError, match="output_attentions"):
        model.config.output_attentions = True
    with torch.no_grad():
        got = model.eval()(**image_batch(), output_attentions=True).attentions
        want = base.eval()(**image_batch(), output_attentions=True).attentions
    assert len(got) == 2 and all(torch.equal(g, w) for g, w in zip(got, want))
    trained = model.train()(**image_batch(), output_attentions=True).attentions
    assert len(trained) == 2 and not torch.allclose(trained[0], want[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flags", [{"variant": "hard", "p": 1.0, "hard_fill": "mask"}, VARIANTS["blur"]])
@pytest.mark.parametrize("case", cases("llama", "marian", "bert"))
def test_no_nan_for_empty_rows_short_sequences_and_batch_of_one(case, flags, dtype, path):
    _, model = twins(case, **{**flags, **WIDE_KERNELS[flags["variant"]]})
    model = model.to(dtype).train()
    inputs = seq2seq_batch(source_len=5, target_len=3) if case.id == "marian" else text_batch(length=5)
    inputs["attention_mask"][2] = 0  # an example whose every key is padding
    if case.id == "llama":
        inputs["attention_mask"][2, 0] = 1
    for batch in (inputs, {k: v[:1] for k, v in inputs.items()}):  # sequences shorter than top_k / blur_width
        logits = logits_of(model, batch, seed=0)
        assert torch.isfinite(logits).all()
        logits.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_enable_and_disable_are_exact_inverses():
    torch.manual_seed(0)
    model = tiny_vit()
    before_config = model.config.to_dict()
    with torch.no_grad():
        before = logits_of(model.train(), image_batch(), seed=0)
    enable_attentiondrop(model, variant="hard", p=0.5)
    assert model.config._attn_implementation == "attentiondrop"
    assert not torch.allclose(logits_of(model, image_batch(), seed=0), before)
    disable_attentiondrop(model)
    assert model.config.to_dict() == before_config
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits_of(model, image_batch(), seed=0), before)
    assert not any(PLAN_ATTRIBUTE in m.__dict__ for m in model.modules())

    # A model loaded with the flags is the stock model switched on: disabling gives the stock model, the flags it
    # was loaded with kept as data.
    config = copy.deepcopy(model.config)
    config.attentiondrop = {"base_attn_implementation": "eager"}
    loaded = ViTForImageClassification._from_config(config, attn_implementation="attentiondrop")
    assert loaded.config._attn_implementation == "attentiondrop_eager"
    disable_attentiondrop(loaded)
    assert loaded.config._attn_implementation == "eager"
    assert loaded.config.attentiondrop == {"base_attn_implementation": "eager"}


def test_enable_and_disable_keep_each_sub_configs_own_implementation():
    """CLIP with an eager text tower and an SDPA vision tower: each keeps its own base, and comes back as it was."""
    clip = build("clip")
    clip.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    text, vision = clip.config.text_config, clip.config.vision_config
    assert [text._attn_implementation, vision._attn_implementation] == ["eager", "sdpa"]
    before = clip.config.to_dict()
    enable_attentiondrop(clip, variant="blur")
    assert [text._attn_implementation, vision._attn_implementation] == ["attentiondrop_eager", "attentiondrop"]
    bases = {plan_of(m).base for path, m in attention_modules(clip).items() if path.startswith("text_model")}
    assert bases == {"eager"}
    disable_attentiondrop(clip)
    assert [text._attn_implementation, vision._attn_implementation] == ["eager", "sdpa"]
    assert clip.config.to_dict() == before


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case_id", ["vit", "clip"])
def test_the_load_time_path_gives_what_enable_gives(case_id, variant):
    """Flags given at load time (`from_config` + `config.attentiondrop`) are `enable_attentiondrop`: every attention
    module, sub-configs of composite models included, and `layers`, with no further call."""
    torch.manual_seed(0)
    base = build(case_id)
    flags = {**VARIANTS[variant], "layers": [1]}
    enabled = enable_attentiondrop(copy.deepcopy(base), **flags)
    config = copy.deepcopy(base.config)
    config.attentiondrop = flags
    loaded = type(base)._from_config(config, attn_implementation="attentiondrop")
    loaded.load_state_dict(base.state_dict())
    inputs = build_case(case_id).inputs()
    assert torch.equal(logits_of(enabled.train(), inputs, seed=4), logits_of(loaded.train(), inputs, seed=4))
    assert not torch.allclose(logits_of(enabled, inputs, seed=4), logits_of(base.train(), inputs, seed=4))


def test_untargeted_layer_is_the_base():
    torch.manual_seed(0)
    base = tiny_vit()
    model = enable_attentiondrop(copy.deepcopy(base), **VARIANTS["hard"], layers=[1])

    def hidden(m):
        torch.manual_seed(4)
        return m.train()(**image_batch(), output_hidden_states=True).hidden_states

    got, want = hidden(model), hidden(base)
    assert torch.equal(got[1], want[1])  # layer 0 is not targeted
    assert not torch.allclose(got[2], want[2])


@pytest.mark.parametrize("target", ["self", "causal", "cross"])
def test_targets_select_roles_in_marian(target):
    base, model = twins(build_case("marian"), roles=[target], **VARIANTS["hard"])
    inputs = seq2seq_batch()
    torch.manual_seed(1)
    got = model.train()(**inputs)
    torch.manual_seed(1)
    want = base.train()(**inputs)
    encoder_same = torch.equal(got.encoder_last_hidden_state, want.encoder_last_hidden_state)
    assert encoder_same == (target != "self")
    assert not torch.allclose(got.logits, want.logits)


def test_models_without_the_attention_interface_are_rejected():
    deberta = DebertaV2ForSequenceClassification(
        DebertaV2Config(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    fsmt = FSMTForConditionalGeneration(
        FSMTConfig(
            src_vocab_size=64,
            tgt_vocab_size=64,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            langs=["en", "de"],
        )
    )
    for model in (deberta, fsmt):
        with pytest.raises(ValueError, match="does not route its attention through transformers' AttentionInterface"):
            enable_attentiondrop(model)


@pytest.mark.parametrize(
    "case_id, targets", [("vit", ["cross"]), ("vit", ["causal"]), ("llama", ["self"]), ("gpt2", ["self", "cross"])]
)
def test_targets_that_match_nothing_raise_on_every_path(case_id, targets, tmp_path):
    message = rf"targets {targets!r} match no attention of".replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=message):
        enable_attentiondrop(build(case_id), targets=targets)
    model = build(case_id)
    with pytest.raises(ValueError, match=message):  # from_config: at load
        type(model)._from_config(model.config, attn_implementation="attentiondrop", attentiondrop={"targets": targets})
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):  # from_pretrained: at load
        type(model).from_pretrained(tmp_path, attn_implementation="attentiondrop", attentiondrop={"targets": targets})
    assert type(model).from_pretrained(tmp_path, attentiondrop={"targets": targets}) is not None  # stock: data only


def test_a_model_switched_on_behind_the_plugins_back_is_refused_at_its_first_call():
    """`Model(config)` with "attentiondrop" already on the config, or `set_attn_implementation`, build no plan: the
    first call says how to switch AttentionDrop on, in eval too (its base is unknown)."""
    model = tiny_vit()
    model.set_attn_implementation("attentiondrop")
    for mode in (model.train, model.eval):
        with pytest.raises(ValueError, match=r"never set up for it: load the model with from_pretrained"):
            logits_of(mode(), image_batch())
    with pytest.raises(ValueError, match=r"was never set up for it"):
        check_attentiondrop(model)  # what the trainer does when it is built


def test_layers_are_refused_where_one_module_serves_several_layers():
    with pytest.raises(ValueError, match=r"each run for several layers per forward \(shared layers\)"):
        enable_attentiondrop(build("albert"), layers=[0])
    enable_attentiondrop(build("albert"), variant="hard")  # without `layers`: every layer is perturbed


def test_layers_count_blocks_through_the_stages_of_hierarchical_models():
    """Swin: `layers` indexes attention blocks in order through the stages (2 stages x 2 blocks here)."""
    enable_attentiondrop(build("swin"), layers=[3])
    with pytest.raises(ValueError, match=r"`layers` \[4\] out of range: .* at most 4 layers"):
        enable_attentiondrop(build("swin"), layers=[4])


def test_blocked_logit_path_equals_the_one_block_reference(monkeypatch):
    """Long sequences run in checkpointed blocks of query rows: same draws, same outputs and gradients."""

    def gradients_of(model, inputs, seed):
        model.zero_grad()
        logits = logits_of(model.train(), inputs, seed=seed)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for case_id, flags in (("vit", "hard"), ("marian", "hard"), ("llama", "hard"), ("t5", "blur"), ("beit", "hard")):
        case = build_case(case_id)
        _, model = twins(case, **VARIANTS[flags])
        inputs = case.inputs()
        with force_reference_path():
            want, want_grads = gradients_of(model, inputs, seed=3)
        with monkeypatch.context() as patch:
            patch.setattr(attention_glue, "BLOCKED_LOGITS_MIN_KEYS", 1)  # every call is "long"
            got, got_grads = gradients_of(model, inputs, seed=3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=case_id)
        # Blocks sum the key and value gradients in another order; with peaked weights gradients reach O(100), so
        # float32 rounding reaches a few 1e-5 in absolute terms (relative 1e-6).
        for key in want_grads:
            torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-4, atol=1e-4, msg=f"{case_id} {key}")


@pytest.mark.parametrize("case_id", ["vit", "marian", "llama", "beit", "t5"])
def test_hard_masking_without_the_logits_equals_the_reference_in_models(case_id, monkeypatch):
    """The fused hard-masking path (long sequences) gives the logit-space reference's outputs and gradients, with
    padding, causal masks, grouped KV heads (Llama), a float-mask bias (BEiT) and a position bias (T5)."""
    from attentiondrop_hf.variants import hard

    def gradients_of(model, inputs):
        model.zero_grad()
        logits = logits_of(model.train(), inputs, seed=3)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    case = build_case(case_id)
    _, model = twins(case, **VARIANTS["hard"])
    with force_reference_path():
        want, want_grads = gradients_of(model, case.inputs())
    calls = []
    original = hard.hard_masked_attention
    monkeypatch.setattr(hard, "FUSED_MIN_KEYS", 1)  # every call is "long"
    monkeypatch.setattr(hard, "hard_masked_attention", lambda *a: calls.append(1) or original(*a))
    got, got_grads = gradients_of(model, case.inputs())
    assert calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Fused kernels sum in another order; peaked weights give gradients up to O(100): float32 rounding ~1e-4.
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-4, atol=1e-4, msg=key)


def sliding_window_mask(length, window):
    """A 4-D bool mask [B, 1, Q, K] that depends on the query beyond causality: no key-space blur possible."""
    positions = torch.arange(length)
    allowed = (positions[None, :] <= positions[:, None]) & (positions[:, None] - positions[None, :] < window)
    return allowed[None, None].expand(3, 1, length, length)


def test_blur_falls_back_to_logit_space_for_query_dependent_masks_and_logit_terms():
    """Where blurring keys is not blurring logits (a sliding window, T5's position bias, BEiT's and Swin's
    relative position bias in the float mask), the fast dispatch must give the reference's result."""
    _, llama = twins(build_case("llama"), **VARIANTS["blur"], blur_width=7)
    window = {"input_ids": text_batch(padded=False)["input_ids"], "attention_mask": sliding_window_mask(9, 3)}
    runs = [(llama, window)]
    for case_id in ("t5", "beit", "swin"):
        case = build_case(case_id)
        runs.append((twins(case, **VARIANTS["blur"])[1], case.inputs()))
    for model, inputs in runs:
        fast = logits_of(model.train(), inputs, seed=2)
        with force_reference_path():
            reference = logits_of(model.train(), inputs, seed=2)
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            assert not torch.allclose(fast, logits_of(model.eval(), inputs))


@pytest.mark.parametrize("name", ["s_aux", "sinks"])
def test_attention_sinks_are_refused_by_either_name(name):
    _, model = twins(build_case("llama"), **VARIANTS["hard"])
    attention = model.model.layers[0].self_attn.train()
    query = key = value = torch.randn(1, 4, 3, 8)
    with pytest.raises(NotImplementedError, match=rf"sinks \(`{name}`, LlamaAttention\)"):
        attention_glue.attentiondrop_attention_forward(attention, query, key, value, None, **{name: torch.zeros(4)})


def test_torch_compile_eval_and_training_have_no_graph_break():
    """Eval compiles as cleanly as stock SDPA, and so does training, padded batches included (compiled, the blur
    asserts on the device that the mask is padding plus causality instead of testing it on the host)."""

    def breaks(model, inputs):
        torch._dynamo.reset()
        return torch._dynamo.explain(model)(**inputs).graph_break_count

    counts = {}
    for case_id, variant in (("vit", "hard"), ("vit", "blur"), ("llama", "hard"), ("llama", "blur")):
        case = build_case(case_id)
        base, model = twins(case, **VARIANTS[variant])
        assert breaks(model.eval(), case.inputs()) == breaks(base.eval(), case.inputs()) == 0
        counts[case_id, variant] = breaks(model.train(), case.inputs())
    assert counts == {key: 0 for key in counts}
    torch._dynamo.reset()
    model = enable_attentiondrop(tiny_llama(), **VARIANTS["hard"], layers=[1])
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.isfinite(logits_of(compiled.train(), text_batch(), seed=0)).all()


@pytest.mark.parametrize("variant", ["hard", "blur"])
def test_a_compiled_schedule_neither_breaks_nor_recompiles_and_follows_the_step(variant):
    """The schedule's factor is a tensor the compiled graph reads: one graph for every step, and each compiled step
    gives what eager gives at that step with the same draws (padded Llama: the blur's asserted mask too)."""
    from torch._dynamo.utils import counters

    from attentiondrop_hf.hf.plan import model_plan_of

    flags = {**VARIANTS[variant], "schedule": "linear", "schedule_warmup": 1.0}
    torch.manual_seed(0)
    model = enable_attentiondrop(build_peaked("llama"), **flags).train()
    plan = model_plan_of(model)
    plan.set_progress(0.5)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(**text_batch()).graph_break_count == 0
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    outputs = {}
    for progress in (0.0, 0.3, 0.6, 1.0):
        plan.set_progress(progress)
        torch.manual_seed(1)
        compiled_logits = compiled(**text_batch()).logits
        compiled_logits.sum().backward()
        torch.manual_seed(1)
        eager_logits = model(**text_batch()).logits
        torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)
        outputs[progress] = eager_logits
    assert counters["stats"]["unique_graphs"] == 1
    assert not torch.allclose(outputs[0.3], outputs[1.0])  # the strength did change between steps


def test_compiled_hard_masking_at_long_sequences_has_no_graph_break_and_matches_the_reference():
    """From FUSED_MIN_KEYS keys on, hard masking runs `hard_masked_attention`; compiled, it takes its dense blocks
    (the CPU correction's pair list has a data-dependent size): no break, the reference's output and gradients."""
    from testing_common import planned_attention_module

    from attentiondrop_hf.variants.hard import FUSED_MIN_KEYS

    module = planned_attention_module({"variant": "hard", "p": 0.3, "top_k": 8})

    def attend(query, key, value):
        return attention_glue.attentiondrop_attention_forward(module, query, key, value, None, scaling=0.25)[0]

    def run(function, reference=False):
        torch.manual_seed(0)
        tensors = [torch.randn(1, 2, FUSED_MIN_KEYS + 6, 16, requires_grad=True) for _ in range(3)]
        with force_reference_path(reference):
            torch.manual_seed(1)
            output = function(*tensors)
        output.square().sum().backward()
        return [output] + [t.grad for t in tensors]

    torch._dynamo.reset()
    tensors = [torch.randn(1, 2, FUSED_MIN_KEYS + 6, 16, requires_grad=True) for _ in range(3)]
    assert torch._dynamo.explain(attend)(*tensors).graph_break_count == 0
    torch._dynamo.reset()
    for got, want in zip(run(torch.compile(attend, backend="aot_eager")), run(attend, reference=True)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
