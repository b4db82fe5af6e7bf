"""`pissa eval`: greedy generation, answer extraction, exact-match accuracy and perplexity."""

from __future__ import annotations

from pathlib import Path

import typer

from ..eval.scoring import EvalConfig
from .app import app, console, layer_progress, summary_table, user_errors
from .options import config_command


@config_command(app, "eval", {"config": (EvalConfig, ())})
def eval_command(
    config: EvalConfig,
    run_or_model: str = typer.Argument(
        ..., help="A `pissa init` folder, a training run or adapter folder, or a model (embedded name, folder, hub id)."
    ),
    data: str = typer.Option("arith", "--data", "-d", help="arith[:test|:train] (bundled, offline; arith = its test "
                             "split), a JSON/JSONL file, or a hub dataset NAME[@CONFIG][:SPLIT], e.g. "
                             "openai/gsm8k@main:test (needs `datasets` + network)."),
    adapter: Path = typer.Option(None, "--adapter", "-a", help="A PEFT adapter folder to apply on the model."),
    out: Path = typer.Option(None, "--out", "-o", help="Results folder (default RUN/eval/<data>-<task>)."),
    dtype: str = typer.Option("auto", "--dtype", help="Load dtype: auto (as stored), bf16, fp16, fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing results folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code."),
):
    """Evaluate a model or a fine-tuned adapter: accuracy (answer extraction + exact match) and perplexity;
    a classifier (pissa train --task classify | image-classify): accuracy, macro F1, Matthews correlation.

    Examples:

    \b
      pissa eval smollm2-135m --data arith --limit 50 --max-new-tokens 128
      pissa eval out/smol-r16 --data arith:test        # a `pissa init` folder: residual + adapter
      pissa eval smollm2-135m --adapter runs/lora/adapter --data gsm8k_test.jsonl --task gsm8k
      pissa eval ./my-model --data math_test.jsonl --task math --backend vllm
      pissa eval runs/cls --data sst_test.jsonl        # a classifier: accuracy, macro F1, Matthews correlation
      pissa eval runs/vit --data images_test/          # an image classifier on a folder tree ROOT/<label>/<image>
    """
    from ..eval import run_eval

    task = config.task
    with user_errors():
        with layer_progress("evaluating") as progress:
            result, out_dir, target = run_eval(run_or_model, data, config, adapter, out, overwrite, dtype,
                                               trust_remote_code, progress)
    console.print(summary_table(f"pissa eval: {run_or_model} on {data} ({getattr(result, 'task', task)})", [
        ("model", target.model),
        ("adapter", str(target.adapter) if target.adapter else "none"),
        ("accuracy", f"{result.accuracy:.2%} ({result.correct}/{result.total} "
                     f"{'correct' if hasattr(result, 'mcc') else 'exact match'})"),
        *([("macro F1", f"{result.f1:.4f}"), ("Matthews correlation", f"{result.mcc:.4f}")]
          if hasattr(result, "mcc") else []),
        ("perplexity", f"{result.perplexity:.3f}" if result.perplexity is not None else "skipped"),
        ("backend", result.backend),
        ("wall time", f"{result.seconds:.1f} s"),
        ("results", f"{out_dir / 'eval.json'}, {out_dir / 'predictions.jsonl'}"),
    ]))
