#!/usr/bin/env python
"""Fine-tune an image classifier (ViT by default) with AttentionDrop and the consistency term.

Real run (GPU, Hub access):
    python recipes/vit_image_classification.py recipes/configs/vit_cifar10_hub.json
Offline demo (2 CPU cores, a few minutes, scikit-learn's digits and a small ViT built from a config):
    python recipes/vit_image_classification.py recipes/configs/demo_digits.json
Any flag of the model, data, AttentionDrop and training arguments can be given on the command line, alone or after
a JSON file (it then overrides the file's value): `--help` lists them.
"""

import io
import logging
import os
import random
from dataclasses import dataclass, field

import metrics
import numpy as np
import torch
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
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset
from PIL import Image as PILImage
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessorPil, set_seed

from attentiondrop_hf import AttentionDropTrainer, AttentionDropTrainingArguments

logger = logging.getLogger(__name__)

DIGITS = "sklearn_digits"


@dataclass
class ImageModelArguments(ModelArguments):
    model_name_or_path: str | None = field(
        default="google/vit-base-patch16-224-in21k",
        metadata={"help": "Hub id or local path of the pretrained checkpoint to fine-tune."},
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor to use instead of the checkpoint's."}
    )


@dataclass
class ImageDataArguments:
    dataset_name: str = field(
        default="cifar10",
        metadata={
            "help": f"Hub dataset, or '{DIGITS}' (scikit-learn's 8x8 digits, offline). Unused with --train_file."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_file: str | None = field(
        default=None, metadata={"help": "Local training data: a parquet file or an image folder (one folder a class)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data, like --train_file."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of the training split held out when there is no validation split."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column of the images (default: 'image' or 'img', whichever exists)."}
    )
    label_column_name: str = field(default="label", metadata={"help": "Column of the class labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set (debugging)."})
    random_resized_crop: bool = field(default=True, metadata={"help": "Train-time random resized crop."})
    crop_scale_min: float = field(default=0.08, metadata={"help": "Smallest crop area fraction of the random crop."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Train-time random horizontal flip."})

    def __post_init__(self):
        require_file(self.train_file, "--train_file")
        require_file(self.validation_file, "--validation_file")
        if self.validation_file and not self.train_file:
            raise ValueError("--validation_file needs --train_file")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"--crop_scale_min must be in (0, 1], got {self.crop_scale_min}")


def digits_dataset(seed: int = 0) -> DatasetDict:
    """scikit-learn's 1,797 real 8x8 handwritten digits as RGB images, split 80/20."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255 / 16)).astype(np.uint8)
    images = [PILImage.fromarray(p, mode="L").convert("RGB") for p in pixels]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    full = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    split = full.train_test_split(test_size=0.2, seed=seed, stratify_by_column="label")
    return DatasetDict(train=split["train"], validation=split["test"])


def _local_files(path: str) -> tuple[str, str]:
    if os.path.isdir(path):
        return "imagefolder", os.path.join(path, "**")
    return "parquet", path


def load_images(data_args: ImageDataArguments, cache_dir: str | None, seed: int) -> DatasetDict:
    if data_args.train_file:
        builder, train = _local_files(data_args.train_file)
        files = {"train": train}
        if data_args.validation_file:
            files["validation"] = _local_files(data_args.validation_file)[1]
        try:
            raw = load_dataset(builder, data_files=files, cache_dir=cache_dir)
        except Exception as error:  # an unreadable file: say which flag pointed at it
            raise ValueError(f"could not read --train_file / --validation_file ({files}): {error}") from error
    elif data_args.dataset_name == DIGITS:
        raw = digits_dataset(seed)
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    if "validation" not in raw:
        if "test" in raw:
            raw["validation"] = raw.pop("test")
        else:
            split = raw["train"].train_test_split(data_args.train_val_split, seed=seed)
            raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def as_image_column(dataset: Dataset, column: str, source: str) -> Dataset:
    """The image column typed as `datasets.Image`, which is what training decodes. A parquet written with pandas holds
    plain bytes or {bytes, path} structs without the feature's metadata: they are cast here, so that the check below
    and the training transforms read the same images. Any other type is refused, naming the file and the column."""
    feature = dataset.features[column]
    if isinstance(feature, Image):
        return dataset
    if isinstance(feature, dict):  # a struct column
        image_like = bool(feature) and set(feature) <= {"bytes", "path"}
    else:
        encoded_or_path = {"binary", "large_binary", "string", "large_string"}
        image_like = isinstance(feature, Value) and feature.dtype in encoded_or_path
    if not image_like:
        raise ValueError(
            f"{source}: column {column!r} holds {feature}, not images (expected encoded image bytes, file paths, "
            "or {'bytes', 'path'} records)"
        )
    return dataset.cast_column(column, Image())


def check_images_decode(dataset: Dataset, column: str, source: str) -> None:
    """Open every image's header (fast: no pixels are decoded) and name the file and row of one that cannot be read,
    before anything trains."""
    raw = dataset.cast_column(column, Image(decode=False))
    for row, image in enumerate(raw[column]):
        try:
            data = image["bytes"] if image.get("bytes") is not None else image["path"]
            with PILImage.open(io.BytesIO(data) if isinstance(data, bytes) else data) as opened:
                opened.verify()
        except Exception as error:  # PIL raises several types for corrupt data
            where = image.get("path") or source
            message = f"{where}: row {row} of column {column!r}: the image cannot be decoded ({error})"
            raise ValueError(message) from None


def image_column(data_args: ImageDataArguments, columns: list[str]) -> str:
    if data_args.image_column_name is not None:
        if data_args.image_column_name not in columns:
            raise ValueError(f"--image_column_name {data_args.image_column_name!r} is not a column of {columns}")
        return data_args.image_column_name
    found = [name for name in ("image", "img") if name in columns]
    if not found:
        raise ValueError(f"no image column ('image' or 'img') in {columns}; pass --image_column_name")
    return found[0]


def label_encoding(dataset: Dataset, label_column: str) -> tuple[list[str], dict | None]:
    """Class names, and the map from the column's values to class indices (`None`: a ClassLabel, already indices)."""
    if label_column not in dataset.column_names:
        raise ValueError(f"--label_column_name {label_column!r} is not a column of {dataset.column_names}")
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    values = sorted(set(dataset[label_column]))  # numeric order for numbers: 2 before 10
    return [str(value) for value in values], {value: index for index, value in enumerate(values)}


class AugmentationRandomness:
    """The random numbers of the train-time augmentations, apart from torch's (so that AttentionDrop's draws do not
    change which crops a run sees: runs that differ only in regularization see the same images).

    In the main process (`dataloader_num_workers=0`) one generator seeded with the training seed. A data-loading
    worker would otherwise carry a copy of that generator, the same in every worker and, without persistent workers,
    again at every epoch: each worker instead gets its own generator, seeded from the seed torch gives that worker
    (different per worker and per epoch).
    """

    def __init__(self, seed: int):
        self.main = random.Random(seed)
        self.worker_seed, self.worker = None, None

    def generator(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.main
        if self.worker_seed != info.seed:
            self.worker_seed, self.worker = info.seed, random.Random(info.seed)
        return self.worker


def random_resized_crop(image, scale_min: float, rng: random.Random):
    """torchvision's RandomResizedCrop sampling (area in [scale_min, 1], aspect in [3/4, 4/3]), on a PIL image."""
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(scale_min, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w, crop_h = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            return image.crop((left, top, left + crop_w, top + crop_h))
    return image


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args, attentiondrop = parse_arguments(
        (ImageModelArguments, ImageDataArguments, AttentionDropTrainingArguments), argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # The transforms below read the image column, which the Trainer would otherwise drop before they run.
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    raw = load_images(data_args, model_args.cache_dir, training_args.seed)
    image_key = image_column(data_args, raw["train"].column_names)
    labels, label_ids = label_encoding(raw["train"], data_args.label_column_name)
    for split, source in (("train", data_args.train_file), ("validation", data_args.validation_file)):
        source = source or data_args.train_file or f"the {split} split of {data_args.dataset_name}"
        raw[split] = as_image_column(raw[split], image_key, source)
        check_images_decode(raw[split], image_key, source)
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            raw[split] = raw[split].shuffle(seed=training_args.seed).select(range(min(limit, len(raw[split]))))

    config = load_config(
        model_args,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        finetuning_task="image-classification",
    )
    model = load_model(AutoModelForImageClassification, model_args, config, attentiondrop)
    processor_source = model_args.image_processor_name or model_args.model_name_or_path
    if processor_source:
        image_processor = AutoImageProcessor.from_pretrained(processor_source, cache_dir=model_args.cache_dir)
    else:  # a model built from a config: resize to its input size, normalise to [-1, 1]
        size = config.image_size
        image_processor = ViTImageProcessorPil(size={"height": size, "width": size})

    randomness = AugmentationRandomness(training_args.seed)

    def transform(train: bool):
        def apply(batch):
            images = [image.convert("RGB") for image in batch[image_key]]
            rng = randomness.generator()
            if train and data_args.random_resized_crop:
                images = [random_resized_crop(image, data_args.crop_scale_min, rng) for image in images]
            if train and data_args.horizontal_flip:
                flip = PILImage.Transpose.FLIP_LEFT_RIGHT
                images = [image.transpose(flip) if rng.random() < 0.5 else image for image in images]
            batch["pixel_values"] = image_processor(images, return_tensors="pt")["pixel_values"]
            raw_labels = batch[data_args.label_column_name]
            batch["labels"] = raw_labels if label_ids is None else [label_ids[value] for value in raw_labels]
            return batch

        return apply

    raw["train"].set_transform(transform(train=True))
    raw["validation"].set_transform(transform(train=False))

    def collate(examples):
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples]),
        }

    calibration = metrics.load("calibration")

    def compute_metrics(prediction):
        return calibration.compute(predictions=prediction.predictions, references=prediction.label_ids)

    trainer = AttentionDropTrainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw["validation"],
        data_collator=collate,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
    )
    trainer.train(resume_from_checkpoint=checkpoint_to_resume(model_args, training_args))
    results = trainer.evaluate()
    dataset = os.path.basename(data_args.train_file) if data_args.train_file else data_args.dataset_name
    finish(
        trainer,
        results,
        card={"finetuned_from": model_args.model_name_or_path, "tasks": "image-classification", "dataset": dataset},
    )
    return results


if __name__ == "__main__":
    run_from_command_line(main)
