"""Checks that need a CUDA device (skipped elsewhere): bf16 parity of the fast paths, and their memory."""

import pytest
import torch

from attentiondrop_hf import force_reference_path, ops
from attentiondrop_hf.hf.attention import attentiondrop_attention_forward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class Module(torch.nn.Module):
    def __init__(self, flags, causal=False):
        super().__init__()
        from transformers import ViTConfig

        self.config = ViTConfig(num_hidden_layers=1)
        self.config.attentiondrop = flags
        self.is_causal = causal
        self.layer_idx = 0


def attend(flags, length, causal=False, reference=False, seed=0):
    torch.manual_seed(seed)
    shape = (2, 4, length, 64)
    query, key, value = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    module = Module(flags, causal).train()
    targets = {"targets": ["causal"]} if causal else {}
    module.config.attentiondrop = {**flags, **targets}
    with force_reference_path(reference):
        torch.manual_seed(seed + 1)
        output, _ = attentiondrop_attention_forward(module, query, key, value, None, scaling=0.125)
    output.float().square().sum().backward()
    return output.float(), [t.grad.float() for t in (query, key, value)]


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


def test_ops_on_cuda_draw_from_the_cuda_generator():
    torch.manual_seed(0)
    first = ops.draw_slot_uniforms(2, 2, 3, 4, torch.device("cuda"))
    torch.manual_seed(0)
    assert torch.equal(first, ops.draw_slot_uniforms(2, 2, 3, 4, torch.device("cuda")))
