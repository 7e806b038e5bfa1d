"""Parity of the pure ops with plain loop references written here, and their invariants."""

import math

import pytest
import torch

from attentiondrop_hf import ops
from attentiondrop_hf.ops import blur as blur_ops


def loop_hard(logits, attendable, top_k, p, uniforms, fill):
    """Row by row: the s-th largest attendable logit is dropped when uniforms[..., s] < p."""
    out, allowed = logits.clone(), attendable.clone()
    batch, heads, rows, keys = logits.shape
    for b in range(batch):
        for h in range(heads):
            for i in range(rows):
                valid = [j for j in range(keys) if attendable[b, h, i, j]]
                ranked = sorted(valid, key=lambda j: -float(logits[b, h, i, j]))[:top_k]
                for slot, j in enumerate(ranked):
                    if uniforms[b, h, i, slot] < p:
                        if fill == "zero":
                            out[b, h, i, j] = 0.0
                        else:
                            allowed[b, h, i, j] = False
    return out, allowed


def loop_blur(logits, attendable, sigma, width, causal):
    """Row by row: Gaussian average over the attendable neighbours j+t, t in -r..r (or -r..0 when causal)."""
    radius = (width - 1) // 2
    offsets = range(-radius, 1 if causal else radius + 1)
    out = logits.clone()
    batch, heads, rows, keys = logits.shape
    for b in range(batch):
        s = max(float(sigma[b]), blur_ops.SIGMA_FLOOR)
        for h in range(heads):
            for i in range(rows):
                for j in range(keys):
                    if not attendable[b, h, i, j]:
                        continue
                    num = den = 0.0
                    for t in offsets:
                        if 0 <= j + t < keys and attendable[b, h, i, j + t]:
                            g = math.exp(-(t**2) / (2 * s**2))
                            num += g * float(logits[b, h, i, j + t])
                            den += g
                    out[b, h, i, j] = num / den
    return out


def padding_and_causal(batch, rows, keys, causal, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(2, keys), keys + 1, (batch,), generator=generator)
    lengths[0] = keys
    valid = torch.arange(keys)[None, :] < lengths[:, None]  # [B, K]
    attendable = valid[:, None, None, :].expand(batch, 1, rows, keys)
    if causal:
        attendable = attendable & ops.causal_pattern(rows, keys, torch.device("cpu"))
    return valid, attendable


@pytest.mark.parametrize("fill", ["zero", "mask"])
@pytest.mark.parametrize("top_k", [1, 3, 50])
def test_hard_pattern_matches_loop_reference(fill, top_k):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 7)
    _, attendable = padding_and_causal(2, 5, 7, causal=True)
    attendable = attendable.expand(2, 3, 5, 7)
    uniforms = torch.rand(2, 3, 5, min(top_k, 7))
    dropped = ops.hard_drop_pattern(logits, attendable, top_k, 0.5, uniforms)
    got_logits, got_allowed = ops.apply_hard_drop(logits, attendable, dropped, fill)
    want_logits, want_allowed = loop_hard(logits, attendable, top_k, 0.5, uniforms, fill)
    assert torch.equal(got_logits, want_logits)
    assert torch.equal(got_allowed, want_allowed)
    assert not (dropped & ~attendable).any(), "a masked key was dropped"


def test_hard_p1_drops_exactly_topk_clamped_per_row():
    logits = torch.randn(4, 2, 6, 6)
    _, attendable = padding_and_causal(4, 6, 6, causal=True, seed=3)
    dropped = ops.hard_drop_pattern(logits, attendable, 3, 1.0, torch.rand(4, 2, 6, 3))
    per_row = dropped.sum(-1)
    assert torch.equal(per_row, attendable.expand(4, 2, 6, 6).sum(-1).clamp(max=3))


def test_hard_p0_drops_nothing():
    dropped = ops.hard_drop_pattern(torch.randn(2, 2, 5, 5), None, 4, 0.0, torch.rand(2, 2, 5, 4))
    assert not dropped.any()


def test_hard_drop_fraction_and_independence():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 1, 32).expand(64, 4, 32, 32)  # identical rows everywhere
    uniforms = ops.draw_slot_uniforms(64, 4, 32, 8, torch.device("cpu"))
    dropped = ops.hard_drop_pattern(logits, None, 8, 0.3, uniforms)
    fraction = dropped.sum().item() / (64 * 4 * 32 * 8)
    assert abs(fraction - 0.3) < 0.01
    # Identical logits, yet the masks differ across examples, heads and query rows.
    assert not torch.equal(dropped[0], dropped[1])
    assert not torch.equal(dropped[0, 0], dropped[0, 1])
    assert not torch.equal(dropped[0, 0, 0], dropped[0, 0, 1])


def test_hard_gradient_skips_dropped_logits_with_zero_fill():
    logits = torch.randn(1, 1, 4, 6, requires_grad=True)
    dropped = ops.hard_drop_pattern(logits, None, 2, 1.0, torch.rand(1, 1, 4, 2))
    out, _ = ops.apply_hard_drop(logits, None, dropped, "zero")
    out.sum().backward()
    assert torch.equal(logits.grad == 0, dropped)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("width", [3, 5, 9])
def test_blur_logits_matches_loop_reference(causal, width):
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 5, 7)
    _, attendable = padding_and_causal(2, 5, 7, causal)
    sigma = torch.tensor([0.7, 2.0])
    offsets = ops.blur_offsets(width, causal)
    got = ops.blur_logits(logits, attendable, ops.blur_taps(sigma, offsets), offsets)
    want = loop_blur(logits, attendable.expand(2, 2, 5, 7), sigma, width, causal)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_blur_keeps_constant_rows_constant_and_small_sigma_is_identity():
    offsets = ops.blur_offsets(5, False)
    constant = torch.full((1, 1, 3, 6), 2.5)
    _, attendable = padding_and_causal(1, 3, 6, causal=False)
    blurred = ops.blur_logits(constant, attendable, ops.blur_taps(torch.tensor([3.0]), offsets), offsets)
    torch.testing.assert_close(blurred, constant)
    logits = torch.randn(1, 1, 3, 6)
    same = ops.blur_logits(logits, None, ops.blur_taps(torch.tensor([0.0]), offsets), offsets)
    assert torch.equal(same, logits)


@pytest.mark.parametrize("path", ["banded", "conv"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("keys", [1, 4, 11])
def test_blur_keys_equals_blur_logits(path, causal, keys, monkeypatch):
    """q·blur(k) == blur(q·k) at every attendable logit, forward and gradients (grad_output != 1)."""
    if path == "conv":
        monkeypatch.setattr(blur_ops, "BANDED_MATMUL_MAX_KEYS", 0)
    torch.manual_seed(2)
    batch, heads, dim = 3, 2, 8
    query = torch.randn(batch, heads, keys, dim, requires_grad=True)
    key = torch.randn(batch, heads, keys, dim, requires_grad=True)
    valid, attendable = padding_and_causal(batch, keys, keys, causal)
    sigma = torch.tensor([0.5, 1.3, 4.0])
    offsets = ops.blur_offsets(7, causal)
    taps = ops.blur_taps(sigma, offsets)
    scale = dim**-0.5

    fast = query @ ops.blur_keys(key, valid, taps, offsets).transpose(-1, -2) * scale
    reference = ops.blur_logits(query @ key.transpose(-1, -2) * scale, attendable, taps, offsets)
    mask = attendable.expand_as(fast)
    torch.testing.assert_close(fast[mask], reference[mask], rtol=1e-5, atol=1e-5)

    weights = torch.randn_like(fast) * mask
    grads_fast = torch.autograd.grad((fast * weights).sum(), (query, key))
    grads_reference = torch.autograd.grad((reference * weights).sum(), (query, key))
    for got, want in zip(grads_fast, grads_reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blur_keys_low_precision(dtype):
    keys = torch.randn(2, 2, 9, 8)
    offsets = ops.blur_offsets(5, False)
    taps = ops.blur_taps(torch.tensor([1.0, 2.0]), offsets)
    got = ops.blur_keys(keys.to(dtype), None, taps, offsets)
    assert got.dtype == dtype and torch.isfinite(got).all()
    # Low-precision inputs, float32 arithmetic: the error is the input rounding, not an accumulation.
    torch.testing.assert_close(got.float(), ops.blur_keys(keys, None, taps, offsets), rtol=2e-2, atol=2e-2)


def test_blur_sigma_draws_per_example_or_per_batch():
    torch.manual_seed(0)
    per_example = ops.draw_blur_sigma(4, 0.0, 2.0, "example", torch.device("cpu"))
    per_batch = ops.draw_blur_sigma(4, 0.0, 2.0, "batch", torch.device("cpu"))
    fixed = ops.draw_blur_sigma(4, 1.5, 1.5, "example", torch.device("cpu"))
    assert per_example.unique().numel() == 4 and ((per_example >= 0) & (per_example <= 2)).all()
    assert per_batch.unique().numel() == 1
    assert torch.equal(fixed, torch.full((4,), 1.5))


def test_masked_softmax_rows_without_keys_are_zero_not_nan():
    logits = torch.randn(2, 1, 3, 4, requires_grad=True)
    allowed = torch.ones(2, 1, 3, 4, dtype=torch.bool)
    allowed[1, 0, 2] = False
    probs = ops.masked_softmax(logits, allowed)
    assert torch.equal(probs[1, 0, 2], torch.zeros(4))
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(1, 3))
    probs.square().sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_attendable_keys_reads_bool_float_and_missing_masks():
    bool_mask = torch.tensor([[[[True, False, True]]]])
    attendable, bias = ops.attendable_keys(bool_mask, 1, 3, False, torch.device("cpu"))
    assert attendable is bool_mask and bias is None
    # finfo.min padding, a position bias of -1.5, and Swin's shifted-window mask (-100 plus a small bias).
    float_mask = torch.tensor([[[[0.0, torch.finfo(torch.float32).min, -1.5, -100.3, 2.0]]]])
    attendable, bias = ops.attendable_keys(float_mask, 1, 5, False, torch.device("cpu"))
    assert attendable.tolist() == [[[[True, False, True, False, True]]]]
    assert bias.tolist() == [[[[0.0, 0.0, -1.5, 0.0, 2.0]]]]
    attendable, _ = ops.attendable_keys(None, 3, 3, True, torch.device("cpu"))
    assert torch.equal(attendable[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())
    assert ops.attendable_keys(None, 1, 3, True, torch.device("cpu")) == (None, None)


def test_key_validity_detects_query_dependent_masks():
    valid, attendable = padding_and_causal(2, 5, 5, causal=True)
    assert ops.key_validity(attendable, causal=True)[0]
    assert torch.equal(ops.key_validity(attendable, causal=True)[1], valid)
    window = attendable & ~ops.causal_pattern(5, 5, torch.device("cpu")).tril(-2)  # sliding window of 2
    assert not ops.key_validity(window, causal=True)[0]
    assert not ops.key_validity(attendable, causal=False)[0]


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 64])
def test_chunked_attention_equals_plain(rows_per_chunk):
    """Blocks of query rows under checkpointing give the plain result, forward and backward, for the same draws."""
    torch.manual_seed(3)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 7, 8
    query = torch.randn(batch, heads, length, dim, requires_grad=True)
    key = torch.randn(batch, kv_heads, length, dim, requires_grad=True)
    value = torch.randn(batch, kv_heads, length, dim, requires_grad=True)
    _, attendable = padding_and_causal(batch, length, length, causal=True)
    uniforms = torch.rand(batch, heads, length, 3)

    def perturb(logits, attendable, rows):
        dropped = ops.hard_drop_pattern(logits, attendable, 3, 0.5, uniforms[:, :, rows])
        return ops.apply_hard_drop(logits, attendable, dropped, "zero")

    plain, _ = ops.logit_space_attention(query, key, value, attendable, perturb=perturb)
    chunked = ops.chunked_logit_space_attention(query, key, value, attendable, rows_per_chunk, perturb=perturb)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    grad_output = torch.randn_like(plain)
    for got, want in zip(
        torch.autograd.grad(chunked, (query, key, value), grad_output),
        torch.autograd.grad(plain, (query, key, value), grad_output),
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_depthwise_key_blur_backward_is_the_transposed_blur(causal):
    """The long-sequence key blur has a hand-written backward: check it against finite differences."""
    keys = torch.randn(2, 2, 9, 3, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    offsets = ops.blur_offsets(5, causal)
    taps = ops.blur_taps(torch.tensor([0.8, 1.7]), offsets).double()
    blur = blur_ops._DepthwiseKeyBlur.apply
    assert torch.autograd.gradcheck(lambda k: blur(k, valid, taps, offsets), (keys,))


@pytest.mark.parametrize("direction", ["forward", "symmetric"])
@pytest.mark.parametrize("ignored", [True, False], ids=["padded-tokens", "nothing-ignored"])
def test_consistency_terms_equal_the_reference_on_the_whole_tensors(direction, ignored):
    """The trainer's path (counted items gathered first) against the two reference sums over the whole tensors:
    values and gradients; bit for bit when nothing is ignored (classification runs keep their exact numbers)."""
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(3, 7, 11, generator=generator, requires_grad=True)
    second = torch.randn(3, 7, 11, generator=generator, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    if ignored:
        labels[0, 4:] = -100
        labels[2, 1:] = -100
    task, kl = ops.summed_consistency_terms(first, second, labels, 0.1, direction)
    fast_grads = torch.autograd.grad(task + 0.7 * kl, (first, second))
    reference_task = (ops.summed_cross_entropy(first, labels, 0.1) + ops.summed_cross_entropy(second, labels, 0.1)) / 2
    reference_kl = ops.summed_kl(first, second, labels, direction)
    reference_grads = torch.autograd.grad(reference_task + 0.7 * reference_kl, (first, second))
    assert kl > 0
    if ignored:
        torch.testing.assert_close((task, kl), (reference_task, reference_kl))
        torch.testing.assert_close(fast_grads, reference_grads)
        assert all(bool(g[2, 1:].eq(0).all()) for g in fast_grads)  # padded items get no gradient
    else:
        assert torch.equal(task, reference_task) and torch.equal(kl, reference_kl)
        assert all(torch.equal(a, b) for a, b in zip(fast_grads, reference_grads))


def test_key_validity_asserted_for_a_compiled_graph_raises_on_a_mask_that_depends_on_the_query():
    padded = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    padded[1, ..., 3:] = False
    causal = padded & torch.ones(5, 5, dtype=torch.bool).tril()
    assert ops.key_validity(causal, True, assume_separable=True)[1].tolist() == padded[:, 0, 0].tolist()
    packed = causal.clone()
    packed[0, 0, 4, :2] = False  # a second sequence starts at position 2 in the first example
    assert ops.key_validity(packed, True) == (False, None)
    with pytest.raises(RuntimeError, match="needs a mask of padding plus causality"):
        ops.key_validity(packed, True, assume_separable=True)
