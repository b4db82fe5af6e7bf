"""pissa: PiSSA fine-tuning of large language models.

The public API, imported on first use so that `import pissa` (and the CLI's --help) stays light:

    from pissa import PissaConfig, init_model, run_init           # initialise (in memory, or a checkpoint)
    from pissa import TrainConfig, TrainRecipe                    # train (SFT or DPO, on TRL)
    from pissa import EvalConfig, run_eval                        # evaluate
    from pissa import convert_to_lora, merge_adapter              # convert to a LoRA for the original model, merge
    from pissa import decompose                                   # the per-matrix math
    from pissa import load_kwargs                                 # load a QPiSSA residual in 4-bit as fitted

docs/architecture.md maps the packages.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "PissaConfig": "pissa.init",
    "init_model": "pissa.init",
    "run_init": "pissa.init",
    "InitResult": "pissa.init",
    "TrainConfig": "pissa.train",
    "TrainRecipe": "pissa.train",
    "SFTRecipe": "pissa.train",
    "EvalConfig": "pissa.eval",
    "run_eval": "pissa.eval",
    "evaluate": "pissa.eval",
    "convert_to_lora": "pissa.convert",
    "merge_adapter": "pissa.convert",
    "decompose": "pissa.decompose",
    "decompose_batch": "pissa.decompose",
    "load_kwargs": "pissa.quant",
    "load_model": "pissa.models",
    "PissaError": "pissa.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'pissa' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
