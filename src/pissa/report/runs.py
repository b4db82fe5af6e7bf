"""Reports: turn training runs (and their evaluations) into one `report.md` with PNG plots, so runs
can be compared side by side.

    runs = [load_run("runs/lora"), load_run("runs/pissa")]
    write_report(runs, "report/")   # report.md, loss.png, grad_norm.png, accuracy.png, predictions/

A run folder is what `pissa train` writes (log.jsonl, summary.json, train_config.yaml) plus the
results `pissa eval` keeps inside it (eval/<data>-<task>/eval.json + predictions.jsonl). An eval
results folder on its own (eval.json) is accepted too. Every figure is read from those files.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PissaError
from ..io.atomic import atomic_output_dir, check_output_dir
from ..io.jsonfile import read_json as read_json_file
from ..io.jsonfile import read_jsonl
from ..layout import EVAL_FILE, LOG_JSONL, PREDICTIONS_FILE, RUN_EVAL_DIR, SUMMARY_FILE
from ..plots import curves_figure, pyplot, save, step_curves
from .tables import fmt, markdown_table


@dataclass
class RunData:
    """What a report shows of one run: its per-step log, training summary and evaluations."""

    name: str
    path: Path
    log: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)  # each eval.json, plus "folder": its Path


def read_json(path: Path) -> dict:
    return read_json_file(path, "it is missing", "re-run the command that wrote it")


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """A run folder's log, summary and evaluations; refuses a folder that holds none of them."""
    path = Path(path)
    if not path.is_dir():
        raise PissaError(f"run folder {path} does not exist")
    run = RunData(name=name or path.name, path=path)
    if (path / LOG_JSONL).exists():
        run.log = [r for r in read_jsonl(path / LOG_JSONL) if r.get("loss") is not None]
    if (path / SUMMARY_FILE).exists():
        run.summary = read_json(path / SUMMARY_FILE)
    eval_files = [path / EVAL_FILE] if (path / EVAL_FILE).exists() else \
        sorted(path.glob(f"{RUN_EVAL_DIR}/*/{EVAL_FILE}"))
    run.evals = [{**read_json(f), "folder": f.parent} for f in eval_files]
    if not (run.log or run.summary or run.evals):
        raise PissaError(f"{path} holds no training log ({LOG_JSONL}), {SUMMARY_FILE} or evaluation ({EVAL_FILE}); "
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


def metric_figure(runs: list[RunData], key: str, title: str, ylabel: str, log_y: bool = False):
    """One line per run of `key` (loss, grad_norm, ...) against the optimizer step."""
    curves = step_curves({run.name: run.log for run in runs}, key)
    return curves_figure(curves, title, "optimizer step", ylabel, log_y, legend_title="run")


def plot_metric(runs: list[RunData], key: str, path: Path, title: str, ylabel: str, log_y: bool = False) -> Path:
    return save(metric_figure(runs, key, title, ylabel, log_y), path)


def plot_accuracy(rows: list[dict], path: Path, title: str = "Exact-match accuracy") -> Path:
    """Bars of accuracy per evaluated run; `rows` are {run, data, accuracy, correct, total}."""
    fig, ax = pyplot().subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.5))
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
    return save(fig, path)


# --------------------------------------------------------------------------- markdown


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


def write_run_report(
    runs: list[RunData], out: str | Path, title: str = "PiSSA runs", overwrite: bool = False,
    sections: list[str] | None = None, extra_files: dict[str, Path] | None = None, source: str | None = None,
) -> Path:
    """Write OUT/report.md with its PNGs and copies of the per-example predictions (atomically).

    `sections` are extra markdown blocks placed after the tables (the demo adds its own);
    `extra_files` {name: path} are copied into OUT (e.g. PNGs those sections link to);
    `source` replaces the line that lists the run folders.
    """
    out = check_output_dir(out, overwrite, inputs=[run.path for run in runs])
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
