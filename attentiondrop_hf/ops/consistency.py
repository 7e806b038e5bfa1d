"""Loss terms of Consistency-Regularized AttentionDrop (arXiv 2504.12088, Sec. 3.3), summed over counted items.

The trainer runs one forward of the batch concatenated with itself; the two halves are two independently perturbed
predictions p1, p2 of the same inputs. The loss is the mean of both halves' cross-entropies plus lambda times
KL(p1 || p2) (the paper, `direction="forward"`) or R-Drop's 0.5 (KL(p1 || p2) + KL(p2 || p1)) (`"symmetric"`).

Items are examples (classification) or label tokens (seq2seq, causal LM); labels equal to `ignore_index` are left
out of both terms. The functions return *sums* over items so the caller can normalise by the number of items in the
whole accumulated (and distributed) batch. Everything is computed in float32.

`summed_consistency_terms` is the trainer's path: both terms on the counted items only. `summed_cross_entropy` and
`summed_kl` on the whole tensors are its reference.
"""

import torch
import torch.nn.functional as F

__all__ = ["summed_consistency_terms", "summed_cross_entropy", "summed_kl"]


def summed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> torch.Tensor:
    """Σ over counted items of the (label-smoothed) cross-entropy.

    Args:
        logits (`torch.Tensor` of shape `[..., C]`), labels (`torch.Tensor` of shape `[...]`, int).
    """
    return F.cross_entropy(
        logits.float().flatten(0, -2),
        labels.flatten(),
        ignore_index=ignore_index,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


def summed_kl(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    labels: torch.Tensor,
    direction: str = "forward",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Σ over counted items of KL(p || q) (`"forward"`) or 0.5 (KL(p || q) + KL(q || p)) (`"symmetric"`).

    Args:
        logits_p, logits_q (`torch.Tensor` of shape `[..., C]`): the two predictions; gradients flow through both.
        labels (`torch.Tensor` of shape `[...]`): items whose label is `ignore_index` are left out.
    """
    counted = (labels != ignore_index).unsqueeze(-1)
    return _pointwise_kl(logits_p, logits_q, direction).masked_fill(~counted, 0.0).sum()


def _pointwise_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, direction: str) -> torch.Tensor:
    """The KL term's summands p_c (log p_c - log q_c) (symmetrised for `"symmetric"`), shape `[..., C]`."""
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    kl = log_p.exp() * (log_p - log_q)
    if direction == "symmetric":
        kl = 0.5 * (kl + log_q.exp() * (log_q - log_p))
    return kl


def summed_consistency_terms(
    logits_first: torch.Tensor,
    logits_second: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    direction: str = "forward",
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ of the mean of both halves' cross-entropies, Σ of the KL term) over counted items, as the trainer needs.

    In a seq2seq or causal-LM batch padded to its longest sequence, often about half the token positions are
    labelled `ignore_index` (55 % in multi30k-small), and the vocabulary-sized log-softmaxes of the KL are most of the
    step's cost; the counted rows are gathered once, before them. With nothing ignored (classification) nothing is
    gathered and the numbers are the reference's, bit for bit.
    """
    counted = labels != ignore_index
    if not bool(counted.all()):  # reads a flag from the device; the boolean gather must wait for it anyway
        logits_first, logits_second, labels = logits_first[counted], logits_second[counted], labels[counted]
    task = (
        summed_cross_entropy(logits_first, labels, label_smoothing, ignore_index)
        + summed_cross_entropy(logits_second, labels, label_smoothing, ignore_index)
    ) / 2
    # Every row left is counted: no mask to apply over the vocabulary-sized summands.
    return task, _pointwise_kl(logits_first, logits_second, direction).sum()
