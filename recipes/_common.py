"""What both recipes share: argument parsing (command line, or a JSON file plus command-line overrides, with every
registered variant's own flags), the model arguments, a model built from a Hub checkpoint or from a config alone,
resuming from the checkpoints of an earlier run, and the end of a run (save, card, summary)."""

import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from transformers import AutoConfig, HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from attentiondrop_hf import AttentionDropConfig, enable_attentiondrop
from attentiondrop_hf.variants import registered_variants

logger = logging.getLogger(__name__)

# JSON configs refer to the shared data as ${ATTENTIONDROP_DATA}/...; by default the folder beside the checkout.
os.environ.setdefault(
    "ATTENTIONDROP_DATA", os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
)


@dataclass
class ModelArguments:
    """Which model to fine-tune, or which config to build one from."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path of the pretrained checkpoint to fine-tune."}
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Build the model without weights from a fresh config of this type ('vit', 'marian')."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Config to use instead of the checkpoint's."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated key=value config overrides, e.g. 'hidden_size=192,num_hidden_layers=6'."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    use_attentiondrop: bool = field(
        default=True,
        metadata={"help": "False trains the unregularized baseline (with consistency_weight > 0: plain R-Drop)."},
    )
    variant_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to import first, e.g. your own `@register_variant`s: their flags become flags."},
    )
    start_over: bool = field(
        default=False,
        metadata={
            "help": "Train from scratch even if --output_dir holds checkpoints of an earlier run (default: resume)."
        },
    )

    def __post_init__(self):
        if self.model_type is not None:
            default = next(f.default for f in fields(self) if f.name == "model_name_or_path")
            if self.model_name_or_path not in (None, default):
                raise ValueError(
                    "--model_type builds a model without weights; it cannot be combined with --model_name_or_path "
                    f"{self.model_name_or_path!r}"
                )
            self.model_name_or_path = None  # the recipe's Hub default does not apply to a model built from a config
        elif self.model_name_or_path is None and self.config_name is None:
            raise ValueError("pass --model_name_or_path (pretrained weights) or --model_type / --config_name")


def _read_json_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path!r} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a JSON object of flags, got {type(values).__name__}")
    return values


def _json_to_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, list):
            flags.extend(os.path.expandvars(str(v)) for v in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(os.path.expandvars(str(value)))
    return flags


def _import_variant_modules(argv: list[str]) -> None:
    """Import `--variant_modules` before the parser is built, so their variants' flags are flags too."""
    if "--variant_modules" not in argv:
        return
    start = argv.index("--variant_modules") + 1
    for name in argv[start:]:
        if name.startswith("--"):
            break
        importlib.import_module(name)


def parse_arguments(dataclass_types: tuple, argv: list[str] | None = None):
    """`python recipe.py [config.json] [--flag value ...]`: flags override the JSON file's values.

    Parses `dataclass_types` plus the AttentionDrop flags (the common ones and every registered variant's own
    options), and returns the instances of `dataclass_types` followed by the `AttentionDropConfig` they describe.
    String values in the JSON may use environment variables (`${ATTENTIONDROP_DATA}/cifar10/train.parquet`).
    Unknown keys or flags raise before anything is loaded; flags are never abbreviated (`--num_train_epoch` is not
    `--num_train_epochs`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json"):
        argv = _json_to_flags(_read_json_config(argv[0])) + argv[1:]
    _import_variant_modules(argv)
    option_classes = [variant.options_class for variant in registered_variants().values()]
    option_classes = [c for c in option_classes if dataclasses.fields(c)]
    parser = HfArgumentParser((*dataclass_types, AttentionDropConfig, *option_classes), allow_abbrev=False)
    parsed = parser.parse_args_into_dataclasses(args=argv)
    recipe_arguments, flags = parsed[: len(dataclass_types)], parsed[len(dataclass_types) :]
    for arguments in recipe_arguments:
        if isinstance(arguments, TrainingArguments):
            warn_if_processes_do_not_sync(arguments)
    common = {f.name: getattr(flags[0], f.name) for f in fields(AttentionDropConfig) if f.init}
    options = {k: v for instance in flags[1:] for k, v in dataclasses.asdict(instance).items()}
    return (*recipe_arguments, AttentionDropConfig(**common, **options))


def run_from_command_line(main: Callable[[list[str]], object]) -> None:
    """Run a recipe's `main` on `sys.argv`. Every error a user can cause (a wrong flag, a missing file, a bad row, a
    model the plugin refuses) is a ValueError that names the problem: it is printed as one line, with exit status 2
    as argparse does, instead of a traceback through the libraries. ATTENTIONDROP_TRACEBACK=1 shows the traceback."""
    try:
        main(sys.argv[1:])
    except ValueError as error:
        if os.environ.get("ATTENTIONDROP_TRACEBACK") == "1":
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        print("(ATTENTIONDROP_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def warn_if_processes_do_not_sync(training_args: TrainingArguments) -> None:
    """`torchrun --nproc_per_node 2` on a CPU without `--use_cpu true --ddp_backend gloo` starts processes that never
    join a process group: each trains its own copy on its own shard, and the run looks normal. Say so, with the fix."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:  # `world_size` sets up the devices (and the group)
        logger.warning(
            "%d processes were launched (WORLD_SIZE=%d) but they do not synchronise: each trains its own copy of the "
            "model. On a CPU pass `--use_cpu true --ddp_backend gloo` (and `--fsdp %s` for FSDP).",
            launched,
            launched,
            '"full_shard auto_wrap"',
        )


def require_file(path: str | None, flag: str) -> None:
    """A clear error, naming the flag, for a data path that is not there."""
    if path is not None and not os.path.exists(path):
        raise ValueError(f"{flag} {path!r} does not exist")


def load_config(model_args: ModelArguments, **task_attributes):
    """The checkpoint's config, a named config, or a fresh one of `model_type`, with the overrides applied."""
    if model_args.config_name or model_args.model_name_or_path:
        source = model_args.config_name or model_args.model_name_or_path
        config = AutoConfig.from_pretrained(source, cache_dir=model_args.cache_dir, **task_attributes)
    else:
        config = AutoConfig.for_model(model_args.model_type, **task_attributes)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    return config


def load_model(auto_class, model_args: ModelArguments, config, attentiondrop: AttentionDropConfig):
    """Pretrained weights (a new head where the labels differ) or a model from the config; AttentionDrop switched on
    (which raises for a model whose attention does not go through Transformers' AttentionInterface)."""
    if model_args.model_name_or_path:
        model = auto_class.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir, ignore_mismatched_sizes=True
        )
    else:
        model = auto_class.from_config(config)
    if model_args.use_attentiondrop:
        enable_attentiondrop(model, attentiondrop)
    return model


def checkpoint_to_resume(model_args: ModelArguments, training_args) -> str | None:
    """Where training resumes from, as in Transformers' examples: `--resume_from_checkpoint`, else the last checkpoint
    an earlier run left in `--output_dir` (said in the log), unless `--start_over`."""
    if training_args.resume_from_checkpoint is not None or model_args.start_over:
        return training_args.resume_from_checkpoint
    if not os.path.isdir(training_args.output_dir):
        return None
    last = get_last_checkpoint(training_args.output_dir)
    if last is not None:
        logger.warning(
            f"Resuming from {last}, left in --output_dir by an earlier run. Pass --start_over true to train from "
            "scratch (its checkpoints are then overwritten) or choose another --output_dir."
        )
    return last


def finish(trainer, metrics: dict[str, float], card: dict) -> None:
    """Save the model and its card (pushing both when --push_to_hub), and print where they are."""
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.save_model()
        trainer.create_model_card(**card)
    if not trainer.is_world_process_zero():
        return
    output_dir = os.path.abspath(trainer.args.output_dir)
    shown = {k: v for k, v in metrics.items() if not k.endswith(("runtime", "per_second", "epoch"))}
    lines = ["", "=" * 72, "AttentionDrop run finished", *(f"  {k:<28} {v:.4f}" for k, v in shown.items())]
    lines += [f"  checkpoint   {output_dir}", f"  model card   {os.path.join(output_dir, 'README.md')}"]
    if trainer.args.push_to_hub:
        lines.append(f"  pushed to    https://huggingface.co/{trainer.hub_model_id}")
    print("\n".join(lines + ["=" * 72]))
