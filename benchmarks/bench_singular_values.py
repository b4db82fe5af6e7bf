"""PiSSA vs PiSSA with trainable singular values (paper appendix A) on the embedded SmolLM2-135M.

Same seed, data order, batch, rank, lr and steps through the `pissa train` recipe; the singular-value
runs re-express each adapter as B·diag(S)·A (PEFT AdaLoRA layout) with the orthogonality regulariser
at weight 0.1 (the default) and 0 (none). It records the training loss per step, the step time,
the trainable parameters, and at the end of each run how far the factors drifted from orthonormal
(max over layers of ‖AAᵀ−I‖_F and ‖BᵀB−I‖_F) and how far S moved.

Run (CPU, ~5-10 min on 2 idle cores):

    .venv/bin/python benchmarks/bench_singular_values.py --steps 24 --lr 2e-4

Writes benchmarks/results/singular_values.md (+ .json). The dataset is the bundled synthetic `arith`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, load_average, machine

RUNS = {"pissa": {}, "pissa+sv (w=0.1)": {"train_singular_values": True, "orth_reg_weight": 0.1},
        "pissa+sv (w=0)": {"train_singular_values": True, "orth_reg_weight": 0.0}}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=144)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


@torch.no_grad()
def orthogonality(model) -> dict:
    """Max over layers of ‖AAᵀ−I‖_F, ‖BᵀB−I‖_F, and of max |S - S_0| / S_0 (relative move of the values)."""
    from peft.tuners.adalora import AdaLoraLayer

    drift_A = drift_B = 0.0
    for module in model.modules():
        if isinstance(module, AdaLoraLayer):
            A, B = module.lora_A["default"].double(), module.lora_B["default"].double()
            drift_A = max(drift_A, float(torch.linalg.norm(A @ A.T - torch.eye(len(A), dtype=A.dtype))))
            drift_B = max(drift_B, float(torch.linalg.norm(B.T @ B - torch.eye(B.shape[1], dtype=B.dtype))))
    return {"max_AAt_minus_I": drift_A, "max_BtB_minus_I": drift_B}


def singular_values(model) -> dict[str, torch.Tensor]:
    from peft.tuners.adalora import AdaLoraLayer

    return {n: m.lora_E["default"].detach().flatten().clone() for n, m in model.named_modules()
            if isinstance(m, AdaLoraLayer)}


def run(args, name: str, extra: dict, work: Path) -> dict:
    from pissa.train import SFTRecipe, TrainConfig
    from pissa.train.log import read_log

    config = TrainConfig(out=str(work / name.replace(" ", "")), model=args.model, method="pissa", lr=args.lr,
                         max_steps=args.steps, batch_size=args.batch_size, rank=args.rank,
                         max_length=args.max_length, seed=0, tensorboard=False, save_residual=False, **extra)
    recipe = SFTRecipe(config).setup()
    before = singular_values(recipe.model)
    recipe.train()
    summary = recipe.save()
    log = read_log(config.out)
    record = {"losses": [r["loss"] for r in log], "median_step_s": statistics.median(r["step_s"] for r in log),
              "trainable_params": summary["trainable_params"]}
    if before:
        after = singular_values(recipe.model)
        record["max_rel_S_move"] = max(float(((after[n] - s).abs() / s.abs()).max()) for n, s in before.items())
        record.update(orthogonality(recipe.model))
    return record


def tail_mean(xs: list[float], k: int = 5) -> float:
    return sum(xs[-k:]) / len(xs[-k:])


def report(args, records: dict, wall_s: float, load: tuple[float, float]) -> str:
    names = list(records)
    lines = [
        "# PiSSA with trainable singular values (paper appendix A) vs plain PiSSA",
        "",
        f"`benchmarks/bench_singular_values.py --steps {args.steps} --lr {args.lr:g} --rank {args.rank} "
        f"--batch-size {args.batch_size} --max-length {args.max_length}` on {args.model}, bundled synthetic "
        f"`arith` set; {machine()}, "
        f"{args.threads} threads, wall {wall_s / 60:.1f} min, 1-minute load average {load[0]:.1f} at the start "
        f"and {load[1]:.1f} at the end. Same seed, data order and steps for every run; PiSSA init by exact SVD.",
        "",
        "| run | first loss | final loss (mean of last 5) | trainable params | median step s | "
        "max ‖AAᵀ−I‖_F | max ‖BᵀB−I‖_F | max relative move of S |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in records.items():
        orth = [f"{r[k]:.2e}" if k in r else "-" for k in ("max_AAt_minus_I", "max_BtB_minus_I", "max_rel_S_move")]
        lines.append(f"| {name} | {r['losses'][0]:.4f} | {tail_mean(r['losses']):.4f} | {r['trainable_params']:,} "
                     f"| {r['median_step_s']:.2f} | " + " | ".join(orth) + " |")
    lines += ["", "## Loss per step", "", "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(args.steps):
        lines.append(f"| {i + 1} | " + " | ".join(f"{records[n]['losses'][i]:.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start, load_start = time.perf_counter(), load_average()
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in RUNS.items():
            records[name] = run(args, name, extra, Path(tmp))
            print(name, f"{records[name]['losses'][0]:.4f} -> {tail_mean(records[name]['losses']):.4f}", flush=True)
    wall_s, load = time.perf_counter() - start, (load_start, load_average())
    (args.out / "singular_values.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "wall_s": wall_s, "load_average": load,
         "runs": records}, indent=2) + "\n")
    (args.out / "singular_values.md").write_text(report(args, records, wall_s, load))
    print((args.out / "singular_values.md").read_text())


if __name__ == "__main__":
    main()
