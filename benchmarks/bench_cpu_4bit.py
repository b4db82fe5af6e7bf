"""bitsandbytes' 4-bit layers on the CPU: its bf16 inference kernel against the dequantize + fp32 matmul path that
pissa keeps them on (`pissa.quant.keep_exact_cpu_forward_`), in time and in distance from the fitted weight.

On a CPU with AVX512-BF16, bitsandbytes >= 0.49 repacks a Linear4bit's weight at its first eval-mode no-grad
forward and then computes it in bf16 (through the `kernels` package's kernel when it is installed, else its own).
pissa turns that off on every 4-bit model it loads, because the result leaves the fitted nf4(W_res) and the
repacked layer passes no gradient to its input. This measures what that costs: NF4 layers of SmolLM2-135M's
shapes (576 -> 1536, 1536 -> 576, 576 -> 576), one token (decoding) and 8 x 128 tokens (a batch of prompts),
fp32 activations, best of 7 interleaved runs of 30 calls each, on this process's threads.

    .venv/bin/python benchmarks/bench_cpu_4bit.py           # writes results/cpu_4bit.md
"""

from __future__ import annotations

import sys
import time

import torch
from _common import LoadWatch, write_result

SHAPES = [(576, 1536), (1536, 576), (576, 576)]  # (in, out)
INPUTS = {"1 token": (1, 1), "8 x 128 tokens": (8, 128)}
WATCH = LoadWatch(threads=torch.get_num_threads())


def layer(in_dim: int, out_dim: int, bf16_kernel: bool, weight: torch.Tensor):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(in_dim, out_dim, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu").eval()  # quantizes
    q.support_avx512bf16_for_cpu = bf16_kernel
    return q


def best_seconds(q, x: torch.Tensor, calls: int = 30) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(calls):
            q(x)
        return (time.perf_counter() - start) / calls


def measure() -> list[dict]:
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(0)
    rows = []
    for in_dim, out_dim in SHAPES:
        weight = torch.randn(out_dim, in_dim, generator=g) * 0.02
        layers = {"bf16 kernel": layer(in_dim, out_dim, True, weight), "exact": layer(in_dim, out_dim, False, weight)}
        for label, (batch, tokens) in INPUTS.items():
            x = torch.randn(batch, tokens, in_dim, generator=g)
            with torch.no_grad():
                exact = layers["exact"](x)
                fitted = x @ bnb.functional.dequantize_4bit(layers["exact"].weight.data,
                                                            layers["exact"].weight.quant_state).T  # (.., out)
                drift = (layers["bf16 kernel"](x) - fitted).abs().max().item()  # repacks, then runs in bf16
            times = {name: [] for name in layers}
            for _ in range(7):
                for name, q in layers.items():
                    times[name].append(best_seconds(q, x))
            rows.append({"shape": f"{in_dim} -> {out_dim}", "input": label,
                         "bf16_ms": min(times["bf16 kernel"]) * 1e3, "exact_ms": min(times["exact"]) * 1e3,
                         "bf16_drift": drift, "exact_drift": (exact - fitted).abs().max().item()})
    return rows


def report(rows: list[dict], repacked: bool) -> str:
    from importlib.util import find_spec

    import bitsandbytes as bnb

    kernel = "the `kernels` package's" if find_spec("kernels") else "bitsandbytes' own (`kernels` not installed)"
    lines = [
        "# bitsandbytes 4-bit layers on the CPU: its bf16 kernel vs dequantize + fp32 matmul",
        "",
        f"Written by `benchmarks/bench_cpu_4bit.py`. bitsandbytes {bnb.__version__}; this CPU "
        f"{'has' if repacked else 'lacks'} AVX512-BF16, so the bf16 path ran {kernel} kernel"
        f"{'' if repacked else ' (not repacked: both paths are the same here)'}. {WATCH.header()}",
        "",
        "Drift: max |output - x @ dequant(W)ᵀ|, the distance from the layer as fitted.",
        "",
        "| layer (in -> out) | input | bf16 kernel | dequantize + fp32 (pissa) | pissa / bf16 | drift, bf16 | "
        "drift, pissa |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['input']} | {r['bf16_ms']:.2f} ms | {r['exact_ms']:.2f} ms | "
                     f"{r['exact_ms'] / r['bf16_ms']:.2f} | {r['bf16_drift']:.1e} | {r['exact_drift']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import bitsandbytes as bnb

    rows = measure()
    write_result("cpu_4bit", report(rows, bnb.functional.has_avx512bf16()), rows)


if __name__ == "__main__":
    sys.exit(main())
