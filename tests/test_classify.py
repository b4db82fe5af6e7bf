"""`pissa train --task classify | image-classify` and `pissa eval` of classifiers, on a tiny BERT and a tiny ViT
built from configs (and one integration test on the embedded MiniLM): the head is trained and saved as PEFT's
modules_to_save and loads with stock PEFT in a fresh process; PiSSA leaves the logits unchanged at init; the
converted LoRA (and the merged model) on the run's original model give the trained logits; every method's saved
run evaluates to what the trained model predicts; bad inputs get one line before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import build_tiny_bert, build_tiny_vit, sentiment_records, word_tokenizer
from pissa.cli import app
from pissa.convert import convert_to_lora, merge_adapter
from pissa.data.labels import encode_texts, read_labelled_texts
from pissa.eval import EvalConfig, run_eval
from pissa.eval.classify import scores
from pissa.train import TrainConfig, recipe_for

pytestmark = pytest.mark.usefixtures("one_thread")
AUTO = {"text": "AutoModelForSequenceClassification", "image": "AutoModelForImageClassification"}
TASK = {"text": "classify", "image": "image-classify"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def image_set(n: int, seed: int):
    """8x8 grey images whose label says which half is brighter (a learnable rule)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 100, (n, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % 2
    images[labels == 1, :, :4] += 150  # (n1, 8, 4): the left half lit
    images[labels == 0, :, 4:] += 150
    return images, labels


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    build_tiny_bert().save_pretrained(root / "bert")
    word_tokenizer().save_pretrained(root / "bert")
    build_tiny_vit().save_pretrained(root / "vit")
    for split, (n, seed) in {"train": (32, 0), "test": (16, 1)}.items():
        write_jsonl(root / f"{split}.jsonl", sentiment_records(n, seed))
        images, labels = image_set(n, seed)
        np.savez(root / f"{split}.npz", images=images, labels=labels, label_names=np.array(["right", "left"]))
    return {"root": root, "text": {"model": root / "bert", "train": root / "train.jsonl", "test": root / "test.jsonl"},
            "image": {"model": root / "vit", "train": root / "train.npz", "test": root / "test.npz"}}


def config(inputs, kind, out, **kw) -> TrainConfig:
    d = inputs[kind]
    base = dict(out=str(out), model=str(d["model"]), data=str(d["train"]), task=TASK[kind], rank=4, lr=2e-2,
                max_steps=4, batch_size=8, warmup_ratio=0.0, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def batch_of(recipe, n: int = 6) -> dict:
    rows = [{k: v for k, v in r.items() if k != "labels"} for r in recipe.data.records[:n]]
    return dict(recipe.task.collator(recipe.tokenizer)(rows))


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def base_logits(run, kind, batch):
    import transformers

    return logits(getattr(transformers, AUTO[kind]).from_pretrained(run / "base"), batch)


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    """A PiSSA run of each kind (4 steps at a large lr, so the factors and the head really move)."""
    out = {}
    for kind in TASK:
        run = tmp_path_factory.mktemp(f"run-{kind}") / "run"
        recipe = recipe_for(config(inputs, kind, run, method="pissa"))
        recipe.run()
        batch = batch_of(recipe)
        out[kind] = {"run": run, "batch": batch, "logits": logits(recipe.model, batch)}
    return out


@pytest.mark.parametrize("kind", TASK)
def test_pissa_leaves_the_logits_unchanged_at_init(inputs, tmp_path, kind):
    recipe = recipe_for(config(inputs, kind, tmp_path / "run", method="pissa")).setup()
    batch = batch_of(recipe)
    torch.testing.assert_close(logits(recipe.model, batch), base_logits(tmp_path / "run", kind, batch),
                               atol=1e-5, rtol=0)
    # the head is PEFT's modules_to_save (trained in full), never an adapter target
    assert {n for n, p in recipe.model.named_parameters() if p.requires_grad and "lora_" not in n} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias"}


@pytest.fixture(scope="module")
def stock(trained, tmp_path_factory, stock_outputs):
    """Per kind, from the stock-loading process (conftest): the residual + trained adapter, the converted LoRA on the
    run's original model (RUN/base), and the merged model."""
    out = {}
    for kind, t in trained.items():
        run, folder = t["run"], tmp_path_factory.mktemp(f"converted-{kind}")
        convert_to_lora(run / "adapter", run / "init", folder / "lora")
        merge_adapter(folder / "lora", run / "base", folder / "merged")
        pairs = [(run / "residual", run / "adapter"), (run / "base", folder / "lora"), (folder / "merged", None)]
        logits = stock_outputs(AUTO[kind], pairs, t["batch"])
        out[kind] = {"folder": folder, **dict(zip(["trained", "converted", "merged"], logits, strict=True))}
    return out


def test_a_head_for_other_labels_is_drawn_anew(inputs, tmp_path):
    """A classifier checkpoint whose head has other labels (same count): RUN/base gets a new head, not its weights."""
    other = build_tiny_bert(num_labels=2)
    other.config.id2label, other.config.label2id = {0: "a", 1: "b"}, {"a": 0, "b": 1}
    other.save_pretrained(tmp_path / "other")
    word_tokenizer().save_pretrained(tmp_path / "other")
    recipe_for(config(inputs, "text", tmp_path / "run", model=str(tmp_path / "other"), method="lora")).setup()
    base = load_file(tmp_path / "run" / "base" / "model.safetensors")
    assert not torch.equal(base["classifier.weight"], other.classifier.weight)
    assert torch.equal(base["bert.pooler.dense.weight"], other.bert.pooler.dense.weight)  # the backbone as it was
    assert json.loads((tmp_path / "run" / "base" / "config.json").read_text())["id2label"] == \
        {"0": "negative", "1": "positive"}


@pytest.mark.parametrize("kind", TASK)
def test_the_trained_head_is_saved_and_loads_with_stock_peft(trained, stock, kind):
    run = trained[kind]["run"]
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    start = load_file(run / "base" / "model.safetensors")
    assert not torch.equal(saved["base_model.model.classifier.weight"], start["classifier.weight"])  # trained
    torch.testing.assert_close(stock[kind]["trained"], trained[kind]["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", TASK)
def test_the_converted_lora_and_the_merged_model_carry_the_head(trained, stock, kind):
    run, lora = trained[kind]["run"], stock[kind]["folder"] / "lora"
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run / "base").resolve())  # the backbone with its new head
    assert "classifier" in config["modules_to_save"]
    torch.testing.assert_close(stock[kind]["converted"], trained[kind]["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(stock[kind]["merged"], trained[kind]["logits"], atol=1e-4, rtol=0)


METHODS = {"full": {}, "lora": {}, "dora": {"method": "pissa", "dora": True}, "qpissa": {"quant_iters": 2},
           "loftq": {"quant_iters": 2}}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_evaluates_as_it_trained(inputs, tmp_path, name):
    """`pissa eval RUN` loads what the run saved (full model, adapter on its base, 4-bit residual + adapter)
    and predicts what the trained model predicted."""
    kw = {"method": name, **METHODS[name]}
    if kw["method"] in ("qpissa", "loftq"):
        pytest.importorskip("bitsandbytes")
    if kw["method"] == "full":
        kw["rank"] = None
    recipe = recipe_for(config(inputs, "text", tmp_path / "run", **kw))
    recipe.run()
    rows, _ = encode_texts(read_labelled_texts(inputs["text"]["test"]), recipe.tokenizer, recipe.labels, 64)
    batch = dict(recipe.task.collator(recipe.tokenizer)([{k: v for k, v in r.items() if k != "labels"}
                                                         for r in rows]))
    predicted = logits(recipe.model, batch).argmax(-1)
    gold = torch.tensor([r["labels"] for r in rows])
    result, out, _ = run_eval(str(tmp_path / "run"), str(inputs["text"]["test"]), EvalConfig(), out=tmp_path / "ev")
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [recipe.labels.names.index(x["predicted"]) for x in lines] == predicted.tolist()
    assert result.accuracy == pytest.approx((predicted == gold).float().mean().item())
    assert json.loads((out / "eval.json").read_text())["labels"] == ["negative", "positive"]


@pytest.mark.parametrize("classes", [2, 3])
def test_scores_match_scikit_learn(classes):
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    g = torch.Generator().manual_seed(classes)
    gold, predicted = torch.randint(0, classes, (200,), generator=g), torch.randint(0, classes, (200,), generator=g)
    ours = scores(predicted, gold, classes)
    assert ours["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert ours["f1"] == pytest.approx(f1_score(gold, predicted, average="macro"))
    assert ours["mcc"] == pytest.approx(matthews_corrcoef(gold, predicted))


# --- bad inputs: one line, exit 2, nothing written ----------------------------------------------------------

def bad_inputs(root):
    """{case: (extra train args | eval args, expected words)} written under `root`."""
    write_jsonl(root / "nolabel.jsonl", [{"text": "good"}, {"text": "bad", "label": "negative"}])
    write_jsonl(root / "regression.jsonl", [{"text": "good", "label": 0.5}, {"text": "bad", "label": 1.0}])
    write_jsonl(root / "onelabel.jsonl", [{"text": "good", "label": "x"}] * 3)
    write_jsonl(root / "notext.jsonl", [{"prompt": "good", "label": "x"}])
    write_jsonl(root / "unknown.jsonl", sentiment_records(4) + [{"text": "fine", "label": "neutral"}])
    folder = root / "images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        from PIL import Image

        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / label / "0.png")
    (folder / "b" / "notes.txt").write_text("not an image")
    return root


TRAIN_CASES = {
    "label missing": ("text", ["--data", "{root}/nolabel.jsonl"], "line 1 has no `label`"),
    "fractional label": ("text", ["--data", "{root}/regression.jsonl"], "regression target"),
    "one label": ("text", ["--data", "{root}/onelabel.jsonl"], "at least 2 classes"),
    "no text field": ("text", ["--data", "{root}/notext.jsonl"], "has no text field"),
    "non-image file": ("image", ["--data", "{root}/images"], "notes.txt is not an image"),
    "dpo": ("text", ["--stage", "dpo"], "not for --task classify"),
    "bogus task": ("text", ["--task", "bogus"], "unknown --task"),
    "init of a bare encoder": ("text", ["--init", "{init}"], "not a SequenceClassification model"),
}


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory, inputs):
    from pissa.init import PissaConfig, run_init

    root = bad_inputs(tmp_path_factory.mktemp("bad"))
    run_init(str(inputs["text"]["model"]), PissaConfig(rank=4), root / "init")
    return root


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_bad_train_input_is_refused_in_one_line(inputs, bad_root, tmp_path, case):
    kind, extra, words = TRAIN_CASES[case]
    args = [a.format(root=bad_root, init=bad_root / "init") for a in extra]
    base = ["train", "--task", TASK[kind], "--data", str(inputs[kind]["train"]), "--out", str(tmp_path / "out"),
            "--max-steps", "1"]
    if "--init" not in args:
        base += ["--model", str(inputs[kind]["model"])]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_eval_refuses_labels_the_head_was_not_trained_on(trained, bad_root, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(trained["text"]["run"]), "--data", str(bad_root / "unknown.jsonl"),
                                      "--out", str(tmp_path / "ev")])
    assert result.exit_code == 2, result.output
    assert "labels the classifier was not trained on: neutral" in " ".join(result.output.split())
    assert not (tmp_path / "ev").exists()


@pytest.mark.integration
def test_minilm_pissa_leaves_the_logits_unchanged_at_init(tmp_path):
    """The embedded MiniLM-L6 (real weights, real tokenizer) with a new head: PiSSA on every backbone linear layer."""
    records = [{"text": t, "label": y} for t, y in [("A gripping, funny film.", "fresh"), ("Dull and long.", "rotten")]]
    data = write_jsonl(tmp_path / "rt.jsonl", records * 4)
    recipe = recipe_for(TrainConfig(out=str(tmp_path / "run"), model="minilm-l6", task="classify", data=str(data),
                                    rank=8, max_steps=1, tensorboard=False)).setup()
    batch = batch_of(recipe, 8)
    torch.testing.assert_close(logits(recipe.model, batch), base_logits(tmp_path / "run", "text", batch),
                               atol=1e-4, rtol=0)
    assert sorted(json.loads(json.dumps(recipe.model.peft_config["default"].target_modules, default=sorted))) == \
        ["dense", "key", "query", "value"]
