"""Examples as the records TRL's SFTTrainer trains, with the loss on what the model must answer.

| Example                                  | TRL record                                  | loss on                 |
|------------------------------------------|---------------------------------------------|-------------------------|
| chat turns, a tokenizer with a template  | {"prompt": [turns], "completion": [answer]} | the answer turn         |
| chat/sharegpt, several assistant turns   | {"messages": [turns]}, assistant_only_loss  | every assistant turn    |
| chat turns, no chat template             | {"prompt": Alpaca text, "completion": text} | the answer + EOS        |
| raw prompt/completion                    | {"prompt": text, "completion": text}        | the completion + EOS    |
| text                                     | {"text": text}                              | every token + EOS       |

With several assistant turns the tokenizer gets a copy of its template with generation markers
(`pissa.data.template`), checked to render each record exactly as the original. TRL tokenizes;
pissa only measures each record's length with the same calls first, to drop (not truncate) the
records longer than `max_length`, as `pissa train` always has.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import PissaError, PissaWarning
from . import template as chat
from .formats import FORMATS, Example, load_examples
from .tokens import completion_text, is_templated, render_prompt, with_eos

LAYOUTS = {
    "conversational": "conversational prompt-completion (chat template)",
    "turns": "messages, every assistant turn (chat template with generation markers)",
    "plain": "prompt-completion text",
    "text": "language modeling text",
}


@dataclass
class DataStats:
    source: str
    format: str
    layout: str  # a LAYOUTS key: how the records reach TRL
    records: int
    kept: int
    too_long: int
    max_length: int
    stop_token_trained: bool | None = None  # chat template: is the end-of-turn token in the loss
    loss_tokens: int | None = None  # filled in once TRL has built the labels


@dataclass
class SFTData:
    records: list[dict]  # TRL records, those that fit in max_length
    stats: DataStats
    tokenizer: object  # what TRL tokenizes with (a copy with a marked template for `turns`)
    assistant_only_loss: bool

    def dataset(self):
        from datasets import Dataset

        return Dataset.from_list(self.records)

    def summary(self) -> dict:
        s = self.stats
        return {"examples": s.kept, "dropped_too_long": s.too_long, "data_format": s.format, "data_layout": s.layout,
                "loss_tokens": s.loss_tokens, "stop_token_trained": s.stop_token_trained}


def layout_of(fmt: str, examples: list[Example], tokenizer) -> str:
    """How this dataset reaches TRL (see the table above); refuses what cannot be trained as asked."""
    if fmt == "text":
        return "text"
    raw = {ex.raw for ex in examples}
    if len(raw) > 1:
        odd = next(ex for ex in examples if ex.raw != examples[0].raw)
        raise PissaError(f"{odd.where}: mixes plain-text and conversational prompt/completion records; use one kind")
    if raw == {True}:
        return "plain"
    several = FORMATS[fmt].every_turn and any(t["role"] == "assistant" for ex in examples for t in ex.prompt)
    if not is_templated(tokenizer):
        multi = next((ex for ex in examples if several and any(t["role"] == "assistant" for t in ex.prompt)
                      or len(ex.completion) > 1), None)
        if multi is not None:
            raise PissaError(f"{multi.where}: a conversation with several assistant turns needs a chat template to "
                             "mark them, and the model's tokenizer has none; use a tokenizer with a chat_template")
        return "plain"
    return "turns" if several else "conversational"


def to_record(example: Example, layout: str, tokenizer) -> dict:
    if layout == "text":
        return {"text": example.completion}
    if layout == "turns":
        return {"messages": example.prompt + example.completion}
    if layout == "conversational":
        return {"prompt": example.prompt, "completion": example.completion}
    return {"prompt": render_prompt(tokenizer, example), "completion": completion_text(tokenizer, example)}


def sequence_texts(records: list[dict], examples: list[Example], layout: str, tokenizer, marked: str | None):
    """The whole text TRL tokenizes for each record (checked against the original template for `turns`)."""
    if layout == "text":
        return [with_eos(r["text"], tokenizer) for r in records], True
    if layout == "plain":
        return [r["prompt"] + r["completion"] for r in records], True
    original = chat.original_template(tokenizer)
    if layout == "turns":
        texts = [chat.check_same_render(tokenizer, r["messages"], original, marked, ex.where)
                 for r, ex in zip(records, examples, strict=True)]
    else:
        texts = [chat.render(tokenizer, r["prompt"] + r["completion"], original, ex.where)
                 for r, ex in zip(records, examples, strict=True)]
    return texts, False


def prepare(examples: list[Example], fmt: str, source: str, tokenizer, max_length: int) -> SFTData:
    """TRL records of `examples`, those longer than max_length tokens dropped; refuses if none is left."""
    layout = layout_of(fmt, examples, tokenizer)
    records = [to_record(ex, layout, tokenizer) for ex in examples]
    trl_tokenizer, marked, stop = copy.deepcopy(tokenizer), None, None  # TRL sets a pad token on its own
    if layout in ("turns", "conversational"):
        marked = chat.with_generation_markers(chat.original_template(tokenizer))
        stop = chat.stop_token_trained(tokenizer, marked)
    if layout == "turns":
        trl_tokenizer.chat_template = marked
    texts, specials = sequence_texts(records, examples, layout, tokenizer, marked)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=specials)["input_ids"]]
    kept = [r for r, n in zip(records, lengths, strict=True) if n <= max_length]
    if not kept:
        raise PissaError(f"every example of {source} is longer than --max-length {max_length} tokens (the shortest "
                         f"has {min(lengths)}); raise --max-length")
    if stop is False:
        warnings.warn(f"the chat template ends an assistant turn without a special end-of-turn token, so the model "
                      f"does not learn to stop ({source}); use a template that closes each turn with EOS", PissaWarning,
                      stacklevel=2)
    stats = DataStats(source=source, format=fmt, layout=layout, records=len(records), kept=len(kept),
                      too_long=len(records) - len(kept), max_length=max_length, stop_token_trained=stop)
    return SFTData(kept, stats, trl_tokenizer, assistant_only_loss=layout == "turns")


def build_sft_data(spec: str | Path, tokenizer, max_length: int, limit: int | None = None) -> SFTData:
    """Read `spec` (file, `arith[:split]`, hub name), convert it for TRL, drop what exceeds max_length."""
    if tokenizer is None:
        raise PissaError("the model folder has no tokenizer; training needs one (save it beside the model)")
    if max_length < 2:
        raise PissaError(f"--max-length must be at least 2, got {max_length}")
    examples, fmt, source = load_examples(spec, limit)
    return prepare(examples, fmt, source, tokenizer, max_length)
