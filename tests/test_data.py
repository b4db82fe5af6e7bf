"""pissa.data: reading files (UTF-8 with or without BOM, JSON Lines, a JSON list or one object), every record
format as an Example, chat turns (text parts, null, ShareGPT), one-line errors naming file, line and field,
and the bundled synthetic set. Which tokens carry the loss is tests/test_data_formats.py."""

from __future__ import annotations

import json
import re
import sys

import pytest

from pissa.data.formats import load_examples
from pissa.data.records import load_records, read_records
from pissa.data.synthetic import arith_preferences, arith_problems
from pissa.data.tokens import PadCollator
from pissa.errors import PissaError

USER, ASSISTANT = "user", "assistant"
RECORDS = {
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5. The answer is: 5"},
    "metamath": {"query": "What is 7 * 6?", "response": "7 * 6 = 42.\nThe answer is: 42"},
    "gsm8k": {"question": "What is 7 * 6?", "answer": "7 * 6 = <<7*6=42>>42\n#### 42"},
    "math": {"problem": "What is $7 \\cdot 6$?", "solution": "It is $\\boxed{42}$."},
    "chat": {"messages": [{"role": "system", "content": "Be brief."}, {"role": USER, "content": "Capital of France?"},
                          {"role": ASSISTANT, "content": "Paris."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Capital of France?"},
                                   {"from": "gpt", "value": "Paris."}]},
    "prompt-completion": {"prompt": "The capital of France is", "completion": " Paris."},
    "text": {"text": "Paris is the capital of France."},
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def one(tmp_path, record, name="d.jsonl"):
    (example,), fmt, _ = load_examples(write_jsonl(tmp_path / name, [record]))
    return example, fmt


# --- formats -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_format_is_detected(tmp_path, fmt):
    assert one(tmp_path, RECORDS[fmt])[1] == fmt


def test_question_answer_formats_become_one_user_and_one_assistant_turn(tmp_path):
    example, _ = one(tmp_path, RECORDS["alpaca"])
    assert example.prompt == [{"role": USER, "content": "Add the numbers.\n\n2 and 3"}]
    assert example.completion == [{"role": ASSISTANT, "content": "2 + 3 = 5. The answer is: 5"}]
    assert example.alpaca_input == "2 and 3"
    example, _ = one(tmp_path, RECORDS["gsm8k"])
    assert example.prompt == [{"role": USER, "content": "What is 7 * 6?"}]
    assert example.response == "7 * 6 = <<7*6=42>>42\n#### 42"  # trained as written


def test_chat_keeps_every_turn_and_the_last_is_the_answer(tmp_path):
    turns = [{"role": USER, "content": "2+2?"}, {"role": ASSISTANT, "content": "4"},
             {"role": USER, "content": "3+3?"}, {"role": ASSISTANT, "content": "6"}]
    example, _ = one(tmp_path, {"messages": turns})
    assert example.prompt == turns[:3] and example.completion == turns[3:] and example.response == "6"


def test_sharegpt_speakers_become_roles(tmp_path):
    example, fmt = one(tmp_path, {"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]})
    assert fmt == "sharegpt"
    assert [t["role"] for t in example.prompt + example.completion] == ["system", USER, ASSISTANT, USER, ASSISTANT]


def test_prompt_completion_plain_or_conversational(tmp_path):
    example, _ = one(tmp_path, RECORDS["prompt-completion"])
    assert example.raw and example.prompt == "The capital of France is" and example.completion == " Paris."
    example, _ = one(tmp_path, {"prompt": [{"role": USER, "content": "Capital?"}],
                                "completion": [{"role": ASSISTANT, "content": "Paris."}]})
    assert not example.raw and example.response == "Paris."
    example, _ = one(tmp_path, {"prompt": "Capital?", "completion": [{"role": ASSISTANT, "content": "Paris."}]})
    assert example.prompt == [{"role": USER, "content": "Capital?"}]  # a string prompt is the user's turn


def test_content_as_text_parts_or_null(tmp_path):
    """OpenAI-style content: a list of text parts (joined with newlines, as vLLM does), or null (empty)."""
    example, _ = one(tmp_path, {"messages": [
        {"role": "system", "content": None},
        {"role": USER, "content": [{"type": "text", "text": "Line one."}, {"type": "text", "text": "Line two."}]},
        {"role": ASSISTANT, "content": ["Paris", "."]}]})
    assert example.prompt == [{"role": "system", "content": ""}, {"role": USER, "content": "Line one.\nLine two."}]
    assert example.response == "Paris\n."


# --- reading files -------------------------------------------------------------------------------------

def test_utf8_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(RECORDS["metamath"], ensure_ascii=False) + "\n").encode())
    (example,), fmt, _ = load_examples(path)
    assert fmt == "metamath" and example.prompt[0]["content"] == "What is 7 * 6?"
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"query": "é?", "response": "ü"}]).encode())
    (example,), _, _ = load_examples(tmp_path / "bom.json")
    assert example.response == "ü"


def test_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(RECORDS["metamath"]).encode() + b'\n{"query": "caf\xe9", "response": "x"}\n')
    with pytest.raises(PissaError, match=r"latin1\.jsonl line 2 is not UTF-8 text \(byte 0xe9\); save the file"):
        load_examples(path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_one_pretty_printed_object_is_one_record(tmp_path, suffix):
    path = tmp_path / f"one{suffix}"
    path.write_text(json.dumps(RECORDS["chat"], indent=2))
    (example,), fmt, _ = load_examples(path)
    assert fmt == "chat" and example.response == "Paris."


def test_json_list_reads_like_jsonl(tmp_path):
    records = [RECORDS["metamath"], RECORDS["metamath"] | {"query": "q2"}]
    (tmp_path / "d.json").write_text(json.dumps(records, indent=2))
    a, _, _ = load_examples(tmp_path / "d.json")
    b, _, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", records))
    assert [(x.prompt, x.completion) for x in a] == [(x.prompt, x.completion) for x in b]


def test_limit_takes_the_first_records_and_refuses_non_positive(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["metamath"]] * 5)
    assert len(load_records(path, limit=2)[0]) == 2
    for bad in (0, -5):
        with pytest.raises(PissaError, match=f"--limit must be a positive number of records, got {bad}"):
            load_records(path, limit=bad)


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("{not json", r"d\.jsonl line 1 is not valid JSON \(.*column 2\)"),
    ('["a", "b"]', r"item 1: expected a JSON object"),
    ('{"title": "hello"}', r"line 1: unknown record format, fields are \['title'\]"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"line 1: the last turn of 'messages' must have role "
                                                          "'assistant'"),
    ('{"query": "q", "response": 5}', r"line 1: field 'response' must be a string"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, '
     '{"role": "assistant", "content": "a"}]}', r"line 1: messages\[0\]\.content\[0\] is a part of type 'image_url'"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
     r"line 1: messages\[0\]\.content must be a string, null or a list of text parts, got int"),
    ('{"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}',
     r"line 1: messages\[0\] is missing field 'role'"),
    ('{"conversations": [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}]}',
     r"line 1: conversations\[0\]\.from is 'alien'; expected one of human"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}',
     r"every assistant turn of 'messages' is empty"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b"}', r"line 1: a preference record .* --stage dpo"),
    ('{"prompt": 3, "completion": "x"}', r"'prompt' and 'completion' must both be strings .* got int and str"),
    ('{"data": [{"query": "q", "response": "r"}]}', r"unknown record format.*put the records in a top-level list"),
])
def test_malformed_records_refused_with_file_line_and_field(tmp_path, line, message):
    (tmp_path / "d.jsonl").write_text(line + "\n")
    with pytest.raises(PissaError, match=message):
        load_examples(tmp_path / "d.jsonl")


def test_missing_field_names_field_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["alpaca"], RECORDS["alpaca"], {"instruction": "no output"}])
    with pytest.raises(PissaError, match=r"d\.jsonl line 3: missing field 'output'"):
        load_examples(path)
    (tmp_path / "d.json").write_text(json.dumps([RECORDS["metamath"], {"query": "q"}]))
    with pytest.raises(PissaError, match=r"item 2: missing field 'response'"):
        load_examples(tmp_path / "d.json")


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PissaError, match="empty"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(PissaError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(PissaError, match="is a folder, not a file"):
        load_examples(tmp_path / "folder.json")


def test_missing_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(PissaError, match="pip install datasets"):
        read_records("someone/some-dataset")


def test_hub_name_config_and_split_reach_load_dataset(monkeypatch):
    """NAME@CONFIG:SPLIT -> load_dataset(NAME, CONFIG, split=SPLIT): GSM8K cannot load without its config."""
    import types

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return [{"query": "q", "response": "r"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    pairs, _ = read_records("openai/gsm8k@main:test")
    read_records("someone/plain")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"}), (("someone/plain", None), {"split": "train"})]
    assert pairs == [({"query": "q", "response": "r"}, "openai/gsm8k@main:test row 1")]


def test_collator_pads_with_masked_labels():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = PadCollator(pad_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


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


def test_arith_loads_as_metamath():
    examples, fmt, _ = load_examples("arith:test", limit=20)
    assert fmt == "metamath" and len(examples) == 20


def test_arith_preferences_reject_a_wrong_final_answer():
    problems, prefs = arith_problems("train", 50), arith_preferences("train", 50)
    for problem, pref in zip(problems, prefs, strict=True):
        chosen, rejected = pref["chosen"][0]["content"], pref["rejected"][0]["content"]
        assert pref["prompt"] == [{"role": USER, "content": problem["query"]}] and chosen == problem["response"]
        assert rejected.rsplit("\n", 1)[0] == chosen.rsplit("\n", 1)[0]  # the same reasoning
        wrong = int(rejected.rsplit("The answer is: ", 1)[1])
        assert wrong != int(problem["answer"])
    assert prefs == arith_preferences("train", 50)
