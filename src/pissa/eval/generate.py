"""Greedy generation for evaluation: batched with left padding (each batch padded to its longest prompt,
prompts sorted by length first so batches waste little padding), stopping at EOS; or with vLLM when it
is installed and a GPU is present."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.tokens import pad_id
from ..errors import PissaError

Progress = Callable[[int, int, str], None]


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids, attention_mask), both (B, T), padded on the left."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's generation config EOS."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)


def cut_at_eos(ids: list[int], stop: list[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop:
            return ids[:i]
    return ids


@torch.no_grad()
def generate_transformers(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, progress: Progress | None = None
) -> list[str]:
    """Greedy completions of token-id prompts, in the prompts' order."""
    from transformers import GenerationConfig

    stop = eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id(tokenizer),
        eos_token_id=stop or None,
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    outputs: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = left_pad([prompts[i] for i in rows], config.pad_token_id)
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
        )  # (B, T + new)
        for row, i in enumerate(rows):
            new = cut_at_eos(generated[row, input_ids.shape[1] :].tolist(), stop)
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
        if progress:
            progress(len(outputs), len(prompts), "generating")
    return [outputs[i] for i in range(len(prompts))]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def generate_vllm(
    model_path: str, adapter_path: str | None, prompts: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy completions with vLLM (the adapter, if any, served as a LoRA request)."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise PissaError("the vLLM backend needs vLLM: `pip install vllm` (GPU only), or pass --backend "
                         "transformers") from e
    lora = None
    kwargs = {}
    if adapter_path is not None:
        from ..io.adapter_files import read_adapter_config

        config = read_adapter_config(adapter_path)
        ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
        kwargs = {"enable_lora": True, "max_lora_rank": max(ranks)}
        lora = LoRARequest("adapter", 1, str(adapter_path))
    llm = LLM(model=str(model_path), **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, lora_request=lora)
    return [r.outputs[0].text for r in results]
