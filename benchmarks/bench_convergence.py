"""Convergence: LoRA vs PiSSA on the embedded SmolLM2-135M-Instruct with the bundled `arith` set.

Both methods train with the same seed, data order, batch, rank and number of steps through the
`pissa train` recipe (`pissa.train.SFTRecipe`), at the paper's lr (2e-5), at 10x it (2e-4), and at
each method's best lr from the sweep (which includes 1e-3): the best-lr pairing is the fair one.
It records the loss per step, held-out accuracy (greedy generation on `arith:test`, answer after
"The answer is:") and reference perplexity via `pissa.evaluate`, and the step-time ratio
PiSSA/LoRA measured in the same process with the two models' steps interleaved.

Run (CPU, ~30-60 min on 2 shared cores):

    .venv/bin/python benchmarks/bench_convergence.py
    .venv/bin/python benchmarks/bench_convergence.py --steps 60 --lrs 2e-5,2e-4,5e-4,1e-3 --eval-limit 100

Writes benchmarks/results/convergence.md and convergence.png (+ convergence.json with every figure).
The bundled dataset is synthetic (generated arithmetic word problems), not GSM8K/MATH.
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

METHODS = ("lora", "pissa")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-json", type=Path, default=None,
                   help="only re-render convergence.md/.png from a convergence.json written by an earlier run")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lrs", default="2e-5,2e-4,1e-3", help="comma-separated sweep; must include 2e-5 and 2e-4")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--eval-limit", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--timing-steps", type=int, default=6, help="interleaved steps per method for the time ratio")
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy machine (no spin-waiting)")
    p.add_argument("--niter", type=int, default=None, help="PiSSA randomized-SVD iterations (default: exact SVD)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def train_run(args, method: str, lr: float, work: Path):
    """One training run through the recipe; returns (per-step records, recipe)."""
    from pissa.train import SFTRecipe, TrainConfig
    from pissa.train.log import read_log

    config = TrainConfig(out=str(work / f"{method}-{lr:g}"), model=args.model, method=method, lr=lr,
                         max_steps=args.steps, batch_size=args.batch_size, rank=args.rank,
                         max_length=args.max_length, seed=0, tensorboard=False, save_residual=False,
                         niter=args.niter if method == "pissa" else None)
    recipe = SFTRecipe(config)
    start = time.perf_counter()
    recipe.setup()
    setup_s = time.perf_counter() - start
    recipe.train()
    recipe.save()
    return read_log(config.out), recipe, setup_s


def held_out(model, tokenizer, args) -> dict:
    from pissa.eval.data import load_eval_examples
    from pissa.eval.scoring import EvalConfig, evaluate

    examples = load_eval_examples("arith:test", limit=args.eval_limit)
    config = EvalConfig(task="gsm8k", max_new_tokens=args.max_new_tokens, batch_size=10, backend="transformers")
    result = evaluate(model, tokenizer, examples, config)
    return {"accuracy": result.accuracy, "correct": result.correct, "total": result.total,
            "perplexity": result.perplexity}


def tail_mean(losses: list[float], k: int = 5) -> float:
    return statistics.fmean(losses[-k:])


def running_mean(losses: list[float], k: int = 5) -> list[float]:
    return [statistics.fmean(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]


def compare(lora: list[float], pissa: list[float], first: int) -> dict:
    """The issue's targets: PiSSA below LoRA at every step; LoRA's final loss reached in <= half the steps.

    Steps before `first` (the first step after a nonzero-lr update) have identical losses by construction:
    both inits leave the model's function unchanged, so they are not counted.
    """
    target = tail_mean(lora)
    reached = next((i + 1 for i, v in enumerate(running_mean(pissa)) if i + 1 >= first and v <= target), None)
    return {
        "steps_pissa_below": sum(p < q for p, q in zip(pissa[first - 1:], lora[first - 1:], strict=True)),
        "steps": len(lora) - first + 1,
        "first_compared_step": first,
        "lora_final": target,
        "pissa_final": tail_mean(pissa),
        "pissa_reaches_lora_final_at": reached,
    }


def step_time_ratio(args) -> dict:
    """PiSSA/LoRA time of one optimizer step, the two models' steps interleaved on the same batch."""
    from pissa.data.formats import load_examples
    from pissa.data.tokens import PadCollator, encode, pad_id
    from pissa.init import PissaConfig, init_model
    from pissa.models import load_model

    models, tokenizer = {}, None
    for method in METHODS:
        base, tokenizer, _ = load_model(args.model, "float32")
        init = "lora-kaiming" if method == "lora" else "pissa"
        options = {"niter": args.niter} if method == "pissa" and args.niter is not None else {}
        models[method], _ = init_model(base, PissaConfig(rank=args.rank, method=init, options=options))
    examples, _, _ = load_examples("arith", limit=args.batch_size)  # the tokens `pissa train` trains on
    features = [f for f in (encode(tokenizer, ex, args.max_length) for ex in examples) if f is not None]
    batch = PadCollator(pad_id(tokenizer))(features)
    optims = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=1e-5) for m in METHODS}
    times = {m: [] for m in METHODS}
    for i in range(args.timing_steps + 1):
        for method in (METHODS if i % 2 == 0 else METHODS[::-1]):  # alternate who goes first
            model, opt = models[method].train(), optims[method]
            start = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            if i > 0:  # the first round warms up allocators
                times[method].append(time.perf_counter() - start)
    median = {m: statistics.median(times[m]) for m in METHODS}
    return {"lora_s": median["lora"], "pissa_s": median["pissa"], "ratio": median["pissa"] / median["lora"],
            "samples": args.timing_steps, "tokens_per_batch": int(batch["attention_mask"].sum())}


def plot(curves: dict, pairings: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pairings), figsize=(5 * len(pairings), 4), sharey=True)
    for ax, (title, lr_l, lr_p) in zip(axes, pairings, strict=True):
        for method, lr in (("lora", lr_l), ("pissa", lr_p)):
            losses = curves[(method, lr)]
            ax.plot(range(1, len(losses) + 1), losses, label=f"{method} lr {lr:g}", alpha=0.35)
            ax.plot(range(1, len(losses) + 1), running_mean(losses), label=f"{method} (5-step mean)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("training loss (response tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rerender(path: Path) -> None:
    """Rebuild the state of a finished run from its convergence.json and rewrite the report."""
    figures = json.loads(path.read_text())
    argv = [x for k, v in figures["args"].items() if v != "None" and k != "from_json"
            for x in (f"--{k.replace('_', '-')}", v)]
    args = parse_args(argv)
    state = {"args": args, "lrs": [float(x) for x in args.lrs.split(",")], "curves": {}, "runs": {},
             "baseline": figures["baseline"], "timing": figures["timing"], "started": time.perf_counter(),
             "load_start": figures["load_average"][0]}
    for key, run in figures["runs"].items():
        method, lr = key.split("@")
        state["curves"][(method, float(lr))] = run.pop("losses")
        state["runs"][(method, float(lr))] = run
    write_results(state, wall_s=figures["wall_s"], load_end=figures["load_average"][1])


def main() -> None:
    args = parse_args()
    if args.from_json:
        return rerender(args.from_json)
    torch.set_num_threads(args.threads)
    lrs = [float(x) for x in args.lrs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    state = {"args": args, "lrs": lrs, "curves": {}, "runs": {}, "baseline": None,
             "started": time.perf_counter(), "load_start": load_average()}
    state["timing"] = step_time_ratio(args)  # first, so the ratio exists even if the sweep is cut short
    print(f"step time ratio PiSSA/LoRA {state['timing']['ratio']:.3f}", flush=True)
    # The paper's lr and 10x first, then the rest of the sweep; results are rewritten after every run.
    order = [lr for lr in (2e-4, 2e-5) if lr in lrs] + [lr for lr in lrs if lr not in (2e-4, 2e-5)]
    with tempfile.TemporaryDirectory() as tmp:
        for lr in order:
            for method in METHODS:
                log, recipe, setup_s = train_run(args, method, lr, Path(tmp))
                losses = [r["loss"] for r in log]
                ev = held_out(recipe.trainer.model, recipe.tokenizer, args) if args.eval_limit else {}
                state["curves"][(method, lr)] = losses
                first_update = next(i for i, r in enumerate(log, 1) if r["lr"]) + 1  # its loss is the first changed
                state["runs"][(method, lr)] = {"setup_s": setup_s, "final": tail_mean(losses),
                                               "first_update": first_update,
                                               "median_step_s": statistics.median(r["step_s"] for r in log), **ev}
                print(f"{method:5s} lr {lr:g}: loss {losses[0]:.3f} -> {tail_mean(losses):.3f} {ev}", flush=True)
                del recipe
                write_results(state)
    if args.eval_limit:
        from pissa.models import load_model

        base, tokenizer, _ = load_model(args.model, "float32")
        state["baseline"] = held_out(base, tokenizer, args)
    write_results(state)
    print((args.out / "convergence.md").read_text())


def write_results(state: dict, wall_s: float | None = None, load_end: float | None = None) -> None:
    """convergence.json/.md/.png from the runs finished so far (pairings need both of their runs)."""
    args, curves, runs = state["args"], state["curves"], state["runs"]
    done = [lr for lr in state["lrs"] if all((m, lr) in runs for m in METHODS)]
    best = {m: min(done, key=lambda lr, m=m: runs[(m, lr)]["final"]) for m in METHODS} if done else {}
    pairings = [(f"lr {lr:g}" + (" (paper)" if lr == 2e-5 else ""), lr, lr) for lr in (2e-5, 2e-4) if lr in done]
    if best:
        pairings.append((f"best lr: LoRA {best['lora']:g}, PiSSA {best['pissa']:g}", best["lora"], best["pissa"]))
    comparisons = {title: compare(curves[("lora", lo)], curves[("pissa", pi)], runs[("lora", lo)]["first_update"])
                   for title, lo, pi in pairings}
    wall_s = time.perf_counter() - state["started"] if wall_s is None else wall_s
    load = (state["load_start"], load_average() if load_end is None else load_end)
    if pairings:
        plot(curves, pairings, args.out / "convergence.png")
    figures = {"args": {k: str(v) for k, v in vars(args).items()}, "baseline": state["baseline"],
               "timing": state["timing"], "best_lr": best, "comparisons": comparisons, "wall_s": wall_s,
               "load_average": load,
               "runs": {f"{m}@{lr:g}": {**runs[(m, lr)], "losses": curves[(m, lr)]} for m, lr in runs}}
    (args.out / "convergence.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "convergence.md").write_text(report(args, state["lrs"], done, curves, runs, state["baseline"],
                                                    state["timing"], best, pairings, comparisons, wall_s, load))


def report(args, lrs, done, curves, runs, baseline, timing, best, pairings, comparisons, wall_s, load) -> str:
    missing = [lr for lr in lrs if lr not in done]
    lines = [
        "# Convergence: LoRA vs PiSSA (SmolLM2-135M-Instruct, bundled synthetic `arith` set)",
        "",
        f"`benchmarks/bench_convergence.py --steps {args.steps} --lrs {args.lrs} --batch-size {args.batch_size} "
        f"--max-length {args.max_length} --eval-limit {args.eval_limit} --threads {args.threads}"
        + (f" --niter {args.niter}" if args.niter is not None else "") + "`; "
        f"{machine()}, wall time "
        f"{wall_s / 60:.1f} min, 1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end "
        "(this benchmark's own threads included). "
        + ("**The machine was shared with other jobs**, so absolute times are noisy; " if load[0] > args.threads + 1
           else "The machine was otherwise idle; ")
        + "the step-time ratio comes from interleaved steps in one process.",
        "",
        f"Setup: rank {args.rank} on every linear layer (alpha = r), fp32, AdamW, cosine schedule, warmup 0.03, "
        f"no weight decay, batch {args.batch_size}, max length {args.max_length} (longer examples dropped), "
        f"{args.steps} steps, seed 0 (same data order for every run), loss on response tokens only; PiSSA init "
        + (f"by randomized SVD (niter {args.niter})" if args.niter is not None else "by exact SVD") + ". "
        "The dataset is synthetic (generated grade-school arithmetic), so nothing here says anything about GSM8K.",
        "",
    ]
    if missing:
        lines += [f"**Incomplete:** the sweep did not finish lr {', '.join(f'{lr:g}' for lr in missing)} "
                  "in the time available; the tables hold only finished runs.", ""]
    if baseline:
        lines += [f"Held-out: greedy generation on the first {args.eval_limit} `arith:test` problems (max "
                  f"{args.max_new_tokens} new tokens), exact match of the number after `The answer is:`; perplexity "
                  f"of the reference responses. Untrained model: accuracy {baseline['accuracy']:.3f} "
                  f"({baseline['correct']}/{baseline['total']}), perplexity {baseline['perplexity']:.3f}.", ""]
    lines += ["## Runs", "",
              "| method | lr | first loss | final loss (mean of last 5) | held-out acc | ppl | median step s "
              "| setup s |",
              "|---|---|---|---|---|---|---|---|"]
    for (m, lr), r in runs.items():
        losses = curves[(m, lr)]
        acc = f"{r['accuracy']:.3f} ({r['correct']}/{r['total']})" if "accuracy" in r else "-"
        ppl = f"{r['perplexity']:.3f}" if r.get("perplexity") is not None else "-"
        lines.append(f"| {m} | {lr:g} | {losses[0]:.4f} | {r['final']:.4f} | {acc} | {ppl} | "
                     f"{r['median_step_s']:.2f} | {r['setup_s']:.1f} |")
    if best:
        lines += ["", f"Best lr among the finished sweep (lowest final loss): LoRA {best['lora']:g}, "
                      f"PiSSA {best['pissa']:g}."]
    lines += ["", "## Against the targets", "",
              "Steps before the first update are equal by construction (both inits keep the model's function) and "
              "are not counted.", "",
              "| pairing | steps PiSSA < LoRA | LoRA final | PiSSA final | PiSSA (5-step mean) reaches LoRA's final "
              "at step | target: all steps, and <= half |", "|---|---|---|---|---|---|"]
    for title, c in comparisons.items():
        reached = c["pissa_reaches_lora_final_at"]
        met = c["steps_pissa_below"] == c["steps"] and reached is not None and reached <= args.steps // 2
        lines.append(f"| {title} | {c['steps_pissa_below']}/{c['steps']} | {c['lora_final']:.4f} | "
                     f"{c['pissa_final']:.4f} | {reached or 'not reached'} | {'met' if met else 'not met'} |")
    cols = list(dict.fromkeys((m, lr) for _, lo, pi in pairings for m, lr in (("lora", lo), ("pissa", pi))))
    if cols:
        lines += ["", "## Loss per step", "", "| step | " + " | ".join(f"{m} {lr:g}" for m, lr in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for s in sorted({1, 2, 3, 5, *range(10, args.steps + 1, 5), args.steps}):
            lines.append(f"| {s} | " + " | ".join(f"{curves[c][s - 1]:.4f}" for c in cols) + " |")
        lines += ["", "![loss curves](convergence.png)"]
    lines += ["", "## Step time (same process, interleaved)", "",
              f"Median of {timing['samples']} optimizer steps each on the same batch ({timing['tokens_per_batch']} "
              f"tokens): LoRA {timing['lora_s']:.3f} s, PiSSA {timing['pissa_s']:.3f} s, "
              f"**ratio PiSSA/LoRA {timing['ratio']:.3f}** (target <= 1.02). Same architecture and shapes, so a "
              "difference is timing noise. PiSSA's one-off SVD init is in `setup s` above.", "",
              "## Caveats", "",
              f"- One seed, {args.steps} steps at batch {args.batch_size}: each logged loss is one small batch's, so "
              "single steps are noisy (the 5-step means in the plot are easier to read). Both methods see the same "
              "batches, so step-by-step comparisons are paired.",
              f"- Held-out accuracy on {args.eval_limit} problems moves in steps of "
              f"{100 / max(1, args.eval_limit):.0f} points; differences of one or two problems are noise. "
              "Perplexity of the references is the finer held-out signal.",
              "- \"Best lr\" is the best of this small sweep only.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
