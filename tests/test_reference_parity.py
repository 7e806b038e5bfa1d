"""Whole-model parity with a plain logit-space reference written here, registered as its own attention function.

Deterministic settings make the comparison exact in distribution-free terms: hard masking with p = 1 drops exactly
each row's top-k attendable logits; blur with sigma_min = sigma_max has one fixed kernel. A float mask's finite part
(BEiT's and Swin's relative position bias) is a term of the logits, added before the perturbation; entries at or
below -50 (padding, Swin's -100 shifted-window mask) mask their key.
"""

import copy
import math

import pytest
import torch
from testing_common import CASES_BY_ID, build
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attentiondrop_hf import enable_attentiondrop, force_reference_path


def reference_hard_p1(logits, allowed, top_k, fill):
    """Rank each row's allowed logits (descending) and drop ranks < min(top_k, #allowed)."""
    ranked = logits.masked_fill(~allowed, float("-inf")).argsort(dim=-1, descending=True)
    rank = ranked.argsort(dim=-1)  # rank of every key in its row
    dropped = (rank < top_k) & allowed
    if fill == "zero":
        return logits.masked_fill(dropped, 0.0), allowed
    return logits, allowed & ~dropped


def reference_blur(logits, allowed, sigma, width, causal):
    """Dense 5-D weights W[b, h, i, j, j'] = g(j' - j) · allowed[b, h, i, j'] over the kernel's window."""
    keys = logits.shape[-1]
    radius = (width - 1) // 2
    distance = torch.arange(keys)[None, :] - torch.arange(keys)[:, None]  # [j, j'] -> j' - j
    window = (distance >= -radius) & (distance <= (0 if causal else radius))
    gauss = torch.exp(-(distance.float() ** 2) / (2 * sigma**2)) * window
    weights = gauss * allowed[..., None, :].float()  # [B, H, Q, K, K]
    blurred = (weights * logits[..., None, :]).sum(-1) / weights.sum(-1).clamp_min(1e-30)
    return torch.where(allowed, blurred, logits), allowed


def role_of(module):
    if getattr(module, "is_decoder", False) and not module.is_causal:
        return "cross"
    return "causal" if module.is_causal else "self"


def register_reference(name, perturb, targets):
    def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        logits = query @ key.transpose(-1, -2) * scaling
        rows, keys = logits.shape[-2:]
        if attention_mask is None:
            causal = torch.ones(rows, keys, dtype=torch.bool).tril()
            allowed = causal if module.is_causal and rows > 1 else torch.ones(rows, keys, dtype=torch.bool)
            allowed = allowed.expand(logits.shape)
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask.expand(logits.shape)
        else:  # the model's own eager adds the whole float mask to the logits
            allowed = (attention_mask > -50).expand(logits.shape)
            logits = logits + attention_mask.masked_fill(attention_mask <= -50, 0.0)
        role = role_of(module)
        if module.training and role in targets:
            logits, allowed = perturb(logits, allowed, role == "causal")
        # A row left with no key (hard_fill="mask" dropped them all) attends to nothing: zero weights, by decision.
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    AttentionInterface.register(name, reference_attention)
    AttentionMaskInterface.register(name, sdpa_mask)


HARD = {"variant": "hard", "p": 1.0, "top_k": 3}
BLUR = {"variant": "blur", "blur_width": 5, "blur_sigma_min": 1.3, "blur_sigma_max": 1.3}
PERTURB = {
    "hard-zero": (HARD, lambda logits, allowed, causal: reference_hard_p1(logits, allowed, 3, "zero")),
    "hard-mask": ({**HARD, "hard_fill": "mask"}, lambda lg, al, causal: reference_hard_p1(lg, al, 3, "mask")),
    "blur": (BLUR, lambda logits, allowed, causal: reference_blur(logits, allowed, 1.3, 5, causal)),
}
# Larger initial weights than the defaults give peaked attention, so a wrong perturbation shows in the logits.
MODELS = [
    ("vit", {"initializer_range": 0.2}, ["self"]),
    ("marian", {"init_std": 0.2}, ["self", "causal", "cross"]),  # padded sources
    ("llama", {"initializer_range": 0.2}, ["causal"]),  # grouped KV heads, padding
    ("beit", {"initializer_range": 0.2}, ["self"]),  # relative position bias in the float mask
    ("swin", {"initializer_range": 0.2}, ["self"]),  # ... plus the -100 shifted-window mask
]


@pytest.mark.parametrize("reference_path", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize("perturbation", PERTURB)
@pytest.mark.parametrize("name, overrides, targets", MODELS, ids=[m[0] for m in MODELS])
def test_model_matches_the_logit_space_reference(name, overrides, targets, perturbation, reference_path):
    flags, perturb = PERTURB[perturbation]
    torch.manual_seed(0)
    model = enable_attentiondrop(build(name, **overrides), targets=targets, **flags)
    if name in ("beit", "swin"):
        # Learned relative position biases start at zero: give them values. BEiT's CLS token starts at zero too,
        # which ties every logit of its query row (any top-k is then right): give it values as well.
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "relative_position_bias_table" in param_name or param_name.endswith("cls_token"):
                    param.normal_(0, 1.0)
    reference = copy.deepcopy(model)
    register_reference("adtest_reference", perturb, targets)
    reference.set_attn_implementation("adtest_reference")

    inputs = CASES_BY_ID[name].inputs()
    with force_reference_path(reference_path):
        got = model.train()(**inputs).logits
    want = reference.train()(**inputs).logits
    unperturbed = copy.deepcopy(model).eval()(**inputs).logits
    if name == "llama":
        # Padding tokens embed to zero (padding_idx), so their query rows are all ties, where any top-k is right.
        valid = inputs["attention_mask"].bool()
        got, want, unperturbed = got[valid], want[valid], unperturbed[valid]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, unperturbed), "the perturbation did nothing"
    assert math.isfinite(got.sum().item())
