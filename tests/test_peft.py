"""Where people fine-tune today: LoRA adapters (PEFT) and TRL's SFTTrainer, with the consistency term on."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from testing_common import CASES_BY_ID, QUIET_TRAINING, ListDataset, build_peaked, collate, text_batch
from transformers import Trainer, TrainingArguments

from attentiondrop_hf import (
    AttentionDropTrainer,
    AttentionDropTrainingArguments,
    ConsistencyMixin,
    disable_attentiondrop,
    enable_attentiondrop,
)

LORA_TARGETS = {"vit": ["q_proj", "v_proj"], "bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def lora_model(case_id):
    torch.manual_seed(0)
    base = build_peaked(case_id)
    task = "SEQ_CLS" if CASES_BY_ID[case_id].task == "classification" else "CAUSAL_LM"
    head = ["classifier"] if task == "SEQ_CLS" else None
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[case_id], modules_to_save=head, task_type=task)
    if case_id == "vit":
        config.task_type = None  # PEFT's SEQ_CLS wrapper expects input_ids; a plain PeftModel takes pixel_values
    return base, get_peft_model(copy.deepcopy(base), config)


def test_enable_and_disable_act_on_the_base_model_of_a_peft_model():
    base, peft_model = lora_model("llama")
    enable_attentiondrop(peft_model, variant="hard", p=0.5)
    inner = peft_model.get_base_model()
    assert inner.config._attn_implementation == "attentiondrop" and inner.config.attentiondrop["p"] == 0.5
    inputs = text_batch()
    torch.manual_seed(1)
    perturbed = peft_model.train()(**inputs).logits
    torch.manual_seed(1)
    assert not torch.allclose(perturbed, base.train()(**inputs).logits)
    disable_attentiondrop(peft_model)
    assert inner.config._attn_implementation == "sdpa" and inner.config.attentiondrop is None
    wrapped = torch.nn.DataParallel(peft_model)  # a DDP / DataParallel / accelerate wrapper around it
    enable_attentiondrop(wrapped, variant="blur")
    assert inner.config.attentiondrop["variant"] == "blur"
    disable_attentiondrop(wrapped)
    assert inner.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("case_id", ["vit", "bert", "llama"])
def test_lora_trains_with_the_consistency_term_and_the_adapter_loads_on_a_stock_model(case_id, tmp_path):
    base, peft_model = lora_model(case_id)
    enable_attentiondrop(peft_model, variant="hard", p=0.5, top_k=3)
    args = AttentionDropTrainingArguments(
        output_dir=str(tmp_path),
        **QUIET_TRAINING,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        logging_steps=1,
        consistency_weight=1.0,
        remove_unused_columns=False,
    )
    rows = CASES_BY_ID[case_id].rows(8)
    trainer = AttentionDropTrainer(model=peft_model, args=args, train_dataset=ListDataset(rows), data_collator=collate)
    seen = []
    hook = peft_model.get_base_model().register_forward_pre_hook(
        lambda module, a, kw: seen.append(next(v.shape[0] for v in kw.values() if torch.is_tensor(v))),
        with_kwargs=True,
    )
    trainer.train()
    hook.remove()
    logs = [entry for entry in trainer.state.log_history if "consistency_loss" in entry]
    assert len(logs) == 3 and all(entry["consistency_loss"] > 0 for entry in logs)
    assert 8 in seen  # the doubled batch (4 + 4) went through the adapter
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora and all(p.abs().sum() > 0 for p in lora.values())  # the adapter learned (lora_B starts at 0)

    peft_model.save_pretrained(tmp_path / "adapter")
    stock = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")  # no attentiondrop flags
    assert stock.get_base_model().config._attn_implementation == "sdpa"
    inputs = collate(rows)
    inputs.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(**inputs).logits, peft_model.eval()(**inputs).logits)


def test_the_mixin_works_with_another_trainer_that_overrides_compute_loss(tmp_path):
    """A trainer of one's own that overrides compute_loss, as TRL's do: the mixin in front takes over at lambda > 0
    and hands over to it at lambda = 0."""
    calls = []

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls.append(model.training)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class MyTrainer(ConsistencyMixin, CountingTrainer):
        pass

    model = enable_attentiondrop(build_peaked("llama"), variant="hard", p=0.5)
    rows = CASES_BY_ID["llama"].rows(8)
    for weight in (0.0, 1.0):
        calls.clear()
        args = TrainingArguments(
            output_dir=str(tmp_path),
            **QUIET_TRAINING,
            per_device_train_batch_size=4,
            max_steps=2,
            logging_steps=1,
        )
        trainer = MyTrainer(
            model=model, args=args, train_dataset=ListDataset(rows), data_collator=collate, consistency_weight=weight
        )
        trainer.train()
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert calls == ([True, True] if weight == 0 else [])
        assert ("consistency_loss" in logged[0]) == (weight > 0)


def _word_tokenizer():
    """A word-level fast tokenizer built in memory (no Hub access): enough for TRL's collator."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.mark.slow
def test_trl_sft_trainer_with_the_mixin_and_lora(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    class AttentionDropSFTTrainer(ConsistencyMixin, trl.SFTTrainer):
        pass

    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 61, (8,), generator=generator)) for _ in range(16)]
    base, peft_model = lora_model("llama")
    enable_attentiondrop(peft_model, variant="blur", blur_sigma_max=2.0)
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        **QUIET_TRAINING,
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        max_length=16,
    )
    trainer = AttentionDropSFTTrainer(
        model=peft_model,
        args=config,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=_word_tokenizer(),
        consistency_weight=1.0,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "consistency_loss" in entry]
    assert len(logs) == 2 and all(entry["consistency_loss"] > 0 for entry in logs)
