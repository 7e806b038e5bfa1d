"""Metrics of the experiments (issue #9) beyond the recipe's accuracy, ECE and NLL: the Brier score, reliability
bins, accuracy under an L-infinity PGD attack in pixel space, and the entropy of attention rows.

Pure functions of arrays and tensors (no files, no Trainer), each tested against a small hand-computed case in
`tests/test_experiments.py`. ECE uses the same upper-inclusive equal-width bins as the recipe's local "calibration"
metric (`recipes/metrics/calibration`), so the two agree on the same logits.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "attention_entropy",
    "brier_score",
    "classification_metrics",
    "expected_calibration_error",
    "pgd_correct",
    "robust_accuracy",
    "pgd_linf",
    "pixel_box",
    "reliability_bins",
    "softmax",
]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of `[N, C]` logits, in float64."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _check_probs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"probs must be [N, C] and labels [N], got {probs.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]}), got {labels.min()}..{labels.max()}")
    return probs, labels


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, list]:
    """Per equal-width confidence bin: example count, summed confidence and number correct.

    Bins are upper-inclusive, ((b-1)/n, b/n]: a confidence of exactly b/n belongs to bin b-1 (as the recipe's ECE).
    Sums rather than means, so bins of several seeds add up before dividing.

    Args:
        probs (`np.ndarray` of shape `[N, C]`): predicted class probabilities.
        labels (`np.ndarray` of shape `[N]`): true class indices.
        n_bins (`int`): number of bins over [0, 1].

    Returns:
        `dict` with `count`, `confidence_sum` and `correct` (lists of length `n_bins`).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs, labels = _check_probs(probs, labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    return {
        "count": np.bincount(bins, minlength=n_bins).tolist(),
        "confidence_sum": np.bincount(bins, weights=confidence, minlength=n_bins).tolist(),
        "correct": np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins).tolist(),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al., 2017): sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|."""
    bins = reliability_bins(probs, labels, n_bins)
    count = np.asarray(bins["count"], dtype=np.float64)
    gaps = np.abs(np.asarray(bins["correct"]) - np.asarray(bins["confidence_sum"]))  # = count * |acc - conf|
    return float(gaps.sum() / count.sum())


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score (Brier, 1950): mean over examples of sum over classes of (p_c - 1[c = y])^2.

    Ranges over [0, 2]; a uniform prediction over C classes scores 1 - 1/C.
    """
    probs, labels = _check_probs(probs, labels)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def classification_metrics(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, ECE, NLL (natural log) and Brier score of `[N, C]` logits."""
    probs, labels = _check_probs(softmax(logits), labels)
    log_probs = np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))
    return {
        "accuracy": float((probs.argmax(axis=1) == labels).mean()),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "nll": float(-log_probs.mean()),
        "brier": brier_score(probs, labels),
    }


def pixel_box(
    mean: Sequence[float], std: Sequence[float], pixel_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scale and bounds of normalised inputs `(x - mean) / std` for pixels in `pixel_range`.

    An epsilon of e in pixel space is e / std in normalised space, and the valid pixels [0, 1] map to
    [(0 - mean) / std, (1 - mean) / std]. Each is returned per channel, shaped `[1, C, 1, 1]` to broadcast over images.

    Returns:
        `(scale, lower, upper)`: `1 / std`, the smallest and the largest valid normalised value.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    if mean_t.shape != std_t.shape or (std_t <= 0).any():
        raise ValueError(f"mean and std must have one value per channel and std > 0, got {mean} and {std}")
    low, high = pixel_range
    return 1.0 / std_t, (low - mean_t) / std_t, (high - mean_t) / std_t


def pgd_linf(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float | torch.Tensor,
    steps: int,
    step_size: float | torch.Tensor,
    lower: float | torch.Tensor,
    upper: float | torch.Tensor,
    random_start: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent on the cross-entropy (Madry et al., 2018), L-infinity ball.

    Each step moves `inputs` by `step_size * sign(grad)` up the loss, then projects onto the ball of radius `epsilon`
    around the clean inputs and onto the valid box `[lower, upper]`. Without a random start the attack is a
    deterministic function of the model and the inputs; with one (`random_start`, a seeded CPU generator) it starts
    from a uniform point of the ball (clipped to the box), the same point for every run given the same seed, so
    paired runs are still attacked alike.

    Args:
        forward (`Callable`): maps inputs `[B, ...]` to logits `[B, C]` (the model in eval mode).
        inputs (`torch.Tensor` of shape `[B, ...]`): clean inputs (inside the box).
        labels (`torch.Tensor` of shape `[B]`): true classes.
        epsilon, step_size (`float` or `torch.Tensor` broadcasting to `inputs`): ball radius and step, in the units
            of `inputs` (for normalised images, the pixel value times `pixel_box`'s scale).
        steps (`int`): number of steps (0 returns the clean inputs).
        lower, upper (`float` or `torch.Tensor` broadcasting to `inputs`): the valid input box.
        random_start (`torch.Generator`, *optional*): draws the starting point; `None` starts at the clean inputs.

    Returns:
        `torch.Tensor` shaped like `inputs`: the adversarial inputs, detached.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    clean = inputs.detach()
    # Tensors on the inputs' device, so that a float or a per-channel tensor both broadcast.
    epsilon, lower, upper = (
        torch.as_tensor(v, dtype=clean.dtype, device=clean.device) for v in (epsilon, lower, upper)
    )
    adversarial = clean.clone()
    if random_start is not None:
        noise = torch.rand(clean.shape, generator=random_start, dtype=clean.dtype).to(clean.device)
        adversarial = torch.minimum(torch.maximum(clean + (2 * noise - 1) * epsilon, lower), upper)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(forward(adversarial), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = adversarial + step_size * grad.sign()
            adversarial = torch.minimum(torch.maximum(adversarial, clean - epsilon), clean + epsilon)
            adversarial = torch.minimum(torch.maximum(adversarial, lower), upper)
    return adversarial.detach()


def pgd_correct(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float | torch.Tensor,
    steps: int,
    lower: float | torch.Tensor,
    upper: float | torch.Tensor,
    batch_size: int = 250,
    random_start_seed: int | None = None,
) -> torch.Tensor:
    """Which inputs the model still classifies right under PGD (step size 2.5 * epsilon / steps, the usual choice),
    attacked in batches; with `random_start_seed`, from random starts drawn by a generator of that seed (the same
    for every run). Returns a boolean CPU tensor `[B]`: per image, so that several attacks combine into the
    per-image worst case (an image counts as robust only if every attack failed on it)."""
    step_size = 2.5 * epsilon / max(steps, 1)
    generator = None if random_start_seed is None else torch.Generator().manual_seed(random_start_seed)
    correct = []
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
        adversarial = pgd_linf(forward, x, y, epsilon, steps, step_size, lower, upper, random_start=generator)
        with torch.no_grad():
            correct.append((forward(adversarial).argmax(-1) == y).cpu())
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)


def robust_accuracy(*correct: torch.Tensor) -> float:
    """The accuracy under the per-image worst of several attacks: an image counts as robust only if every attack
    failed on it (`correct` are `pgd_correct`'s boolean vectors over the same images)."""
    if not correct or any(c.shape != correct[0].shape for c in correct):
        raise ValueError(
            f"robust_accuracy needs boolean vectors over the same images, got shapes {[c.shape for c in correct]}"
        )
    robust = torch.stack(correct).all(dim=0)
    return float(robust.float().mean()) if len(robust) else 0.0


def gradient_variance(
    loss_of_batch: Callable[[int], torch.Tensor], parameters: Sequence[torch.Tensor], batches: int
) -> dict[str, float]:
    """The variance of minibatch gradients, the quantity the paper reports about 10 % lower with AttentionDrop.

    For minibatches k = 0 .. K-1, g_k is the gradient of `loss_of_batch(k)` with respect to `parameters` (all of
    them, flattened into one vector) and g the mean of the g_k.

    Returns:
        `variance`: the trace of the gradients' covariance, sum_k ||g_k - g||^2 / (K - 1); `mean_norm_sq`: ||g||^2;
        `noise_to_signal`: their ratio, which does not depend on the scale of the loss.
    """
    if batches < 2:
        raise ValueError(f"the variance needs at least 2 minibatches, got {batches}")
    parameters = list(parameters)
    gradients = []
    for k in range(batches):
        grads = torch.autograd.grad(loss_of_batch(k), parameters, allow_unused=True)
        flat = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]
        gradients.append(torch.cat([g.detach().double().reshape(-1) for g in flat]))
    stacked = torch.stack(gradients)  # [K, P]
    mean = stacked.mean(dim=0)
    variance = float(((stacked - mean) ** 2).sum() / (batches - 1))
    mean_norm_sq = float(mean.square().sum())
    return {
        "variance": variance,
        "mean_norm_sq": mean_norm_sq,
        "noise_to_signal": variance / mean_norm_sq if mean_norm_sq > 0 else float("inf"),
    }


def attention_entropy(probs: torch.Tensor, key_mask: torch.Tensor | None = None) -> float:
    """Mean entropy (nats) of attention rows: -sum_j p_ij log p_ij, averaged over batch, heads and queries.

    Args:
        probs (`torch.Tensor` of shape `[B, H, Q, K]`): attention probabilities (rows sum to 1).
        key_mask (`torch.Tensor` of shape `[B, K]`, *optional*): 1 for real keys; rows of padded queries are left
            out of the mean. `None`: every query counts (images).

    Returns:
        `float`: 0 for one-hot rows, log(K) for uniform rows over K keys.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [batch, heads, queries, keys], got shape {tuple(probs.shape)}")
    probs = probs.double()
    # 0 * log 0 = 0: only positive probabilities enter the logarithm.
    row_entropy = -(probs * torch.where(probs > 0, probs.log(), torch.zeros_like(probs))).sum(-1)  # [B, H, Q]
    if key_mask is None:
        return float(row_entropy.mean())
    query_mask = key_mask.bool()[:, None, :].expand_as(row_entropy)  # queries are the keys' positions (self-attn)
    return float(row_entropy[query_mask].mean())
