"""Evaluation sets: question + reference pairs, read and tokenized exactly as training does.

Reading, prompt rendering and tokenization come from `pissa.data` (the bundled `arith` set, JSON/
JSONL files, hub names; chat template or Alpaca prompt), so a model is asked the way it was
trained. Every training format with a question and an answer can be evaluated (`pissa.data.formats`:
Alpaca, MetaMathQA, GSM8K {question, answer}, MATH {problem, solution}, chats: the last assistant turn is
the reference, prompt/completion). The gold answer is extracted
from the first present of `answer`, `solution`, then the response (`#### 72`, `The answer is: 72`,
`\\boxed{...}`, or the bare answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import formats, records, synthetic, tokens
from ..errors import PissaError

# Eval-only record formats: (question field, reference field).
EVAL_FORMATS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}
GOLD_FIELDS = ("answer", "solution")


@dataclass
class EvalExample:
    index: int
    example: formats.Example  # prompt turns + reference response
    reference: str  # where the gold answer is extracted from


def question_example(question: str, reference: str, index: int = 0) -> EvalExample:
    """An EvalExample from a bare question and its reference answer."""
    example = formats.Example(prompt=[{"role": "user", "content": question}],
                              completion=[{"role": "assistant", "content": reference}])
    return EvalExample(index, example, reference)


def to_eval_example(index: int, record: dict, where: str) -> EvalExample:
    for question_field, reference_field in EVAL_FORMATS.values():
        if question_field in record and not any(f in record for f in ("query", "instruction", "messages")):
            if record.get(reference_field) is None:
                raise PissaError(f"{where} has no answer field {reference_field!r}, so it cannot be scored; "
                                 f"its fields are: {', '.join(record)}")
            return question_example(str(record[question_field]), str(record[reference_field]), index)
    fmt = formats.detect_format(record, where)
    field = formats.FORMATS[fmt].response_field
    if field is not None and field not in record and not any(f in record for f in GOLD_FIELDS):
        raise PissaError(f"{where} has no answer field ({field!r} or {' / '.join(GOLD_FIELDS)}), "
                         f"so it cannot be scored; its fields are: {', '.join(record)}")
    example = formats.to_example(record, fmt, where)
    gold = next((record[f] for f in GOLD_FIELDS if record.get(f) is not None), example.response)
    return EvalExample(index, example, str(gold))


def load_eval_examples(spec: str | Path, limit: int | None = None) -> list[EvalExample]:
    """Examples of an evaluation set: `arith` (its test split), `arith:SPLIT`, a JSON/JSONL file, or a hub name."""
    spec = str(spec)
    if spec == synthetic.NAME:
        spec = f"{synthetic.NAME}:test"  # evaluation means held-out problems
    if not Path(spec).expanduser().exists() and Path(spec).suffix in (".json", ".jsonl"):
        raise PissaError(f"evaluation data {spec} not found; give a JSONL file with question and answer fields")
    pairs, source = records.read_records(spec)
    pairs = pairs[:limit] if limit else pairs
    if not pairs:
        raise PissaError(f"evaluation data {source} is empty")
    return [to_eval_example(i, record, where) for i, (record, where) in enumerate(pairs)]


def encode_prompt(tokenizer, example: EvalExample) -> list[int]:
    """The prompt's token ids, as TRL builds them in training (`pissa.data.tokens`)."""
    return tokens.prompt_ids(tokenizer, example.example)


def encode_with_response(tokenizer, example: EvalExample, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + response + EOS as in training (labels -100 on the prompt), cut to
    max_length tokens (training drops longer examples; scoring keeps their first max_length tokens)."""
    features = tokens.encode(tokenizer, example.example, max_length=2**62)
    return features["input_ids"][:max_length], features["labels"][:max_length]
