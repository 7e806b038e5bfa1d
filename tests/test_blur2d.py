"""The `blur2d` variant: its ops against a loop reference and each other, its invariants, its errors, and tiny
vision models with it switched on."""

import copy
import math

import pytest
import torch
from testing_common import build_peaked, image_batch

from attentiondrop_hf import AttentionDropConfig, enable_attentiondrop, force_reference_path, ops
from attentiondrop_hf.ops.blur2d import blur2d_keys, blur2d_logits, blur2d_taps, patch_grid


def loop_blur2d(logits, attendable, sigma, width, prefix, grid):
    """Key by key: the Gaussian average of the attendable in-grid neighbours (y + dy, x + dx)."""
    height, grid_width = grid
    radius = width // 2
    out = logits.clone()
    batch, heads, rows, keys = logits.shape
    for b in range(batch):
        s = max(float(sigma[b]), 1e-3)
        for h in range(heads):
            for i in range(rows):
                for key in range(prefix, keys):
                    if not attendable[b, h, i, key]:
                        continue
                    y, x = divmod(key - prefix, grid_width)
                    num = den = 0.0
                    for dy in range(-radius, radius + 1):
                        for dx in range(-radius, radius + 1):
                            ny, nx = y + dy, x + dx
                            neighbour = prefix + ny * grid_width + nx
                            if 0 <= ny < height and 0 <= nx < grid_width and attendable[b, h, i, neighbour]:
                                g = math.exp(-(dy**2 + dx**2) / (2 * s**2))
                                num += g * float(logits[b, h, i, neighbour])
                                den += g
                    out[b, h, i, key] = num / den
    return out


@pytest.mark.parametrize("prefix, grid", [(1, (4, 4)), (2, (3, 4)), (0, (2, 5))])
@pytest.mark.parametrize("width", [3, 5])
def test_blur2d_logits_matches_the_loop_reference(prefix, grid, width):
    torch.manual_seed(0)
    keys = prefix + grid[0] * grid[1]
    logits = torch.randn(2, 2, 3, keys)
    attendable = torch.rand(2, 1, 3, keys) > 0.2
    sigma = torch.tensor([0.6, 1.7])
    got = blur2d_logits(logits, attendable, blur2d_taps(sigma, width), prefix, grid)
    want = loop_blur2d(logits, attendable.expand(2, 2, 3, keys), sigma, width, prefix, grid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prefix, grid", [(1, (4, 4)), (2, (3, 5))])
def test_blurred_keys_equal_blurred_logits_forward_and_gradients(prefix, grid, dtype):
    """q · blur2d(k) == blur2d(q · k) for every row, and so are the gradients (grad_output != 1)."""
    torch.manual_seed(1)
    keys_len = prefix + grid[0] * grid[1]
    query = torch.randn(3, 2, 5, 8, dtype=dtype, requires_grad=True)
    key = torch.randn(3, 2, keys_len, 8, dtype=dtype, requires_grad=True)
    taps = blur2d_taps(torch.tensor([0.4, 1.0, 2.5]), 5).to(dtype)
    fast = query @ blur2d_keys(key, taps, prefix, grid).transpose(-1, -2)
    reference = blur2d_logits(query @ key.transpose(-1, -2), None, taps, prefix, grid)
    torch.testing.assert_close(fast, reference)
    weights = torch.randn_like(fast)
    for got, want in zip(
        torch.autograd.grad((fast * weights).sum(), (query, key)),
        torch.autograd.grad((reference * weights).sum(), (query, key)),
    ):
        torch.testing.assert_close(got, want)


def test_prefix_keys_stay_constant_rows_stay_and_grid_rows_do_not_mix():
    torch.manual_seed(2)
    prefix, grid = 1, (4, 4)
    taps = blur2d_taps(torch.tensor([1.5]), 3)
    logits = torch.randn(1, 1, 2, 17)
    blurred = blur2d_logits(logits, None, taps, prefix, grid)
    assert torch.equal(blurred[..., 0], logits[..., 0])  # the CLS key is not blurred
    constant = torch.full((1, 1, 2, 17), 3.0)
    torch.testing.assert_close(blur2d_logits(constant, None, taps, prefix, grid), constant)
    # The last patch of grid row 0 (key 4) and the first of grid row 1 (key 5) are sequence neighbours, not image
    # neighbours: changing one leaves the 2-D blur of the other alone, while the 1-D blur mixes them.
    changed = logits.clone()
    changed[..., 4] += 10.0
    assert torch.equal(blur2d_logits(changed, None, taps, prefix, grid)[..., 5], blurred[..., 5])
    offsets = ops.blur_offsets(3, causal=False)
    one_d = ops.blur_taps(torch.tensor([1.5]), offsets)
    assert not torch.equal(
        ops.blur_logits(changed, None, one_d, offsets)[..., 5], ops.blur_logits(logits, None, one_d, offsets)[..., 5]
    )


def test_sequences_that_are_not_a_grid_and_bad_options_raise():
    assert patch_grid(17, 1) == (4, 4) and patch_grid(14, 2, (3, 4)) == (3, 4)
    with pytest.raises(ValueError, match=r"16 tokens after 1 prefix tokens leaves 15 patches, not a square grid"):
        patch_grid(16, 1)
    with pytest.raises(ValueError, match=r"holds 12 patches, not the 4 x 4 grid of `blur2d_grid`"):
        patch_grid(13, 1, (4, 4))
    invalid = [
        ({"blur2d_width": 4}, "`blur2d_width` must be an odd integer >= 3"),
        ({"blur2d_sigma_min": 2.0, "blur2d_sigma_max": 1.0}, "must not exceed `blur2d_sigma_max`"),
        ({"blur2d_prefix_tokens": -1}, "`blur2d_prefix_tokens` must be an integer >= 0"),
        ({"blur2d_grid": [4]}, "`blur2d_grid` must be two positive integers"),
        ({"targets": ["causal"]}, r"perturbs bidirectional self-attention only, got targets \['causal'\]"),
    ]
    for flags, message in invalid:
        with pytest.raises(ValueError, match=message):
            AttentionDropConfig(variant="blur2d", **flags)


@pytest.mark.parametrize("case_id, prefix", [("vit", 1), ("deit", 2)])
def test_vision_models_with_blur2d(case_id, prefix):
    """Eval is the base bit for bit; training perturbs; the fast path equals the reference; prefix tokens inferred."""
    torch.manual_seed(0)
    base = build_peaked(case_id)
    model = enable_attentiondrop(copy.deepcopy(base), variant="blur2d", blur2d_sigma_min=0.5, blur2d_sigma_max=2.0)
    inputs = image_batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, base.eval()(**inputs).logits)
    model.train()
    torch.manual_seed(3)
    fast = model(**inputs).logits
    with force_reference_path():
        torch.manual_seed(3)
        reference = model(**inputs).logits
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, base.train()(**inputs).logits)
    explicit = enable_attentiondrop(
        copy.deepcopy(base), variant="blur2d", blur2d_sigma_min=0.5, blur2d_sigma_max=2.0, blur2d_prefix_tokens=prefix
    )
    torch.manual_seed(3)
    assert torch.equal(explicit.train()(**inputs).logits, fast)


def test_a_model_type_without_a_known_prefix_needs_the_option():
    model = enable_attentiondrop(build_peaked("bert"), variant="blur2d")
    from testing_common import text_batch

    with pytest.raises(ValueError, match=r"cannot tell how many tokens a 'bert' model puts before its patch grid"):
        model.train()(**text_batch())


def test_the_vit_recipe_takes_blur2d_flags():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
    import _common
    import vit_image_classification as recipe

    types = (recipe.ImageModelArguments, recipe.ImageDataArguments, recipe.AttentionDropTrainingArguments)
    argv = [
        "--model_type",
        "vit",
        "--output_dir",
        "out",
        "--variant",
        "blur2d",
        "--blur2d_width",
        "5",
        "--blur2d_grid",
        "4",
        "4",
        "--consistency_weight",
        "1",
    ]
    settings = _common.parse_arguments(types, argv)[-1]
    assert (
        settings.variant == "blur2d" and settings.options.blur2d_width == 5 and settings.options.blur2d_grid == [4, 4]
    )
