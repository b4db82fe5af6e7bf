"""`pissa export`: a LoRA adapter rewritten for a serving engine (vLLM, SGLang, TGI), with a parity check."""

from __future__ import annotations

from pathlib import Path

import typer

from ..convert.export import ExportConfig
from ..layout import EXPORT_FILE
from .app import app, console, human_bytes, layer_progress, summary_table, user_errors
from .options import config_command

WORST_SHOWN = 5


@config_command(app, "export", {"config": (ExportConfig, ())})
def export_command(
    config: ExportConfig,
    adapter: Path = typer.Argument(..., help="A LoRA adapter for the original model (e.g. from `pissa convert`), "
                                             "or a trained PiSSA adapter with --init."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: the adapter the engine loads."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
):
    """Export an adapter that a serving engine loads as it is, and print the command that serves it.

    Engines read only the global r and lora_alpha: each layer's scale is folded into B, and r = lora_alpha.

    Every layer gets one rank from the engine's set: zero-padded (exact), or its best approximation (--rank).

    DoRA, and modules_to_save or biases that differ from the base's, are refused: serve the merged model.

    A parity check compares the exported adapter, read as the engine reads it, with the merged model.

    Examples:

      pissa export out/smol-lora --for vllm --base smollm2-135m --out out/smol-vllm

      pissa export runs/smol/adapter --init out/smol-r16 --for vllm --out out/smol-vllm   (convert first)

      pissa export out/llama-lora-r160 --for vllm --rank 128 --out out/llama-vllm-r128   (compress 160 -> 128)

      pissa export out/llama-lora --for sglang --out out/llama-sglang
    """
    from ..convert import export_adapter

    with user_errors(), layer_progress("exporting") as progress:
        result = export_adapter(adapter, out, config, overwrite, progress)
    actions = [info["action"] for info in result.layers.values()]
    counts = ", ".join(f"{actions.count(a)} {a}" for a in ("kept", "padded", "compressed") if a in actions)
    rows = [
        ("engine", result.engine.title),
        ("base model", result.base),
        ("rank", f"{result.rank} for every layer, lora_alpha {result.rank} (scale 1, folded into B); {counts}"),
    ]
    if "compressed" in actions:
        worst = sorted(result.layers.items(), key=lambda kv: -kv[1]["rel_err"])[:WORST_SHOWN]
        rows.append(("max relative error", f"{result.max_rel_err:.3g} (‖ΔW - ΔW_r‖_F / ‖ΔW‖_F)"))
        rows += [(f"  {name}", f"{info['rel_err']:.3g}") for name, info in worst]
    if result.dropped:
        rows.append(("left out (equal to the base)", f"{len(result.dropped)} tensors, e.g. {result.dropped[0]}"))
    if result.parity is not None:
        p = result.parity
        rows.append(("parity vs merged model", f"max |Δlogit| {p['max_abs_logit_diff']:.3g} (largest |logit| "
                                               f"{p['max_abs_logit']:.3g}, adapter effect "
                                               f"{p['max_abs_adapter_effect']:.3g}; {p['sequences']}x{p['length']} "
                                               f"tokens, config read as {result.engine.title} reads it)"))
    rows += [("wall time", f"{result.seconds:.1f} s"), (str(out), human_bytes(result.size()))]
    console.print(summary_table(f"pissa export: {adapter} -> {out}", rows))
    console.print(f"details: {out / EXPORT_FILE}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print("serve it with:")
    console.print(result.command, soft_wrap=True, markup=False, highlight=False)
