"""The sweep over every architecture Transformers can build from a config (issue #17): both ways in, hard and blur.

For each tiny model of `tiny_models` (one per model type of Transformers' auto mappings), each way in
(`enable_attentiondrop` on the stock model; loading with `attn_implementation="attentiondrop"`) and each variant:

- both ways accept the model, or both refuse it with the same `ValueError`;
- eval output is `torch.equal` to the stock model's (same weights, the stock model's own default implementation);
- every targeted attention module that a training forward calls runs the perturbation (at least one does), and that
  forward differs from the stock model's (a no-op is a failure);
- `disable_attentiondrop` gives back every config as it was and the stock eval output.

Once per accepted model: the trainer's task loss at p = 0 (lambda = 1) equals the model's own loss (or the trainer
refuses the head at lambda > 0 with a `ValueError`), and a checkpoint saved with AttentionDrop on reloads in stock
Transformers as the stock model's checkpoint does.
The counts (tried, passed, refused, skipped) are printed at the end of the run (`conftest.py`); README's list of
refused families is generated from the sweep: `python tests/test_architectures.py --write-readme`.
"""

import copy
import os
import re
import sys
from collections import defaultdict

import pytest
import torch
import transformers
from tiny_models import build, tiny_models

from attentiondrop_hf import (
    AttentionDropTrainer,
    AttentionDropTrainingArguments,
    disable_attentiondrop,
    enable_attentiondrop,
)
from attentiondrop_hf.hf import attention as attention_glue
from attentiondrop_hf.hf.plan import PLAN_ATTRIBUTE, attention_modules, find_sites, plan_of

# Strong enough that a perturbation always shows: each of a row's three largest logits leaves the softmax with
# probability 0.5; sigma of at least 0.5 key positions.
VARIANTS = {
    "hard": {"variant": "hard", "p": 0.5, "top_k": 3, "hard_fill": "mask"},
    "blur": {"variant": "blur", "blur_sigma_min": 0.5, "blur_sigma_max": 2.0},
}
WAYS_IN = ("enable", "load")
README = os.path.join(os.path.dirname(__file__), "..", "README.md")
README_BLOCK = re.compile(r"(<!-- refused-architectures:start -->\n)(.*?)(<!-- refused-architectures:end -->)", re.S)

CASES, SKIPPED = tiny_models()
# id -> ("passed" | "refused", detail); read by conftest.py's summary and by the README check.
RESULTS: dict[str, tuple[str, str]] = {}


def tensors_of(value) -> list[torch.Tensor]:
    """Every floating tensor of a model output (logits, loss, hidden states ...), in order."""
    if torch.is_tensor(value):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    return []


def run(model, inputs, training: bool, seed: int = 0):
    model.train(training)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(training):
        return tensors_of(model(**inputs))


def same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))


def configs_of(model) -> list:
    """(path, config) of every PreTrainedModel part and attention module, as the switch may write them."""
    found = [(path, part.config) for path, part in model.named_modules() if hasattr(part, "config")]
    return [(path, config) for path, config in found if hasattr(config, "_attn_implementation")]


def switched_on(case, way: str, flags: dict, stock):
    """The model of `case` with AttentionDrop switched on `way`, with the stock model's weights; or the ValueError."""
    try:
        if way == "enable":
            model = build(case)
            model.load_state_dict(stock.state_dict())
            return enable_attentiondrop(model, **flags), None
        model = build(case, attn_implementation="attentiondrop", attentiondrop=dict(flags))
        model.load_state_dict(stock.state_dict())
        return model, None
    except ValueError as error:
        return None, str(error)


def training_calls(model, inputs) -> tuple[set, set, list]:
    """One training forward: the ids of the plans of the attention modules called, of those that ran the
    perturbation, and the outputs. The model's state (batch-norm statistics) is put back afterwards."""
    called, perturbed = set(), set()
    look_up, perturb = attention_glue.plan_of, attention_glue._perturbed_attention

    def recording_look_up(module):
        plan = look_up(module)
        called.add(id(plan))
        return plan

    def recording_perturb(call, plan, options, **kwargs):
        perturbed.add(id(plan))
        return perturb(call, plan, options, **kwargs)

    state = copy.deepcopy(model.state_dict())
    attention_glue.plan_of, attention_glue._perturbed_attention = recording_look_up, recording_perturb
    try:
        outputs = run(model, inputs, training=True, seed=1)
    finally:
        attention_glue.plan_of, attention_glue._perturbed_attention = look_up, perturb
        model.load_state_dict(state)
    return called, perturbed, outputs


def check_trainer_loss(model, inputs, tmp_path) -> str:
    """At p = 0 the trainer's task loss (lambda = 1) is the model's own loss; or it refuses the head."""
    labels = inputs.get("labels")
    if labels is None or labels.is_floating_point():
        return "no class or token labels"
    enable_attentiondrop(model, variant="hard", p=0.0)
    args = AttentionDropTrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, consistency_weight=1.0
    )
    trainer = AttentionDropTrainer(model=model, args=args)
    model.train()
    try:
        torch.manual_seed(2)
        trainer.compute_loss(model, dict(inputs))
    except ValueError as error:
        return f"trainer refuses lambda > 0: {str(error).splitlines()[0]}"
    task = trainer.consistency_terms.sums["task_loss"]
    torch.manual_seed(2)
    own = model.train()(**inputs).loss.float()
    torch.testing.assert_close(task, own, rtol=2e-5, atol=1e-6, msg=f"trainer task loss {task} vs model loss {own}")
    return "trainer loss = model loss"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on 2 threads spend their time in OpenMP barriers (1000x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_both_ways_in_agree_and_keep_every_promise(case, tmp_path):
    stock = build(case)
    inputs = case.make_inputs()
    stock_eval = run(stock, inputs, training=False)
    stock_train = run(copy.deepcopy(stock), inputs, training=True, seed=1)  # a copy: batch-norm statistics move
    stock_configs = [(path, c._attn_implementation, copy.deepcopy(c.to_dict())) for path, c in configs_of(stock)]
    refusals = {}
    for variant, flags in VARIANTS.items():
        for way in WAYS_IN:
            model, refused = switched_on(case, way, flags, stock)
            refusals[variant, way] = refused
            if refused is not None:
                continue
            where = f"{case.id} {way} {variant}"
            assert same(run(model, inputs, training=False), stock_eval), f"{where}: eval output is not the stock one"
            plans = {path: plan_of(m) for path, m in attention_modules(model).items()}
            called, perturbed, trained = training_calls(model, inputs)
            targeted = {id(plan): path for path, plan in plans.items() if plan.perturbed}
            missing = sorted(
                path for plan_id, path in targeted.items() if plan_id in called and plan_id not in perturbed
            )
            assert not missing, f"{where}: targeted modules ran without the perturbation: {missing}"
            assert set(targeted) & called, f"{where}: no targeted module ran: {sorted(targeted.values())}"
            # Hard masking that removes keys always shows; a blur can be the identity on its own (one key per row,
            # or keys a fresh model computes equal at every position): that it ran is checked above.
            assert variant != "hard" or not same(trained, stock_train), f"{where}: training is a no-op"
            disable_attentiondrop(model)
            restored = [(path, c._attn_implementation, c.to_dict()) for path, c in configs_of(model)]
            if way == "enable":
                assert restored == stock_configs, f"{where}: disable did not restore every config"
            else:  # loaded with the flags: the stock implementations, the flags kept as loaded
                assert [r[:2] for r in restored] == [s[:2] for s in stock_configs], f"{where}: implementations"
            assert not any(PLAN_ATTRIBUTE in m.__dict__ for m in model.modules()), f"{where}: plan left behind"
            assert same(run(model, inputs, training=False), stock_eval), f"{where}: eval after disable"

    distinct = set(refusals.values())
    assert len(distinct) == 1, f"{case.id}: the ways in disagree: {refusals}"
    refusal = distinct.pop()
    if refusal is not None:
        RESULTS[case.id] = ("refused", refusal)
        return

    # Saved with AttentionDrop on, reloaded without asking for it: what a stock checkpoint reloads to.
    model, _ = switched_on(case, "enable", VARIANTS["hard"], stock)
    model.save_pretrained(tmp_path / "with")
    stock.save_pretrained(tmp_path / "without")
    torch.manual_seed(0)  # some checkpoints reload with freshly initialised weights (shieldgemma2): the same ones
    reloaded = type(stock).from_pretrained(tmp_path / "with")
    torch.manual_seed(0)
    reference = type(stock).from_pretrained(tmp_path / "without")
    assert reloaded.config.attentiondrop["variant"] == "hard"
    assert [c._attn_implementation for _, c in configs_of(reloaded)] == [s[1] for s in stock_configs]
    assert same(run(reloaded, inputs, training=False), run(reference, inputs, training=False)), f"{case.id}: reload"
    RESULTS[case.id] = ("passed", check_trainer_loss(model, inputs, tmp_path / "trainer"))


# Roles that earlier releases guessed wrong from module attributes (issue #17, item 5): by path suffix below the model.
EXPECTED_ROLES = {
    "moonshine": {"decoder.layers.0.self_attn": "causal", "decoder.layers.0.encoder_attn": "cross"},
    "nllb-moe": {"decoder.layers.0.self_attn": "causal", "decoder.layers.0.cross_attention": "cross"},
    "layoutlm": {"encoder.layer.0.attention.self": "self"},
    "paligemma": {
        "language_model.layers.0.self_attn": "causal",
        "vision_tower.encoder.layers.0.self_attn": "self",
    },
    "t5": {"encoder.block.0.layer.0.SelfAttention": "self", "decoder.block.0.layer.1.EncDecAttention": "cross"},
    "vision-encoder-decoder": {
        "encoder.layers.0.attention": "self",
        "decoder.bert.encoder.layer.0.crossattention.self": "cross",
    },
}


def _prefix(model, part) -> str | None:
    return next((path for path, module in model.named_modules() if module is part), None)


ENCODER_DECODER = [case for case in CASES if getattr(case.config, "is_encoder_decoder", False)]


@pytest.mark.parametrize("case", ENCODER_DECODER, ids=[case.id for case in ENCODER_DECODER])
def test_roles_follow_the_place_of_each_module_in_encoder_decoder_models(case):
    """The encoder holds self-attention, the decoder causal self-attention and cross-attention; and every role the
    model has can be targeted alone (Moonshine's cross-attention, NLLB-MoE's decoder self-attention)."""
    model = build(case)
    sites = find_sites(model)
    encoder, decoder = _prefix(model, model.get_encoder()), _prefix(model, model.get_decoder())
    for path, site in sites.items():
        if encoder and path.startswith(encoder + "."):
            assert site.role == "self", path
        elif decoder and path.startswith(decoder + "."):
            assert site.role in ("causal", "cross"), path
    roles = {site.role for site in sites.values()}
    for role in roles:
        try:
            enable_attentiondrop(build(case), targets=[role])
        except ValueError as error:  # refused for what it is, never for its roles
            assert "match no attention" not in str(error), (role, str(error))


@pytest.mark.parametrize("model_type", sorted(EXPECTED_ROLES))
def test_roles_that_attributes_once_misled(model_type):
    case = next((case for case in CASES if case.id == model_type), None)
    if case is None:
        pytest.skip(f"{model_type} is not in the zoo: {SKIPPED.get(model_type)}")
    sites = find_sites(build(case))
    for suffix, role in EXPECTED_ROLES[model_type].items():
        found = [site.role for path, site in sites.items() if path.endswith(suffix)]
        assert found == [role], (suffix, found, sorted(sites))


def refusal_reason(message: str) -> str:
    """A refusal's reason, as the README groups it."""
    if "does not route its attention through" in message:
        return "attention outside transformers' AttentionInterface"
    if "attention with sinks" in message:
        return "attention sinks (an extra logit no variant perturbs)"
    if "only for an implementation named 'sdpa'" in message:
        return "masks built by the implementation's name (eval would change)"
    if "targets None match no attention" in message:
        return (
            "no default target: the encoder's self-attention is written out by hand (`targets=['causal', 'cross']` "
            "perturbs the decoder)"
        )
    return message.splitlines()[0]


def trainer_reason(detail: str) -> str:
    if "have no row per example" in detail:
        return "inputs without a row per example (flattened image patches): the batch cannot be doubled"
    if "logits of shape labels.shape" in detail:
        return "no class distribution per label (regression, multi-label, dense heads)"
    if "differs from the model's own loss" in detail:
        return "a loss the trainer does not reproduce (extra terms)"
    return detail[len("trainer refuses lambda > 0: ") :]


def refused_families_markdown(results: dict[str, tuple[str, str]]) -> str:
    """The README's list: the refused model types grouped by the reason, then those whose head the consistency
    trainer refuses at lambda > 0."""
    refused, trainer = defaultdict(list), defaultdict(list)
    for model_type, (status, detail) in sorted(results.items()):
        if status == "refused":
            refused[refusal_reason(detail)].append(f"`{model_type}`")
        elif detail.startswith("trainer refuses"):
            trainer[trainer_reason(detail)].append(f"`{model_type}`")
    lines = [f"- **{reason}** ({len(types)}): {', '.join(types)}.\n" for reason, types in sorted(refused.items())]
    lines += [
        f"- **consistency trainer, lambda > 0 only: {reason}** ({len(types)}): {', '.join(types)}.\n"
        for reason, types in sorted(trainer.items())
    ]
    header = f"(Transformers {transformers.__version__})\n\n"
    return header + "".join(lines)


@pytest.mark.slow
def test_the_readme_lists_the_refused_families_the_sweep_finds():
    if len(RESULTS) < len(CASES):
        pytest.skip("the sweep did not run over every architecture in this session")
    found = README_BLOCK.search(open(README, encoding="utf-8").read())
    assert found, "README.md has no refused-architectures block"
    generated_with = re.search(r"Transformers (\S+)\)", found.group(2))
    if generated_with is None or generated_with.group(1) != transformers.__version__:
        pytest.skip(f"README's list was generated with another Transformers release than {transformers.__version__}")
    assert found.group(2) == refused_families_markdown(RESULTS), (
        "README's list of refused families is not the sweep's: python tests/test_architectures.py --write-readme"
    )


def summary() -> str:
    passed = sum(status == "passed" for status, _ in RESULTS.values())
    refused = sum(status == "refused" for status, _ in RESULTS.values())
    trainer_refused = sum(detail.startswith("trainer refuses") for _, detail in RESULTS.values())
    return (
        f"AttentionDrop architecture sweep: {len(CASES) + len(SKIPPED)} model types, {len(CASES)} built and tried, "
        f"{passed} passed ({trainer_refused} of them refused by the trainer at lambda > 0), {refused} refused with a "
        f"ValueError, {len(SKIPPED)} skipped (cannot be built from a config here); "
        f"{len(CASES) - len(RESULTS)} not run in this session"
    )


def write_readme() -> int:
    """Run the sweep and write its list of refused families into README.md."""
    code = pytest.main([__file__, "-q", "-p", "no:cacheprovider", "-k", "keep_every_promise"])
    sweep = sys.modules["test_architectures"]  # the module pytest ran, not this __main__
    text = open(README, encoding="utf-8").read()
    block = refused_families_markdown(sweep.RESULTS)
    with open(README, "w", encoding="utf-8") as handle:
        handle.write(README_BLOCK.sub(lambda m: m.group(1) + block + m.group(3), text))
    print(sweep.summary())
    return int(code)


if __name__ == "__main__" and "--write-readme" in sys.argv:
    sys.exit(write_readme())
