"""`pissa train`: supervised fine-tuning (loss on response tokens) with full FT, LoRA or PiSSA adapters."""

from __future__ import annotations

from pathlib import Path

import typer

from ..adapters import fields_help
from ..train import TrainConfig
from .app import app, console, err_console, human_bytes, summary_table, user_errors

H = fields_help(TrainConfig)


@app.command("train")
def train_command(
    out: Path = typer.Option(..., "--out", "-o", help=H["out"]),
    model: str = typer.Option(None, "--model", help=H["model"]),
    init: str = typer.Option(None, "--init", help=H["init"]),
    method: str = typer.Option(None, "--method", "-m", help=H["method"]),
    dora: bool = typer.Option(False, "--dora", help=H["dora"]),
    train_singular_values: bool = typer.Option(False, "--train-singular-values", help=H["train_singular_values"]),
    orth_reg_weight: float = typer.Option(0.1, "--orth-reg-weight", help=H["orth_reg_weight"]),
    data: str = typer.Option("arith", "--data", "-d", help=H["data"]),
    limit: int = typer.Option(None, "--limit", help=H["limit"]),
    max_length: int = typer.Option(512, "--max-length", help=H["max_length"]),
    rank: int = typer.Option(16, "--rank", "-r", help=H["rank"]),
    alpha: float = typer.Option(None, "--alpha", help=H["alpha"]),
    targets: list[str] = typer.Option([], "--targets", "-t", help=H["targets"] + " Repeatable."),
    niter: int = typer.Option(None, "--niter", help=H["niter"]),
    quant_type: str = typer.Option("nf4", "--quant-type", help=H["quant_type"]),
    quant_iters: int = typer.Option(5, "--quant-iters", help=H["quant_iters"]),
    lr: float = typer.Option(2e-5, "--lr", help=H["lr"]),
    scheduler: str = typer.Option("cosine", "--scheduler", help=H["scheduler"]),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio", help=H["warmup_ratio"]),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help=H["weight_decay"]),
    epochs: float = typer.Option(1.0, "--epochs", help=H["epochs"]),
    max_steps: int = typer.Option(-1, "--max-steps", help=H["max_steps"]),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help=H["batch_size"]),
    grad_accum: int = typer.Option(1, "--grad-accum", help=H["grad_accum"]),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help=H["max_grad_norm"]),
    precision: str = typer.Option("fp32", "--precision", help=H["precision"]),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help=H["gradient_checkpointing"]),
    seed: int = typer.Option(0, "--seed", help=H["seed"]),
    save_steps: int = typer.Option(0, "--save-steps", help=H["save_steps"]),
    save_total_limit: int = typer.Option(2, "--save-total-limit", help=H["save_total_limit"]),
    save_residual: bool = typer.Option(True, "--save-residual/--no-save-residual", help=H["save_residual"]),
    tensorboard: bool = typer.Option(True, "--tensorboard/--no-tensorboard", help=H["tensorboard"]),
    convert_at_end: bool = typer.Option(False, "--convert-at-end", help=H["convert_at_end"]),
    resume: bool = typer.Option(False, "--resume", help=H["resume"]),
    overwrite: bool = typer.Option(False, "--overwrite", help=H["overwrite"]),
):
    """Fine-tune with the loss on response tokens only; paper defaults (AdamW, lr 2e-5, cosine, warmup 0.03).

    Examples:

      pissa train --model smollm2-135m --method pissa --rank 16 --max-steps 200 --out runs/pissa

      pissa init smollm2-135m --rank 16 --out out/smol-r16 && pissa train --init out/smol-r16 --out runs/from-init

      pissa train --model smollm2-135m --method lora --lr 2e-4 --data my.jsonl --epochs 3 --out runs/lora

      pissa train --model smollm2-135m --method pissa --train-singular-values --max-steps 200 --out runs/pissa-sv

      accelerate launch --multi_gpu --num_processes 2 "$(which pissa)" train --model smollm2-135m --out runs/ddp

      torchrun --nproc_per_node 2 "$(which pissa)" train --model smollm2-135m --out runs/ddp-cpu   # CPU, gloo

      pissa train --model smollm2-135m --method pissa --max-steps 200 --save-steps 50 --out runs/pissa --resume

    The bundled `arith` dataset (the default --data) is synthetic: generated grade-school arithmetic
    word problems, for demos and tests.
    """
    from ..train import SFTRecipe

    with user_errors():
        config = TrainConfig(
            out=str(out), model=model, init=init, method=method, dora=dora,
            train_singular_values=train_singular_values, orth_reg_weight=orth_reg_weight, data=data, limit=limit,
            max_length=max_length, rank=rank, alpha=alpha, targets=list(targets) or None, niter=niter,
            quant_type=quant_type, quant_iters=quant_iters, lr=lr,
            scheduler=scheduler, warmup_ratio=warmup_ratio, weight_decay=weight_decay, epochs=epochs,
            max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
            precision=precision, gradient_checkpointing=gradient_checkpointing, seed=seed, save_steps=save_steps,
            save_total_limit=save_total_limit, save_residual=save_residual, tensorboard=tensorboard,
            convert_at_end=convert_at_end, resume=resume, overwrite=overwrite,
        )
        with step_progress() as progress:
            recipe = SFTRecipe(config, progress=progress)
            summary = recipe.run()
    if summary:  # only the main process prints
        console.print(summary_table(f"pissa train: {summary['method']} -> {out}", summary_rows(summary, out)))


def summary_rows(summary: dict, out: Path) -> list[tuple[str, str]]:
    from ..checkpoint.atomic import dir_size

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    rows = [
        ("method", summary["method"]),
        ("data", f"{summary['examples']:,} examples ({summary['data_format']}), "
                 f"{summary['dropped_too_long']} dropped as too long"),
        ("steps", str(summary["steps"])),
        ("loss first -> last", f"{fmt(summary['first_loss'], '.4f')} -> {fmt(summary['final_loss'], '.4f')}"),
        ("trainable params", f"{summary['trainable_params']:,}"),
        ("tokens/s (median step)", fmt(summary["tokens_per_s_median"], ",.0f")),
        ("wall time", f"{summary['train_seconds']:.1f} s"),
    ]
    for name in ("adapter", "model", "residual", "init_adapter", "log.jsonl", "loss.png"):
        if (out / name).exists():
            rows.append((str(out / name), human_bytes(dir_size(out / name))))
    return rows


class step_progress:
    """A rich bar over optimizer steps showing the last loss; a context manager yielding the callback."""

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}"), console=err_console,
                            transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task("training", total=None, loss="-")
        return self.update

    def update(self, step: int, total: int, loss: float | None) -> None:
        self.bar.update(self.task, completed=step, total=total, loss="-" if loss is None else f"{loss:.4f}")

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)
