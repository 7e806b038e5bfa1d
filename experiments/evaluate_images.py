"""The end-of-training evaluation of an image classifier saved by the ViT recipe (issue #9, item 3).

Loads the checkpoint and image processor the recipe saved to its `--output_dir` (stock Transformers: nothing of the
plugin is needed at inference) and measures, once, after training:
- on the evaluation data (the test set in final runs): accuracy, ECE (15 bins), NLL, Brier score, reliability bins;
- on a fixed subset of it (the same images for every run): accuracy under L-infinity PGD, epsilon given in pixel
  units (the processor normalises, so the radius and the valid box are converted per channel), without a random
  start (`pgd_steps`) and with one and more steps (`pgd_strong_steps`, 20 by default), and the per-image worst
  of the two (an image counts as robust only if both attacks failed on it);
- on the un-augmented training subset: accuracy and NLL (with the test accuracy: the overfitting gap);
- on a fixed batch in eval mode: the mean entropy of the last layer's attention rows;
- when the protocol asks (`gradient_variance`): the variance of minibatch gradients of the task loss at every saved
  checkpoint and at the end, in training mode (the run's AttentionDrop flags and dropout on).
"""

import numpy as np
import torch
from datasets import ClassLabel, load_dataset
from measures import (
    attention_entropy,
    classification_metrics,
    gradient_variance,
    pgd_correct,
    pixel_box,
    reliability_bins,
    robust_accuracy,
    softmax,
)
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

__all__ = ["evaluate_image_classifier", "gradient_variance_at_checkpoints"]


def _image_column(dataset, name: str | None) -> str:
    if name is not None:
        return name
    found = [column for column in ("image", "img") if column in dataset.column_names]
    if not found:
        raise ValueError(f"no image column ('image' or 'img') in {dataset.column_names}; pass --image_column_name")
    return found[0]


def load_images(path: str, processor, label2id: dict, image_column: str | None, label_column: str, limit=None):
    """Pixel values `[N, 3, H, W]` as the recipe's eval transform makes them, and class indices `[N]`."""
    builder = "imagefolder" if not path.endswith(".parquet") else "parquet"
    dataset = load_dataset(builder, data_files=path if builder == "parquet" else f"{path}/**", split="train")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    image_key = _image_column(dataset, image_column)
    feature = dataset.features[label_column]
    raw = dataset[label_column]
    # The recipe's label encoding: a ClassLabel is already the class index; other values are named by str(value).
    labels = raw if isinstance(feature, ClassLabel) else [int(label2id[str(value)]) for value in raw]
    pixels = []
    for start in range(0, len(dataset), 500):
        images = [image.convert("RGB") for image in dataset[start : start + 500][image_key]]
        pixels.append(processor(images, return_tensors="pt")["pixel_values"])
    return torch.cat(pixels), torch.tensor(labels)


@torch.no_grad()
def predict(model, pixels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat(
        [
            model(pixel_values=pixels[i : i + batch_size].to(device)).logits.float().cpu()
            for i in range(0, len(pixels), batch_size)
        ]
    )


def fixed_subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """The same `n` indices for every run of a protocol (a fixed random order, then sorted)."""
    return np.sort(np.random.default_rng(seed).permutation(n_total)[: min(n, n_total)])


def evaluate_image_classifier(output_dir: str, evaluation: dict, device: str = "cpu") -> dict:
    """Every end-of-training metric of the checkpoint in `output_dir` (see the module docstring).

    Args:
        output_dir (`str`): the recipe's output folder (model, config, image processor).
        evaluation (`dict`): `train_file`, `validation_file` (the data evaluated), `image_column_name`,
            `label_column_name`, `ece_bins`, `pgd_examples`, `pgd_steps`, `pgd_strong_steps`, `pgd_epsilons_255`
            (pixel epsilons in units of 1/255), `entropy_examples`, `seed` (of the fixed subsets).
        device (`str`): "cpu" or "cuda".
    """
    device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    model = AutoModelForImageClassification.from_pretrained(output_dir).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    columns = (
        model.config.label2id,
        evaluation.get("image_column_name"),
        evaluation.get("label_column_name", "label"),
    )
    test_x, test_y = load_images(evaluation["validation_file"], processor, *columns)
    train_x, train_y = load_images(evaluation["train_file"], processor, *columns)

    n_bins = evaluation.get("ece_bins", 15)
    test_logits = predict(model, test_x).numpy()
    results = {f"test_{k}": v for k, v in classification_metrics(test_logits, test_y.numpy(), n_bins).items()}
    results["test_examples"] = len(test_y)
    results["reliability"] = reliability_bins(softmax(test_logits), test_y.numpy(), n_bins)
    train_metrics = classification_metrics(predict(model, train_x).numpy(), train_y.numpy(), n_bins)
    results.update(train_accuracy=train_metrics["accuracy"], train_nll=train_metrics["nll"])
    results["train_examples"] = len(train_y)
    results["overfit_gap"] = results["train_accuracy"] - results["test_accuracy"]

    subset = fixed_subset(len(test_y), evaluation.get("pgd_examples", 1000), evaluation.get("seed", 0))
    x, y = test_x[subset].to(device), test_y[subset].to(device)
    scale, lower, upper = (t.to(device) for t in pixel_box(processor.image_mean, processor.image_std))

    def forward(inputs):
        return model(pixel_values=inputs).logits.float()

    results["pgd_examples"] = len(subset)
    results["pgd_clean_accuracy"] = float((predict(model, x).argmax(-1) == y.cpu()).float().mean())
    for eps in evaluation.get("pgd_epsilons_255", [1, 2]):
        epsilon = scale * (eps / 255)
        plain = pgd_correct(forward, x, y, epsilon, evaluation.get("pgd_steps", 10), lower, upper)
        # The stronger attack: a random start (the same for every run) and more steps.
        steps = evaluation.get("pgd_strong_steps", 20)
        strong = pgd_correct(forward, x, y, epsilon, steps, lower, upper, random_start_seed=evaluation.get("seed", 0))
        results[f"pgd_{eps}_255_accuracy"] = robust_accuracy(plain)
        results[f"pgd_{eps}_255_rs{steps}_accuracy"] = robust_accuracy(strong)
        # Neither attack dominates the other image by image: an image is robust only if both failed on it.
        results[f"pgd_{eps}_255_worst_accuracy"] = robust_accuracy(plain, strong)

    if "gradient_variance" in evaluation:
        results["gradient_variance"] = gradient_variance_at_checkpoints(
            output_dir, train_x, train_y, evaluation["gradient_variance"], evaluation.get("seed", 0), device
        )

    # Attention weights exist only on the eager path; the checkpoint's weights are the same.
    eager = AutoModelForImageClassification.from_pretrained(output_dir, attn_implementation="eager").to(device).eval()
    batch = x[: evaluation.get("entropy_examples", 256)]
    with torch.no_grad():
        attentions = eager(pixel_values=batch, output_attentions=True).attentions
    results["attention_entropy_last"] = attention_entropy(attentions[-1])
    results["attention_entropy_uniform"] = float(np.log(attentions[-1].shape[-1]))  # the maximum, for scale
    return results


def gradient_variance_at_checkpoints(
    output_dir: str, pixels: torch.Tensor, labels: torch.Tensor, settings: dict, seed: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """`measures.gradient_variance` of the cross-entropy at each `checkpoint-STEP` folder of `output_dir` and at the
    final model ("final"), on the same `batches` minibatches of `batch_size` training images for every run and
    checkpoint, in training mode: a checkpoint with AttentionDrop flags is loaded with them switched on, and the
    draws are seeded, so that rows differ only by what they do to the gradients."""
    import glob
    import os

    import attentiondrop_hf  # noqa: F401  (registers the attention implementation)

    batches, batch_size = settings.get("batches", 16), settings.get("batch_size", 64)
    order = fixed_subset(len(labels), batches * batch_size, seed)
    if len(order) < 2 * batch_size:
        raise ValueError(f"gradient_variance needs at least 2 minibatches of {batch_size}; {len(labels)} images")
    batches = len(order) // batch_size
    folders = sorted(glob.glob(os.path.join(output_dir, "checkpoint-*")), key=lambda f: int(f.rsplit("-", 1)[1]))
    results = {}
    for label, folder in [*((os.path.basename(f).split("-")[1], f) for f in folders), ("final", output_dir)]:
        config = AutoConfig.from_pretrained(folder)
        perturbed = getattr(config, "attentiondrop", None) is not None
        model = AutoModelForImageClassification.from_pretrained(
            folder, **({"attn_implementation": "attentiondrop"} if perturbed else {})
        )
        model.to(device).train()
        parameters = [p for p in model.parameters() if p.requires_grad]

        def loss_of_batch(k: int, model: torch.nn.Module = model) -> torch.Tensor:
            rows = order[k * batch_size : (k + 1) * batch_size]
            logits = model(pixel_values=pixels[rows].to(device)).logits.float()
            return torch.nn.functional.cross_entropy(logits, labels[rows].to(device))

        torch.manual_seed(seed)
        results[label] = gradient_variance(loss_of_batch, parameters, batches)
    return results
