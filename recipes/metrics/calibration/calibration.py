"""Accuracy, expected calibration error (ECE) and negative log-likelihood of a classifier, as an `evaluate` module.

A local module (the Hub's metric scripts cannot be fetched offline): `metrics.load("calibration")`, from
the recipes folder.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy, expected calibration error and mean negative log-likelihood of class predictions.

ECE (Guo et al., 2017): the confidence (largest predicted probability) of every example falls in one of `n_bins`
equal-width bins ((0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1]); ECE = sum over bins of (bin size / N) *
|accuracy in the bin - mean confidence in the bin|.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): per example, the class logits (`from_logits=True`, default) or probabilities.
    references (`list[int]`): the true class of each example.
    n_bins (`int`, defaults to 15): equal-width confidence bins of the ECE.
    from_logits (`bool`, defaults to `True`): apply a softmax to `predictions` first.
Returns:
    accuracy (`float`), ece (`float`), nll (`float`, natural log, mean over examples).
Examples:
    >>> metric = metrics.load("calibration")
    >>> metric.compute(predictions=[[2.0, 0.0], [0.0, 1.0]], references=[0, 0])
"""

_CITATION = """
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={ICML},
  year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Calibration(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, n_bins=15, from_logits=True):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if from_logits:
            shifted = scores - scores.max(axis=1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        else:
            log_probs = np.log(np.clip(scores, 1e-300, None))
        probs = np.exp(log_probs)
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        # Upper-inclusive bins: a confidence of exactly b/n belongs to bin b-1.
        bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
        ece = 0.0
        for b in range(n_bins):
            in_bin = bins == b
            if in_bin.any():
                ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
        return {
            "accuracy": float(correct.mean()),
            "ece": float(ece),
            "nll": float(-log_probs[np.arange(len(labels)), labels].mean()),
        }
