"""Streaming init in bounded memory: peak RSS and wall time against the I/O floor.

Generates synthetic Llama-shaped sharded safetensors checkpoints (hidden 2048, intermediate 5632,
vocab 32000, bf16 or fp32; every q/k/v/o/gate/up/down weight has a decaying singular spectrum
s_i = i^-0.8) at two sizes in a temp dir, then for each size, in fresh subprocesses:

  - the I/O floor: copying the same shard bytes to a new folder (read + write + fsync, as the
    streaming writer does);
  - `pissa init` streaming (run_init, r=16, niter=4, 1 worker): peak RSS (ru_maxrss of the
    process), and wall time (whole process; in-process time after imports shown too);
  - for the smaller size, the in-memory path (the whole model loaded, as peers do) for reference.

Targets (issue 3): streaming peak RSS <= 2 x largest tensor + 500 MB and flat across sizes;
wall <= 2 x copy floor. The checkpoints are deleted afterwards.

Run (about 10-20 min on 2 shared CPU cores, needs ~3x the largest size in free disk):

    .venv/bin/python benchmarks/bench_stream.py
    .venv/bin/python benchmarks/bench_stream.py --layers 12,38 --tmp /big/disk
    .venv/bin/python benchmarks/bench_stream.py --dtype fp32 --layers 8,18      (fp32: 18 layers -> ~4.2 GB)

Writes benchmarks/results/stream.md (+ stream.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import LoadWatch, write_result
from safetensors.torch import save_file

HIDDEN, INTER, VOCAB, HEADS = 2048, 5632, 32000, 16
DTYPE = torch.bfloat16
SHARD_BYTES = 1 << 30  # 1 GiB shards, like real hub checkpoints (smaller than their 5 GB)
WATCH = LoadWatch(threads=torch.get_num_threads())


def decaying_matrix(out_dim: int, in_dim: int, g: torch.Generator) -> torch.Tensor:
    """U diag(s) V^T with orthonormal U, V and s_i = 0.05 * i^-0.8: a trained-weight-like spectrum."""
    k = min(out_dim, in_dim)
    U = torch.linalg.qr(torch.randn(out_dim, k, generator=g)).Q  # (out, k)
    V = torch.linalg.qr(torch.randn(in_dim, k, generator=g)).Q  # (in, k)
    s = 0.05 * torch.arange(1, k + 1, dtype=torch.float32) ** -0.8  # (k,)
    return (U * s) @ V.T  # (out, in)


def layer_weights(bases: dict, layer: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder layer: each weight is a base matrix with its rows permuted and signs flipped,
    which keeps the spectrum and makes every layer different, at O(size) cost."""
    shapes = {"self_attn.q_proj": "sq", "self_attn.k_proj": "sq", "self_attn.v_proj": "sq", "self_attn.o_proj": "sq",
              "mlp.gate_proj": "up", "mlp.up_proj": "up", "mlp.down_proj": "down"}
    out = {}
    for name, shape in shapes.items():
        W = bases[shape]
        perm = torch.randperm(W.shape[0], generator=g)
        signs = torch.randint(0, 2, (W.shape[0], 1), generator=g) * 2 - 1
        out[f"model.layers.{layer}.{name}.weight"] = (W[perm] * signs).to(DTYPE)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{layer}.{norm}.weight"] = torch.ones(HIDDEN, dtype=DTYPE)
    return out


def write_checkpoint(folder: Path, layers: int) -> int:
    """A sharded Llama checkpoint (config + index + ~1 GiB shards); returns its tensor bytes."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                num_key_value_heads=HEADS, vocab_size=VOCAB, tie_word_embeddings=False, dtype=str(DTYPE)[6:],
                architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    bases = {"sq": decaying_matrix(HIDDEN, HIDDEN, g), "up": decaying_matrix(INTER, HIDDEN, g),
             "down": decaying_matrix(HIDDEN, INTER, g)}
    groups = [{"model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).to(DTYPE)}]
    groups += [layer_weights(bases, i, g) for i in range(layers)]
    groups.append({"model.norm.weight": torch.ones(HIDDEN, dtype=DTYPE),
                   "lm_head.weight": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).to(DTYPE)})
    shards, current, size = [], {}, 0
    for group in groups:  # a layer never straddles two shards, as transformers does it
        group_bytes = sum(t.numel() * t.element_size() for t in group.values())
        if current and size + group_bytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current.update(group)
        size += group_bytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


COPY = """
import os, shutil, sys, time
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
for name in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    fd = os.open(os.path.join(dst, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

INIT = """
import json, sys, time
sys.path.insert(0, BENCHMARKS)
from _common import peak_rss_bytes as hwm
from pissa.init import PissaConfig, run_init
rss_imports = hwm()
start = time.perf_counter()
run_init(sys.argv[1], PissaConfig(rank=16, options={"niter": 4}), sys.argv[2], stream=sys.argv[3] == "stream")
print(json.dumps({"run_s": time.perf_counter() - start, "rss_imports": rss_imports, "peak_rss": hwm()}))
""".replace("BENCHMARKS", repr(str(Path(__file__).parent)))


def timed(code: str, *args: str) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return wall, (json.loads(lines[-1]) if lines else {})


def measure(folder: Path, work: Path, in_memory: bool) -> dict:
    copy_wall, _ = timed(COPY, str(folder), str(work / "copy"))
    shutil.rmtree(work / "copy")
    wall, info = timed(INIT, str(folder), str(work / "out"), "stream")
    shutil.rmtree(work / "out")
    row = {"copy_s": copy_wall, "stream_wall_s": wall, **{f"stream_{k}": v for k, v in info.items()}}
    if in_memory:
        wall, info = timed(INIT, str(folder), str(work / "out"), "memory")
        shutil.rmtree(work / "out")
        row.update({"memory_wall_s": wall, **{f"memory_{k}": v for k, v in info.items()}})
    return row


@torch.no_grad()
def svd_matmul_floor(layers: int, rank: int = 16, niter: int = 4, repeats: int = 3) -> float:
    """Seconds the randomized SVD's products alone take for `layers` decoder layers: per weight,
    2·niter + 2 fp32 products with the (in, 2r) sketch, on warm buffers (no reads, writes, casts or
    page faults). No streaming init at these settings can beat it; it runs with this process's threads."""
    per_layer = 0.0
    for (out_dim, in_dim), count in {(HIDDEN, HIDDEN): 4, (INTER, HIDDEN): 2, (HIDDEN, INTER): 1}.items():
        W, Q = torch.randn(out_dim, in_dim), torch.randn(in_dim, 2 * rank)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            Y = W @ Q  # (out, 2r)
            for _ in range(niter):
                Y = W @ (W.T @ Y)
            W.T @ Y  # (in, 2r): the last product, B = Qᵀ W
            times.append(time.perf_counter() - start)
        per_layer += count * min(times)
    return per_layer * layers


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def report(rows: list[dict]) -> str:
    lines = [
        "# Streaming init: memory and wall time vs the I/O floor",
        "",
        f"`benchmarks/bench_stream.py`: synthetic Llama-shaped {str(DTYPE)[6:]} checkpoints (hidden 2048, "
        "intermediate 5632, vocab 32000, ~1 GiB shards, decaying spectra), `pissa init` streaming at r=16, "
        "niter=4, 1 worker, "
        f"torch threads {torch.get_num_threads()}. {WATCH.header()} The copy floor and the init ran back to "
        "back on the same files (both from the page cache). Peak RSS is the process's VmHWM, imports "
        "(torch, transformers, peft) included. The SVD matmul floor is the randomized SVD's products alone "
        "(10 per weight at niter=4 with a 2r = 32-column sketch, fp32, warm buffers, this process's threads): "
        "a lower bound on the compute of any init at these settings.",
        "",
        "| layers | checkpoint | largest tensor | RSS target (2x largest + 500 MB) | streaming peak RSS | RSS after "
        "imports | copy floor | SVD matmul floor | streaming wall (in-process) | wall / floor |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = 2 * r["largest"] + 500e6
        lines.append(
            f"| {r['layers']} | {gb(r['bytes'])} | {gb(r['largest'])} | {gb(target)} | {gb(r['stream_peak_rss'])} | "
            f"{gb(r['stream_rss_imports'])} | {r['copy_s']:.1f} s | {r['matmul_floor_s']:.1f} s | "
            f"{r['stream_wall_s']:.1f} s "
            f"({r['stream_run_s']:.1f} s) | {r['stream_wall_s'] / r['copy_s']:.1f}x |"
        )
    mem = [r for r in rows if "memory_peak_rss" in r]
    if mem:
        r = mem[0]
        lines += ["", f"In-memory reference (the whole model loaded, as peers do) on the {gb(r['bytes'])} "
                      f"checkpoint: peak RSS {gb(r['memory_peak_rss'])}, wall {r['memory_wall_s']:.1f} s "
                      f"(in-process {r['memory_run_s']:.1f} s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="16,38", help="decoder layers of the two checkpoints (38 -> ~4.2 GB)")
    parser.add_argument("--tmp", default=None, help="folder for the temporary checkpoints (default: system temp)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="storage dtype of the checkpoints")
    args = parser.parse_args()
    global DTYPE
    DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for i, layers in enumerate(int(x) for x in args.layers.split(",")):
            folder = Path(tmp) / f"llama-{layers}"
            total = write_checkpoint(folder, layers)
            row = {"layers": layers, "bytes": total, "largest": VOCAB * HIDDEN * DTYPE.itemsize}
            row.update(measure(folder, Path(tmp), in_memory=i == 0))
            row["matmul_floor_s"] = svd_matmul_floor(layers)
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(folder)
    write_result("stream", report(rows), rows)


if __name__ == "__main__":
    main()
