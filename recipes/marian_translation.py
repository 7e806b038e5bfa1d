#!/usr/bin/env python
"""Fine-tune a Marian translation model with AttentionDrop and the consistency term; BLEU and chrF by sacreBLEU.

Real run (GPU, Hub access):
    python recipes/marian_translation.py recipes/configs/marian_wmt16_hub.json
Offline (Multi30k from ../shared/data, a small Marian built from a config, a tokenizer trained on the data):
    python recipes/marian_translation.py recipes/configs/marian_multi30k.json
Flags override a JSON file's values; `--help` lists them all. `--targets self causal cross` perturbs encoder
self-attention (the paper), decoder self-attention and encoder-decoder attention.
"""

import json
import logging
import os
from dataclasses import dataclass, field

import metrics
import numpy as np
from _common import (
    ModelArguments,
    checkpoint_to_resume,
    finish,
    load_config,
    load_model,
    parse_arguments,
    require_file,
    run_from_command_line,
)
from datasets import DatasetDict, load_dataset
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, MarianTokenizer, set_seed

from attentiondrop_hf import AttentionDropSeq2SeqTrainer, AttentionDropSeq2SeqTrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class TranslationModelArguments(ModelArguments):
    model_name_or_path: str | None = field(
        default="Helsinki-NLP/opus-mt-en-de",
        metadata={"help": "Hub id or local path of the pretrained checkpoint to fine-tune."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to use. Without one (and without a checkpoint) a Marian tokenizer is trained."},
    )
    spm_vocab_size: int = field(
        default=8000, metadata={"help": "Sentencepiece vocabulary per language when a tokenizer is trained."}
    )


@dataclass
class TranslationDataArguments:
    dataset_name: str = field(default="wmt16", metadata={"help": "Hub dataset. Unused with --train_file."})
    dataset_config_name: str | None = field(default="de-en", metadata={"help": "Configuration of the Hub dataset."})
    train_file: str | None = field(
        default=None, metadata={"help": 'Local jsonl, one {"translation": {"en": ..., "de": ...}} per line.'}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation jsonl."})
    test_file: str | None = field(default=None, metadata={"help": "Local test jsonl, translated after training."})
    source_lang: str = field(default="en", metadata={"help": "Key of the source sentence in `translation`."})
    target_lang: str = field(default="de", metadata={"help": "Key of the target sentence in `translation`."})
    max_source_length: int = field(default=128, metadata={"help": "Source tokens kept (longer is truncated)."})
    max_target_length: int = field(default=128, metadata={"help": "Target tokens kept (longer is truncated)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test set."})

    def __post_init__(self):
        for flag in ("train_file", "validation_file", "test_file"):
            require_file(getattr(self, flag), f"--{flag}")
        if (self.validation_file or self.test_file) and not self.train_file:
            raise ValueError("--validation_file / --test_file need --train_file")
        if self.source_lang == self.target_lang:
            raise ValueError(f"--source_lang and --target_lang are both {self.source_lang!r}")


def check_pair(pair, languages: dict[str, str], where: str) -> None:
    """A clear error, naming the file and row (`where`) and the language, for a row the recipe cannot train on.

    Args:
        languages (`dict[str, str]`): flag -> language, e.g. `{"--source_lang": "en", "--target_lang": "de"}`.
    """
    translation = pair.get("translation") if isinstance(pair, dict) else None
    if not isinstance(translation, dict):
        raise ValueError(f'{where}: expected {{"translation": {{...}}}}, got {json.dumps(pair)[:80]}')
    for flag, language in languages.items():
        if language not in translation:
            raise ValueError(
                f"{where}: {flag} {language!r} is not a language of this row (languages: {sorted(translation)})"
            )
        text = translation[language]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: {flag} {language!r} is {json.dumps(text)}, not a sentence")


def check_jsonl(path: str, languages: dict[str, str]) -> None:
    """Read a translation jsonl line by line: malformed JSON, an empty file or a bad row raise naming the file and
    line, before a tokenizer is trained on it."""
    rows = 0
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                pair = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error})") from None
            check_pair(pair, languages, f"{path}, line {line_number}")
            rows += 1
    if rows == 0:
        raise ValueError(f'{path} holds no examples (one {{"translation": {{...}}}} object per line expected)')


def load_pairs(data_args: TranslationDataArguments, cache_dir: str | None) -> DatasetDict:
    languages = {"--source_lang": data_args.source_lang, "--target_lang": data_args.target_lang}
    if data_args.train_file:
        files = {"train": data_args.train_file}
        files.update(
            {s: getattr(data_args, f"{s}_file") for s in ("validation", "test") if getattr(data_args, f"{s}_file")}
        )
        for path in files.values():
            check_jsonl(path, languages)
        raw = load_dataset("json", data_files=files, cache_dir=cache_dir)
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
        for split, dataset in raw.items():
            if "translation" not in dataset.column_names:
                raise ValueError(f"the data has no 'translation' column (columns: {dataset.column_names})")
            for row, translation in enumerate(dataset["translation"]):
                check_pair({"translation": translation}, languages, f"{data_args.dataset_name} {split}, row {row}")
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=0.05, seed=0)
        raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def train_marian_tokenizer(pairs, source_lang: str, target_lang: str, directory: str, vocab_size: int):
    """A MarianTokenizer (one sentencepiece model per language, one shared vocabulary) trained on the data."""
    import sentencepiece as spm

    os.makedirs(directory, exist_ok=True)
    vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for language, name in ((source_lang, "source"), (target_lang, "target")):
        sentences = (pair[language] for pair in pairs)
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_prefix=os.path.join(directory, name),
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # small corpora have fewer pieces than asked for
            character_coverage=1.0,
            bos_id=-1,
            eos_id=-1,
            minloglevel=2,
        )
        processor = spm.SentencePieceProcessor(model_file=os.path.join(directory, f"{name}.model"))
        for piece_id in range(processor.get_piece_size()):
            vocab.setdefault(processor.id_to_piece(piece_id), len(vocab))
    for name in ("source", "target"):
        os.replace(os.path.join(directory, f"{name}.model"), os.path.join(directory, f"{name}.spm"))
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    return MarianTokenizer(
        source_spm=os.path.join(directory, "source.spm"),
        target_spm=os.path.join(directory, "target.spm"),
        vocab=os.path.join(directory, "vocab.json"),
        source_lang=source_lang,
        target_lang=target_lang,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args, attentiondrop = parse_arguments(
        (TranslationModelArguments, TranslationDataArguments, AttentionDropSeq2SeqTrainingArguments), argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    raw = load_pairs(data_args, model_args.cache_dir)
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    if "test" in raw and data_args.max_predict_samples is not None:
        raw["test"] = raw["test"].select(range(min(data_args.max_predict_samples, len(raw["test"]))))

    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_source:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, cache_dir=model_args.cache_dir)
    else:
        tokenizer = train_marian_tokenizer(
            raw["train"]["translation"],
            data_args.source_lang,
            data_args.target_lang,
            os.path.join(training_args.output_dir, "tokenizer"),
            model_args.spm_vocab_size,
        )
    special_tokens = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,  # Marian starts decoding from the pad token
        "forced_eos_token_id": tokenizer.eos_token_id,
    }
    config = load_config(model_args, **({} if model_args.model_name_or_path else special_tokens))
    if not model_args.model_name_or_path:
        config.vocab_size = config.decoder_vocab_size = len(tokenizer)
    model = load_model(AutoModelForSeq2SeqLM, model_args, config, attentiondrop)
    for flag in ("max_source_length", "max_target_length"):
        if getattr(data_args, flag) > config.max_position_embeddings:
            logger.warning(
                f"--{flag} {getattr(data_args, flag)} exceeds the model's {config.max_position_embeddings} "
                "positions; truncating to them"
            )
            setattr(data_args, flag, config.max_position_embeddings)

    def tokenize(batch):
        sources = [pair[data_args.source_lang] for pair in batch["translation"]]
        targets = [pair[data_args.target_lang] for pair in batch["translation"]]
        inputs = tokenizer(sources, max_length=data_args.max_source_length, truncation=True)
        targets = tokenizer(text_target=targets, max_length=data_args.max_target_length, truncation=True)
        inputs["labels"] = targets["input_ids"]
        return inputs

    columns = raw["train"].column_names
    tokenized = DatasetDict({split: raw[split].map(tokenize, batched=True, remove_columns=columns) for split in raw})
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    sacrebleu_chrf = metrics.load("sacrebleu_chrf")
    # Translations are scored against the raw reference strings, not the references decoded back from token ids
    # (the tokenizer does not round-trip every sentence). Generation keeps the dataset's order.
    references = {split: [pair[data_args.target_lang].strip() for pair in raw[split]["translation"]] for split in raw}
    scored = {"split": "validation"}  # which split the next compute_metrics call scores

    def compute_metrics(prediction):
        predictions = np.where(prediction.predictions != -100, prediction.predictions, tokenizer.pad_token_id)
        hypotheses = [text.strip() for text in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        wanted = references[scored["split"]]
        if len(wanted) != len(hypotheses):
            raise ValueError(f"{len(hypotheses)} translations for {len(wanted)} {scored['split']} references")
        scores = sacrebleu_chrf.compute(predictions=hypotheses, references=[[text] for text in wanted])
        return {
            "bleu": scores["bleu"],
            "chrf": scores["chrf"],
            "bleu_brevity_penalty": scores["bleu_brevity_penalty"],
            "length_ratio": scores["hypothesis_length"] / max(scores["reference_length"], 1),
        }

    trainer = AttentionDropSeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
    )
    trainer.train(resume_from_checkpoint=checkpoint_to_resume(model_args, training_args))
    results = trainer.evaluate(metric_key_prefix="eval")
    if "test" in tokenized:
        scored["split"] = "test"
        test_metrics = trainer.predict(tokenized["test"], metric_key_prefix="test").metrics
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        kept = ("test_bleu", "test_chrf", "test_loss", "test_bleu_brevity_penalty", "test_length_ratio")
        results.update({k: v for k, v in test_metrics.items() if k in kept})
    dataset = os.path.basename(data_args.train_file) if data_args.train_file else data_args.dataset_name
    card = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "translation",
        "dataset": dataset,
        "language": [data_args.source_lang, data_args.target_lang],
    }
    finish(trainer, results, card=card)
    return results


if __name__ == "__main__":
    run_from_command_line(main)
