"""Training: `TrainConfig`, training methods as data (`methods`), the SFT recipe on the transformers
Trainer (`recipe`, `save`), per-step logs (`log`), and PiSSA with trainable singular values."""

from .config import TrainConfig
from .methods import TRAIN_METHODS, TrainMethod, get_train_method
from .recipe import SFTRecipe

__all__ = ["TRAIN_METHODS", "SFTRecipe", "TrainConfig", "TrainMethod", "get_train_method"]
