"""What pissa's recipe keeps on TRL's SFTTrainer: the AdaLoRA orthogonality regulariser in the loss
(--train-singular-values), fp32 adapters on a 4-bit base, padding-free batches equal to padded ones, packing
with no attention across examples, and the untemplated path giving the pre-TRL recipe's exact losses."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import RECORDS, build_tiny_llama, char_tokenizer, losses, train_config
from pissa.train import TrainRecipe
from pissa.train.singular_values import orthogonality_penalty

pytestmark = pytest.mark.usefixtures("one_thread")


def first_batch(recipe, n=4):
    trainer = recipe.trainer
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def test_singular_values_loss_includes_the_orthogonality_regulariser(tmp_path, tiny_dir, data_file):
    """TRL rebuilds the loss from log-probs, dropping what PEFT's AdaLoraModel.forward adds; the recipe's trainer
    adds it back, so its loss is PEFT's own: the mean NLL + orth_reg_weight * regulariser."""
    recipe = TrainRecipe(train_config(tmp_path, tiny_dir, data_file, train_singular_values=True, orth_reg_weight=0.5,
                                      limit=4, max_steps=1)).setup()
    model = recipe.trainer.model
    with torch.no_grad():  # off orthonormality, so that the regulariser is far from 0
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.mul_(1.5)
    batch = first_batch(recipe)
    penalty = orthogonality_penalty(model)
    assert penalty.item() > 0.1
    with torch.no_grad():
        trl_loss = recipe.trainer.compute_loss(model, dict(batch))
        peft_loss = model(**batch).loss  # PEFT: cross-entropy + orth_reg_weight * regulariser
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100)
    assert recipe.trainer.fused_lm_head  # an AdaLoRA adapter keeps TRL's loss path, even on a CPU
    torch.testing.assert_close(trl_loss, peft_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trl_loss - penalty, nll, rtol=1e-5, atol=1e-5)


def test_singular_values_gradient_accumulation_counts_the_regulariser_once(tmp_path, tiny_dir, data_file):
    """batch 4 == 2 micro-batches of 2: the regulariser is added once per optimizer step either way."""
    kw = dict(train_singular_values=True, orth_reg_weight=0.5, max_steps=3)
    TrainRecipe(train_config(tmp_path, tiny_dir, data_file, "plain", **kw)).run()
    TrainRecipe(train_config(tmp_path, tiny_dir, data_file, "accum", batch_size=2, grad_accum=2, **kw)).run()
    torch.testing.assert_close(losses(tmp_path / "accum"), losses(tmp_path / "plain"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["qpissa", "loftq"])
def test_adapters_on_a_4bit_base_stay_fp32(tmp_path, tiny_dir, data_file, method):
    """TRL casts a quantized model's trainable adapter weights to bf16; the recipe keeps the fitted fp32 ones."""
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model_state_dict

    from pissa.io.adapter_files import read_adapter

    recipe = TrainRecipe(train_config(tmp_path, tiny_dir, data_file, method=method, quant_iters=2,
                                      max_steps=1)).setup()
    trainable = {n: p for n, p in recipe.model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    _, saved = read_adapter(tmp_path / "run" / "init" / "adapter")  # what the quantized fit wrote
    live = get_peft_model_state_dict(recipe.model)
    assert saved.keys() == live.keys()
    for key, tensor in saved.items():
        assert torch.equal(live[key].cpu(), tensor.float()), key


def test_padding_free_equals_padded(tmp_path, tiny_dir, data_file):
    """--padding-free: each batch flattened into one row with position ids restarting per example; the same
    examples, the same losses."""
    TrainRecipe(train_config(tmp_path, tiny_dir, data_file, "padded", max_steps=4)).run()
    recipe = TrainRecipe(train_config(tmp_path, tiny_dir, data_file, "free", max_steps=4, padding_free=True))
    recipe.run()
    assert recipe.trainer.padding_free
    torch.testing.assert_close(losses(tmp_path / "free"), losses(tmp_path / "padded"), rtol=1e-4, atol=1e-5)
    padded = json.loads((tmp_path / "padded" / "summary.json").read_text())
    free = json.loads((tmp_path / "free" / "summary.json").read_text())
    assert free["tokens"] == padded["tokens"]  # no pad token counted either way


def test_packing_fills_rows_with_whole_examples_that_do_not_attend_to_each_other(tmp_path, tiny_dir, data_file):
    recipe = TrainRecipe(train_config(tmp_path, tiny_dir, data_file, max_steps=2, packing=True, max_length=256))
    recipe.setup()
    rows = recipe.trainer.train_dataset
    assert len(rows) < len(RECORDS) and all(len(r["input_ids"]) <= 256 for r in rows)
    unpacked = TrainRecipe(train_config(tmp_path, tiny_dir, data_file, "unpacked", max_length=256)).setup()
    loss_tokens = [sum(t != -100 for t in r["labels"]) for r in unpacked.trainer.train_dataset]
    assert sum(sum(t != -100 for t in r["labels"]) for r in rows) == sum(loss_tokens)
    # One packed row through the model == each of its examples alone.
    row = max(rows, key=lambda r: len(r["seq_lengths"]))
    assert len(row["seq_lengths"]) >= 2
    batch = recipe.trainer.data_collator([row])
    model = recipe.trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for n in row["seq_lengths"]:
            alone = model(input_ids=torch.tensor([row["input_ids"][start:start + n]])).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n
    recipe.train()
    assert len(losses(tmp_path / "run")) == 2


@pytest.mark.parametrize("fused", [False, True], ids=["model-loss", "trl-fused-lm-head"])
def test_untemplated_losses_equal_the_pre_trl_recipe(tmp_path, data_file, fused):
    """With no chat template the tokens are exactly the old recipe's (Alpaca prompt | response + EOS), so TRL's
    data path must reproduce its losses, with the model's own loss (what a CPU uses) and with TRL's fused LM head
    (what a GPU uses): these ten were printed by the pre-TRL recipe (transformers Trainer and pissa's own
    collator) on the same seeded runs."""
    folder = tmp_path / "plain-model"
    tok = char_tokenizer()
    tok.chat_template = None
    build_tiny_llama(seed=0, vocab_size=128).save_pretrained(folder)
    tok.save_pretrained(folder)
    before = {
        "lora": [4.831364, 4.755189, 4.616784, 4.547668, 4.490106, 4.463163, 4.447899, 4.4533, 4.445582, 4.438335],
        "pissa": [4.831364, 4.727854, 4.605799, 4.563621, 4.50249, 4.453025, 4.422509, 4.41855, 4.400291, 4.4],
    }
    for method, expected in before.items():
        recipe = TrainRecipe(train_config(tmp_path, folder, data_file, method, method=method, max_length=256)).setup()
        recipe.trainer.fused_lm_head = fused
        recipe.train()
        recipe.save()
        assert losses(tmp_path / method) == pytest.approx(expected, abs=1e-5)
