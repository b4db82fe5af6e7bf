"""Training: `TrainConfig`, training methods as data (`methods`), the recipe on TRL (`recipe`: SFT or DPO,
`trainers`: what pissa adds to TRL's trainers, `save`), per-step logs (`log`), and PiSSA with trainable
singular values; `classify`: the recipe on a sequence or image classifier."""

from ..data.tasks import get_task
from .config import TrainConfig
from .methods import TRAIN_METHODS, TrainMethod, get_train_method
from .recipe import TrainRecipe

SFTRecipe = TrainRecipe  # the recipe's name before --stage dpo; both stages run through it


def recipe_for(config: TrainConfig, **kwargs) -> TrainRecipe:
    """The recipe of a config's --task: SFT/DPO for a causal LM, `ClassifyRecipe` for a classifier task."""
    if get_task(config.task) is None:
        return TrainRecipe(config, **kwargs)
    from .classify import ClassifyRecipe

    return ClassifyRecipe(config, **kwargs)


__all__ = ["TRAIN_METHODS", "SFTRecipe", "TrainConfig", "TrainMethod", "TrainRecipe", "get_train_method",
           "recipe_for"]
