"""The paper's table 4 / table 8: quantization-error reduction of LoftQ and QPiSSA relative to QLoRA,
per layer type and on average, for several ranks and iteration counts.

For each targeted weight W, each rank r and fit (LoftQ, QPiSSA), one run of T = max(iters) steps
gives every requested T (see `fit`). The ratio of a layer is 1 - ||E||_* / ||W - nf4(W)||_* (in %);
a layer type's ratio is the mean over the layers of that type; AVG is the mean over the types
(this reproduces the paper's AVG column from its per-type columns).
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..decompose import check_weight
from ..dtypes import dtype_name
from ..errors import PissaError, check_number, check_regex
from ..plots import pyplot, save
from ..quant.fit import check_iters, fit_iterates, qlora_iterate
from ..quant.formats import QuantizationError, QuantSpec
from ..quant.metrics import frobenius, nuclear, reduction_ratio
from .tables import markdown_table as table_markdown

FIT_LABELS = {"qlora": "QLoRA", "loftq": "LoftQ", "qpissa": "QPiSSA"}


@dataclass
class ReportConfig:
    """What `pissa quant-report` measures."""

    ranks: list[int] = field(default_factory=lambda: [16, 64], metadata={
        "help": "Adapter ranks, e.g. --ranks 16 64."})
    iters: list[int] = field(default_factory=lambda: [1, 5], metadata={
        "help": "LoftQ/QPiSSA alternating steps T, e.g. --iters 1 5."})
    quant_type: str = field(default="nf4", metadata={
        "help": "nf4, fp4 (bitsandbytes 4-bit, blocksize 64) or int8."})
    double_quant: bool = field(default=False, metadata={"help": "Quantize the 4-bit absmax values too."})
    niter: int | None = field(default=None, metadata={
        "help": "Randomized-SVD power iterations for the SVD steps (omit: exact SVD). niter=8 moved layer ratios "
                "by <= 0.21 points on SmolLM2/MiniLM (benchmarks/results/quant.md)."})
    targets: list[str] | None = field(default=None, metadata={
        "help": "Only layers ending with this name, or whose type matches it as a regex (repeatable).",
        "flags": ("-t",)})
    seed: int = field(default=0, metadata={"help": "Seed of the randomized SVD."})

    def __post_init__(self):
        self.spec_for(torch.float32)  # refuses a bad quant type now, before any model is loaded
        check_number(self.niter, "--niter", minimum=0)
        for pattern in self.targets or []:
            check_regex(pattern, "--targets")
        if not self.ranks or min(self.ranks) < 1:
            raise QuantizationError(f"--ranks must be >= 1, got {self.ranks}")
        if not self.iters:
            raise QuantizationError("--iters needs at least one value")
        for t in self.iters:
            check_iters(t, "--iters")
        self.ranks, self.iters = sorted(set(self.ranks)), sorted(set(self.iters))

    @property
    def options(self) -> dict:
        return {} if self.niter is None else {"niter": self.niter}

    def spec_for(self, dtype: torch.dtype) -> QuantSpec:
        """The quantization of a weight stored in `dtype` (the loader quantizes from the stored dtype)."""
        return QuantSpec(quant_type=self.quant_type, double_quant=self.double_quant, dtype=dtype_name(dtype))


def layer_type(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`: the name after the block index."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[idx[-1] + 1:]) if idx else name


def short_names(types: Iterable[str]) -> dict[str, str]:
    """Each type's shortest dotted suffix that no other type shares (q_proj, or output.dense for BERT)."""
    types = list(dict.fromkeys(types))
    out = {}
    for t in types:
        parts = t.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if sum(1 for u in types if u == suffix or u.endswith("." + suffix)) == 1:
                out[t] = suffix
                break
        else:
            out[t] = t
    return out


def measure_layer(W: torch.Tensor, name: str, config: ReportConfig) -> list[dict]:
    """Error rows of one weight W (out, in): QLoRA once, then LoftQ and QPiSSA per rank and T."""
    check_weight(W.detach(), 1, f"{name}.weight")  # NaN/Inf: name the tensor before any SVD fails on it
    W32 = W.detach().to(torch.float32)  # (out, in)
    spec = config.spec_for(W.dtype)
    base_E = qlora_iterate(W32, 1, spec).error(W32)  # (out, in) = W - nf4(W)
    base = {"nuclear": nuclear(base_E), "fro": frobenius(base_E)}
    row = {"layer": name, "type": layer_type(name), "shape": "x".join(map(str, W.shape))}
    rows = [{**row, "fit": "qlora", "rank": 0, "iters": 0, **errors_row(base, base)}]
    for rank in config.ranks:
        if rank > min(W.shape):
            continue
        for fit in ("loftq", "qpissa"):
            for it in fit_iterates(fit, W32, rank, spec, max(config.iters), config.options, config.seed):
                if it.t in config.iters:
                    E = it.error(W32)  # (out, in)
                    err = {"nuclear": nuclear(E), "fro": frobenius(E)}
                    rows.append({**row, "fit": fit, "rank": rank, "iters": it.t, **errors_row(err, base)})
    return rows


def errors_row(err: dict, base: dict) -> dict:
    return {
        "nuclear": err["nuclear"],
        "fro": err["fro"],
        "reduction_nuclear_pct": reduction_ratio(err["nuclear"], base["nuclear"]),
        "reduction_fro_pct": reduction_ratio(err["fro"], base["fro"]),
    }


def measure(weights: Iterable[tuple[str, torch.Tensor]], config: ReportConfig, total: int | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Rows of every (name, W) in `weights`; `progress(done, total, name)` after each layer."""
    rows = []
    for done, (name, W) in enumerate(weights, 1):
        rows.extend(measure_layer(W, name, config))
        if progress:
            progress(done, total or done, name)
    return rows


def summarize(rows: list[dict], metric: str = "reduction_nuclear_pct") -> tuple[list[str], list[dict]]:
    """(type columns, table rows): per (fit, rank, T) the mean `metric` per layer type, plus AVG."""
    types = list(dict.fromkeys(r["type"] for r in rows))
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["fit"], r["rank"], r["iters"])][r["type"]].append(r[metric])
    order = {"qlora": 0, "loftq": 1, "qpissa": 2}
    table = []
    for (fit, rank, iters), by_type in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], order[kv[0][0]])):
        means = {t: sum(v) / len(v) for t, v in by_type.items()}
        avg = sum(means.values()) / len(means)
        table.append({"fit": fit, "rank": rank, "iters": iters, **means, "AVG": avg})
    return types, table


def qpissa_wins(table: list[dict], types: list[str]) -> list[dict]:
    """Per (rank, T): the layer types where QPiSSA's ratio beats LoftQ's, and where it does not."""
    by_key = {(r["fit"], r["rank"], r["iters"]): r for r in table}
    out = []
    for (fit, rank, iters), q in by_key.items():
        if fit != "qpissa" or ("loftq", rank, iters) not in by_key:
            continue
        lq = by_key[("loftq", rank, iters)]
        wins = [t for t in types if t in q and q[t] > lq[t]]
        losses = [t for t in types if t in q and q[t] <= lq[t]]
        out.append({"rank": rank, "iters": iters, "wins": wins, "losses": losses})
    return out


def quant_table(types: list[str], table: list[dict], names: dict[str, str] | None = None) -> str:
    """The summary as markdown: one row per (fit, rank, T), one column per layer type, and AVG."""
    names = names or short_names(types)
    rows = []
    for r in table:
        rank, iters = (str(r["rank"]), str(r["iters"])) if r["fit"] != "qlora" else ("-", "-")
        rows.append([FIT_LABELS[r["fit"]], rank, iters, *[f"{r[t]:.1f}" if t in r else "" for t in types],
                     f"{r['AVG']:.1f}"])
    return table_markdown(["Method", "Rank", "T", *[names[t] for t in types], "AVG"], rows)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def bar_chart(path: Path, types: list[str], table: list[dict], title: str) -> None:
    """Grouped bars: one panel per (rank, T), LoftQ vs QPiSSA per layer type and AVG."""
    names = short_names(types)
    panels = sorted({(r["rank"], r["iters"]) for r in table if r["fit"] != "qlora"})
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False, sharey=True)
    cols = [*types, "AVG"]
    for ax, (rank, iters) in zip(axes[0], panels, strict=True):
        for k, fit in enumerate(("loftq", "qpissa")):
            row = next((r for r in table if (r["fit"], r["rank"], r["iters"]) == (fit, rank, iters)), None)
            if row is None:
                continue
            xs = [i + (k - 0.5) * 0.4 for i in range(len(cols))]
            ax.bar(xs, [row.get(c, 0.0) for c in cols], width=0.4, label=FIT_LABELS[fit])
        ax.set_xticks(range(len(cols)), [names.get(c, c) for c in cols], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"r={rank}, T={iters}", fontsize=10)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0][0].set_ylabel("error reduction vs QLoRA (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save(fig, path)


def write_quant_report(out: Path, rows: list[dict], title: str, extra: dict | None = None) -> dict[str, Path]:
    """Write layers.csv, summary.csv, summary.md and chart.png into `out` (a temporary folder)."""
    types, table = summarize(rows)
    names = short_names(types)
    write_csv(out / "layers.csv", rows)
    write_csv(out / "summary.csv", [{**{k: v for k, v in r.items() if k not in types}, **{names[t]: r[t] for t in types
                                     if t in r}} for r in table])
    md = [f"# {title}", "", "Error-reduction ratio vs QLoRA, nuclear norm, % (higher is better)", "",
          quant_table(types, table, names), ""]
    for w in qpissa_wins(table, types):
        wins = ", ".join(names[t] for t in w["wins"]) or "none"
        losses = ", ".join(names[t] for t in w["losses"]) or "none"
        md.append(f"- r={w['rank']}, T={w['iters']}: QPiSSA > LoftQ on {wins}; not on {losses}")
    if extra:
        md += ["", "```", *[f"{k}: {v}" for k, v in extra.items()], "```"]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    bar_chart(out / "chart.png", types, table, title)
    return {name: out / name for name in ("layers.csv", "summary.csv", "summary.md", "chart.png")}


def model_weights(model: str, dtype: str = "auto", targets: list[str] | None = None,
                  trust_remote_code: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """(full name -> (out, in) weight of each linear layer but the head, resolved path); `targets`
    keeps the layers whose name ends with one of them (or whose type matches one as a regex)."""
    from ..init import linear_modules
    from ..layout import kind_of
    from ..models import check_not_quantized, load_model

    loaded, _, path = load_model(model, dtype, trust_remote_code, tokenizer=False)
    check_not_quantized(loaded)
    modules = linear_modules(loaded)
    if targets:
        modules = {n: m for n, m in modules.items()
                   if any(n.endswith(t) or re.fullmatch(t, layer_type(n)) for t in targets)}
        if not modules:
            raise PissaError(f"no linear layer of {model} matches --targets {targets}; leave it out for all layers")
    return {n: kind_of(m).to_matrix(m.weight).detach() for n, m in modules.items()}, path


def check_ranks_fit(ranks: list[int], weights: dict[str, torch.Tensor]) -> None:
    """A rank above a layer's min(out, in) is skipped for that layer; a rank that fits no layer is refused."""
    largest = max(min(W.shape) for W in weights.values())
    too_big = [r for r in ranks if r > largest]
    if too_big:
        raise PissaError(f"--ranks {', '.join(map(str, too_big))}: larger than every measured layer (the largest "
                         f"allows rank {largest}); choose ranks <= {largest}")


def run_quant_report(model: str, config: ReportConfig, out: str | Path, overwrite: bool = False,
                     dtype: str = "auto", trust_remote_code: bool = False,
                     progress: Callable[[int, int, str], None] | None = None,
                     ) -> tuple[list[dict], dict[str, Path], str]:
    """`pissa quant-report` as a library call: measure every linear layer of `model` (or `config.targets`)
    and write layers.csv, summary.csv, summary.md and chart.png into OUT atomically.
    Returns (per-layer rows, written files, the report's title)."""
    from ..io.atomic import atomic_output_dir, check_output_dir

    out = check_output_dir(out, overwrite, inputs=[model])  # before the (slow) load
    weights, path = model_weights(model, dtype, config.targets, trust_remote_code)
    check_ranks_fit(config.ranks, weights)
    rows = measure(weights.items(), config, total=len(weights), progress=progress)
    spec = config.spec_for(next(iter(weights.values())).dtype)
    svd = "exact SVD" if config.niter is None else f"randomized SVD, niter={config.niter}"
    title = f"{model}: {spec.quant_type}{' + double quant' if spec.double_quant else ''} from {spec.dtype}, {svd}"
    with atomic_output_dir(out, overwrite) as tmp:
        skipped = {r: sum(r > min(W.shape) for W in weights.values()) for r in config.ranks}
        extra = {"model": path, "layers": len(weights),
                 **{f"rank {r}": f"skipped on {n} layers smaller than it" for r, n in skipped.items() if n}}
        files = write_quant_report(tmp, rows, title, extra)
    return rows, {name: out / p.name for name, p in files.items()}, title
