"""Corpus BLEU and chrF from the `sacrebleu` package, as an `evaluate` module.

A local module (the Hub's metric scripts cannot be fetched offline): `metrics.load("sacrebleu_chrf")`, from
the recipes folder.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """
Corpus-level BLEU and chrF computed by sacrebleu with its default settings (13a tokenisation for BLEU, chrF with
character 6-grams and beta 2), the scores reported by machine-translation papers.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): detokenized system outputs.
    references (`list[list[str]]`): per prediction, one or more detokenized references.
Returns:
    bleu (`float`), chrf (`float`): scores in [0, 100]; bleu_brevity_penalty (`float`, in (0, 1]);
    hypothesis_length, reference_length (`int`): the tokens BLEU counts; bleu_signature, chrf_signature (`str`).
Examples:
    >>> metric = metrics.load("sacrebleu_chrf")
    >>> metric.compute(predictions=["ein Hund läuft"], references=[["ein Hund rennt"]])
"""

_CITATION = """
@inproceedings{post-2018-call,
  title={A Call for Clarity in Reporting {BLEU} Scores},
  author={Post, Matt},
  booktitle={Proceedings of the Third Conference on Machine Translation},
  year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SacrebleuChrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if len({len(refs) for refs in references}) > 1:
            raise ValueError("sacrebleu needs the same number of references for every prediction")
        reference_streams = [list(stream) for stream in zip(*references)]
        bleu = sacrebleu.metrics.BLEU()
        chrf = sacrebleu.metrics.CHRF()
        bleu_score = bleu.corpus_score(predictions, reference_streams)
        chrf_score = chrf.corpus_score(predictions, reference_streams)
        return {
            "bleu": bleu_score.score,
            "chrf": chrf_score.score,
            # BLEU's brevity penalty and the lengths it compares: a lower BLEU from short outputs shows here.
            "bleu_brevity_penalty": bleu_score.bp,
            "hypothesis_length": bleu_score.sys_len,
            "reference_length": bleu_score.ref_len,
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()),
        }
