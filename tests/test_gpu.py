"""Checks that need a CUDA device (skipped elsewhere): bf16 parity of the fast paths, and their memory."""

import pytest
import torch
from testing_common import planned_attention_module

from attentiondrop_hf import force_reference_path, ops
from attentiondrop_hf.hf.attention import attentiondrop_attention_forward

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def attend(flags, length, causal=False, reference=False, seed=0, device="cuda", dtype=torch.bfloat16):
    """Output and gradients of one attention call at B = 2, H = 4, D = 64 on random inputs (same draws per seed)."""
    torch.manual_seed(seed)
    shape = (2, 4, length, 64)
    query, key, value = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    module = planned_attention_module(flags, causal)
    with force_reference_path(reference):
        torch.manual_seed(seed + 1)
        output, _ = attentiondrop_attention_forward(module, query, key, value, None, scaling=0.125)
    output.float().square().sum().backward()
    return output.float(), [t.grad.float() for t in (query, key, value)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["hard", "blur"])
def test_the_helper_of_the_gpu_checks_runs_on_the_cpu(variant, causal):
    """The GPU checks below cannot run here: this keeps their helper working (fast path against reference, float32,
    at a length that takes the fused hard op)."""
    flags = {"hard": {"variant": "hard", "p": 0.3, "top_k": 8}, "blur": {"variant": "blur", "blur_sigma_min": 0.5}}
    identity = {"hard": {"variant": "hard", "p": 0.0}, "blur": {"variant": "blur", "blur_sigma_max": 0.0}}
    on_cpu = {"device": "cpu", "dtype": torch.float32}
    fast, fast_grads = attend(flags[variant], 1030, causal, **on_cpu)
    reference, reference_grads = attend(flags[variant], 1030, causal, reference=True, **on_cpu)
    unperturbed, _ = attend(identity[variant], 1030, causal, **on_cpu)
    assert (fast - unperturbed).abs().max() > 1e-3
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    for got, want in zip(fast_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [197, 2048])
def test_blur_fast_path_matches_reference_in_bf16(length, causal):
    flags = {"variant": "blur", "blur_width": 5, "blur_sigma_min": 0.5, "blur_sigma_max": 1.5}
    fast, fast_grads = attend(flags, length, causal)
    reference, reference_grads = attend(flags, length, causal, reference=True)
    # bf16 inputs: the key blur rounds the blurred keys to bf16, the reference rounds only the logits.
    torch.testing.assert_close(fast, reference, rtol=3e-2, atol=3e-2)
    for got, want in zip(fast_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@gpu_only
def test_blocked_hard_path_matches_reference_and_saves_memory():
    flags = {"variant": "hard", "p": 0.3, "top_k": 8}
    torch.cuda.reset_peak_memory_stats()
    fast, fast_grads = attend(flags, 4096)
    fast_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    reference, reference_grads = attend(flags, 4096, reference=True)
    reference_peak = torch.cuda.max_memory_allocated()
    torch.testing.assert_close(fast, reference, rtol=2e-2, atol=2e-2)
    for got, want in zip(fast_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
    assert fast_peak < reference_peak / 4


@pytest.mark.gpu
@gpu_only
def test_ops_on_cuda_draw_from_the_cuda_generator():
    torch.manual_seed(0)
    first = ops.draw_slot_uniforms(2, 2, 3, 4, torch.device("cuda"))
    torch.manual_seed(0)
    assert torch.equal(first, ops.draw_slot_uniforms(2, 2, 3, 4, torch.device("cuda")))
