"""Streaming init of a MoE checkpoint: peak RSS is bounded by one expert matrix, not by the fused expert stack.

Generates synthetic Qwen3-MoE-shaped bf16 checkpoints (hidden 1024, 4 layers, experts of intermediate 512 stored
one tensor per expert as the hub's checkpoints are, vocab 16000, decaying spectra) with 32 and then 128 experts
per layer, so the expert weights grow 4x while the largest single tensor (the embedding) stays the same. For
each, in fresh subprocesses: the copy floor (the same bytes read, written and fsynced), `pissa init` streaming
(r=8, niter=2, 1 worker: every expert matrix decomposed alone), and, for the smaller one, the in-memory path
(the whole model loaded, as peers do) as the reference.

Target (issue 15): streaming peak RSS flat across expert counts, and within bench_stream's bound (2 x the largest
tensor + 500 MB) plus the adapter factors of one shard; the in-memory peak grows with the model.

Run (a few minutes on 2 CPU cores, ~4 GB free disk):

    .venv/bin/python benchmarks/bench_moe_stream.py
    .venv/bin/python benchmarks/bench_moe_stream.py --experts 32,128 --tmp /big/disk

Writes benchmarks/results/moe_stream.md (+ moe_stream.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from _checkpoints import spectrum_matrix
from _common import LoadWatch, write_result
from bench_stream import COPY, timed
from safetensors.torch import save_file

HIDDEN, INTER, VOCAB, HEADS, KV, HEAD_DIM, LAYERS = 1024, 512, 16000, 8, 4, 128, 4
DTYPE = torch.bfloat16
SHARD_BYTES = 1 << 29  # 512 MiB shards
WATCH = LoadWatch(threads=torch.get_num_threads())

INIT = """
import json, sys, time
sys.path.insert(0, BENCHMARKS)
from _common import peak_rss_bytes as hwm
from pissa.init import PissaConfig, run_init
rss_imports = hwm()
start = time.perf_counter()
result = run_init(sys.argv[1], PissaConfig(rank=8, options={"niter": 2}), sys.argv[2], stream=sys.argv[3] == "stream")
print(json.dumps({"run_s": time.perf_counter() - start, "rss_imports": rss_imports, "peak_rss": hwm(),
                  "adapter_params": result.trainable_params, "coverage": result.manifest["coverage"]["share"]}))
""".replace("BENCHMARKS", repr(str(Path(__file__).parent)))


def shuffled(W: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The base matrix with its rows permuted and signs flipped: same spectrum, a different matrix."""
    signs = torch.randint(0, 2, (W.shape[0], 1), generator=g) * 2 - 1
    return (W[torch.randperm(W.shape[0], generator=g)] * signs).to(DTYPE)


def layer_tensors(layer: int, experts: int, bases: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    p = f"model.layers.{layer}"
    out = {f"{p}.self_attn.{n}.weight": shuffled(bases[n], g) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    out.update({f"{p}.self_attn.q_norm.weight": torch.ones(HEAD_DIM, dtype=DTYPE),
                f"{p}.self_attn.k_norm.weight": torch.ones(HEAD_DIM, dtype=DTYPE),
                f"{p}.input_layernorm.weight": torch.ones(HIDDEN, dtype=DTYPE),
                f"{p}.post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=DTYPE),
                f"{p}.mlp.gate.weight": (torch.randn(experts, HIDDEN, generator=g) * 0.02).to(DTYPE)})
    for e in range(experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"{p}.mlp.experts.{e}.{name}.weight"] = shuffled(bases[name], g)
    return out


def write_checkpoint(folder: Path, experts: int) -> tuple[int, int]:
    """A sharded Qwen3-MoE checkpoint with per-expert tensors; returns (tensor bytes, expert-stack bytes/layer)."""
    from transformers import Qwen3MoeConfig

    folder.mkdir(parents=True)
    Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, intermediate_size=4 * INTER,
                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
                   num_experts=experts, num_experts_per_tok=4, vocab_size=VOCAB, tie_word_embeddings=False,
                   dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"]).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    q, kv = HEADS * HEAD_DIM, KV * HEAD_DIM
    shapes = {"q_proj": (q, HIDDEN), "k_proj": (kv, HIDDEN), "v_proj": (kv, HIDDEN), "o_proj": (HIDDEN, q),
              "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
    bases = {name: spectrum_matrix(*shape, g) for name, shape in shapes.items()}
    groups = [{"model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).to(DTYPE)}]
    groups += [layer_tensors(i, experts, bases, g) for i in range(LAYERS)]
    groups.append({"model.norm.weight": torch.ones(HIDDEN, dtype=DTYPE),
                   "lm_head.weight": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).to(DTYPE)})
    shards, current, size = [], {}, 0
    for group in groups:
        for k, t in group.items():  # experts may straddle shards, as on the hub
            if current and size + t.numel() * t.element_size() > SHARD_BYTES:
                shards.append(current)
                current, size = {}, 0
            current[k] = t
            size += t.numel() * t.element_size()
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=2))
    return total, 3 * experts * INTER * HIDDEN * DTYPE.itemsize


def measure(folder: Path, work: Path, in_memory: bool) -> dict:
    copy_wall, _ = timed(COPY, str(folder), str(work / "copy"))
    shutil.rmtree(work / "copy")
    wall, info = timed(INIT, str(folder), str(work / "out"), "stream")
    row = {"copy_s": copy_wall, "stream_wall_s": wall, "shards": len(list(folder.glob("*.safetensors"))),
           **{f"stream_{k}": v for k, v in info.items()}}
    shutil.rmtree(work / "out")
    if in_memory:
        wall, info = timed(INIT, str(folder), str(work / "out"), "memory")
        shutil.rmtree(work / "out")
        row.update({"memory_wall_s": wall, **{f"memory_{k}": v for k, v in info.items()}})
    return row


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def report(rows: list[dict]) -> str:
    largest = VOCAB * HIDDEN * DTYPE.itemsize
    matrix = INTER * HIDDEN * DTYPE.itemsize
    lines = [
        "# Streaming init of a MoE checkpoint: memory vs expert count",
        "",
        f"`benchmarks/bench_moe_stream.py`: synthetic Qwen3-MoE-shaped {str(DTYPE)[6:]} checkpoints (hidden {HIDDEN}, "
        f"{LAYERS} layers, experts of intermediate {INTER} stored one tensor per expert, vocab {VOCAB}, 512 MiB "
        f"shards, decaying spectra), `pissa init` streaming at r=8, niter=2, 1 worker. {WATCH.header()} Peak RSS "
        f"is the process's VmHWM, imports included. One expert matrix is {matrix / 1e6:.1f} MB; the largest "
        f"tensor (embedding, head: copied, not decomposed) {largest / 1e6:.1f} MB. The bound is bench_stream's "
        "2 x the largest tensor + 500 MB, plus the adapter factors of one shard (fp32, held until the shard is "
        "written).",
        "",
        "| experts | checkpoint | fused expert stack per layer | adapter (fp32) | bound | streaming peak RSS | "
        "RSS after imports | copy floor | streaming wall | coverage |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        adapter = r["stream_adapter_params"] * 4
        bound = 2 * largest + 500e6 + adapter / r["shards"]
        lines.append(f"| {r['experts']} | {gb(r['bytes'])} | {gb(r['stack'])} | {gb(adapter)} | {gb(bound)} | "
                     f"{gb(r['stream_peak_rss'])} | {gb(r['stream_rss_imports'])} | {r['copy_s']:.1f} s | "
                     f"{r['stream_wall_s']:.1f} s | {r['stream_coverage']:.1%} |")
    mem = [r for r in rows if "memory_peak_rss" in r]
    if mem:
        r = mem[0]
        lines += ["", f"In-memory reference (the whole model loaded) with {r['experts']} experts ({gb(r['bytes'])}): "
                      f"peak RSS {gb(r['memory_peak_rss'])}, wall {r['memory_wall_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="32,128", help="experts per layer of the checkpoints")
    parser.add_argument("--tmp", default=None, help="folder for the temporary checkpoints (default: system temp)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for i, experts in enumerate(int(x) for x in args.experts.split(",")):
            folder = Path(tmp) / f"moe-{experts}"
            total, stack = write_checkpoint(folder, experts)
            row = {"experts": experts, "bytes": total, "stack": stack}
            row.update(measure(folder, Path(tmp), in_memory=i == 0))
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(folder)
    write_result("moe_stream", report(rows), rows)


if __name__ == "__main__":
    main()
