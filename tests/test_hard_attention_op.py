"""`ops.hard_attention.hard_masked_attention` against the logit-space reference it equals: outputs and gradients."""

import pytest
import torch

from attentiondrop_hf.ops import hard_attention as hard_ops
from attentiondrop_hf.ops.attention import logit_space_attention, rows_of
from attentiondrop_hf.ops.hard import apply_hard_drop, hard_drop_pattern
from attentiondrop_hf.ops.hard_attention import hard_masked_attention

# float32: the fused CPU kernels and the blocked matmuls sum in another order than the reference's single matmul, and
# the correction of the dropped pairs subtracts terms at most as large as the kept ones (about one bit lost): a few
# units in the last place of values of order 1 (measured: every test passes at 2.5e-6), well within 1e-5.
FLOAT32 = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these are many small calls, whose parallel regions only wait for each other on a shared
    2-core machine (about 2 s for the file on one thread, 20-30 s on two when other jobs run). The results do not
    depend on it: the reference runs under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(query, key, value, attendable, bias, scaling, top_k, p, fill, slot_uniforms):
    """The definition: `logit_space_attention` with the hard-masking perturbation, `[B, Q, H, D]`."""

    def perturb(logits, attendable, rows):
        dropped = hard_drop_pattern(logits, attendable, top_k, p, rows_of(slot_uniforms, rows))
        return apply_hard_drop(logits, attendable, dropped, fill)

    return logit_space_attention(query, key, value, attendable, bias=bias, scaling=scaling, perturb=perturb)[0]


def make_inputs(batch, heads, kv_heads, query_len, key_len, dim, top_k, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, query_len, dim, generator=generator)
    key = torch.randn(batch, kv_heads, key_len, dim, generator=generator)
    value = torch.randn(batch, kv_heads, key_len, dim, generator=generator)
    uniforms = torch.rand(batch, heads, query_len, min(top_k, key_len), generator=generator)
    grad_output = torch.randn(batch, query_len, heads, dim, generator=generator)
    query, key, value, grad_output = (t.to(dtype) for t in (query, key, value, grad_output))
    return query, key, value, uniforms, grad_output


def outputs_and_grads(function, query, key, value, attendable, bias, top_k, p, fill, uniforms, grad_output):
    """The output and the gradients with respect to query, key, value (and bias, when it requires one)."""
    inputs = [t.detach().requires_grad_() for t in (query, key, value)]
    if bias is not None and bias.requires_grad:
        bias = bias.detach().requires_grad_()
        inputs.append(bias)
    output = function(*inputs[:3], attendable, bias, None, top_k, p, fill, uniforms)
    return [output.detach(), *torch.autograd.grad(output, inputs, grad_output)]


def assert_matches_reference(
    query, key, value, uniforms, grad_output, attendable=None, bias=None, top_k=3, p=0.5, fill="zero"
):
    """Output and gradients within `FLOAT32` of the reference, all finite; returns them."""
    arguments = (query, key, value, attendable, bias, top_k, p, fill, uniforms, grad_output)
    got = outputs_and_grads(hard_masked_attention, *arguments)
    want = outputs_and_grads(reference, *arguments)
    assert got[0].shape == want[0].shape and got[0].is_contiguous() and got[0].dtype == query.dtype
    for name, got_tensor, want_tensor in zip(("output", "query", "key", "value", "bias"), got, want):
        assert torch.isfinite(got_tensor).all(), name
        torch.testing.assert_close(got_tensor, want_tensor, **FLOAT32, msg=lambda m, n=name: f"{n}: {m}")
    return got


@pytest.fixture(params=["fused", "exact"])
def path(request, monkeypatch):
    """Both implementations: the CPU one (fused kernels plus corrections) and the generic blocked one (off the CPU)."""
    if request.param == "exact":
        monkeypatch.setattr(hard_ops, "_fused_kernels_apply", lambda query, value: False)
    return request.param


SHAPES = {  # batch, heads, kv heads, query length, key length, head dim
    "square": (2, 4, 4, 16, 16, 8),
    "odd": (1, 2, 2, 37, 37, 24),
    "cross-attention": (2, 2, 2, 20, 50, 16),
    "keys-fewer-than-top-k": (2, 2, 2, 9, 2, 8),
    "grouped-kv-heads": (2, 4, 2, 33, 33, 16),
}


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("fill", ["zero", "mask"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_reference_on_a_shape_grid(path, shape, fill, p):
    batch, heads, kv_heads, query_len, key_len, dim = SHAPES[shape]
    query, key, value, uniforms, grad_output = make_inputs(batch, heads, kv_heads, query_len, key_len, dim, top_k=3)
    assert_matches_reference(query, key, value, uniforms, grad_output, fill=fill, p=p)


@pytest.mark.parametrize("p", [0.5, 1.0])
@pytest.mark.parametrize("fill", ["zero", "mask"])
def test_padding_and_an_example_with_every_key_masked(path, fill, p):
    query, key, value, uniforms, grad_output = make_inputs(3, 2, 2, 12, 12, 8, top_k=4)
    attendable = torch.ones(3, 1, 1, 12, dtype=torch.bool)
    attendable[1, ..., 7:] = False  # padding
    attendable[2] = False  # nothing to attend to
    got = assert_matches_reference(query, key, value, uniforms, grad_output, attendable, top_k=4, p=p, fill=fill)
    output, grad_query, grad_key, grad_value = got
    assert output[2].eq(0).all() and grad_query[2].eq(0).all()
    assert grad_key[2].eq(0).all() and grad_value[2].eq(0).all()
    assert grad_key[1, :, 7:].eq(0).all() and grad_value[1, :, 7:].eq(0).all()  # padded keys get no gradient


@pytest.mark.parametrize("fill", ["zero", "mask"])
def test_causal_mask_with_grouped_kv_heads(path, fill):
    query, key, value, uniforms, grad_output = make_inputs(2, 4, 2, 24, 24, 8, top_k=4)
    causal = torch.ones(24, 24, dtype=torch.bool).tril()[None, None]  # [1, 1, Q, K]
    for p in (0.5, 1.0):  # p = 1 with mask fill removes every key of the first rows: all-zero rows
        assert_matches_reference(query, key, value, uniforms, grad_output, causal, top_k=4, p=p, fill=fill)


@pytest.mark.parametrize("fill", ["zero", "mask"])
def test_learned_bias_gets_its_gradient(path, fill):
    query, key, value, uniforms, grad_output = make_inputs(2, 3, 3, 14, 14, 8, top_k=3)
    bias = torch.randn(1, 3, 14, 14, generator=torch.Generator().manual_seed(1)).requires_grad_()  # a position bias
    padding = torch.ones(2, 1, 1, 14, dtype=torch.bool)
    padding[1, ..., 10:] = False
    got = assert_matches_reference(query, key, value, uniforms, grad_output, padding, bias, fill=fill)
    assert got[4].shape == bias.shape and got[4].abs().sum() > 0


def test_bias_without_gradient_and_broadcast_over_queries(path):
    # A float mask's finite part, `[B, 1, 1, K]`: the fused path folds it into the kernels' additive mask.
    query, key, value, uniforms, grad_output = make_inputs(2, 2, 2, 10, 17, 8, top_k=3)
    bias = torch.randn(2, 1, 1, 17, generator=torch.Generator().manual_seed(2))
    assert_matches_reference(query, key, value, uniforms, grad_output, None, bias)


@pytest.mark.parametrize("through", ["logits", "bias"])
@pytest.mark.parametrize("fill", ["zero", "mask"])
def test_peaked_rows_take_the_exact_path(monkeypatch, fill, through):
    """A logit ~30 above the others in half the rows: dropping it removes nearly all of the row's mass, where the
    fused path's correction would cancel; those rows must be recomputed exactly (and are)."""
    batch, heads, length, dim = 2, 2, 16, 16
    query, key, value, uniforms, grad_output = make_inputs(batch, heads, heads, length, length, dim, top_k=3)
    query, key, bias = query * 0.3, key * 0.3, None
    if through == "logits":  # q_i · k_3 / sqrt(D) = 10 · 12 / 4 = 30 in the even rows
        query[:, :, ::2, 0], key[:, :, 3, 0] = 10.0, 12.0
    else:
        bias = torch.zeros(batch, heads, length, length)
        bias[:, :, ::2, 3] = 30.0
    exact_rows = []
    original = hard_ops._exact_backward
    monkeypatch.setattr(
        hard_ops, "_exact_backward", lambda call, rows: exact_rows.append(rows) or original(call, rows)
    )
    assert_matches_reference(query, key, value, uniforms, grad_output, None, bias, p=0.5, fill=fill)
    assert exact_rows[0] is not None and 0 < int(exact_rows[0].sum()) <= batch * heads * length // 2


def test_non_contiguous_inputs(path):
    """Transformers hands `[B, H, Q, D]` views of `[B, Q, H, D]` projections."""
    query, key, value, uniforms, grad_output = make_inputs(2, 4, 4, 19, 19, 8, top_k=3)
    query, key, value = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (query, key, value))
    assert not query.is_contiguous()
    assert_matches_reference(query, key, value, uniforms, grad_output)


@pytest.mark.parametrize("fill", ["zero", "mask"])
def test_bfloat16(path, fill):
    query, key, value, uniforms, grad_output = make_inputs(2, 4, 2, 40, 40, 16, top_k=4, dtype=torch.bfloat16)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    got = outputs_and_grads(
        hard_masked_attention, query, key, value, causal, None, 4, 0.5, fill, uniforms, grad_output
    )
    want = outputs_and_grads(reference, query, key, value, causal, None, 4, 0.5, fill, uniforms, grad_output)
    assert got[0].dtype == torch.bfloat16
    # bfloat16 keeps 8 bits: one unit in the last place is 0.4 to 0.8 % of a value. The reference rounds the logits,
    # the probabilities and every gradient matmul to bfloat16; the fused path keeps float32 inside its kernels and
    # rounds once at the end. The two differ by a few such units (measured: up to 1.7 % of the largest output entry,
    # 1.2 % of the largest gradient entry, over seeds and both fills), and each is as far from a float64 computation
    # of the same drop: allow 3 % of the largest entry.
    for name, got_tensor, want_tensor in zip(("output", "query", "key", "value"), got, want):
        tolerance = 0.03 * want_tensor.float().abs().max().item()
        error = (got_tensor.float() - want_tensor.float()).abs().max().item()
        assert error <= tolerance, f"{name}: {error} > {tolerance}"


@pytest.mark.parametrize("padding", [False, True])
def test_saves_nothing_of_the_logits_size(path, padding):
    batch, heads, length, dim = 1, 2, 512, 16
    query, key, value, uniforms, grad_output = make_inputs(batch, heads, heads, length, length, dim, top_k=8)
    attendable = None
    if padding:
        attendable = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        attendable[..., 400:] = False
    inputs = [t.requires_grad_() for t in (query, key, value)]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = hard_masked_attention(*inputs, attendable, None, None, 8, 0.5, "zero", uniforms)
    output.backward(grad_output)
    assert saved and max(saved) < length * length  # not even one (batch, head) of N x N logits
    assert max(saved) <= batch * heads * length * max(dim, 8)  # O(N · D): inputs, output, top-k indices and flags
