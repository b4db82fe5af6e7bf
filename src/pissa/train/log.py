"""Training logs: one record per optimizer step to JSONL, CSV and TensorBoard, and a progress hook.
Used by the recipe as `transformers` TrainerCallbacks.

On resume, records after the checkpoint's step are dropped before training continues, so the
files show the same curve as an uninterrupted run (no duplicated or orphaned steps).
"""

from __future__ import annotations

import csv
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from ..io.jsonfile import read_jsonl
from ..layout import LOG_CSV, LOG_JSONL, TENSORBOARD_DIR

FIELDS = ["step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "step_s", "epoch"]
# Extra columns per stage: column -> the key TRL logs it under.
STAGE_FIELDS = {"sft": {}, "dpo": {"margin": "rewards/margins", "reward_accuracy": "rewards/accuracies"}}


def read_log(run: str | Path) -> list[dict]:
    """The per-step records of a run folder (empty if it has none yet)."""
    path = Path(run) / LOG_JSONL
    return read_jsonl(path) if path.exists() else []


def _rewrite(run: Path, records: list[dict], fields: list[str]) -> None:
    (run / LOG_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records))
    with open(run / LOG_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


class MetricsLogger(TrainerCallback):
    """Writes {step, loss, grad_norm, lr, tokens, tokens_per_s, step_s, epoch} for every logged step, and for
    DPO the reward margin (chosen minus rejected) and accuracy (share of pairs with a positive margin)."""

    def __init__(self, run: str | Path, tensorboard: bool = True, stage: str = "sft"):
        self.run = Path(run)
        self.tensorboard = tensorboard
        self.extra = STAGE_FIELDS[stage]
        self.fields = FIELDS + list(self.extra)
        self.writer = None
        self.last_time = self.last_tokens = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.run.mkdir(parents=True, exist_ok=True)
        # Resumed runs: keep only the steps the checkpoint actually reached.
        _rewrite(self.run, [r for r in read_log(self.run) if r["step"] <= state.global_step], self.fields)
        self.writer = self._open_tensorboard(state.global_step) if self.tensorboard else None
        self.last_time, self.last_tokens = time.perf_counter(), state.num_input_tokens_seen

    def _open_tensorboard(self, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed, so no TensorBoard logs are written "
                          "(`pip install tensorboard`); JSONL and CSV logs are unaffected", stacklevel=2)
            return None
        # purge_step drops events after the checkpoint when resuming, as the JSONL rewrite does.
        return SummaryWriter(str(self.run / TENSORBOARD_DIR), purge_step=step + 1 if step else None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        elapsed = now - self.last_time
        record = {
            "step": state.global_step,
            "loss": logs["loss"],
            "grad_norm": logs.get("grad_norm"),
            "lr": logs.get("learning_rate"),
            "tokens": tokens,
            "tokens_per_s": (tokens - self.last_tokens) / elapsed if elapsed > 0 else None,
            "step_s": elapsed / max(1, args.logging_steps),
            "epoch": state.epoch,
            **{column: logs.get(key) for column, key in self.extra.items()},
        }
        self.last_time, self.last_tokens = now, tokens
        with open(self.run / LOG_JSONL, "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.run / LOG_CSV, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(record)
        if self.writer is not None:
            for key in ("loss", "grad_norm", "lr", "tokens_per_s", *self.extra):
                if record[key] is not None:
                    self.writer.add_scalar(f"train/{key}", record[key], record["step"])
            self.writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressHook(TrainerCallback):
    """Calls `progress(step, max_steps, loss)` after every logged step (drives a rich bar in the CLI)."""

    def __init__(self, progress: Callable[[int, int, float | None], None]):
        self.progress = progress

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress(state.global_step, state.max_steps, None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self.progress(state.global_step, state.max_steps, logs["loss"])
