"""`pissa init`: decompose a model's layers into a residual model + PEFT adapter."""

from __future__ import annotations

from pathlib import Path

import typer

from ..adapters import PissaConfig, fields_help
from ..quant.report import quant_rows
from .app import app, console, human_bytes, layer_progress, parse_key_values, summary_table, user_errors

H = fields_help(PissaConfig)


@app.command("init")
def init_command(
    model: str = typer.Argument(..., help="Embedded name (smollm2-135m, minilm-l6), local folder, or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: gets residual/, adapter/, pissa.json."),
    rank: int = typer.Option(16, "--rank", "-r", help=H["rank"]),
    alpha: float = typer.Option(None, "--alpha", help=H["alpha"]),
    method: str = typer.Option("pissa", "--method", "-m", help=H["method"]),
    niter: int = typer.Option(None, "--niter", help="Randomized-SVD power iterations (pissa); omit for exact SVD."),
    oversample: int = typer.Option(None, "--oversample", help="Randomized-SVD extra sketch columns (default r)."),
    components: str = typer.Option(
        None, "--components", help="pissa: principal (default), medium, minor, or random singular triplets."
    ),
    option: list[str] = typer.Option([], "--option", help="Any other method option as KEY=VALUE (repeatable)."),
    targets: list[str] = typer.Option(
        [], "--targets", "-t", help="Module names to adapt (repeatable); default every linear layer but the head."
    ),
    target_regex: str = typer.Option(None, "--target-regex", help="One regex over full module names instead."),
    rank_pattern: list[str] = typer.Option([], "--rank-pattern", help="Per-layer rank override PATTERN=RANK."),
    use_rslora: bool = typer.Option(False, "--rslora", help=H["use_rslora"]),
    seed: int = typer.Option(0, "--seed", help=H["seed"]),
    adapter_dtype: str = typer.Option("float32", "--adapter-dtype", help=H["adapter_dtype"]),
    quantize: str = typer.Option(None, "--quantize", "-q", help=H["quantize"]),
    quant_fit: str = typer.Option("qpissa", "--quant-fit", help=H["quant_fit"]),
    quant_iters: int = typer.Option(5, "--quant-iters", help=H["quant_iters"]),
    double_quant: bool = typer.Option(False, "--double-quant", help=H["double_quant"]),
    quant_storage: str = typer.Option("uint8", "--quant-storage", help=H["quant_storage"]),
    compute_dtype: str = typer.Option(None, "--compute-dtype", help=H["compute_dtype"]),
    dtype: str = typer.Option("auto", "--dtype", help="Load and residual dtype: auto (as stored), bf16, fp16, fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code."),
    in_memory: bool = typer.Option(
        False, "--in-memory", help="Load the whole model instead of streaming a local safetensors folder by shards."
    ),
    workers: int = typer.Option(1, "--workers", help="Streaming: processes that decompose shards in parallel."),
    device: str = typer.Option("cpu", "--device", help="Streaming: where the SVDs run (cpu, cuda; each rank's GPU)."),
    resume: bool = typer.Option(
        True, "--resume/--restart", help="Streaming: continue an interrupted run into the same --out, or start over."
    ),
    batch_same_shape: bool = typer.Option(
        None, "--batch-same-shape/--no-batch-same-shape",
        help="Streaming: decompose a shard's same-shape weights in batched calls (default: on with --device cuda, "
             "off on the CPU, where it costs memory).",
    ),
):
    """Initialise PiSSA adapters: W = W_res + B @ A, written as a residual model plus a PEFT adapter.

    Examples:

      pissa init smollm2-135m --rank 16 --out out/smol-r16

      pissa init meta-llama/Llama-3.1-8B --rank 64 --niter 4 --out out/llama-r64

      pissa init ./my-model --method pissa --components minor --target-regex '.*mlp.*' --out out/minor

      pissa init ./Llama-70B --rank 64 --niter 4 --workers 4 --out out/llama70b-r64   (streams; re-run to resume)

      torchrun --nproc-per-node 8 -m pissa.cli init ./Llama-70B --device cuda --out out/llama70b-r64

      pissa init smollm2-135m --rank 64 --quantize nf4 --quant-iters 5 --out out/qpissa-r64

      pissa init smollm2-135m --rank 64 --quantize nf4 --quant-fit loftq --quant-iters 5 --out out/loftq-r64
    """
    from ..initialize import run_init

    with user_errors():
        if targets and target_regex:
            from ..errors import PissaError

            raise PissaError("give either --targets or --target-regex, not both")
        options = parse_key_values(option, "--option")
        for key, value in (("niter", niter), ("oversample", oversample), ("components", components)):
            if value is not None:
                options[key] = value
        config = PissaConfig(
            rank=rank,
            alpha=alpha,
            method=method,
            options=options,
            targets=target_regex or (list(targets) or None),
            rank_pattern={k: int(v) for k, v in parse_key_values(rank_pattern, "--rank-pattern").items()},
            use_rslora=use_rslora,
            seed=seed,
            adapter_dtype=adapter_dtype,
            quantize=quantize,
            quant_fit=quant_fit,
            quant_iters=quant_iters,
            double_quant=double_quant,
            quant_storage=quant_storage,
            compute_dtype=compute_dtype,
        )
        with layer_progress("decomposing") as progress:
            result = run_init(model, config, out, overwrite, dtype, trust_remote_code, progress=progress,
                              stream=False if in_memory else None, workers=workers, device=device, resume=resume,
                              batch=batch_same_shape)
    summary = result.manifest["summary"]
    sizes = result.sizes()
    console.print(summary_table(f"pissa init: {model} -> {out}", [
        ("method", f"{config.method} {config.options or ''}".strip()),
        ("layers", str(summary["layers"])),
        ("ranks", ", ".join(map(str, summary["ranks"]))),
        ("trainable params", f"{result.trainable_params:,}"),
        recon_row(config, summary),
        *quant_rows(result.manifest),
        *stream_rows(result.manifest),
        ("wall time", f"{result.seconds:.1f} s"),
        *[(f"{out / name}", human_bytes(size)) for name, size in sizes.items()],
    ]))


def recon_row(config: PissaConfig, summary: dict) -> tuple[str, str]:
    """max |residual + B A - W|: an identity up to the storage cast, except for LoftQ, whose residual is not W - B A."""
    err = f"{summary['max_recon_abs_err']:.3g}"
    if config.quantize is not None and config.quant_fit == "loftq":
        return ("max |residual + BA - W|", f"{err} (LoftQ fits Q(residual) + BA ~ W instead; see quant error)")
    return ("max reconstruction error", f"{err} (after cast to storage dtype)")


def stream_rows(manifest: dict) -> list[tuple[str, str]]:
    """How the run went: streamed (shards, workers, ranks, resumed) or in memory."""
    st = manifest.get("stream")
    if not st:
        return [("mode", "in memory")]
    return [("mode", f"streamed: {st['shards']} shard(s), {st['workers']} worker(s) x {st['world_size']} rank(s), "
                     f"{st['device']}, {st['resumed_shards']} shard(s) resumed")]
