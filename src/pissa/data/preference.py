"""Preference records for `pissa train --stage dpo`, as TRL's DPOTrainer takes them.

A record holds a prompt and two answers, `chosen` (preferred) and `rejected`:
- plain text: `prompt`, `chosen`, `rejected` strings, used as they are (TRL appends EOS to the answers);
- conversational: `prompt` a list of turns (or a string: the user's turn), `chosen`/`rejected` a list of
  assistant turns, one turn ({role, content} or ShareGPT {from, value}) or a string. Answers written as
  whole conversations that repeat the prompt (UltraFeedback style) have the prompt stripped off, and
  with no `prompt` field the turns the two answers share are the prompt. A ShareGPT `conversations`
  field may stand for the prompt (LLaMA-Factory's format).
Conversational records are rendered with the model's chat template; with a tokenizer that has none,
a single-turn answer is put after the Alpaca prompt (as `pissa train` does for SFT), and anything else
is refused. The bundled `arith` set gives the correct worked answer as chosen and the same reasoning
with a wrong final answer as rejected (`pissa.data.synthetic.arith_preferences`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PissaError
from . import synthetic
from . import template as chat
from .formats import Example
from .messages import chat_turns
from .records import load_records
from .tokens import is_templated, render_prompt, with_eos


@dataclass
class PreferenceData:
    records: list[dict]  # TRL records {prompt, chosen, rejected}, those that fit in max_length
    source: str
    layout: str  # "conversational" or "plain"
    count: int  # records read
    too_long: int

    def dataset(self):
        from datasets import Dataset

        return Dataset.from_list(self.records)

    def summary(self) -> dict:
        return {"examples": len(self.records), "dropped_too_long": self.too_long, "data_format": "preference",
                "data_layout": self.layout}


def _answer(value, where: str, field: str):
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return chat_turns([value], where, field)
    return chat_turns(value, where, field)


def to_preference(record: dict, where: str) -> dict:
    """One record as {prompt, chosen, rejected}: all strings, or all lists of turns."""
    for f in ("chosen", "rejected"):
        if record.get(f) is None:
            raise PissaError(f"{where}: missing field {f!r} (a preference record needs prompt, chosen and rejected)")
    if record["chosen"] == record["rejected"]:
        raise PissaError(f"{where}: 'chosen' and 'rejected' are the same answer; nothing to prefer")
    prompt = record.get("prompt", record.get("conversations"))
    if all(isinstance(x, str) for x in (prompt, record["chosen"], record["rejected"])):
        return {"prompt": prompt, "chosen": record["chosen"], "rejected": record["rejected"]}
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif prompt is not None:
        prompt = chat_turns(prompt, where, "prompt" if "prompt" in record else "conversations")
    chosen, rejected = _answer(record["chosen"], where, "chosen"), _answer(record["rejected"], where, "rejected")
    if prompt is None:  # implicit prompt: the turns both answers share
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:  # answers that repeat the prompt
        chosen = chosen[len(prompt):] if chosen[: len(prompt)] == prompt else chosen
        rejected = rejected[len(prompt):] if rejected[: len(prompt)] == prompt else rejected
    if not prompt:
        raise PissaError(f"{where}: no prompt: give a 'prompt' field (or answers that start with shared turns)")
    if chosen == rejected:
        raise PissaError(f"{where}: 'chosen' and 'rejected' are the same answer; nothing to prefer")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _plain(record: dict, tokenizer, where: str) -> dict:
    """A conversational record for a tokenizer without a chat template: the Alpaca prompt and plain answers."""
    if not all(len(record[f]) == 1 and record[f][0]["role"] == "assistant" for f in ("chosen", "rejected")):
        raise PissaError(f"{where}: answers of several turns need a chat template, and the model's tokenizer has "
                         "none; use a tokenizer with a chat_template")
    example = Example(prompt=record["prompt"], completion=record["chosen"], where=where)
    return {"prompt": render_prompt(tokenizer, example), "chosen": record["chosen"][0]["content"],
            "rejected": record["rejected"][0]["content"]}


def _texts(record: dict, tokenizer, conversational: bool, where: str) -> list[str]:
    if conversational:
        original = chat.original_template(tokenizer)
        return [chat.render(tokenizer, record["prompt"] + record[f], original, where) for f in ("chosen", "rejected")]
    return [record["prompt"] + with_eos(record[f], tokenizer) for f in ("chosen", "rejected")]


def read_preferences(spec: str | Path, limit: int | None = None) -> tuple[list[tuple[dict, str]], str]:
    name, _, split = str(spec).partition(":")
    if name == synthetic.NAME:
        records = synthetic.arith_preferences(split or "train", limit)
        return [(r, f"{spec} item {i}") for i, r in enumerate(records, 1)], str(spec)
    return load_records(spec, limit)


def build_preference_data(spec: str | Path, tokenizer, max_length: int, limit: int | None = None) -> PreferenceData:
    """Preference records of `spec` for TRL; those whose prompt + longer answer exceeds max_length are dropped."""
    if limit is not None and limit <= 0:
        raise PissaError(f"--limit must be a positive number of records, got {limit}")
    pairs, source = read_preferences(spec, limit)
    converted = [(to_preference(r, where), where) for r, where in pairs]
    kinds = {isinstance(r["prompt"], str) for r, _ in converted}
    if len(kinds) > 1:
        raise PissaError(f"{source} mixes plain-text and conversational preference records; use one kind")
    conversational = kinds == {False}
    if conversational and not is_templated(tokenizer):
        converted, conversational = [(_plain(r, tokenizer, w), w) for r, w in converted], False
    texts = [t for r, where in converted for t in _texts(r, tokenizer, conversational, where)]
    ids = tokenizer(texts, add_special_tokens=not conversational)["input_ids"]
    lengths = [max(len(a), len(b)) for a, b in zip(ids[::2], ids[1::2], strict=True)]
    kept = [r for (r, _), n in zip(converted, lengths, strict=True) if n <= max_length]
    if not kept:
        raise PissaError(f"every preference record of {source} is longer than --max-length {max_length} tokens (the "
                         f"shortest has {min(lengths)}); raise --max-length")
    return PreferenceData(kept, source, "conversational" if conversational else "plain", len(converted),
                          len(converted) - len(kept))
