"""How much of a model the targets adapt: the share of its matrix weights (every parameter with two or more
dimensions: linear layers, fused expert tensors, routers, embeddings and the head; tied ones counted once) that
got an adapter, by parameter count, and what the rest is. Read from the meta model, so both init paths and the
summary agree before any work is done."""

from __future__ import annotations

import re

from torch import nn

from .experts import router_modules

WARN_UNTOUCHED = 0.5  # warn when the targets leave half or more of the matrix weights without adapters


def group_of(name: str, routers: set[str]) -> str:
    """A short label for a parameter: its module's leaf name (`q_proj`, `embed_tokens`), `experts.gate_up_proj`
    for a fused tensor, marked `(router)` for MoE routers and gates."""
    module, _, param = name.rpartition(".")
    if module in routers:
        return f"{module.rsplit('.', 1)[-1]} (router)"
    leaf = module.rsplit(".", 1)[-1] if module else param
    label = leaf if param in ("weight", "") else f"{leaf}.{param}"
    return re.sub(r"^\d+$", module, label)


def coverage(model: nn.Module, targets) -> dict:
    """{matrix_params, adapted_params, share, untouched: {group: share}, left_out, warning} for `targets`
    (an `init.targets.Targets`) on `model` (live or meta, not yet wrapped by PEFT)."""
    modules = dict(model.named_modules())
    adapted_ids = {id(modules[n].weight) for n in targets.modules}
    params = dict(model.named_parameters())
    adapted_ids |= {id(params[k]) for k in targets.experts}
    routers = set(router_modules(model))
    total = adapted = 0
    untouched: dict[str, int] = {}
    for name, p in params.items():  # named_parameters() lists a tied weight once
        if p.ndim < 2:
            continue
        total += p.numel()
        if id(p) in adapted_ids:
            adapted += p.numel()
        else:
            group = group_of(name, routers)
            untouched[group] = untouched.get(group, 0) + p.numel()
    shares = {g: n / total for g, n in sorted(untouched.items(), key=lambda kv: -kv[1])}
    left = 1 - adapted / total if total else 0.0
    warning = None
    if total and left >= WARN_UNTOUCHED:
        top = ", ".join(f"{g} {s:.0%}" for g, s in list(shares.items())[:4])
        warning = (f"the targets leave {left:.0%} of the model's matrix weights without adapters ({top}); "
                   "widen --targets if that is not what you want")
    return {"matrix_params": total, "adapted_params": adapted, "share": adapted / total if total else 0.0,
            "untouched": shares, "left_out": dict(targets.left_out), "warning": warning}


def coverage_rows(record: dict | None) -> list[tuple[str, str]]:
    """Summary-table rows of a manifest's coverage record."""
    if not record:
        return []
    untouched = ", ".join(f"{g} {s:.1%}" for g, s in list(record["untouched"].items())[:5]) or "none"
    rows = [("coverage", f"{record['share']:.1%} of matrix weights adapted "
                         f"({record['adapted_params']:,} of {record['matrix_params']:,}); untouched: {untouched}")]
    reasons: dict[str, list[str]] = {}
    for name, why in record.get("left_out", {}).items():
        reasons.setdefault(why, []).append(name)
    rows += [("not targeted", f"{len(names)} x {why}: {', '.join(names[:2])}{', ...' if len(names) > 2 else ''}")
             for why, names in reasons.items()]
    if record.get("warning"):
        rows.append(("WARNING", record["warning"]))
    return rows
