"""`pissa convert`: a trained PiSSA adapter -> a plain LoRA adapter on the original model."""

from __future__ import annotations

from pathlib import Path

import typer

from ..layout import CONVERSION_FILE
from .app import app, console, human_bytes, layer_progress, summary_table, user_errors

WORST_SHOWN = 5


@app.command("convert")
def convert_command(
    trained: Path = typer.Argument(..., help="The trained PiSSA adapter folder (adapter_config.json + weights)."),
    init: Path = typer.Option(..., "--init", "-i", help="The `pissa init` folder the adapter was trained from."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the LoRA adapter."),
    rank: int = typer.Option(
        None, "--rank", "-r", help="Compress every layer to this rank (best approximation, error reported); "
                                   "default: exact, rank 2r."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    init_check: bool = typer.Option(
        True, "--init-check/--no-init-check", help="Refuse an adapter whose factors did not start from --init's."
    ),
):
    """Rewrite a trained PiSSA adapter as a LoRA adapter that applies to the ORIGINAL model.

    ΔW = s·(B'A' - BA) becomes a rank-2r LoRA ([A'; A], [B' | -B]), alpha and rsLoRA handled.

    `PeftModel.from_pretrained(original, OUT)` then reproduces the trained model, beside any other adapters.

    Works on the adapter files alone: no model is loaded.

    Examples:

    \b
      pissa convert runs/smol/adapter --init out/smol-r16 --out out/smol-lora-r32
      pissa convert runs/smol/adapter --init out/smol-r16 --out out/smol-lora-r16 --rank 16
    """
    from ..convert import convert_to_lora

    with user_errors(), layer_progress("converting") as progress:
        result = convert_to_lora(trained, init, out, rank, overwrite, init_check, progress)
    ranks = sorted({info["rank_out"] for info in result.layers.values()})
    rows = [
        ("layers", str(len(result.layers))),
        ("rank", f"{', '.join(map(str, ranks))} " + ("(rank 2r, exact)" if rank is None else "(compressed)")),
        ("lora_alpha", f"{result.config['lora_alpha']:g}" + (" (rsLoRA)" if result.config.get("use_rslora") else "")),
        ("base model", str(result.config["base_model_name_or_path"])),
    ]
    if rank is not None:
        worst = sorted(result.layers.items(), key=lambda kv: -kv[1]["rel_err"])[:WORST_SHOWN]
        rows.append(("max relative error", f"{result.max_rel_err:.3g} (‖ΔW - ΔW_r‖_F / ‖ΔW‖_F)"))
        rows += [(f"  {name}", f"{info['rel_err']:.3g}") for name, info in worst]
    rows += [("wall time", f"{result.seconds:.1f} s"), (str(out), human_bytes(result.size()))]
    console.print(summary_table(f"pissa convert: {trained} -> {out}", rows))
    console.print(f"per-layer errors: {out / CONVERSION_FILE}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
