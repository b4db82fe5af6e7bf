"""pissa.data and pissa.synthetic: formats, exact response-only labels, errors, the bundled set."""

from __future__ import annotations

import copy
import json
import re
import sys

import pytest

from pissa.data.records import ALPACA_PROMPT_INPUT, load_examples
from pissa.data.synthetic import arith_problems
from pissa.data.tokens import IGNORE_INDEX, PadCollator, build_dataset, render_prompt
from pissa.errors import PissaError

RECORDS = {
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5. The answer is: 5"},
    "alpaca-no-input": {"instruction": "Say hi.", "output": "Hi there!"},
    "metamath": {"query": "What is 7 * 6?", "response": "7 * 6 = 42.\nThe answer is: 42"},
    "chat": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris."}]},
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def plain_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer with its chat template removed, so prompts fall back to Alpaca's."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("templated", [True, False], ids=["chat-template", "alpaca-prompt"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_labels_mask_exactly_the_prompt(tmp_path, smollm2_tokenizer, plain_tokenizer, fmt, templated):
    tok = smollm2_tokenizer if templated else plain_tokenizer
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS[fmt]])
    (example,), _, _ = load_examples(path)
    feature = build_dataset(path, tok, max_length=512)[0]
    prompt_ids = tok(render_prompt(tok, example), add_special_tokens=not templated)["input_ids"]
    response_ids = tok(example.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(prompt_ids)
    assert feature["input_ids"] == prompt_ids + response_ids
    assert feature["labels"][:n] == [IGNORE_INDEX] * n  # every prompt token masked
    assert feature["labels"][n:] == response_ids  # every response token (and EOS) kept
    assert tok.decode(feature["labels"][n:], skip_special_tokens=True) == example.response


def test_prompt_uses_chat_template_or_alpaca(smollm2_tokenizer, plain_tokenizer, tmp_path):
    (example,), fmt, _ = load_examples(write_jsonl(tmp_path / "a.jsonl", [RECORDS["alpaca"]]))
    assert fmt == "alpaca"
    assert render_prompt(plain_tokenizer, example) == ALPACA_PROMPT_INPUT.format(
        instruction="Add the numbers.", input="2 and 3")
    templated = render_prompt(smollm2_tokenizer, example)
    assert templated == smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}], tokenize=False, add_generation_prompt=True)


def test_chat_prompt_holds_every_turn_but_the_answer(smollm2_tokenizer, tmp_path):
    (example,), fmt, _ = load_examples(write_jsonl(tmp_path / "c.jsonl", [RECORDS["chat"]]))
    assert fmt == "chat" and example.response == "Paris."
    prompt = render_prompt(smollm2_tokenizer, example)
    assert "Be brief." in prompt and "Capital of France?" in prompt and "Paris." not in prompt


def test_json_list_file_reads_like_jsonl(tmp_path, smollm2_tokenizer):
    records = [RECORDS["metamath"]] * 3
    (tmp_path / "d.json").write_text(json.dumps(records))
    a = build_dataset(tmp_path / "d.json", smollm2_tokenizer, 512)
    b = build_dataset(write_jsonl(tmp_path / "d.jsonl", records), smollm2_tokenizer, 512)
    assert a.features == b.features and len(a) == 3


def test_too_long_examples_are_dropped_and_counted(tmp_path, smollm2_tokenizer):
    short, long = RECORDS["metamath"], {"query": "x " * 400, "response": "y"}
    ds = build_dataset(write_jsonl(tmp_path / "d.jsonl", [short, long, short]), smollm2_tokenizer, max_length=128)
    assert len(ds) == 2 and ds.stats.too_long == 1 and ds.stats.records == 3
    assert all(len(f["input_ids"]) <= 128 for f in ds.features)


def test_collator_pads_with_masked_labels():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = PadCollator(pad_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# --- bad input -------------------------------------------------------------------------------------

def test_missing_field_names_field_and_line(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["alpaca"], RECORDS["alpaca"], {"instruction": "no output"}])
    with pytest.raises(PissaError, match=r"d\.jsonl line 3: missing field 'output'"):
        build_dataset(path, smollm2_tokenizer, 512)


def test_missing_field_in_json_list_names_item(tmp_path, smollm2_tokenizer):
    (tmp_path / "d.json").write_text(json.dumps([RECORDS["metamath"], {"query": "q"}]))
    with pytest.raises(PissaError, match=r"item 2: missing field 'response'"):
        build_dataset(tmp_path / "d.json", smollm2_tokenizer, 512)


def test_empty_dataset_refused(tmp_path, smollm2_tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PissaError, match="empty"):
        build_dataset(tmp_path / "empty.jsonl", smollm2_tokenizer, 512)


def test_every_example_too_long_refused(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["metamath"]] * 2)
    with pytest.raises(PissaError, match="every example .* longer than --max-length 8"):
        build_dataset(path, smollm2_tokenizer, max_length=8)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 1 is not valid JSON"),
    ('["a", "b"]', r"line 1: expected a JSON object"),
    ('{"text": "hello"}', r"line 1: unknown record format, fields are \['text'\]"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"last message must have role 'assistant'"),
    ('{"query": "q", "response": 5}', r"field 'response' must be a string"),
])
def test_malformed_records_refused(tmp_path, smollm2_tokenizer, line, message):
    (tmp_path / "d.jsonl").write_text(line + "\n")
    with pytest.raises(PissaError, match=message):
        build_dataset(tmp_path / "d.jsonl", smollm2_tokenizer, 512)


def test_missing_file_and_missing_datasets_package(tmp_path, smollm2_tokenizer, monkeypatch):
    with pytest.raises(PissaError, match="does not exist"):
        build_dataset(tmp_path / "nope.jsonl", smollm2_tokenizer, 512)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(PissaError, match="pip install datasets"):
        build_dataset("someone/some-dataset", smollm2_tokenizer, 512)


def test_hub_name_config_and_split_reach_load_dataset(monkeypatch):
    """NAME@CONFIG:SPLIT -> load_dataset(NAME, CONFIG, split=SPLIT): GSM8K cannot load without its config."""
    import types

    from pissa.data.records import read_records

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return [{"query": "q", "response": "r"}]

    fake = types.SimpleNamespace(load_dataset=load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    pairs, _ = read_records("openai/gsm8k@main:test")
    read_records("someone/plain")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"}), (("someone/plain", None), {"split": "train"})]
    assert pairs == [({"query": "q", "response": "r"}, "openai/gsm8k@main:test row 1")]


# --- the bundled synthetic set ---------------------------------------------------------------------

def test_arith_is_deterministic_and_splits_are_disjoint():
    train, test = arith_problems("train", 500), arith_problems("test")
    assert train == arith_problems("train", 500)
    assert arith_problems("train", 50, seed=1) != arith_problems("train", 50, seed=0)
    assert len({r["query"] for r in train}) == 500
    assert not {r["query"] for r in train} & {r["query"] for r in test}


def test_arith_reasoning_is_correct_arithmetic():
    """Every `a op b = c` in every response holds, and the last line states the answer."""
    for record in arith_problems("train", 300):
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", record["response"])
        assert len(steps) >= 2, record["response"]  # multi-step
        for a, op, b, c in steps:
            assert eval(f"{a} {op} {b}") == int(c), (a, op, b, c)  # noqa: S307 (digits and one operator)
        assert record["response"].endswith(f"\nThe answer is: {record['answer']}")
        assert int(steps[-1][3]) == int(record["answer"])


def test_arith_loads_as_metamath(smollm2_tokenizer):
    ds = build_dataset("arith:test", smollm2_tokenizer, 512, limit=20)
    assert ds.stats.format == "metamath" and len(ds) == 20
