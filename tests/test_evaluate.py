"""Evaluation: answer extraction on real-looking outputs, accuracy on a hand-labelled set, batched
generation == one-at-a-time generation, perplexity == the model's own loss, `pissa eval` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from pissa.cli import app
from pissa.data.synthetic import arith_problems
from pissa.data.tokens import pad_id
from pissa.errors import PissaError
from pissa.eval.answers import accuracy, extract_answer, gold_answer, is_correct, normalize
from pissa.eval.data import encode_prompt, encode_with_response, load_eval_examples, question_example
from pissa.eval.generate import generate_transformers
from pissa.eval.scoring import EvalConfig, evaluate, perplexity

# (model output, task, expected extracted answer, expected normalised value)
EXTRACTION_TABLE = [
    # MetaMath/GSM8K style final line
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\nThe answer is: 72",
     "gsm8k", "72", "72"),
    # thousands commas and a trailing period
    ("He earns 1,200 * 12 = 14,400 a year. The answer is: 14,400.", "gsm8k", "14,400", "14400"),
    # dollar sign and trailing .00 / .0
    ("Total cost is 3 * $6.50 = $19.50. So she pays $20.00 - $19.50 = $0.50 back... The answer is: $0.50",
     "gsm8k", "$0.50", "1/2"),
    ("The answer is: 18.0", "gsm8k", "18.0", "18"),
    # negative answer
    ("The temperature drops from 5 to -3 degrees, a change of -8.\nThe answer is: -8", "gsm8k", "-8", "-8"),
    # several numbers after the phrase: the first one is the answer
    ("The answer is: 42 apples, since 6 * 7 = 42 and 3 boxes", "gsm8k", "42", "42"),
    # no answer phrase: fall back to the last number; "3-5" and "10 - 4" are not negatives
    ("Kids aged 3-5 pay 10 - 4 = 6 dollars, so 4 kids pay 24", "gsm8k", "24", "24"),
    ("first 10 - 4 = 6", "gsm8k", "6", "6"),
    # the last answer phrase wins when the model repeats itself
    ("The answer is: 5\nWait, I made an error: 2 + 4 = 6. The answer is: 6", "gsm8k", "6", "6"),
    # GSM8K gold solution format
    ("Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10",
     "gsm8k", "10", "10"),
    ("#### 1,000,000", "gsm8k", "1,000,000", "1000000"),
    # nothing to extract
    ("I am not sure how to solve this.", "gsm8k", None, None),
    # MATH: boxed with nested braces
    (r"So the probability is $\boxed{\frac{1}{2}}$.", "math", r"\frac{1}{2}", "1/2"),
    (r"We get $x = \boxed{-\dfrac{3}{4}}$", "math", r"-\dfrac{3}{4}", "-3/4"),
    (r"First $\boxed{3}$ is wrong; the answer is $\boxed{\sqrt{2}+1}$.", "math", r"\sqrt{2}+1", r"\sqrt{2}+1"),
    (r"$\boxed{\left( 3, \frac{\pi}{2} \right)}$", "math", r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"\boxed{1,\!000}", "math", r"1,\!000", "1000"),
    (r"The area is $\boxed{12\text{ cm}}$", "math", r"12\text{ cm}", "12"),
    # MATH without a box: MetaMath's "The answer is" line, then the last number
    (r"The answer is: \frac{5}{2}", "math", r"\frac{5}{2}", "5/2"),
    (r"The answer is: $50\%$.", "math", r"50\%", "50"),
    ("so x equals 7", "math", "7", "7"),
    # generic exact match
    ("The answer is: Paris.", "generic-exact", "Paris", "Paris"),
    ("blue", "generic-exact", "blue", "blue"),
]


@pytest.mark.parametrize("text,task,extracted,normalised", EXTRACTION_TABLE)
def test_extraction_table(text, task, extracted, normalised):
    found = extract_answer(text, task)
    assert found == extracted
    assert normalize(found) == normalised


@pytest.mark.parametrize("field,task,gold", [
    ("72", "gsm8k", "72"),
    ("1,234", "gsm8k", "1,234"),
    ("She has 3 + 4 = 7 left.\nThe answer is: 7", "gsm8k", "7"),
    ("Weng earns $0.2 per minute.\n#### 10", "gsm8k", "10"),
    (r"\frac{1}{2}", "math", r"\frac{1}{2}"),  # a bare MATH answer is taken whole, not its last digit
    ("x^2+1", "math", "x^2+1"),
    (r"Thus $f(2) = \boxed{\frac{7}{3}}$.", "math", r"\frac{7}{3}"),
])
def test_gold_answer_from_dataset_fields(field, task, gold):
    assert gold_answer(field, task) == gold


# A hand-labelled mini set: (model output, gold field, task, correct by a human reading).
HAND_LABELLED = [
    ("3 * 4 = 12. The answer is: 12", "12", "gsm8k", True),
    ("The answer is: 1,500", "#### 1500", "gsm8k", True),
    ("So she pays $15.00 in total.", "15", "gsm8k", True),  # fallback to the last number
    ("The answer is: 12", "13", "gsm8k", False),
    ("The answer is: -4", "4", "gsm8k", False),  # the sign matters
    ("3 + 4 = 7 apples, then 2 more: 9 apples", "The answer is: 7", "gsm8k", False),  # last number is 9
    (r"$\boxed{0.5}$", r"\frac{1}{2}", "math", True),
    (r"$\boxed{\frac{2}{4}}$", r"The answer is $\boxed{\frac{1}{2}}$", "math", True),
    (r"$\boxed{\frac{1}{3}}$", r"\frac{1}{2}", "math", False),
    ("The answer is: Paris", "paris", "generic-exact", False),  # exact match is case-sensitive
]


def test_accuracy_on_hand_labelled_set():
    for output, gold_field, task, human in HAND_LABELLED:
        assert is_correct(extract_answer(output, task), gold_answer(gold_field, task)) == human, output
    gsm = [(o, g) for o, g, t, _ in HAND_LABELLED if t == "gsm8k"]
    predicted = [extract_answer(o, "gsm8k") for o, _ in gsm]
    gold = [gold_answer(g, "gsm8k") for _, g in gsm]
    assert accuracy(predicted, gold) == pytest.approx(3 / 6)


# ------------------------------------------------------------------ a tiny model with a real tokenizer


@pytest.fixture
def tiny_lm(make_tiny_llama, smollm2_tokenizer):
    """A 2-layer Llama sized for SmolLM2's tokenizer (random weights), and that tokenizer."""
    return make_tiny_llama(vocab_size=len(smollm2_tokenizer)), smollm2_tokenizer


@pytest.fixture
def tiny_lm_dir(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    path = tmp_path / "tiny-lm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


QUESTIONS = ["What is 2 + 2?", "Tom has 3 apples and buys 5 more. How many does he have?", "Hi",
             "A train goes 60 km per hour for 3 hours. How far does it go in total, in kilometres?"]


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = [encode_prompt(tokenizer, question_example(q, "")) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # the batch really needs padding
    batched = generate_transformers(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    single = generate_transformers(model, tokenizer, prompts, max_new_tokens=8, batch_size=1)
    assert batched == single
    assert all(out for out in single)


def test_perplexity_equals_model_loss(tiny_lm):
    model, tokenizer = tiny_lm
    examples = [("What is 2 + 2?", "2 + 2 = 4.\nThe answer is: 4"), ("Hi", "Hello! The answer is: 0"),
                ("Name a colour.", "The answer is: blue")]
    examples = [question_example(q, a) for q, a in examples]
    sequences = [encode_with_response(tokenizer, ex, max_length=512) for ex in examples]
    ppl, nll, count = perplexity(model, sequences, batch_size=3, pad=pad_id(tokenizer))
    # Reference: the model's own mean loss per example (no padding), weighted by its labelled tokens.
    ref_nll, ref_count = 0.0, 0
    with torch.no_grad():
        for ids, labels in sequences:
            n = sum(label != -100 for label in labels[1:])
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            ref_nll += loss.item() * n
            ref_count += n
    # every response token + EOS is scored, no prompt token is
    assert count == ref_count == sum(len(ids) - len(encode_prompt(tokenizer, ex)) for ex, (ids, _) in
                                     zip(examples, sequences, strict=True))
    assert nll == pytest.approx(ref_nll, rel=1e-5)
    assert ppl == pytest.approx(math.exp(ref_nll / ref_count), rel=1e-5)


def test_evaluate_scores_outputs_against_gold(tiny_lm):
    """The scoring loop with canned generations: accuracy is what a human counts."""
    model, tokenizer = tiny_lm
    examples = [question_example("q0", "The answer is: 12", 0), question_example("q1", "#### 7", 1),
                question_example("q2", "The answer is: 1,000", 2)]
    canned = ["6 * 2 = 12\nThe answer is: 12", "The answer is: 8", "that is $1,000.00 in all"]
    result = evaluate(model, tokenizer, examples, EvalConfig(task="gsm8k", perplexity=False),
                      generate=lambda prompt_ids: canned[: len(prompt_ids)])
    assert [r["correct"] for r in result.records] == [True, False, True]
    assert [r["gold"] for r in result.records] == ["12", "7", "1,000"]
    assert result.accuracy == pytest.approx(2 / 3) and result.correct == 2 and result.total == 3


# ------------------------------------------------------------------ the CLI end to end

runner = CliRunner()


def read_predictions(folder):
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_pissa_eval_end_to_end(tmp_path, tiny_lm_dir, tiny_lm):
    out = tmp_path / "eval"
    args = ["eval", str(tiny_lm_dir), "--data", "arith:test", "--limit", "4", "--max-new-tokens", "6",
            "--batch-size", "3", "--out", str(out), "--backend", "transformers"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())
    records = read_predictions(out)
    problems = arith_problems("test", n=4)
    assert [r["gold"] for r in records] == [p["answer"] for p in problems]
    assert summary["total"] == 4 and summary["correct"] == sum(r["correct"] for r in records)
    assert summary["accuracy"] == summary["correct"] / 4
    assert all(p["query"] in r["prompt"] for p, r in zip(problems, records, strict=True))
    # The same outputs and perplexity as calling the library on the in-memory model.
    model, tokenizer = tiny_lm
    examples = load_eval_examples("arith", limit=4)
    direct = evaluate(model, tokenizer, examples, EvalConfig(max_new_tokens=6, batch_size=2))
    assert [r["output"] for r in records] == [r["output"] for r in direct.records]
    assert summary["perplexity"] == pytest.approx(direct.perplexity, rel=1e-5)
    assert "accuracy" in result.output and str(out) in result.output.replace("\n", "")
    # An existing results folder is refused without --overwrite.
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize("targets", [[], ["--targets", "embed_tokens", "--targets", "q_proj"]],
                         ids=["linear", "embedding"])
def test_pissa_eval_of_init_folder_matches_base_model(tmp_path, tiny_lm_dir, targets):
    """A `pissa init` folder (residual + PiSSA adapter) evaluates exactly like the model it came from."""
    init = tmp_path / "init"
    done = runner.invoke(app, ["init", str(tiny_lm_dir), "--rank", "4", *targets, "--out", str(init)])
    assert done.exit_code == 0, done.output
    common = ["--data", "arith", "--limit", "3", "--max-new-tokens", "5", "--backend", "transformers"]
    assert runner.invoke(app, ["eval", str(tiny_lm_dir), *common, "--out", str(tmp_path / "a")]).exit_code == 0
    result = runner.invoke(app, ["eval", str(init), *common])
    assert result.exit_code == 0, result.output
    default_out = init / "eval" / "arith-gsm8k"  # results of a folder are kept inside it
    base, pissa = read_predictions(tmp_path / "a"), read_predictions(default_out)
    assert [r["output"] for r in base] == [r["output"] for r in pissa]
    ppl = [json.loads((f / "eval.json").read_text())["perplexity"] for f in (tmp_path / "a", default_out)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4)
    assert json.loads((default_out / "eval.json").read_text())["kind"] == "init"


def test_load_eval_examples_fields(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"question": "1+1?", "answer": "#### 2"}\n\n{"instruction": "Add", "input": "2 and 3", '
                    '"output": "5"}\n')
    examples = load_eval_examples(path)
    assert [(e.example.prompt[0]["content"], e.reference) for e in examples] == [("1+1?", "#### 2"),
                                                                                ("Add\n\n2 and 3", "5")]
    arith = load_eval_examples("arith", limit=2)  # the bundled set evaluates on its test split
    assert [e.example.prompt[0]["content"] for e in arith] == [p["query"] for p in arith_problems("test", n=2)]
    assert [e.reference for e in arith] == [p["answer"] for p in arith_problems("test", n=2)]


@pytest.mark.parametrize("extra,message", [
    (["--task", "mmlu"], "unknown task 'mmlu'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
    (["--batch-size", "-1"], "--batch-size must be > 0"),
    (["--limit", "0"], "--limit must be > 0"),
    (["--backend", "tgi"], "unknown --backend"),
    (["--data", "missing.jsonl"], "missing.jsonl not found"),
])
def test_eval_bad_options(tmp_path, tiny_lm_dir, extra, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(tiny_lm_dir), "--out", str(out), *extra])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not out.exists()


@pytest.mark.parametrize("lines", [
    '{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "rationale": "..."}\n',
    '{"query": "1+1?", "response": "2"}\n{"query": "2+2?", "rationale": "..."}\n',
])
def test_eval_dataset_without_answer_field(tmp_path, tiny_lm_dir, lines):
    data = tmp_path / "noanswer.jsonl"
    data.write_text(lines)
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(tiny_lm_dir), "--data", str(data), "--out", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "line 2 has no answer field" in text and "rationale" in text
    assert not out.exists()


def test_eval_adapter_that_does_not_fit_the_model(tmp_path, tiny_lm_dir, make_tiny_llama, smollm2_tokenizer):
    init = tmp_path / "init"
    assert runner.invoke(app, ["init", str(tiny_lm_dir), "--rank", "2", "--out", str(init)]).exit_code == 0
    other = tmp_path / "other"
    make_tiny_llama(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64).save_pretrained(other)
    smollm2_tokenizer.save_pretrained(other)
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(other), "--adapter", str(init / "adapter"), "--out", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "has 32x32" in text and "base model it was trained on" in text
    assert not out.exists()


def test_config_refuses_bad_limits():
    with pytest.raises(PissaError, match="--max-new-tokens must be > 0"):
        EvalConfig(max_new_tokens=-5)
    with pytest.raises(PissaError, match="unknown task"):
        EvalConfig(task="humaneval")


def test_eval_pissa_adapter_on_the_original_model_is_refused(tmp_path, tiny_lm_dir):
    """Same shapes, wrong base: the principal part would be counted twice."""
    init = tmp_path / "init"
    assert runner.invoke(app, ["init", str(tiny_lm_dir), "--rank", "2", "--out", str(init)]).exit_code == 0
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(tiny_lm_dir), "--adapter", str(init / "adapter"), "--out", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "is a PiSSA adapter for the residual model" in text and "pissa convert" in text
    assert not out.exists()
    # Its own residual is accepted.
    ok = runner.invoke(app, ["eval", str(init / "residual"), "--adapter", str(init / "adapter"), "--limit", "1",
                             "--max-new-tokens", "2", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
