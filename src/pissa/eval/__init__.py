"""Evaluation as in the paper: answer extraction (`answers`), eval sets (`data`), greedy generation
(`generate`), accuracy and perplexity (`evaluate`), and what a run, init or adapter folder means to
evaluate (`run`)."""

from .run import run_eval
from .scoring import EvalConfig, EvalResult, evaluate

__all__ = ["EvalConfig", "EvalResult", "evaluate", "run_eval"]
