"""Table-driven integration: tiny ViT, DeiT, BERT, Marian, BART and Llama with AttentionDrop switched on."""

import copy

import pytest
import torch
from conftest import (
    image_batch,
    seq2seq_batch,
    text_batch,
    tiny_bart,
    tiny_bert,
    tiny_deit,
    tiny_llama,
    tiny_marian,
    tiny_t5,
    tiny_vit,
)
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    FSMTConfig,
    FSMTForConditionalGeneration,
    ViTForImageClassification,
)

from attentiondrop_hf import disable_attentiondrop, enable_attentiondrop, force_reference_path, integration
from attentiondrop_hf.sites import annotate_sites

# (id, factory, batch, roles the model has)
CASES = [
    ("vit", tiny_vit, image_batch, ["self"]),
    ("deit", tiny_deit, image_batch, ["self"]),
    ("bert", tiny_bert, text_batch, ["self"]),
    ("marian", tiny_marian, seq2seq_batch, ["self", "causal", "cross"]),
    ("bart", tiny_bart, seq2seq_batch, ["self", "causal", "cross"]),
    ("llama", tiny_llama, text_batch, ["causal"]),
]
CASE_IDS = [case[0] for case in CASES]
VARIANTS = {
    "hard": {"variant": "hard", "p": 0.5, "top_k": 3},
    "blur": {"variant": "blur", "blur_sigma_min": 0.5, "blur_sigma_max": 2.0},
}
# More candidates / a wider kernel than the test sequences are long.
WIDE_KERNELS = {"hard": {"top_k": 8}, "blur": {"blur_width": 9}}


def twins(factory, roles, seed=0, **flags):
    """The same weights twice: stock SDPA, and AttentionDrop on every role the model has."""
    torch.manual_seed(seed)
    base = factory()
    return base, enable_attentiondrop(copy.deepcopy(base), targets=roles, **flags)


def run(model, batch, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return model(**batch, **kwargs).logits


@pytest.fixture(params=["fast", "reference"])
def path(request):
    """Run a test through the fast paths (default dispatch) and through the forced logit-space reference."""
    with force_reference_path(request.param == "reference"):
        yield request.param


@pytest.mark.parametrize("name, factory, batch, roles", CASES, ids=CASE_IDS)
def test_roles_and_layers_detected(name, factory, batch, roles):
    sites = annotate_sites(factory())
    assert sorted({role for role, _ in sites.values()}) == sorted(roles)
    for role in roles:
        assert sorted(layer for r, layer in sites.values() if r == role) == [0, 1]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name, factory, batch, roles", CASES, ids=CASE_IDS)
def test_eval_is_bitwise_the_base_implementation(name, factory, batch, roles, variant):
    base, model = twins(factory, roles, **VARIANTS[variant])
    with torch.no_grad():
        assert torch.equal(run(model.eval(), batch()), run(base.eval(), batch()))


@pytest.mark.parametrize("name, factory, batch, roles", [CASES[0], CASES[3], CASES[5]], ids=["vit", "marian", "llama"])
def test_eval_is_bitwise_the_eager_base(name, factory, batch, roles):
    base, model = twins(factory, roles, **VARIANTS["hard"], base_attn_implementation="eager")
    base.set_attn_implementation("eager")
    with torch.no_grad():
        assert torch.equal(run(model.eval(), batch()), run(base.eval(), batch()))


@pytest.mark.parametrize("flags", [{"variant": "hard", "p": 0.0}, {"variant": "blur", "blur_sigma_max": 0.0}])
@pytest.mark.parametrize("name, factory, batch, roles", CASES, ids=CASE_IDS)
def test_identity_flags_equal_the_base_in_training(name, factory, batch, roles, flags):
    base, model = twins(factory, roles, **flags)
    assert torch.equal(run(model.train(), batch(), seed=1), run(base.train(), batch(), seed=1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name, factory, batch, roles", CASES, ids=CASE_IDS)
def test_training_passes_differ_and_the_seed_reproduces(name, factory, batch, roles, variant):
    base, model = twins(factory, roles, **VARIANTS[variant])
    model.train()
    first, second, again = run(model, batch(), seed=1), run(model, batch(), seed=2), run(model, batch(), seed=1)
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, run(base.train(), batch(), seed=1))
    assert torch.equal(first, again)


def change_padded_tokens(inputs):
    changed = dict(inputs)
    padding = inputs["attention_mask"] == 0
    assert padding.any()
    changed["input_ids"] = inputs["input_ids"].masked_fill(padding, 7)
    return changed


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name, factory, batch, roles", CASES[2:], ids=CASE_IDS[2:])
def test_padded_token_content_changes_no_valid_output(name, factory, batch, roles, variant, path):
    _, model = twins(factory, roles, **VARIANTS[variant])
    model.train()
    inputs = batch()
    logits = run(model, inputs, seed=3)
    changed = run(model, change_padded_tokens(inputs), seed=3)
    if name == "llama":  # decoder-only: compare the positions that are not padding
        valid = inputs["attention_mask"].bool()
        logits, changed = logits[valid], changed[valid]
    assert torch.equal(changed, logits)  # exactly: a masked key contributes an exact 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name, factory", [("marian", tiny_marian), ("llama", tiny_llama)])
def test_future_tokens_change_no_earlier_output(name, factory, variant, path):
    """Positions before t are unchanged when the tokens from t on change: no leak of the future."""
    roles = ["self", "causal", "cross"] if name == "marian" else ["causal"]
    _, model = twins(factory, roles, **{**VARIANTS[variant], **WIDE_KERNELS[variant]})
    model.train()
    inputs = seq2seq_batch(target_len=8) if name == "marian" else text_batch(length=8, padded=False)
    field = "decoder_input_ids" if name == "marian" else "input_ids"
    cut = 4
    changed = dict(inputs)
    changed[field] = inputs[field].clone()
    changed[field][:, cut:] = torch.randint(2, 60, changed[field][:, cut:].shape)
    before, after = run(model, inputs, seed=5), run(model, changed, seed=5)
    assert torch.equal(after[:, :cut], before[:, :cut])  # exactly: a leak through a blurred key is tiny
    assert not torch.allclose(after[:, cut:], before[:, cut:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_identical_examples_in_a_batch_are_perturbed_differently(variant, path):
    _, model = twins(tiny_vit, ["self"], **VARIANTS[variant])
    pixels = image_batch(batch=1)["pixel_values"].expand(2, -1, -1, -1)
    logits = run(model.train(), {"pixel_values": pixels}, seed=0)
    assert not torch.allclose(logits[0], logits[1])


def test_one_sigma_per_batch_blurs_identical_examples_identically(path):
    _, model = twins(tiny_vit, ["self"], **VARIANTS["blur"], blur_sigma_per="batch")
    pixels = image_batch(batch=1)["pixel_values"].expand(2, -1, -1, -1)
    logits = run(model.train(), {"pixel_values": pixels}, seed=0)
    torch.testing.assert_close(logits[0], logits[1])


GRADIENT_CASES = [
    ("vit", lambda: tiny_vit(attention_probs_dropout_prob=0.1), image_batch, ["self"]),
    ("marian", lambda: tiny_marian(attention_dropout=0.1), seq2seq_batch, ["self", "causal", "cross"]),
    ("llama", lambda: tiny_llama(attention_dropout=0.1), text_batch, ["causal"]),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name, factory, batch, roles", GRADIENT_CASES, ids=[c[0] for c in GRADIENT_CASES])
def test_activation_checkpointing_replays_the_masks(name, factory, batch, roles, variant, path):
    def gradients(model):
        model.zero_grad()
        logits = run(model.train(), batch(), seed=11)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    _, model = twins(factory, roles, **VARIANTS[variant])
    plain = gradients(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = gradients(model)
    assert plain.keys() == checkpointed.keys()
    for name_ in plain:
        torch.testing.assert_close(checkpointed[name_], plain[name_], msg=name_)


def test_output_attentions_returns_the_perturbed_probabilities():
    _, model = twins(tiny_vit, ["self"], variant="hard", p=1.0, top_k=2, hard_fill="mask")
    attentions = model.train()(**image_batch(), output_attentions=True).attentions
    assert len(attentions) == 2
    for probs in attentions:
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        assert torch.equal((probs == 0).sum(-1), torch.full(probs.shape[:-1], 2))  # the two largest removed


EDGE_CASES = [
    ("llama", tiny_llama, ["causal"]),
    ("marian", tiny_marian, ["self", "causal", "cross"]),
    ("bert", tiny_bert, ["self"]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flags", [{"variant": "hard", "p": 1.0, "hard_fill": "mask"}, VARIANTS["blur"]])
@pytest.mark.parametrize("name, factory, roles", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_no_nan_for_empty_rows_short_sequences_and_batch_of_one(name, factory, roles, flags, dtype, path):
    _, model = twins(factory, roles, **{**flags, **WIDE_KERNELS[flags["variant"]]})
    model = model.to(dtype).train()
    inputs = seq2seq_batch(source_len=5, target_len=3) if name == "marian" else text_batch(length=5)
    inputs["attention_mask"][2] = 0  # an example whose every key is padding
    if name == "llama":
        inputs["attention_mask"][2, 0] = 1
    for batch in (inputs, {k: v[:1] for k, v in inputs.items()}):  # sequences shorter than top_k / blur_width
        logits = run(model, batch, seed=0)
        assert torch.isfinite(logits).all()
        logits.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_enable_and_disable_are_exact_inverses():
    torch.manual_seed(0)
    model = tiny_vit()
    before_config = model.config.to_dict()
    with torch.no_grad():
        before = run(model.train(), image_batch(), seed=0)
    enable_attentiondrop(model, variant="hard", p=0.5)
    assert model.config._attn_implementation == "attentiondrop"
    assert not torch.allclose(run(model, image_batch(), seed=0), before)
    disable_attentiondrop(model)
    assert model.config.to_dict() == before_config
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(run(model, image_batch(), seed=0), before)

    # A model loaded with the flags returns to its base implementation and loses them.
    model.config.attentiondrop = {"base_attn_implementation": "eager"}
    loaded = ViTForImageClassification._from_config(model.config, attn_implementation="attentiondrop")
    disable_attentiondrop(loaded)
    assert loaded.config._attn_implementation == "eager" and loaded.config.attentiondrop is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_config_and_enable_agree_including_layers_without_layer_idx(variant):
    """ViT has no `layer_idx`: the layer comes from the module path, through either entry point."""
    torch.manual_seed(0)
    base = tiny_vit()
    enabled = enable_attentiondrop(copy.deepcopy(base), **VARIANTS[variant], layers=[1])
    config = copy.deepcopy(base.config)
    config.attentiondrop = {**VARIANTS[variant], "layers": [1]}
    loaded = ViTForImageClassification._from_config(config, attn_implementation="attentiondrop")
    loaded.load_state_dict(base.state_dict())

    def forward(model):
        torch.manual_seed(4)
        return model.train()(**image_batch(), output_hidden_states=True)

    enabled_out, loaded_out, base_out = (forward(m) for m in (enabled, loaded, base))
    assert torch.equal(enabled_out.logits, loaded_out.logits)
    # Layer 0 is not targeted: its output is the base's; layer 1 is perturbed.
    assert torch.equal(enabled_out.hidden_states[1], base_out.hidden_states[1])
    assert not torch.allclose(enabled_out.hidden_states[2], base_out.hidden_states[2])


@pytest.mark.parametrize("target", ["self", "causal", "cross"])
def test_targets_select_roles_in_marian(target):
    base, model = twins(tiny_marian, [target], **VARIANTS["hard"])
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


def test_targets_that_match_nothing_raise():
    with pytest.raises(ValueError, match=r"targets \['cross'\] .* match no attention of ViTForImageClassification"):
        enable_attentiondrop(tiny_vit(), targets=["cross"])


def gradients_of(model, inputs, seed):
    model.zero_grad()
    logits = run(model.train(), inputs, seed=seed)
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


BLOCKED_CASES = [
    ("vit", tiny_vit, image_batch, ["self"], VARIANTS["hard"]),
    ("marian", tiny_marian, seq2seq_batch, ["self", "causal", "cross"], VARIANTS["hard"]),
    ("llama", tiny_llama, text_batch, ["causal"], VARIANTS["hard"]),
    ("t5", tiny_t5, seq2seq_batch, ["self", "causal", "cross"], VARIANTS["blur"]),  # position bias: logit path
]


@pytest.mark.parametrize("name, factory, batch, roles, flags", BLOCKED_CASES, ids=[c[0] for c in BLOCKED_CASES])
def test_blocked_logit_path_equals_the_one_block_reference(name, factory, batch, roles, flags, monkeypatch):
    """Long sequences run in checkpointed blocks of query rows: same draws, same outputs and gradients."""
    _, model = twins(factory, roles, **flags)
    inputs = batch()
    with force_reference_path():
        want, want_grads = gradients_of(model, inputs, seed=3)
    monkeypatch.setattr(integration, "BLOCKED_LOGITS_MIN_KEYS", 1)  # every call is "long"
    got, got_grads = gradients_of(model, inputs, seed=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Blocks sum the key and value gradients in another order; the gradients are O(10), float32 rounding O(1e-6).
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-4, atol=1e-5)


def sliding_window_mask(length, window):
    """A 4-D bool mask [B, 1, Q, K] that depends on the query beyond causality: no key-space blur possible."""
    positions = torch.arange(length)
    allowed = (positions[None, :] <= positions[:, None]) & (positions[:, None] - positions[None, :] < window)
    return allowed[None, None].expand(3, 1, length, length)


def test_blur_falls_back_to_logit_space_for_query_dependent_masks_and_position_bias():
    """Where blurring keys is not blurring logits, the fast dispatch must give the reference's result."""
    _, llama = twins(tiny_llama, ["causal"], **VARIANTS["blur"], blur_width=7)
    inputs = {"input_ids": text_batch(padded=False)["input_ids"], "attention_mask": sliding_window_mask(9, 3)}
    _, t5 = twins(tiny_t5, ["self", "causal", "cross"], **VARIANTS["blur"])
    for model, batch in ((llama, inputs), (t5, seq2seq_batch())):
        fast = run(model.train(), batch, seed=2)
        with force_reference_path():
            reference = run(model.train(), batch, seed=2)
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(fast, run(model.eval(), batch))


def test_attention_sinks_are_refused_by_name():
    _, model = twins(tiny_llama, ["causal"], **VARIANTS["hard"])
    attention = model.model.layers[0].self_attn.train()
    query = key = value = torch.randn(1, 4, 3, 8)
    with pytest.raises(NotImplementedError, match=r"sinks \(`s_aux`, LlamaAttention\)"):
        integration.attentiondrop_attention_forward(attention, query, key, value, None, s_aux=torch.zeros(4))
