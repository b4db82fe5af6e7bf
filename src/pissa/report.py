"""Reports: turn training runs (and their evaluations) into one `report.md` with PNG plots, so runs
can be compared side by side.

    runs = [load_run("runs/lora"), load_run("runs/pissa")]
    write_report(runs, "report/")   # report.md, loss.png, grad_norm.png, accuracy.png, predictions/

A run folder is what `pissa train` writes (log.jsonl, summary.json, train_config.yaml) plus the
results `pissa eval` keeps inside it (eval/<data>-<task>/eval.json + predictions.jsonl). An eval
results folder on its own (eval.json) is accepted too. Every figure is read from those files.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint.atomic import atomic_output_dir
from .errors import PissaError

LOG_FILE = "log.jsonl"  # pissa.trainlog.LOG_JSONL
SUMMARY_FILE = "summary.json"  # pissa.train.SUMMARY_FILE
EVAL_FILE = "eval.json"
PREDICTIONS_FILE = "predictions.jsonl"


@dataclass
class RunData:
    """What a report shows of one run: its per-step log, training summary and evaluations."""

    name: str
    path: Path
    log: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)  # each eval.json, plus "folder": its Path


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PissaError(f"{path} line {number} is not valid JSON ({e}); the log is damaged") from e
    return records


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PissaError(f"{path} is not valid JSON ({e})") from e


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """A run folder's log, summary and evaluations; refuses a folder that holds none of them."""
    path = Path(path)
    if not path.is_dir():
        raise PissaError(f"run folder {path} does not exist")
    run = RunData(name=name or path.name, path=path)
    if (path / LOG_FILE).exists():
        run.log = [r for r in read_jsonl(path / LOG_FILE) if r.get("loss") is not None]
    if (path / SUMMARY_FILE).exists():
        run.summary = read_json(path / SUMMARY_FILE)
    eval_files = [path / EVAL_FILE] if (path / EVAL_FILE).exists() else sorted(path.glob(f"eval/*/{EVAL_FILE}"))
    run.evals = [{**read_json(f), "folder": f.parent} for f in eval_files]
    if not (run.log or run.summary or run.evals):
        raise PissaError(f"{path} holds no training log ({LOG_FILE}), {SUMMARY_FILE} or evaluation ({EVAL_FILE}); "
                         "point at a `pissa train` run folder or a `pissa eval` results folder")
    return run


def unique_names(paths: list[Path]) -> list[str]:
    """Folder names, made unique with their parent's name where two runs share one."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def load_runs(paths: list[str | Path]) -> list[RunData]:
    paths = [Path(p) for p in paths]
    if not paths:
        raise PissaError("give at least one run folder")
    return [load_run(p, name) for p, name in zip(paths, unique_names(paths), strict=True)]


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_figure(runs: list[RunData], key: str, title: str, ylabel: str, log_y: bool = False):
    """A figure with one line per run of `key` (loss, grad_norm, ...) against the optimizer step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for run in runs:
        points = [(r["step"], r[key]) for r in run.log if r.get(key) is not None]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=run.name, marker="." if len(points) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="run")
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_metric(runs: list[RunData], key: str, path: Path, title: str, ylabel: str, log_y: bool = False) -> Path:
    return save(metric_figure(runs, key, title, ylabel, log_y), path)


def plot_accuracy(rows: list[dict], path: Path, title: str = "Exact-match accuracy") -> Path:
    """Bars of accuracy per evaluated run; `rows` are {run, data, accuracy, correct, total}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.5))
    labels = [r["run"] if len({x["data"] for x in rows}) == 1 else f"{r['run']}\n{r['data']}" for r in rows]
    bars = ax.bar(range(len(rows)), [100 * r["accuracy"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{100 * r['accuracy']:.1f}%\n({r['correct']}/{r['total']})",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("model")
    ax.set_ylim(0, max(100.0, *(100 * r["accuracy"] + 15 for r in rows)) if rows else 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def weight_spectrum(W: torch.Tensor) -> torch.Tensor:
    """Singular values of a (out, in) weight, largest first, computed in fp32."""
    return torch.linalg.svdvals(W.detach().float())  # (min(out, in),)


def spectra_figure(spectra: dict[str, dict[str, torch.Tensor]], rank: int | None = None,
                   title: str = "Singular values of W and of the PiSSA residual"):
    """One panel per layer, one line per curve: {layer: {"W": s, "W_res": s_res, ...}}.

    A dotted line marks rank r: PiSSA moves the singular values left of it into the adapter.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(spectra), figsize=(4.2 * len(spectra), 4), squeeze=False)
    for ax, (layer, curves) in zip(axes[0], spectra.items(), strict=True):
        for label, values in curves.items():
            ax.plot(range(1, len(values) + 1), values.float().cpu().numpy(), label=label)
        if rank is not None:
            ax.axvline(rank, color="grey", linestyle=":", label=f"rank r = {rank}")
        ax.set_xscale("log")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value")
        ax.set_title(layer, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_spectra(spectra: dict[str, dict[str, torch.Tensor]], path: Path, rank: int | None = None,
                 title: str = "Singular values of W and of the PiSSA residual") -> Path:
    return save(spectra_figure(spectra, rank, title), path)


# --------------------------------------------------------------------------- markdown


def fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "–"
    return format(value, spec) if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def training_rows(runs: list[RunData]) -> list[list[str]]:
    rows = []
    for run in runs:
        s, log = run.summary, run.log
        first = s.get("first_loss", log[0]["loss"] if log else None)
        final = s.get("final_loss", log[-1]["loss"] if log else None)
        lowest = min((r["loss"] for r in log), default=None)
        rows.append([run.name, fmt(s.get("method")), fmt(s.get("steps", log[-1]["step"] if log else None)),
                     fmt(first, ".4f"), fmt(final, ".4f"), fmt(lowest, ".4f"),
                     f"{s['trainable_params']:,}" if "trainable_params" in s else "–",
                     fmt(s.get("train_seconds"), ".1f"), fmt(s.get("tokens_per_s_median"), ".0f")])
    return rows


def eval_rows(runs: list[RunData]) -> list[dict]:
    return [{"run": run.name, "data": e.get("data", "?"), "task": e.get("config", {}).get("task", "?"),
             "accuracy": e["accuracy"], "correct": e["correct"], "total": e["total"],
             "perplexity": e.get("perplexity"), "folder": e["folder"]} for run in runs for e in run.evals]


def write_report(
    runs: list[RunData], out: str | Path, title: str = "PiSSA runs", overwrite: bool = False,
    sections: list[str] | None = None, extra_files: dict[str, Path] | None = None, source: str | None = None,
) -> Path:
    """Write OUT/report.md with its PNGs and copies of the per-example predictions (atomically).

    `sections` are extra markdown blocks placed after the tables (the demo adds its own);
    `extra_files` {name: path} are copied into OUT (e.g. PNGs those sections link to);
    `source` replaces the line that lists the run folders.
    """
    out = Path(out)
    evals = eval_rows(runs)
    with atomic_output_dir(out, overwrite) as tmp:
        source = source or "from: " + ", ".join(f"`{run.path}`" for run in runs)
        md = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {source}", ""]
        trained = [run for run in runs if run.log]
        if trained:
            md += ["## Training", "", markdown_table(
                ["run", "method", "steps", "first loss", "final loss", "min loss", "trainable params",
                 "train s", "tokens/s"], training_rows(trained)), ""]
            plot_metric(trained, "loss", tmp / "loss.png", "Training loss (response tokens)", "cross-entropy loss")
            md += ["![training loss](loss.png)", ""]
            if any(r.get("grad_norm") is not None for run in trained for r in run.log):
                plot_metric(trained, "grad_norm", tmp / "grad_norm.png", "Gradient norm (before clipping)",
                            "gradient L2 norm", log_y=True)
                md += ["![gradient norm](grad_norm.png)", ""]
        if evals:
            md += eval_section(evals, tmp)
        for section in sections or []:
            md += [section, ""]
        for name, path in (extra_files or {}).items():
            shutil.copy(path, tmp / name)
        (tmp / "report.md").write_text("\n".join(md))
    return out / "report.md"


def eval_section(evals: list[dict], tmp: Path) -> list[str]:
    """The evaluation table, the accuracy bar chart, and the predictions copied into predictions/."""
    (tmp / "predictions").mkdir()
    rows = []
    for e in evals:
        name = f"{e['run']}-{Path(e['folder']).name}".replace("/", "-") + ".jsonl"
        source = Path(e["folder"]) / PREDICTIONS_FILE
        if source.exists():
            shutil.copy(source, tmp / "predictions" / name)
        rows.append([e["run"], f"`{e['data']}`", e["task"], f"{100 * e['accuracy']:.1f}%",
                     f"{e['correct']}/{e['total']}", fmt(e["perplexity"]),
                     f"[{name}](predictions/{name})" if source.exists() else "–"])
    data = sorted({e["data"] for e in evals})
    plot_accuracy(evals, tmp / "accuracy.png", f"Exact-match accuracy on {', '.join(data)}")
    return ["## Evaluation", "", markdown_table(
        ["run", "data", "task", "accuracy", "correct", "perplexity", "per-example outputs"], rows), "",
        "![accuracy](accuracy.png)", ""]
