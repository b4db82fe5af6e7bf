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
    init: Path = typer.Option(
        ..., "--init", "-i", help="Where the adapter started: a `pissa init` folder, a PEFT initial adapter (saved "
                                  "before training) or a LLaMA-Factory output holding pissa_init/."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the LoRA adapter."),
    rank: int = typer.Option(
        None, "--rank", "-r", help="Compress every layer to this rank (best approximation, error reported); "
                                   "default: exact, rank 2r."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    init_check: bool = typer.Option(
        True, "--init-check/--no-init-check", help="Refuse an adapter whose factors did not start from --init's."
    ),
    base: str = typer.Option(
        None, "--base", "-b", help="The original model, recorded as the adapter's base_model_name_or_path "
                                   "(default: what --init records; needed when it records none)."
    ),
):
    """Rewrite a trained PiSSA adapter as a LoRA adapter that applies to the ORIGINAL model.

    ΔW = s·(B'A' - BA) becomes a rank-2r LoRA ([A'; A], [B' | -B]), alpha, rsLoRA and patterns handled.

    DoRA magnitudes, modules_to_save copies and trained biases are carried over unchanged.

    --init may be a `pissa init` folder, a PEFT initial adapter or a LLaMA-Factory output (pissa_init/).

    `PeftModel.from_pretrained(original, OUT)` then reproduces the trained model, beside any other adapters.

    Works on the adapter files alone: no model is loaded.

    Examples:

    \b
      pissa convert runs/smol/adapter --init out/smol-r16 --out out/smol-lora-r32
      pissa convert runs/smol/adapter --init out/smol-r16 --out out/smol-lora-r16 --rank 16

      pissa convert peft-run/trained --init peft-run/initial --out out/peft-lora      (PEFT-made PiSSA)

      pissa convert saves/llama3-pissa --init saves/llama3-pissa --out out/lf-lora    (LLaMA-Factory)
    """
    from ..convert import convert_to_lora

    with user_errors(), layer_progress("converting") as progress:
        result = convert_to_lora(trained, init, out, rank, overwrite, init_check, progress, base)
    ranks = sorted({info["rank_out"] for info in result.layers.values()})
    rows = [
        ("init", f"{init} ({result.init_kind})"),
        ("layers", str(len(result.layers))),
        ("rank", f"{', '.join(map(str, ranks))} " + ("(rank 2r, exact)" if rank is None else "(compressed)")),
        ("lora_alpha", f"{result.config['lora_alpha']:g}" + (" (rsLoRA)" if result.config.get("use_rslora") else "")),
        ("base model", str(result.config["base_model_name_or_path"])),
        *carried_rows(result.config),
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


def carried_rows(config: dict) -> list[tuple[str, str]]:
    """What the converted adapter carries beside its factors."""
    rows = []
    if config.get("use_dora"):
        rows.append(("DoRA", "magnitude vectors kept (W + ΔW is the trained matrix, so they stay valid)"))
    if config.get("modules_to_save"):
        rows.append(("modules_to_save", ", ".join(config["modules_to_save"]) + " (copied as trained)"))
    if config.get("bias", "none") != "none":
        rows.append(("bias", f"{config['bias']} (trained biases copied)"))
    return rows
