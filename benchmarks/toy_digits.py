"""The paper's toy experiment (figure 2a) on scikit-learn's bundled digits, plus the report's variants.

A 2-layer MLP (64 -> 128 -> 10) is trained on the odd digits of `sklearn.datasets.load_digits`,
then fine-tuned on the even digits with rank-r adapters on both layers (base frozen), initialised
as LoRA (PEFT's kaiming A, B = 0), PiSSA (principal triplets), medium and minor triplets (paper
appendix F), CURA and Robust PiSSA (follow-up report), all through `pissa.adapters.init_model`.
Full fine-tuning is shown as a reference. Same optimiser, learning rate and batches for every
method; loss curves over 3 seeds (the seed draws the pre-training, the batches and the adapter).

Run:  .venv/bin/python benchmarks/toy_digits.py            (about a minute on 2 CPU cores)
      .venv/bin/python benchmarks/toy_digits.py --steps 300 --rank 2
Writes benchmarks/results/toy.md and benchmarks/results/toy.png.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from pissa.init import PissaConfig, init_model

RESULTS = Path(__file__).parent / "results"
METHODS = {  # label -> (registry method, options); None = full fine-tuning
    "LoRA": ("lora-kaiming", {}),
    "PiSSA": ("pissa", {}),
    "medium": ("pissa", {"components": "medium"}),
    "minor": ("pissa", {"components": "minor"}),
    "CURA": ("cur", {}),  # the report's factors: A = sampled rows of W, B = C pinv(W[I, J])
    "CURA balanced": ("cur", {"balance": True}),  # same product, PiSSA-like factor norms
    "CURA projection": ("cur", {"core": "projection"}),  # U = pinv(C) W pinv(R): Frobenius-optimal core
    "Robust": ("robust", {}),
    "full FT": None,
}


def digits(seed: int):
    """(train, test) splits of odd and even digits as float tensors, features scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    split = {}
    for parity, keep in (("odd", y % 2 == 1), ("even", y % 2 == 0)):
        Xp, yp = X[keep], y[keep]
        n = int(0.8 * len(yp))
        split[parity] = (Xp[:n], yp[:n], Xp[n:], yp[n:])
    return split


class MLP(nn.Module):
    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def train(model: nn.Module, params, X, y, steps: int, lr: float, batch: int, seed: int) -> list[float]:
    """Plain SGD on cross-entropy; returns the loss of every step (the curve)."""
    optim = torch.optim.SGD(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(y), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model, X, y) -> tuple[float, float]:
    logits = model(X)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def pretrain(split, seed: int, steps: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP()
    Xtr, ytr, *_ = split["odd"]
    train(model, model.parameters(), Xtr, ytr, steps, lr=0.5, batch=64, seed=seed)
    return model.eval()


def finetune(base: MLP, label: str, split, args, seed: int) -> dict:
    Xtr, ytr, Xte, yte = split["even"]
    model = copy.deepcopy(base)
    extra = {}
    if METHODS[label] is None:
        params = list(model.parameters())
    else:
        method, options = METHODS[label]
        model, report = init_model(model, PissaConfig(rank=args.rank, method=method, options=options, seed=seed,
                                                      targets=["fc1", "fc2"]))
        params = [p for p in model.parameters() if p.requires_grad]
        norms = {n: getattr(base, n).weight.norm().item() for n in ("fc1", "fc2")}
        extra = {"residual_ratio": {n: report[n]["residual_fro"] / norms[n] for n in norms}}
    before = evaluate(model, Xte, yte)
    curve = train(model, params, Xtr, ytr, args.steps, args.lr, args.batch, seed=1000 + seed)
    loss, acc = evaluate(model, Xte, yte)
    return {"curve": curve, "test_loss": loss, "test_acc": acc, "init_test_loss": before[0], **extra}


def smooth(curve: list[float], k: int = 10) -> list[float]:
    return [statistics.fmean(curve[max(0, i - k + 1):i + 1]) for i in range(len(curve))]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    finite = [max(r["curve"]) for runs in results.values() for r in runs if math.isfinite(r["curve"][-1])]
    for label, runs in results.items():
        curves = torch.tensor([smooth(r["curve"]) for r in runs])  # (seeds, steps)
        mean = curves.mean(0)
        diverged = sum(not math.isfinite(r["curve"][-1]) for r in runs)
        name = f"{label} (diverged {diverged}/{len(runs)})" if diverged else label
        line, = ax.plot(mean.numpy(), label=name, lw=1.4, ls="--" if label == "full FT" else "-")
        ax.fill_between(range(curves.shape[1]), curves.min(0).values.numpy(), curves.max(0).values.numpy(),
                        color=line.get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_ylim(top=2 * max(finite))  # diverging runs leave the plot instead of squashing it
    ax.set_xlabel("fine-tuning step (even digits)")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title("MLP pre-trained on odd digits, fine-tuned on even digits (mean, min-max over seeds)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def at(curve: list[float], step: int) -> float:
    return statistics.fmean(curve[max(0, step - 10):step])


def markdown(results: dict, args, seconds: float) -> str:
    checkpoints = [s for s in (10, 50, 100, args.steps) if s <= args.steps]
    head = " | ".join(f"loss @ {s}" for s in checkpoints)
    lines = [
        "# Toy experiment (paper figure 2a): odd digits -> even digits", "",
        "Command: `.venv/bin/python benchmarks/toy_digits.py "
        f"--rank {args.rank} --steps {args.steps} --lr {args.lr} --batch {args.batch} --seeds {args.seeds}`", "",
        f"MLP 64 -> 128 -> 10 pre-trained on odd digits of sklearn `load_digits` ({args.pretrain_steps} SGD steps), "
        f"then fine-tuned on even digits: rank-{args.rank} adapters on fc1 and fc2 (base frozen), SGD "
        f"lr {args.lr}, batch {args.batch}, {args.steps} steps, identical batches for every method. "
        f"Mean over {args.seeds} seeds (min-max in brackets). Training loss is the mean of the 10 steps "
        "ending at that step. Figure: `toy.png`.", "",
        f"| method | {head} | test loss | test acc |",
        "|---|" + "---|" * (len(checkpoints) + 2),
    ]
    for label, runs in results.items():
        cells = []
        for s in checkpoints:
            vals = [at(r["curve"], s) for r in runs]
            cells.append(f"{statistics.fmean(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]")
        test = statistics.fmean(r["test_loss"] for r in runs)  # nan if any seed diverged
        acc = statistics.fmean(r["test_acc"] for r in runs)
        diverged = sum(not math.isfinite(r["curve"][-1]) for r in runs)
        acc_cell = f"{acc:.1%}" if not diverged else f"diverged ({diverged}/{len(runs)} seeds)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {test:.3f} | {acc_cell} |")
    finals = {label: statistics.fmean(at(r["curve"], args.steps) for r in runs) for label, runs in results.items()}
    ranked = sorted((v, k) for k, v in finals.items() if math.isfinite(v))
    lines += ["", "Ranking by final training loss (diverged runs left out): "
              + " < ".join(f"{k} ({v:.3f})" for v, k in ranked) + "."]
    lines += ["", "Relative residual ‖W_res‖_F / ‖W‖_F after init (seed 0), i.e. how much of W each init moves "
              "into the trainable adapter (above 1: the adapter and the residual cancel each other):", "",
              "| method | fc1 | fc2 |", "|---|---|---|"]
    for label, runs in results.items():
        if "residual_ratio" in runs[0]:
            ratio = runs[0]["residual_ratio"]
            lines.append(f"| {label} | {ratio['fc1']:.3f} | {ratio['fc2']:.3f} |")
    lines += ["", f"Wall time {seconds:.0f} s on a shared 2-core CPU machine (other jobs were running)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    start = time.perf_counter()
    results: dict[str, list] = {label: [] for label in METHODS}
    for seed in range(args.seeds):
        split = digits(seed)
        base = pretrain(split, seed, args.pretrain_steps)
        _, odd_acc = evaluate(base, *split["odd"][2:])
        print(f"seed {seed}: pre-trained, odd-digit test accuracy {odd_acc:.1%}")
        for label in METHODS:
            results[label].append(finetune(base, label, split, args, seed))
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "toy.png")
    text = markdown(results, args, time.perf_counter() - start)
    (args.out / "toy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
