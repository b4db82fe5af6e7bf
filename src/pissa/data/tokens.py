"""SFT tokens: render a prompt, tokenize it with the response, and mask the prompt out of the loss.

Prompts use the tokenizer's chat template when it has one, otherwise the Alpaca prompt. The
prompt and the response are tokenized separately and concatenated, so the -100 boundary in
`labels` is exact: every prompt token is masked and every response token (plus EOS) is kept.
Examples longer than `max_length` are dropped whole (truncating would cut off the answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PissaError
from .records import ALPACA_HEADER, ALPACA_PROMPT, ALPACA_PROMPT_INPUT, Example, load_examples

IGNORE_INDEX = -100


@dataclass
class DataStats:
    source: str
    format: str
    records: int
    kept: int
    too_long: int
    max_length: int
    response_tokens: int


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
