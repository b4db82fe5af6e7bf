"""Synthetic Llama checkpoints for the benchmarks and the GPU check: sharded safetensors folders with the
layout and dtype of a real export, whose projection weights have a realistic singular spectrum.

Spectrum: s_i = scale * (1 + i/8)^-0.4, fitted to SmolLM2-135M's layers (s_32/s_1 ~ 0.5, s_128/s_1 ~ 0.3,
a flat tail), the slowly decaying kind that makes randomized SVDs work for their accuracy. Each weight is
one base matrix per shape with its rows permuted and signs flipped, which keeps the spectrum and makes
every layer different at O(size) cost.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def spectrum_matrix(out_dim: int, in_dim: int, g: torch.Generator, scale: float = 0.05) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U, V and s_i = scale * (1 + i/8)^-0.4, fp32 (out, in)."""
    k = min(out_dim, in_dim)
    U = torch.linalg.qr(torch.randn(out_dim, k, generator=g)).Q  # (out, k)
    V = torch.linalg.qr(torch.randn(in_dim, k, generator=g)).Q  # (in, k)
    s = scale * (1 + torch.arange(k, dtype=torch.float32) / 8) ** -0.4  # (k,)
    return (U * s) @ V.T  # (out, in)


PROJECTIONS = {"self_attn.q_proj": "q", "self_attn.k_proj": "kv", "self_attn.v_proj": "kv", "self_attn.o_proj": "o",
               "mlp.gate_proj": "up", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def write_llama(folder: Path, layers: int, hidden: int = 2048, intermediate: int = 5632, vocab: int = 32000,
                heads: int = 16, kv_heads: int | None = None, dtype: torch.dtype = torch.bfloat16,
                shard_bytes: int = 500 << 20, seed: int = 0) -> int:
    """Write a sharded Llama checkpoint (config + index + shards of about `shard_bytes`, a layer never split)
    into `folder`; returns its tensor bytes."""
    from transformers import LlamaConfig

    kv_heads = kv_heads or heads
    kv_dim = hidden // heads * kv_heads
    folder.mkdir(parents=True)
    LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=False,
                dtype=str(dtype).removeprefix("torch."), architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (hidden, hidden), "kv": (kv_dim, hidden), "o": (hidden, hidden), "up": (intermediate, hidden),
              "down": (hidden, intermediate)}
    bases = {name: spectrum_matrix(*shape, g) for name, shape in shapes.items()}
    groups = [{"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(dtype)}]
    for layer in range(layers):
        group = {}
        for name, base in PROJECTIONS.items():
            W = bases[base]
            signs = torch.randint(0, 2, (W.shape[0], 1), generator=g) * 2 - 1
            rows = torch.randperm(W.shape[0], generator=g)
            group[f"model.layers.{layer}.{name}.weight"] = (W[rows] * signs).to(dtype)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            group[f"model.layers.{layer}.{norm}.weight"] = torch.ones(hidden, dtype=dtype)
        groups.append(group)
    groups.append({"model.norm.weight": torch.ones(hidden, dtype=dtype),
                   "lm_head.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(dtype)})
    return write_shards(folder, groups, shard_bytes)


def write_shards(folder: Path, groups: list[dict[str, torch.Tensor]], shard_bytes: int) -> int:
    """Pack groups of tensors into shards (a group never straddles two) with transformers' names and index."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for group in groups:
        group_bytes = sum(t.numel() * t.element_size() for t in group.values())
        if current and size + group_bytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current.update(group)
        size += group_bytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def truncation_floor(W: torch.Tensor, rank: int) -> float:
    """||W - W_r||_F of the exact truncated SVD W_r (singular values in fp32, summed in float64)."""
    return torch.linalg.svdvals(W.float()).double()[rank:].square().sum().sqrt().item()
