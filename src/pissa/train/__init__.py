"""Training: `TrainConfig`, training methods as data (`methods`), the recipe on TRL (`recipe`: SFT or DPO,
`trainers`: what pissa adds to TRL's trainers, `save`), per-step logs (`log`), and PiSSA with trainable
singular values."""

from .config import TrainConfig
from .methods import TRAIN_METHODS, TrainMethod, get_train_method
from .recipe import TrainRecipe

SFTRecipe = TrainRecipe  # the recipe's name before --stage dpo; both stages run through it

__all__ = ["TRAIN_METHODS", "SFTRecipe", "TrainConfig", "TrainMethod", "TrainRecipe", "get_train_method"]
