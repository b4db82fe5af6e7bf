"""Initialisation: `PissaConfig`, target selection, per-layer init of a live model (`layers`), the
streaming checkpoint transform (`plan`, `shard_job`, `parallel`, `stream`, `finalize`), `run_init`
over both, and loading an init output back (`load`)."""

from .config import PissaConfig
from .layers import ADAPTER_NAME, init_layer_, init_model, residual_state_dict
from .run import InitResult, run_init
from .targets import default_targets, linear_modules, output_head, resolve_targets
from .weights import decompose_weight

__all__ = ["ADAPTER_NAME", "InitResult", "PissaConfig", "decompose_weight", "default_targets", "init_layer_",
           "init_model", "linear_modules", "output_head", "residual_state_dict", "resolve_targets", "run_init"]
