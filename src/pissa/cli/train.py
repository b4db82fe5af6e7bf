"""`pissa train`: supervised fine-tuning (loss on the answers) or DPO, with full FT, LoRA or PiSSA adapters."""

from __future__ import annotations

from pathlib import Path

from ..layout import RunDir
from ..train.config import TrainConfig
from .app import app, console, err_console, human_bytes, summary_table, user_errors
from .options import config_command


@config_command(app, "train", {"config": (TrainConfig, ())})
def train_command(config: TrainConfig):
    """Fine-tune on TRL. --stage sft: the loss on the answers only (every
    assistant turn of a chat). --stage dpo: preference tuning against the model
    before training. Paper defaults (AdamW, lr 2e-5, cosine, warmup 0.03).

    Examples:

    \b
      pissa train --model smollm2-135m --method pissa --rank 16 --max-steps 200 --out runs/pissa
      pissa init smollm2-135m --rank 16 --out out/smol-r16 && pissa train --init out/smol-r16 --out runs/from-init
      pissa train --model smollm2-135m --method lora --lr 2e-4 --data chats.jsonl --epochs 3 --out runs/lora
      pissa train --init out/smol-r16 --data chats.jsonl --packing --max-length 2048 --out runs/packed
      pissa train --init out/smol-r16 --stage dpo --data prefs.jsonl --beta 0.1 --lr 5e-6 --out runs/dpo
      pissa train --model smollm2-135m --method pissa --train-singular-values --max-steps 200 --out runs/pissa-sv
      accelerate launch --multi_gpu --num_processes 2 "$(which pissa)" train --model smollm2-135m --out runs/ddp
      torchrun --nproc_per_node 2 "$(which pissa)" train --model smollm2-135m --out runs/ddp-cpu   # CPU, gloo
      pissa train --model smollm2-135m --method pissa --max-steps 200 --save-steps 50 --out runs/pissa --resume
      pissa train --task classify --model minilm-l6 --method pissa --rank 8 --lr 2e-4 --data sst.jsonl --out runs/cls
      pissa train --task image-classify --model ./vit --method pissa --data images/ --epochs 3 --out runs/vit

    Data (a .json/.jsonl file; the format is read from the first record):
    chat `messages`, ShareGPT `conversations`, prompt/completion, Alpaca,
    MetaMathQA, GSM8K question/answer, MATH, `text`; dpo: prompt/chosen/rejected.
    The bundled `arith` set (the default --data) is synthetic: generated
    arithmetic word problems, for demos and tests (dpo: the right answer is
    chosen, a wrong final answer rejected). --task classify: `text` (+
    `text_pair`) / `label` records in .jsonl/.json/.csv or a hub dataset;
    --task image-classify: a folder tree ROOT/<label>/<image> or an .npz with
    `images` and `labels`.
    """
    from ..train import recipe_for

    out = Path(config.out)
    with user_errors(interrupted=f"interrupted; re-run with --resume to continue from the last checkpoint in "
                                 f"{out / 'checkpoints'} (written every --save-steps), or with --overwrite to start "
                                 "again"):
        with step_progress() as progress:
            recipe = recipe_for(config, progress=progress)
            summary = recipe.run()
    if summary:  # only the main process prints
        console.print(summary_table(f"pissa train: {summary['method']} -> {out}", summary_rows(summary, out)))


def summary_rows(summary: dict, out: Path) -> list[tuple[str, str]]:
    from ..io.atomic import dir_size

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    rows = [
        ("method", f"{summary['method']} ({summary['stage']})"),
        ("data", f"{summary['examples']:,} examples ({summary['data_format']}: {summary['data_layout']}), "
                 f"{summary['dropped_too_long']} dropped as too long"),
        ("steps", str(summary["steps"])),
        ("loss first -> last", f"{fmt(summary['first_loss'], '.4f')} -> {fmt(summary['final_loss'], '.4f')}"),
        *([("loss tokens", f"{summary['loss_tokens']:,}")] if summary.get("loss_tokens") is not None else []),
        *([("reward margin first -> last",
            f"{fmt(summary['first_margin'], '.4f')} -> {fmt(summary['final_margin'], '.4f')}")]
          if summary["stage"] == "dpo" else []),
        ("trainable params", f"{summary['trainable_params']:,}"),
        ("tokens/s (median step)", fmt(summary["tokens_per_s_median"], ",.0f")),
        ("wall time", f"{summary['train_seconds']:.1f} s"),
    ]
    run = RunDir(out)
    for path in (run.adapter, run.model, run.residual, run.init.root, run.base, run.log_jsonl, run.loss_png):
        if path.exists():
            rows.append((str(path), human_bytes(dir_size(path))))
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
