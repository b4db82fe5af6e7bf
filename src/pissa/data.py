"""SFT data: read records, render prompts, tokenize with the loss on response tokens only.

Formats (detected from the first record; every record must then have the same fields):
- Alpaca:      {"instruction", "input" (optional), "output"}
- MetaMathQA:  {"query", "response"}
- chat:        {"messages": [{"role", "content"}, ...]}; the last message is the assistant's answer

Sources: a .json (a list of records) or .jsonl file, the bundled synthetic set `arith`
(`arith`, `arith:train`, `arith:test`, see `pissa.synthetic`), or a Hugging Face dataset name
(needs the `datasets` package and network; `NAME` or `NAME:SPLIT`).

Prompts use the tokenizer's chat template when it has one, otherwise the Alpaca prompt. The
prompt and the response are tokenized separately and concatenated, so the -100 boundary in
`labels` is exact: every prompt token is masked and every response token (plus EOS) is kept.
Examples longer than `max_length` are dropped whole (truncating would cut off the answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import synthetic
from .errors import PissaError

IGNORE_INDEX = -100
FORMATS = {  # format -> (required fields, optional fields)
    "alpaca": (("instruction", "output"), ("input",)),
    "metamath": (("query", "response"), ()),
    "chat": (("messages",), ()),
}
ALPACA_HEADER = ("Below is an instruction that describes a task{ctx}. "
                 "Write a response that appropriately completes the request.\n\n")
ALPACA_PROMPT = ALPACA_HEADER.format(ctx="") + "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = (ALPACA_HEADER.format(ctx=", paired with an input that provides further context")
                       + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@dataclass
class Example:
    """One training pair: prompt turns (chat messages) and the response to learn."""

    prompt: list[dict]
    response: str
    alpaca_input: str = ""  # kept apart so the Alpaca prompt can show its `### Input:` section


@dataclass
class DataStats:
    source: str
    format: str
    records: int
    kept: int
    too_long: int
    max_length: int
    response_tokens: int


# --- reading -------------------------------------------------------------------------------------

def read_records(spec: str | Path) -> tuple[list[tuple[dict, str]], str]:
    """(record, where) pairs and a source label; `where` names the file and line for errors."""
    spec = str(spec)
    name, _, split = spec.partition(":")
    if name == synthetic.NAME:
        records = synthetic.arith_problems(split or "train")
        return [(r, f"{spec} item {i}") for i, r in enumerate(records, 1)], spec
    path = Path(spec).expanduser()
    if path.suffix in (".json", ".jsonl") or path.exists():
        return _read_file(path), str(path)
    return _read_hub(spec), spec


def _read_file(path: Path) -> list[tuple[dict, str]]:
    if not path.is_file():
        raise PissaError(f"data file {path} does not exist; give a .json/.jsonl file, `arith`, or a hub dataset name")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        return [(_parse_line(line, path, i), f"{path} line {i}")
                for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise PissaError(f"{path} is not valid JSON ({e}); a .json file must hold a list of records") from e
    return [(_check_object(r, f"{path} item {i}"), f"{path} item {i}") for i, r in enumerate(items, 1)]


def _parse_line(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PissaError(f"{path} line {lineno} is not valid JSON ({e.msg}); each line must be one JSON object") from e
    return _check_object(record, f"{path} line {lineno}")


def _check_object(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise PissaError(f"{where}: expected a JSON object with fields, got {type(record).__name__}")
    return record


def _read_hub(spec: str) -> list[tuple[dict, str]]:
    try:
        import datasets
    except ImportError as e:
        raise PissaError(
            f"data {spec!r} is not a local .json/.jsonl file or the bundled `arith` set; to use a Hugging Face "
            "dataset name install `pip install datasets` (and have network access)"
        ) from e
    name, _, split = spec.partition(":")
    name, _, subset = name.partition("@")  # openai/gsm8k@main:test -> config "main" (GSM8K needs one)
    try:
        rows = datasets.load_dataset(name, subset or None, split=split or "train")
    except Exception as e:  # datasets raises many kinds (connection, not found, bad split)
        raise PissaError(f"could not load Hugging Face dataset {spec!r}: {e.__class__.__name__}: {e}") from e
    return [(dict(r), f"{spec} row {i}") for i, r in enumerate(rows, 1)]


# --- records -> examples -------------------------------------------------------------------------

def detect_format(record: dict, where: str) -> str:
    for fmt, (required, _) in FORMATS.items():
        if any(f in record for f in required):
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(req)}" for fmt, (req, _) in FORMATS.items())
    raise PissaError(f"{where}: unknown record format, fields are {sorted(record)}; expected one of ({expected})")


def to_example(record: dict, fmt: str, where: str) -> Example:
    """One record of format `fmt` as an Example; a missing or non-text field is named with its line."""
    required, _ = FORMATS[fmt]
    for f in required:
        if f not in record or record[f] is None:
            raise PissaError(f"{where}: missing field {f!r} ({fmt} format needs {', '.join(required)}); "
                             "fix or remove that record")
    if fmt == "chat":
        return _chat_example(record["messages"], where)
    prompt_field, response_field = required[0], required[1]
    for f in (*required, *FORMATS[fmt][1]):
        if f in record and record[f] is not None and not isinstance(record[f], str):
            raise PissaError(f"{where}: field {f!r} must be a string, got {type(record[f]).__name__}")
    if not record[response_field].strip():
        raise PissaError(f"{where}: field {response_field!r} is empty; there is nothing to learn from this record")
    extra = (record.get("input") or "") if fmt == "alpaca" else ""
    content = record[prompt_field] + (f"\n\n{extra}" if extra else "")
    return Example(prompt=[{"role": "user", "content": content}], response=record[response_field],
                   alpaca_input=extra)


def _chat_example(messages, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise PissaError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PissaError(f"{where}: messages[{i}] is missing field 'role' or 'content'")
    if messages[-1]["role"] != "assistant":
        raise PissaError(f"{where}: the last message must have role 'assistant' (the response to learn), "
                         f"got {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise PissaError(f"{where}: 'messages' needs at least one prompt turn before the assistant's answer")
    return Example(prompt=[dict(role=m["role"], content=m["content"]) for m in messages[:-1]],
                   response=messages[-1]["content"])


def load_examples(spec: str | Path, limit: int | None = None) -> tuple[list[Example], str, str]:
    """(examples, format, source) from a file, `arith[:split]` or a hub name; refuses an empty dataset."""
    pairs, source = read_records(spec)
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise PissaError(f"dataset {source} is empty; it must hold at least one record")
    fmt = detect_format(*pairs[0])
    return [to_example(r, fmt, where) for r, where in pairs], fmt, source


# --- prompts and tokens --------------------------------------------------------------------------

def render_prompt(tokenizer, example: Example) -> str:
    """The prompt text: the chat template (with the assistant turn opened) or the Alpaca prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    if len(example.prompt) == 1 and example.prompt[0]["role"] == "user":
        content = example.prompt[0]["content"]
        if example.alpaca_input:
            instruction = content[: -len(example.alpaca_input) - 2]
            return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=example.alpaca_input)
        return ALPACA_PROMPT.format(instruction=content)
    # Multi-turn chat with no template: earlier turns shown as labelled sections before the response.
    turns = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in example.prompt)
    return ALPACA_HEADER.format(ctx="") + turns + "### Response:\n"


def encode(tokenizer, example: Example, max_length: int) -> dict | None:
    """input_ids and labels (prompt tokens -100); None when the example exceeds max_length."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    # A chat template writes its own BOS; the plain Alpaca prompt gets the tokenizer's usual specials.
    prompt_ids = tokenizer(render_prompt(tokenizer, example), add_special_tokens=not templated)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]  # learn to stop
    ids = prompt_ids + response_ids
    if len(ids) > max_length:
        return None
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized examples: each item is {input_ids, labels} as lists of ints."""

    def __init__(self, features: list[dict], stats: DataStats):
        self.features = features
        self.stats = stats

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


def build_dataset(spec: str | Path, tokenizer, max_length: int, limit: int | None = None) -> SFTDataset:
    """Read, render and tokenize `spec`; refuses a dataset where nothing fits in max_length."""
    if tokenizer is None:
        raise PissaError("the model folder has no tokenizer; training needs one (save it beside the model)")
    if max_length < 2:
        raise PissaError(f"--max-length must be at least 2, got {max_length}")
    examples, fmt, source = load_examples(spec, limit)
    encoded = [encode(tokenizer, ex, max_length) for ex in examples]
    features = [f for f in encoded if f is not None]
    if not features:
        shortest = min(len(tokenizer(render_prompt(tokenizer, ex) + ex.response)["input_ids"]) for ex in examples)
        raise PissaError(f"every example of {source} is longer than --max-length {max_length} tokens (the shortest "
                         f"has about {shortest + 1}); raise --max-length")
    stats = DataStats(source=source, format=fmt, records=len(examples), kept=len(features),
                      too_long=len(examples) - len(features), max_length=max_length,
                      response_tokens=sum(sum(1 for t in f["labels"] if t != IGNORE_INDEX) for f in features))
    return SFTDataset(features, stats)


@dataclass
class PadCollator:
    """Right-pads a batch to its longest example: pad id in input_ids, 0 in attention_mask, -100 in labels."""

    pad_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (batch, width)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (batch, width)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (batch, width)
        for i, f in enumerate(batch):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else EOS (padded positions are masked out of attention and loss anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0
