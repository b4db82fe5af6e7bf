"""PiSSA init speed and quality: pissa vs PEFT's built-in `init_lora_weights="pissa"` on the
embedded SmolLM2-135M (210 linear layers), side by side in one process.

For each configuration it times the whole in-memory init of a fresh model copy (PEFT wrapping +
every SVD), and measures the residual-norm excess over the exact truncated SVD:
    excess = ||W - scale*B@A||_F / ||W - W_r||_F - 1, summed in quadrature over all layers.

Run:  .venv/bin/python benchmarks/bench_init.py [--ranks 16 128] [--repeats 1]
Writes benchmarks/results/init.md.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import LoadWatch, write_result

from pissa.init import PissaConfig, init_model
from pissa.models import load_model

WATCH = LoadWatch(threads=torch.get_num_threads())
FALLBACKS: dict[tuple[str, int], int] = {}  # layers where a randomized request ran the exact SVD (cheaper)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ours(rank, niter=None, oversample=None):
    options = {} if niter is None else {"niter": niter, "oversample": oversample}
    label = "pissa exact SVD" if niter is None else \
        f"pissa randomized niter={niter} " + ("(default block)" if oversample is None else f"oversample={oversample}")

    def run(model):
        peft_model, report = init_model(model, PissaConfig(rank=rank, options=options, targets=TARGETS))
        FALLBACKS[label, rank] = sum(info["svd"] == "exact" for info in report.values()) if niter else 0
        return peft_model

    return label, niter, run


def peft(rank, niter=None):
    from peft import LoraConfig, get_peft_model

    init = "pissa" if niter is None else f"pissa_niter_{niter}"
    label = f'PEFT init_lora_weights="{init}"'

    def run(model):
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=init)
        return get_peft_model(model, config)

    return label, niter, run


def residual_norms(peft_model) -> dict[str, float]:
    return {
        name: module.get_base_layer().weight.detach().float().norm().item()
        for name, module in peft_model.base_model.model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def exact_floor(model, rank) -> dict[str, float]:
    """||W - W_r||_F of the exact truncated SVD, per targeted layer."""
    floor = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            S = torch.linalg.svdvals(module.weight.detach().float())
            floor[name] = S[rank:].square().sum().sqrt().item()
    return floor


def measure(model, run, floor, repeats):
    best, peft_model = float("inf"), None
    for _ in range(repeats):
        fresh = copy.deepcopy(model)
        start = time.perf_counter()
        peft_model = run(fresh)
        best = min(best, time.perf_counter() - start)
    norms = residual_norms(peft_model)
    total = sum(v * v for v in norms.values()) ** 0.5
    floor_total = sum(floor[n] ** 2 for n in norms) ** 0.5
    worst = max(norms[n] / floor[n] - 1 for n in norms)
    return best, total / floor_total - 1, worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _, _ = load_model("smollm2-135m", dtype="float32")
    rows = []
    for rank in args.ranks:
        floor = exact_floor(model, rank)
        configs = [
            ours(rank), peft(rank),
            *[ours(rank, n) for n in (2, 4, 16)],  # the shipping default block (oversample None)
            *[peft(rank, n) for n in (2, 4, 16)],
        ]
        for label, niter, run in configs:
            seconds, excess, worst = measure(model, run, floor, args.repeats)
            rows.append((rank, label, niter, seconds, excess, worst))
            print(f"r={rank:4d} {label:55s} {seconds:7.2f} s  excess {excess * 100:.4f}%  "
                  f"worst layer {worst * 100:.4f}%")
    write(rows, args)


def write(rows, args):
    lines = [
        "# Init benchmark: pissa vs PEFT PiSSA init on SmolLM2-135M",
        "",
        "Written by `benchmarks/bench_init.py` "
        f"(`--ranks {' '.join(map(str, args.ranks))} --repeats {args.repeats}`). One process, fp32, CPU. "
        + WATCH.header(),
        "",
        "Time = whole in-memory init of a fresh model copy (PEFT wrapping + all 210 decompositions). "
        "Excess = residual Frobenius norm over the exact truncated SVD's, over all layers (worst single layer "
        "in brackets). 0% means exact quality.",
        "",
    ]
    for rank in args.ranks:
        subset = [r for r in rows if r[0] == rank]
        peft_exact = next(r for r in subset if r[1].startswith("PEFT") and r[2] is None)[3]
        lines += [f"## r = {rank}", "", "| method | time (s) | vs PEFT exact | residual excess |",
                  "|---|---:|---:|---:|"]
        for _, label, _, seconds, excess, worst in subset:
            fell_back = FALLBACKS.get((label, rank), 0)
            note = f" ({fell_back}/210 layers ran the exact SVD, which is cheaper there)" if fell_back else ""
            lines.append(f"| {label}{note} | {seconds:.2f} | {peft_exact / seconds:.1f}x | "
                         f"{excess * 100:.4f}% ({worst * 100:.4f}%) |")
        lines += ["", *verdicts(subset, peft_exact), ""]
    write_result("init", "\n".join(lines))


def verdicts(subset, peft_exact):
    out = []
    for niter in (2, 4, 16):
        mine = next(r for r in subset if not r[1].startswith("PEFT") and r[2] == niter)
        theirs = next(r for r in subset if r[1].startswith("PEFT") and r[2] == niter)
        out.append(f"- niter={niter}: ours {mine[3]:.2f} s vs PEFT {theirs[3]:.2f} s "
                   f"(ratio {mine[3] / theirs[3]:.2f}; target <= 1), excess {mine[4] * 100:.4f}% vs "
                   f"{theirs[4] * 100:.4f}%.")
    exact_quality = [r for r in subset if not r[1].startswith("PEFT") and r[4] <= 0.001]
    if exact_quality:
        fastest = min(exact_quality, key=lambda r: r[3])
        out.append(f"- Exact quality (excess <= 0.1%): fastest of ours is {fastest[1]} at {fastest[3]:.2f} s, "
                   f"{peft_exact / fastest[3]:.1f}x faster than PEFT's full-SVD `pissa` ({peft_exact:.2f} s); "
                   "target >= 5x.")
    return out


if __name__ == "__main__":
    main()
