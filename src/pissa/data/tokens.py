"""Tokens of an Example exactly as TRL's SFTTrainer builds them, for evaluation (prompts for generation,
prompt + response for perplexity) outside a trainer; `pissa train` itself hands TRL the records
(`pissa.data.sft`) and `tests/test_data_formats.py` checks that both give the same tokens.

- With a chat template, the prompt is the template with the assistant turn opened
  (`add_generation_prompt`), and prompt + response is the template over the whole conversation: the
  response tokens then end with the template's end-of-turn text (`<|im_end|>\\n` for ChatML).
- With no template, the prompt is Alpaca's (or labelled `### Role:` sections for a chat), and the
  response ends with the tokenizer's EOS; raw text (plain prompt/completion) is used as it is.
The response starts where prompt and prompt + response tokens first differ (TRL's rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import Example

IGNORE_INDEX = -100
ALPACA_HEADER = ("Below is an instruction that describes a task{ctx}. "
                 "Write a response that appropriately completes the request.\n\n")
ALPACA_PROMPT = ALPACA_HEADER.format(ctx="") + "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = (ALPACA_HEADER.format(ctx=", paired with an input that provides further context")
                       + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def is_templated(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def templated_example(tokenizer, example: Example) -> bool:
    """Whether the example is rendered by the chat template (chat turns and a tokenizer with a template)."""
    return not example.raw and is_templated(tokenizer)


def render_prompt(tokenizer, example: Example) -> str:
    """The prompt text: raw text, the chat template with the assistant turn opened, or the Alpaca prompt."""
    if example.raw:
        return example.prompt
    if is_templated(tokenizer):
        return tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    if len(example.prompt) == 1 and example.prompt[0]["role"] == "user":
        content = example.prompt[0]["content"]
        if example.alpaca_input:
            instruction = content[: -len(example.alpaca_input) - 2]
            return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=example.alpaca_input)
        return ALPACA_PROMPT.format(instruction=content)
    # A chat with no template: earlier turns shown as labelled sections before the response.
    turns = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in example.prompt)
    return ALPACA_HEADER.format(ctx="") + turns + "### Response:\n"


def with_eos(text: str, tokenizer) -> str:
    """TRL's rule for untemplated text: append the EOS text unless it is already there."""
    eos = tokenizer.eos_token
    return text if not eos or text.endswith(eos) else text + eos


def completion_text(tokenizer, example: Example) -> str:
    """What follows the rendered prompt in an untemplated example: the response text and EOS."""
    return with_eos(example.response, tokenizer)


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """The prompt's token ids (what generation starts from)."""
    text = render_prompt(tokenizer, example)
    # A chat template writes its own specials; untemplated text gets the tokenizer's usual ones (as TRL does).
    return tokenizer(text, add_special_tokens=not templated_example(tokenizer, example))["input_ids"]


def full_ids(tokenizer, example: Example) -> list[int]:
    """Prompt + response token ids, as TRL tokenizes the whole sequence."""
    if templated_example(tokenizer, example):
        turns = example.prompt + example.completion
        return tokenizer(tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False)["input_ids"]
    return tokenizer(render_prompt(tokenizer, example) + completion_text(tokenizer, example))["input_ids"]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode(tokenizer, example: Example, max_length: int) -> dict | None:
    """input_ids and labels (prompt tokens -100) of prompt + response; None when longer than max_length."""
    ids = full_ids(tokenizer, example)
    if len(ids) > max_length:
        return None
    start = common_prefix_length(prompt_ids(tokenizer, example), ids)
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * start + ids[start:]}


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
