"""pissa train --stage dpo: the reference is the model before training (PiSSA: W, not the residual; QPiSSA:
its fitted reconstruction; LoRA: the base), every method trains from a step-0 loss of ln 2, a few real steps
raise the chosen-vs-rejected margin, resume equals an uninterrupted run, preference formats, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import PREFS, CrashAt, assistant, losses, train_config, user
from pissa.data.preference import build_preference_data
from pissa.errors import PissaError
from pissa.train import TrainConfig, TrainRecipe
from pissa.train.log import read_log

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.long]


def dpo_config(tmp_path, tiny_dir, prefs_file, name="run", **kw):
    return train_config(tmp_path, tiny_dir, prefs_file, name, stage="dpo", **{"lr": 5e-3, "max_steps": 4, **kw})


def step0_batch(recipe):
    trainer = recipe.trainer
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


@torch.no_grad()
def completion_logps(model, batch) -> torch.Tensor:
    """Summed log-probs of the completion tokens (chosen rows, then rejected rows), computed here by hand."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    logps = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]  # (rows, T-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(1)


def reference_logps(recipe, batch) -> torch.Tensor:
    chosen, rejected = recipe.trainer.compute_ref_log_probs(recipe.trainer.model, batch)
    return torch.cat([chosen, rejected])


def test_pissa_reference_is_the_original_model_not_the_residual(tmp_path, tiny_dir, prefs_file):
    recipe = TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file, method="pissa")).setup()
    batch = step0_batch(recipe)
    ref = reference_logps(recipe, batch)
    original = completion_logps(AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), batch)
    with recipe.trainer.model.disable_adapter():
        residual = completion_logps(recipe.trainer.model, batch)
    torch.testing.assert_close(ref, original, rtol=1e-5, atol=1e-4)
    # The trap the reference avoids: the residual alone is another model (off by up to ~0.8 nats here, with
    # rank 4 of 64 on random weights; far more on a trained model, whose spectrum is steep).
    assert (ref - residual).abs().max() > 0.3, (ref, residual)
    assert sorted(recipe.trainer.model.peft_config) == ["default", "ref"]


def test_lora_reference_is_the_base(tmp_path, tiny_dir, prefs_file):
    recipe = TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file, method="lora")).setup()
    batch = step0_batch(recipe)
    original = completion_logps(AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), batch)
    torch.testing.assert_close(reference_logps(recipe, batch), original, rtol=1e-5, atol=1e-4)


def test_qpissa_reference_is_the_fitted_reconstruction(tmp_path, tiny_dir, prefs_file):
    """QPiSSA's model before training is nf4(W_res) + scale * B0 A0: built here from the init files by hand."""
    pytest.importorskip("bitsandbytes")
    from pissa.io.adapter_files import read_adapter
    from pissa.quant.formats import QuantSpec, fake_quantize

    recipe = TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file, method="qpissa", quant_iters=2)).setup()
    batch = step0_batch(recipe)
    ref = reference_logps(recipe, batch)
    init = tmp_path / "run" / "init"
    config, adapter = read_adapter(init / "adapter")
    scale = config["lora_alpha"] / config["r"]
    fitted = AutoModelForCausalLM.from_pretrained(init / "residual", dtype=torch.float32,
                                                  quantization_config=None).eval()
    manifest = json.loads((init / "pissa.json").read_text())
    spec = QuantSpec(**{k: v for k, v in manifest["quantization"].items() if k in QuantSpec.__dataclass_fields__})
    with torch.no_grad():
        for name, module in fitted.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in adapter:
                B, A = adapter[key.replace("lora_A", "lora_B")].float(), adapter[key].float()
                module.weight.copy_(fake_quantize(module.weight.float(), spec) + scale * B @ A)  # (out, in)
    expected = completion_logps(fitted, batch)
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-4)
    original = completion_logps(AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), batch)
    assert (expected - original).abs().max() > 0  # it is the fit, not W
    with recipe.trainer.model.disable_adapter():
        residual = completion_logps(recipe.trainer.model, batch)  # the 4-bit residual alone
    assert (ref - residual).abs().max() > 0.3


@pytest.mark.parametrize("method, kw", [
    ("full", {"lr": 1e-3}), ("lora", {"lr": 3e-2}), ("lora-gaussian", {"lr": 3e-2}), ("pissa", {}),
    ("pissa", {"dora": True}), ("pissa", {"train_singular_values": True}), ("qlora", {"lr": 3e-2}),
    ("qpissa", {}), ("loftq", {}),
], ids=["full", "lora", "lora-gaussian", "pissa", "pissa-dora", "pissa-singular-values", "qlora", "qpissa", "loftq"])
def test_every_method_starts_at_ln2_and_raises_the_margin(tmp_path, tiny_dir, prefs_file, method, kw):
    """Policy == reference at step 0, so the first DPO loss is ln 2 exactly; then the reward margin
    (chosen minus rejected log-ratio, times beta) grows."""
    if method in ("qlora", "qpissa", "loftq"):
        pytest.importorskip("bitsandbytes")
        kw = {**kw, "quant_iters": 2}
    summary = TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file, method=method, max_steps=6, **kw)).run()
    log = read_log(tmp_path / "run")
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert log[0]["margin"] == pytest.approx(0, abs=1e-3)
    assert log[-1]["margin"] > 0.01 and log[-1]["loss"] < math.log(2) - 0.005, [(r["loss"], r["margin"]) for r in log]
    assert summary["stage"] == "dpo" and summary["final_margin"] == log[-1]["margin"]
    saved = tmp_path / "run" / ("model" if method == "full" else "adapter")
    assert saved.is_dir() and not (saved / "ref").exists()  # the frozen reference copy is not the run's adapter


def test_a_few_steps_raise_the_chosen_vs_rejected_margin(tmp_path, tiny_dir, prefs_file):
    """On the tiny synthetic preference set, measured on the model itself: sum over pairs of
    log p(chosen) - log p(rejected), before and after 8 DPO steps of PiSSA."""
    recipe = TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file, method="pissa", max_steps=8)).setup()
    batch = step0_batch(recipe)
    half = len(PREFS)
    before = completion_logps(recipe.trainer.model.eval(), batch)
    recipe.train()
    after = completion_logps(recipe.trainer.model.eval(), batch)
    margin_before = (before[:half] - before[half:]).sum()
    margin_after = (after[:half] - after[half:]).sum()
    assert margin_after > margin_before + 1.0, (margin_before, margin_after)
    torch.testing.assert_close(reference_logps(recipe, batch), before, rtol=1e-5, atol=1e-4)  # reference unmoved




def test_dpo_resume_equals_uninterrupted(tmp_path, tiny_dir, prefs_file):
    """The reference is rebuilt from the initial adapter on resume (not from the checkpoint): same losses."""
    kw = dict(method="pissa", max_steps=6, save_steps=3)
    TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file, "full_run", **kw)).run()
    with pytest.raises(KeyboardInterrupt):
        TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file, "crashed", **kw), callbacks=[CrashAt(5)]).run()
    TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file, "crashed", resume=True, **kw)).run()
    torch.testing.assert_close(losses(tmp_path / "crashed"), losses(tmp_path / "full_run"), rtol=1e-5, atol=1e-6)


def test_dpo_from_init_dir_equals_on_the_fly(tmp_path, tiny_dir, prefs_file):
    from pissa.init import PissaConfig, run_init

    run_init(str(tiny_dir), PissaConfig(rank=4, seed=0), tmp_path / "init")
    TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file, "fly", method="pissa")).run()
    TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file, "dir", model=None, init=str(tmp_path / "init"))).run()
    torch.testing.assert_close(losses(tmp_path / "dir"), losses(tmp_path / "fly"), rtol=1e-5, atol=1e-6)


# --- preference records ------------------------------------------------------------------------------

def build(tmp_path, tokenizer, records, max_length=512):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return build_preference_data(path, tokenizer, max_length)


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}),
    ({"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
     {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}),
    ({"prompt": "2+2?", "chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]},
     {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}),  # UltraFeedback style
    ({"chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]},
     {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}),  # implicit prompt
    ({"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
      "rejected": {"from": "gpt", "value": "5"}},
     {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}),  # LLaMA-Factory
], ids=["plain", "conversational", "answers-repeat-prompt", "implicit-prompt", "sharegpt"])
def test_preference_formats(tmp_path, smollm2_tokenizer, record, expected):
    data = build(tmp_path, smollm2_tokenizer, [record])
    assert data.records == [expected]
    assert data.layout == ("plain" if isinstance(expected["prompt"], str) else "conversational")


def test_preference_tokens_in_trl(tmp_path, tiny_dir, prefs_file):
    """TRL's rows: the prompt as the chat template opens the assistant turn, each answer as the template
    closes it (the tests' template ends a turn with a newline)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    row = TrainRecipe(dpo_config(tmp_path, tiny_dir, prefs_file)).setup().trainer.train_dataset[0]
    assert tok.decode(row["prompt_ids"]) == "<s>user: 2 + 3?\n<s>assistant: "
    assert tok.decode(row["chosen_ids"]) == "2 + 3 = 5. The answer is: 5\n"
    assert tok.decode(row["rejected_ids"]) == "2 + 3 = 5. The answer is: 7\n"


def test_bundled_arith_preferences_train(tmp_path, tiny_dir):
    config = TrainConfig(out=str(tmp_path / "run"), model=str(tiny_dir), stage="dpo", data="arith", limit=8,
                         rank=4, max_steps=1, batch_size=4, max_length=1024, tensorboard=False)
    summary = TrainRecipe(config).run()
    assert summary["data_format"] == "preference" and summary["examples"] == 8


@pytest.mark.parametrize("kw, message", [
    (dict(stage="dpo", packing=True), "--packing and --padding-free apply to --stage sft"),
    (dict(beta=0.5), "--beta is DPO's; it applies to --stage dpo only"),
    (dict(stage="dpo", beta=float("nan")), "--beta must be a finite number, got nan"),
    (dict(stage="dpo", beta=0.0), "--beta must be > 0, got 0.0"),
    (dict(stage="ppo"), "unknown --stage 'ppo'"),
    (dict(limit=-5), "--limit must be >= 1, got -5"),
])
def test_bad_options_refused(tmp_path, kw, message):
    with pytest.raises(PissaError, match=message):
        TrainConfig(out=str(tmp_path / "r"), model="m", **kw)


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "response": "r"}', r"line 1: missing field 'chosen'"),
    ('{"prompt": "q", "chosen": "a", "rejected": "a"}', r"line 1: 'chosen' and 'rejected' are the same answer"),
    ('{"chosen": "a", "rejected": "b"}', r"line 1: no prompt"),
])
def test_bad_preference_records_refused_before_writing(tmp_path, tiny_dir, line, message):
    (tmp_path / "p.jsonl").write_text(line + "\n")
    with pytest.raises(PissaError, match=message):
        TrainRecipe(dpo_config(tmp_path, tiny_dir, tmp_path / "p.jsonl")).setup()
    assert not (tmp_path / "run").exists()


def test_cli_stage_dpo(tmp_path, tiny_dir, prefs_file):
    from typer.testing import CliRunner

    from pissa.cli import app

    run = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_dir), "--stage", "dpo", "--data", str(prefs_file),
                                      "--out", str(run), "--rank", "4", "--max-steps", "2", "--beta", "0.2",
                                      "--max-length", "128", "--no-tensorboard"])
    assert result.exit_code == 0, result.output
    assert "reward margin first -> last" in result.output and "(dpo)" in result.output
    command = (run / "train_config.yaml").read_text().splitlines()[0]
    assert "--stage dpo" in command and "--beta 0.2" in command  # the saved command repeats the run
    assert [r["step"] for r in read_log(run)] == [1, 2] and "margin" in read_log(run)[0]
