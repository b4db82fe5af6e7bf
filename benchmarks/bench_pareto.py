"""Per-layer Pareto: pissa's randomized SVD against PEFT's `init_lora_weights="pissa_niter_N"`, time against
quality, one matrix at a time.

Goal (issue 14): for each PEFT niter in {2, 4, 16}, some pissa setting reaches an equal or lower residual
excess in <= 0.67x PEFT's time, on SmolLM2's real layers at r = 16 and r = 64 and on 7B-shaped matrices
(4096x4096, 11008x4096) with a realistic spectrum.

- PEFT: its own layer init, `peft.tuners.lora.layer.Linear(base, config=LoraConfig(init_lora_weights=
  "pissa_niter_N"))` (torch.svd_lowrank(W, q=r, niter=N), the factors, the residual written into the base
  layer, and its LoRA modules). pissa: `pissa.decompose(W, "pissa", r, options={"niter", "oversample"})`
  (block Krylov, factors, residual and the error statistics a manifest reports), over a grid of settings.
- Every variant runs on every matrix in one process, one torch thread, interleaved (rep by rep, matrix by
  matrix, variant by variant); a variant's time is the sum over matrices of its median, as wall time and
  as this thread's CPU time (which other processes on the machine do not inflate).
- Excess = ||residual||_F / ||W - W_r||_F - 1 over all matrices of a workload in quadrature (float64
  norms; W_r the exact truncated SVD); the worst single matrix beside it.
- SmolLM2: the embedded smollm2-135m, blocks 0, 10, 20, 29, all seven projections (28 matrices). 7B-shaped:
  U diag(s) Vᵀ with random orthonormal U, V and s_i = (1 + i/8)^-0.4, fitted to SmolLM2's spectra
  (s_32/s_1 ~ 0.5, s_128/s_1 ~ 0.3).

Run on an idle machine (about 10 min; `--quick`: smaller shapes, fewer layers and settings, < 1 min):

    .venv/bin/python benchmarks/bench_pareto.py
    .venv/bin/python benchmarks/bench_pareto.py --quick

Writes benchmarks/results/pareto.md (+ pareto.json); `--quick` prints its report instead.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

# Transparent huge pages for torch's big CPU tensors, as the `pissa` CLI sets them (read once, before torch
# allocates): without them a fresh residual's page faults cost as much as the rest of a layer's init, and
# PEFT, which allocates two W-sized tensors per layer to our one, would pay more of them.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from _common import LoadWatch, write_result  # noqa: E402

from pissa.decompose import decompose  # noqa: E402
from pissa.decompose.svd import block_size  # noqa: E402

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PEFT_NITERS = (2, 4, 16)
GOAL = 0.67
WATCH = LoadWatch(threads=1)


def smollm2(blocks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    from pissa.io.reader import CheckpointReader
    from pissa.models import resolve_embedded

    names = [f"model.layers.{b}.{p}.weight" for b in blocks for p in PROJECTIONS]
    return {n: t.float() for n, t in CheckpointReader(resolve_embedded("smollm2-135m")).read(names).items()}


def synthetic(shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """U diag(s) Vᵀ, s_i = (1 + i/8)^-0.4: a flat, slowly decaying spectrum like trained LLM weights'."""
    out = {}
    for i, (m, n) in enumerate(shapes):
        g, k = torch.Generator().manual_seed(i), min(m, n)
        U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q  # (m, k)
        V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q  # (n, k)
        s = (1 + torch.arange(k, dtype=torch.float32) / 8) ** -0.4  # (k,)
        out[f"{m}x{n}"] = (U * s) @ V.T  # (m, n)
    return out


def floors(Ws: dict[str, torch.Tensor], rank: int) -> dict[str, float]:
    """||W - W_r||_F of the exact truncated SVD."""
    return {n: torch.linalg.svdvals(W.double())[rank:].square().sum().sqrt().item() for n, W in Ws.items()}


def peft_variant(rank: int, niter: int):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear
    from torch import nn

    init = f"pissa_niter_{niter}"
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=init)

    def prepare(W):
        base = nn.Linear(W.shape[1], W.shape[0], bias=False)
        base.weight.data = W.clone()
        return base

    def run(base):
        torch.manual_seed(0)  # svd_lowrank draws from the global generator
        layer = Linear(base, "default", config=config, r=rank, lora_alpha=rank, init_lora_weights=init)
        return layer.get_base_layer().weight.data

    return f"PEFT niter={niter}", prepare, run


def pissa_variant(rank: int, niter: int | None, oversample: int | None):
    options = {} if niter is None else {"niter": niter, "oversample": oversample}
    label = "pissa exact" if niter is None else f"pissa niter={niter} oversample={oversample}"
    return label, (lambda W: W), (lambda W: decompose(W, "pissa", rank, options=options, seed=0).residual)


def measure(Ws: dict, floor: dict, variants: list, reps: int) -> dict[str, dict]:
    """Interleaved timing (wall and thread CPU time, sum over matrices of the medians) and excess."""
    wall = {label: {n: [] for n in Ws} for label, _, _ in variants}
    cpu = {label: {n: [] for n in Ws} for label, _, _ in variants}
    norms: dict[str, dict[str, float]] = {label: {} for label, _, _ in variants}
    for rep in range(reps + 1):  # rep 0 warms every code path up and is not timed
        for n, W in Ws.items():
            for label, prepare, run in variants:
                x = prepare(W)
                start, start_cpu = time.perf_counter(), time.thread_time()
                residual = run(x)
                if rep:
                    wall[label][n].append(time.perf_counter() - start)
                    cpu[label][n].append(time.thread_time() - start_cpu)
                else:
                    norms[label][n] = residual.double().norm().item()
    total_floor = math.sqrt(sum(v * v for v in floor.values()))
    out = {}
    for label, _, _ in variants:
        excess = math.sqrt(sum(v * v for v in norms[label].values())) / total_floor - 1
        out[label] = {"wall_s": sum(statistics.median(v) for v in wall[label].values()),
                      "cpu_s": sum(statistics.median(v) for v in cpu[label].values()),
                      "excess": excess, "worst": max(norms[label][n] / floor[n] - 1 for n in Ws)}
    return out


def grid(rank: int, quick: bool, exact: bool) -> list[tuple[int | None, int | None]]:
    """pissa's settings: (niter, oversample), and (None, None) for the exact SVD when `exact`."""
    niters = (1, 2, 3, 4, 6) if quick else (0, 1, 2, 3, 4, 5, 6, 8)
    oversamples = (0, rank // 2, rank) if quick else (0, rank // 4, rank // 2, rank)
    return [(None, None)] * exact + [(q, p) for q in niters for p in oversamples]


def workload(name: str, Ws: dict, rank: int, reps: int, quick: bool, exact: bool = True) -> dict:
    print(f"== {name}: {len(Ws)} matrices, r={rank}", flush=True)
    floor = floors(Ws, rank)
    variants = [peft_variant(rank, n) for n in PEFT_NITERS]
    variants += [pissa_variant(rank, q, p) for q, p in grid(rank, quick, exact)]
    rows = measure(Ws, floor, variants, reps)
    for label, row in rows.items():
        print(f"  {label:38s} wall {row['wall_s'] * 1e3:9.1f} ms  cpu {row['cpu_s'] * 1e3:9.1f} ms  "
              f"excess {row['excess'] * 100:8.4f}%  worst {row['worst'] * 100:7.3f}%", flush=True)
    return {"name": name, "rank": rank, "matrices": len(Ws), "rows": rows}


def best_against(rows: dict, niter: int, clock: str) -> tuple[str, dict] | None:
    """The fastest pissa setting at or below PEFT niter's excess."""
    peft = rows[f"PEFT niter={niter}"]
    ok = [(label, r) for label, r in rows.items() if label.startswith("pissa") and r["excess"] <= peft["excess"]]
    return min(ok, key=lambda item: item[1][clock]) if ok else None


def frontier(rows: dict, clock: str) -> list[str]:
    """pissa settings no other pissa setting beats on both time and excess."""
    ours = {label: r for label, r in rows.items() if label.startswith("pissa")}
    return [label for label, r in ours.items()
            if not any(o[clock] < r[clock] and o["excess"] < r["excess"] for o in ours.values())]


def report(results: list[dict], args, clock: str) -> str:
    lines = [
        "# Per-layer Pareto: pissa's randomized SVD against PEFT's pissa_niter_N",
        "",
        f"Written by `benchmarks/bench_pareto.py{' --quick' if args.quick else ''}` ({args.reps} timed repeats). "
        f"{WATCH.header()}",
        "",
        "One torch thread, every variant on every matrix interleaved; time is the sum over a workload's "
        "matrices of each variant's median, as wall time and as this thread's CPU time. Excess is the residual's "
        "Frobenius norm over the exact truncated SVD's, minus 1, over all matrices in quadrature (worst matrix "
        f"in brackets). The goal column compares the {clock} clock. PEFT runs its own LoRA layer init; pissa runs "
        "`decompose` (block Krylov, 2·niter + 2 passes over W, the residual and its error statistics).",
        "",
    ]
    for w in results:
        rows = w["rows"]
        lines += [f"## {w['name']} (r = {w['rank']}, {w['matrices']} matrices)", "",
                  "| PEFT niter | PEFT time | PEFT excess | fastest pissa at <= that excess | its time | its excess "
                  f"| ratio | goal <= {GOAL} |", "|---:|---:|---:|---|---:|---:|---:|---|"]
        for niter in PEFT_NITERS:
            peft = rows[f"PEFT niter={niter}"]
            best = best_against(rows, niter, clock)
            if best is None:
                lines.append(f"| {niter} | {peft[clock] * 1e3:.1f} ms | {peft['excess'] * 100:.4f}% | none | | | "
                             "| not met |")
                continue
            label, r = best
            ratio = r[clock] / peft[clock]
            lines.append(f"| {niter} | {peft[clock] * 1e3:.1f} ms | {peft['excess'] * 100:.4f}% | {label} | "
                         f"{r[clock] * 1e3:.1f} ms | {r['excess'] * 100:.4f}% | {ratio:.2f} | "
                         f"{'met' if ratio <= GOAL else 'not met'} |")
        on = frontier(rows, clock)
        lines += ["", f"pissa's frontier ({clock} clock): " + "; ".join(
            f"{label.removeprefix('pissa ')} {rows[label][clock] * 1e3:.1f} ms at {rows[label]['excess'] * 100:.4f}%"
            for label in sorted(on, key=lambda lb: rows[lb][clock])), "",
            "<details><summary>every setting</summary>", "",
            "| setting | wall | thread CPU | excess (worst) |", "|---|---:|---:|---:|"]
        lines += [f"| {label} | {r['wall_s'] * 1e3:.1f} ms | {r['cpu_s'] * 1e3:.1f} ms | {r['excess'] * 100:.4f}% "
                  f"({r['worst'] * 100:.3f}%) |" for label, r in rows.items()]
        lines += ["", "</details>", ""]
    lines += [f"Default oversample: block = r + oversample (`block_size(16, None)` = {block_size(16, None)}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 7 SmolLM2 layers, fewer settings")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats (default 5, quick 2)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--clock", choices=["wall_s", "cpu_s"], default="wall_s",
                        help="the clock the goal column compares (cpu_s on a shared machine)")
    args = parser.parse_args()
    args.reps = args.reps or (2 if args.quick else 5)
    smol = smollm2((0,) if args.quick else (0, 10, 20, 29))
    big = synthetic([(1024, 1024), (2752, 1024)] if args.quick else [(4096, 4096), (11008, 4096)])
    torch.set_num_threads(1)
    ranks = args.ranks[:1] if args.quick else args.ranks
    results = [workload("SmolLM2-135M layers", smol, r, args.reps, args.quick) for r in ranks]
    # no exact SVD here: one of 11008x4096 takes tens of seconds on one thread, and it is never on the frontier
    results += [workload("7B-shaped" if not args.quick else "7B-shaped / 4", big, r, max(1, args.reps - 2),
                         args.quick, exact=False) for r in ranks]
    text = report(results, args, args.clock)
    if args.quick:  # a smoke run: its figures are not results
        print(text)
    else:
        write_result("pareto", text, results)


if __name__ == "__main__":
    main()
