"""`pissa init`: decompose a model's layers into a residual model + PEFT adapter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from ..init.config import PissaConfig
from ..init.stream import StreamOptions
from .app import app, console, human_bytes, layer_progress, summary_table, user_errors
from .options import config_command, parse_key_values


@config_command(app, "init", {"config": (PissaConfig, ("targets", "options")), "stream": (StreamOptions, ())})
def init_command(
    config: PissaConfig,
    stream: StreamOptions,
    model: str = typer.Argument(..., help="Embedded name (smollm2-135m, minilm-l6), local folder, or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: gets residual/, adapter/, pissa.json."),
    niter: int = typer.Option(None, "--niter", help="Randomized-SVD power iterations (pissa); omit for exact SVD."),
    oversample: int = typer.Option(None, "--oversample", help="Randomized-SVD extra sketch columns (default r)."),
    components: str = typer.Option(
        None, "--components", help="pissa: principal (default), medium, minor, or random singular triplets."
    ),
    option: list[str] = typer.Option([], "--option", help="Any other method option as KEY=VALUE (repeatable)."),
    targets: list[str] = typer.Option(
        [], "--targets", "-t", help="Module names to adapt (repeatable, or several after one flag); default every "
                                    "linear layer but the head."
    ),
    target_regex: str = typer.Option(None, "--target-regex", help="One regex over full module names instead."),
    dtype: str = typer.Option("auto", "--dtype", help="Load and residual dtype: auto (as stored), bf16, fp16, fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code."),
    in_memory: bool = typer.Option(
        False, "--in-memory", help="Load the whole model instead of streaming a local safetensors folder by shards."
    ),
):
    """Initialise PiSSA adapters: W = W_res + B @ A, written as a residual model plus a PEFT adapter.

    Examples:

    \b
      pissa init smollm2-135m --rank 16 --out out/smol-r16
      pissa init meta-llama/Llama-3.1-8B --rank 64 --niter 4 --out out/llama-r64
      pissa init ./my-model --method pissa --components minor --target-regex '.*mlp.*' --out out/minor
      pissa init ./Llama-70B --rank 64 --niter 4 --workers 4 --out out/llama70b-r64   (streams; re-run to resume)
      torchrun --nproc-per-node 8 -m pissa.cli init ./Llama-70B --device cuda --out out/llama70b-r64
      pissa init smollm2-135m --rank 64 --quantize nf4 --quant-iters 5 --out out/qpissa-r64
      pissa init smollm2-135m --rank 64 --quantize nf4 --quant-fit loftq --quant-iters 5 --out out/loftq-r64
    """
    from ..errors import PissaError
    from ..init import run_init

    with user_errors(interrupted="interrupted; re-run the same command to resume (a streamed init keeps its "
                                 "finished shards; an in-memory one wrote nothing)"):
        if targets and target_regex:
            raise PissaError("give either --targets or --target-regex, not both")
        options = parse_key_values(option, "--option")
        for key, value in (("niter", niter), ("oversample", oversample), ("components", components)):
            if value is not None:
                options[key] = value
        config = dataclasses.replace(config, options=options, targets=target_regex or (list(targets) or None))
        with layer_progress("decomposing") as progress:
            result = run_init(model, config, out, overwrite, dtype, trust_remote_code, progress=progress,
                              stream=False if in_memory else None, workers=stream.workers, device=stream.device,
                              resume=stream.resume, batch=stream.batch)
    summary = result.manifest["summary"]
    console.print(summary_table(f"pissa init: {model} -> {out}", [
        ("method", f"{config.method} {config.options or ''}".strip()),
        ("layers", str(summary["layers"])),
        ("ranks", ", ".join(map(str, summary["ranks"]))),
        ("trainable params", f"{result.trainable_params:,}"),
        recon_row(config, summary),
        *quant_rows(result.manifest),
        *stream_rows(result.manifest),
        ("wall time", f"{result.seconds:.1f} s"),
        *[(f"{out / name}", human_bytes(size)) for name, size in result.sizes().items()],
    ]))


def recon_row(config: PissaConfig, summary: dict) -> tuple[str, str]:
    """max |residual + B A - W|: an identity up to the storage cast, except for LoftQ, whose residual is not W - B A."""
    err = f"{summary['max_recon_abs_err']:.3g}"
    if config.quantize is not None and config.quant_fit == "loftq":
        return ("max |residual + BA - W|", f"{err} (LoftQ fits Q(residual) + BA ~ W instead; see quant error)")
    return ("max reconstruction error", f"{err} (after cast to storage dtype)")


def quant_rows(manifest: dict) -> list[tuple[str, str]]:
    """Summary-table rows of a `pissa init --quantize` manifest (none without quantization)."""
    record = manifest.get("quantization")
    if not record:
        return []
    reductions = [info["quant"]["reduction_fro_pct"] for info in manifest["layers"].values()]
    dq = "on" if record["double_quant"] else "off"
    return [
        ("quantization", f"{record.get('fit', 'qpissa')} fit, {record['quant_type']} from {record['dtype']}, "
                         f"T={record['iters']}, double quant {dq}, blocksize {record['blocksize']}, "
                         f"compute {record['compute_dtype']}"),
        ("quant error vs QLoRA", f"{sum(reductions) / len(reductions):.1f}% lower (Frobenius, mean over layers; "
                                 f"min {min(reductions):.1f}%, max {max(reductions):.1f}%)"),
        ("load in 4-bit with", "from_pretrained(OUT/residual, **pissa.quant.load_kwargs(OUT/residual))"),
    ]


def stream_rows(manifest: dict) -> list[tuple[str, str]]:
    """How the run went: streamed (shards, workers, ranks, resumed) or in memory."""
    st = manifest.get("stream")
    if not st:
        return [("mode", "in memory")]
    return [("mode", f"streamed: {st['shards']} shard(s), {st['workers']} worker(s) x {st['world_size']} rank(s), "
                     f"{st['device']}, {st['resumed_shards']} shard(s) resumed")]
