"""Quantization-error reduction of LoftQ and QPiSSA vs QLoRA on real weights (paper table 4 / 8).

Run (from the repository root):

    .venv/bin/python benchmarks/bench_quant.py
    .venv/bin/python benchmarks/bench_quant.py --models minilm-l6 --ranks 16 --iters 1 5 --niter 8

For each embedded model (SmolLM2-135M-Instruct, MiniLM-L6) and every linear layer but the head:
NF4 (bitsandbytes, blocksize 64, no double quant) error ||W - (Q + B @ A)||_* for QLoRA, LoftQ and
QPiSSA at r = 16, 64 and T = 1, 5; per layer type the mean reduction ratio, AVG = mean of the types.

The SVD steps use randomized SVD (`--niter`) so the whole of both models fits in a benchmark run;
the exact-SVD numbers of one block (`--check-block`) are measured in the same run and the largest
difference is written next to the table. The peer, PEFT's `loftq_init`, is run on that block too.

Writes benchmarks/results/quant.md, and CSV/markdown/PNG per model under benchmarks/results/quant/.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from _common import RESULTS, LoadWatch
from _peers import cuda_moves_on_cpu

from pissa.quant import QuantSpec, loftq_iterates, nuclear
from pissa.report.quant import (
    ReportConfig,
    measure,
    model_weights,
    qpissa_wins,
    quant_table,
    short_names,
    summarize,
    write_quant_report,
)

WATCH = LoadWatch()


def block_of(name: str) -> int | None:
    found = re.findall(r"\.(\d+)\.", name)
    return int(found[-1]) if found else None


def peer_check(weights: dict[str, torch.Tensor], rank: int, iters: int) -> dict:
    """Our LoftQ (exact SVD) vs PEFT's loftq_init on the same layers: nuclear errors and equality of Q."""
    from peft.utils.loftq_utils import loftq_init

    ours_total = peft_total = 0.0
    same_q = 0
    for W in weights.values():
        W32 = W.to(torch.float32)
        with cuda_moves_on_cpu():
            Q, A, B = loftq_init(W32, num_bits=4, reduced_rank=rank, num_iter=iters)
        ours = list(loftq_iterates(W32, rank, QuantSpec(), iters))[-1]
        ours_total += nuclear(ours.error(W32))
        peft_total += nuclear(W32 - Q - B @ A)
        same_q += int(torch.equal(Q, ours.Q))
    return {"layers": len(weights), "ours": ours_total, "peft": peft_total, "same_Q": same_q}


def tolerance(rand_rows: list[dict], exact_rows: list[dict]) -> dict[str, float]:
    """Largest |ratio(randomized) - ratio(exact)| in percentage points, per fit, over the checked layers."""
    exact = {(r["layer"], r["fit"], r["rank"], r["iters"]): r["reduction_nuclear_pct"] for r in exact_rows}
    worst: dict[str, float] = {}
    for r in rand_rows:
        key = (r["layer"], r["fit"], r["rank"], r["iters"])
        if key in exact:
            worst[r["fit"]] = max(worst.get(r["fit"], 0.0), abs(r["reduction_nuclear_pct"] - exact[key]))
    return worst


def int8_check(weights: dict[str, torch.Tensor], rank: int) -> list[dict]:
    """Paper table 9 style: INT8 (row-wise absmax) QLoRA vs LoftQ vs QPiSSA nuclear errors, T = 1, exact SVD."""
    rows = measure(weights.items(), ReportConfig(ranks=[rank], iters=[1], quant_type="int8"))
    totals: dict[str, float] = {}
    for r in rows:
        totals[r["fit"]] = totals.get(r["fit"], 0.0) + r["nuclear"]
    return [{"fit": k, "nuclear": v} for k, v in totals.items()]


def main_lines(model, args, weights, total_layers, path, dtype, seconds, rows) -> list[str]:
    types, table = summarize(rows)
    names = short_names(types)
    subset = (f"blocks {', '.join(map(str, sorted(args.blocks[model])))} of {model} only ({len(weights)} of "
              f"{total_layers} linear layers, to fit the run on a shared 2-core machine)"
              if args.blocks.get(model) else f"{len(weights)} linear layers (all but the output head)")
    lines = [f"## {model}", "", f"{subset}, weights as stored "
             f"({dtype}) from `{path}`. NF4 blocksize 64, no double quant. Randomized SVD "
             f"(niter={args.niter}, oversample r) for the SVD steps; nuclear norms exact. "
             f"Measured in {seconds:.0f} s.", "",
             "Error-reduction ratio vs QLoRA, nuclear norm, % (higher is better):", "",
             quant_table(types, table, names), ""]
    for w in qpissa_wins(table, types):
        wins = ", ".join(names[t] for t in w["wins"]) or "none"
        losses = ", ".join(names[t] for t in w["losses"]) or "none"
        lines.append(f"- r={w['rank']}, T={w['iters']}: QPiSSA beats LoftQ on **{wins}**; does not on **{losses}**.")
    return lines


def run_model(model: str, args) -> list[str]:
    weights, path = model_weights(model)
    total_layers = len(weights)
    if args.blocks.get(model):
        keep = set(args.blocks[model])
        weights = {n: W for n, W in weights.items() if block_of(n) in keep}
    dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    config = ReportConfig(ranks=args.ranks, iters=args.iters, niter=args.niter, seed=0)
    print(f"{model}: {len(weights)} layers, randomized SVD niter={args.niter}", flush=True)
    start = time.perf_counter()
    rows = measure(weights.items(), config, len(weights),
                   lambda d, t, n: print(f"  {d}/{t} {n}", flush=True) if d % 10 == 0 or d == t else None)
    seconds = time.perf_counter() - start
    folder = RESULTS / "quant" / (model + args.suffix)
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{model}: nf4 from {dtype}, randomized SVD niter={args.niter}"
    write_quant_report(folder, rows, title, {"model": path, "layers": len(weights)})

    block = {n: W for n, W in weights.items() if block_of(n) == args.check_block}
    if not block:  # --check-block -1: no exact-SVD check, no peer run
        return main_lines(model, args, weights, total_layers, path, dtype, seconds, rows) + [
            "", f"![{model}](quant/{model + args.suffix}/chart.png)", ""]
    print(f"  exact-SVD check on block {args.check_block} ({len(block)} layers)", flush=True)
    start = time.perf_counter()
    exact_rows = measure(block.items(), ReportConfig(ranks=args.ranks, iters=args.iters))
    exact_seconds = time.perf_counter() - start
    tol = tolerance(rows, exact_rows)
    print("  peer check (PEFT loftq_init)", flush=True)
    peers = [(r, t, peer_check(block, r, t)) for r in (min(args.ranks),) for t in args.iters]
    int8 = int8_check(block, min(args.ranks))

    lines = main_lines(model, args, weights, total_layers, path, dtype, seconds, rows)
    types, _ = summarize(rows)
    names = short_names(types)
    _, exact_table = summarize(exact_rows)
    lines += ["", f"Exact SVD on block {args.check_block} only ({len(block)} layers, {exact_seconds:.0f} s):", "",
              quant_table(types, exact_table, names), "",
              "Randomized vs exact SVD on those layers, largest |difference| of a layer's ratio (points): "
              + ", ".join(f"{k} {v:.3f}" for k, v in sorted(tol.items())), ""]
    for rank, iters, p in peers:
        lines.append(f"- Peer: PEFT `loftq_init` (r={rank}, T={iters}) on block {args.check_block}: nuclear error "
                     f"sum {p['peft']:.4f} vs ours {p['ours']:.4f} (ratio {p['ours'] / p['peft']:.6f}); "
                     f"identical Q on {p['same_Q']}/{p['layers']} layers.")
    qlora = next(r["nuclear"] for r in int8 if r["fit"] == "qlora")
    lines += ["", f"INT8 row-wise absmax (paper table 9 style), r={min(args.ranks)}, T=1, exact SVD, block "
              f"{args.check_block}, summed nuclear error: "
              + ", ".join(f"{r['fit']} {r['nuclear']:.4f} ({(1 - r['nuclear'] / qlora) * 100:.1f}% lower than QLoRA)"
                          for r in int8), "",
              f"Per-layer CSV, summary and chart: `benchmarks/results/quant/{model + args.suffix}/`", "",
              f"![{model}](quant/{model + args.suffix}/chart.png)", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--iters", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--niter", type=int, default=8)
    parser.add_argument("--check-block", type=int, default=0)
    parser.add_argument("--blocks", nargs="*", default=[], metavar="MODEL=I,J",
                        help="Measure only these blocks of a model, e.g. smollm2-135m=0,14,29")
    parser.add_argument("--section", action="store_true",
                        help="Write only benchmarks/results/quant/<model>/section.md (run models in parallel)")
    parser.add_argument("--assemble", action="store_true", help="Build quant.md from the models' section.md files")
    parser.add_argument("--suffix", default="", help="Appended to the per-model results folder name")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 avoids OpenMP oversubscription on a shared machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "quant.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.blocks = {k: [int(i) for i in v.split(",")] for k, v in (b.split("=", 1) for b in args.blocks)}
    start = time.perf_counter()
    if args.section:
        for model in args.models:
            lines = run_model(model, args)
            lines[2] += f" Wall time of this model's run: {time.perf_counter() - start:.0f} s."
            (RESULTS / "quant" / (model + args.suffix) / "section.md").write_text("\n".join(lines) + "\n")
        return
    if args.assemble:
        body = [(RESULTS / "quant" / m / "section.md").read_text() for m in args.models]
    else:
        body = [line for model in args.models for line in run_model(model, args)]
    head = [
        "# QPiSSA: quantization-error reduction on real weights",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_quant.py --models {' '.join(args.models)} --ranks "
        f"{' '.join(map(str, args.ranks))} --iters {' '.join(map(str, args.iters))} --niter {args.niter}"
        + "".join(f" --blocks {m}={','.join(map(str, b))}" for m, b in args.blocks.items()) + "`"
        + (" (each model ran as its own `--section` process, in parallel; then `--assemble`)" if args.assemble else ""),
        "",
        f"{WATCH.header()} {args.threads} torch thread(s) per process.",
        "",
        "Ratio of a layer = (1 - ||W - (Q + B A)||_* / ||W - nf4(W)||_*) x 100 (paper section 5.3); a type's "
        "value is the mean over its layers; AVG is the mean of the type columns, as in the paper's table 4.",
        "QLoRA: Q = nf4(W), B = 0. LoftQ: Q = nf4(W - L), L = SVD_r(W - Q), T times from L = 0. QPiSSA "
        "(Algorithm 1): L = SVD_r(W - Q), Q = nf4(W - L), T times from Q = 0.",
        "",
        "4-bit training measurement: this session had no GPU, so no QPiSSA training run in 4-bit was measured.",
        "",
    ]
    args.out.write_text("\n".join(head + body) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
