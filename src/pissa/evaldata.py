"""Evaluation sets: read question + reference answer pairs, and turn them into token ids.

A set is a JSONL file (one object per line) or a JSON list. The question is the first present of
`query`, `question`, `problem`, `instruction` (+ `input`), `prompt`; the reference the first of
`response`, `answer`, `solution`, `output`. The gold answer is extracted from the reference
(`#### 72`, `The answer is: 72`, `\\boxed{...}`, or the bare answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import PissaError

QUESTION_KEYS = ("query", "question", "problem", "instruction", "prompt")
ANSWER_KEYS = ("response", "answer", "solution", "output")


@dataclass
class EvalExample:
    index: int
    question: str
    answer: str  # the reference response (or the bare gold answer)


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) pairs of a JSONL file or a JSON list."""
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PissaError(f"{path} is not valid JSON ({e})") from e
        if not isinstance(data, list):
            raise PissaError(f"{path} must hold a JSON list of examples")
        return list(enumerate(data, 1))
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise PissaError(f"{path} line {number} is not valid JSON ({e}); one JSON object per line") from e
    return records


def to_example(index: int, record: dict, where: str) -> EvalExample:
    if not isinstance(record, dict):
        raise PissaError(f"{where} is not a JSON object")
    question_key = next((k for k in QUESTION_KEYS if k in record), None)
    answer_key = next((k for k in ANSWER_KEYS if k in record), None)
    if question_key is None:
        raise PissaError(f"{where} has no question field (one of {', '.join(QUESTION_KEYS)}); "
                         f"its fields are: {', '.join(record) or 'none'}")
    if answer_key is None:
        raise PissaError(f"{where} has no answer field (one of {', '.join(ANSWER_KEYS)}), so it cannot be "
                         f"scored; its fields are: {', '.join(record)}")
    question = str(record[question_key])
    if question_key == "instruction" and record.get("input"):
        question = f"{question}\n\n{record['input']}"
    return EvalExample(index=index, question=question, answer=str(record[answer_key]))


def load_eval_examples(data: str | Path, limit: int | None = None) -> list[EvalExample]:
    """Question/answer examples from a JSONL or JSON file (see the module docstring for fields)."""
    path = Path(data)
    if not path.exists():
        raise PissaError(f"evaluation data {path} not found; give a JSONL file with question and answer fields")
    records = read_records(path)
    if not records:
        raise PissaError(f"evaluation data {path} is empty")
    records = records[:limit] if limit else records
    return [to_example(i, record, f"{path} line {line}") for i, (line, record) in enumerate(records)]


ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{question}\n\n### Response:"
)


def encode_prompt(tokenizer, question: str) -> list[int]:
    """The prompt's token ids: the chat template when the tokenizer has one, else the Alpaca prompt."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(ALPACA_PROMPT.format(question=question))["input_ids"]


def encode_with_response(tokenizer, question: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + response + EOS, labels -100 on the prompt, cut to max_length."""
    prompt = encode_prompt(tokenizer, question)
    answer = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([-100] * len(prompt) + answer)[:max_length]
    return ids, labels
