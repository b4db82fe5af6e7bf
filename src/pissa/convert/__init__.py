"""After training: a trained PiSSA adapter rewritten as a LoRA for the original model (`lora`, from the
inputs checked in `inputs`), and an adapter merged into its base as a standalone model (`merge`). Pure
state-dict arithmetic on files; no model is loaded."""

from .lora import ConvertResult, convert_to_lora
from .merge import MergeResult, merge_adapter

__all__ = ["ConvertResult", "MergeResult", "convert_to_lora", "merge_adapter"]
