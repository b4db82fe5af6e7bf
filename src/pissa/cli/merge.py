"""`pissa merge`: write a standalone model with an adapter merged in, shard by shard."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, human_bytes, layer_progress, summary_table, user_errors


@app.command("merge")
def merge_command(
    adapter: Path = typer.Argument(..., help="A LoRA adapter folder: converted (`pissa convert`) or trained PiSSA."),
    base: str = typer.Option(
        ..., "--base", "-b", help="The model to merge into: the original model (folder, hub id, embedded name) for a "
                                  "converted adapter, or the `pissa init` folder for a trained PiSSA adapter."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the merged model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
):
    """Merge an adapter into its base and write a standalone model in the base's dtype.

    DoRA adapters are merged as PEFT merges them; modules_to_save copies and trained biases replace the base's.

    Streams one shard at a time, copies config and tokenizer files, rebuilds the shard index.

    Examples:

    \b
      pissa merge out/smol-lora-r32 --base smollm2-135m --out out/smol-merged
      pissa merge runs/smol/adapter --base out/smol-r16 --out out/smol-merged
    """
    from ..convert import merge_adapter

    with user_errors(), layer_progress("merging") as progress:
        result = merge_adapter(adapter, base, out, overwrite, progress)
    console.print(summary_table(f"pissa merge: {adapter} + {base} -> {out}", [
        ("mode", result.mode),
        ("base folder", str(result.base)),
        ("merged layers", str(result.layers)),
        *([("replaced tensors", f"{result.replaced} (modules_to_save copies, trained biases)")] if result.replaced
          else []),
        ("shards", str(result.shards)),
        ("wall time", f"{result.seconds:.1f} s"),
        (str(out), human_bytes(result.size())),
    ]))
