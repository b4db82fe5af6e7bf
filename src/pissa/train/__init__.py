"""Training: `TrainConfig`, training methods as data (`methods`), the recipe on TRL (`recipe`: SFT or DPO,
`trainers`: what pissa adds to TRL's trainers, `save`), per-step logs (`log`), and PiSSA with trainable
singular values; `classify`: the recipe on a sequence or image classifier.

The recipe is imported on first use: it loads transformers' Trainer, and with it peft and bitsandbytes
(seconds), which the command line's other verbs, and `pissa train --help`, never need."""

from __future__ import annotations

import importlib

from ..data.tasks import get_task
from .config import TrainConfig
from .methods import TRAIN_METHODS, TrainMethod, get_train_method

_LAZY = {"TrainRecipe": "pissa.train.recipe", "SFTRecipe": "pissa.train.recipe"}

__all__ = ["TRAIN_METHODS", "SFTRecipe", "TrainConfig", "TrainMethod", "TrainRecipe", "get_train_method",
           "recipe_for"]


def recipe_for(config: TrainConfig, **kwargs):
    """The recipe of a config's --task: SFT/DPO for a causal LM, `ClassifyRecipe` for a classifier task."""
    if get_task(config.task) is None:
        from .recipe import TrainRecipe

        return TrainRecipe(config, **kwargs)
    from .classify import ClassifyRecipe

    return ClassifyRecipe(config, **kwargs)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pissa.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
