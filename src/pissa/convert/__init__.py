"""After training: a trained PiSSA adapter rewritten as a LoRA for the original model (`lora`, from the
inputs checked in `inputs` and the init recognised in `sources`), an adapter merged into its base as a
standalone model (`merge`), and an adapter exported for a serving engine (`export`). Conversion and merge
are state-dict arithmetic on files; no model is loaded (export loads one for its parity check)."""

from .export import ExportConfig, ExportResult, export_adapter
from .lora import Converted, ConvertResult, check_convertible, convert_to_lora, read_conversion
from .merge import MergeResult, merge_adapter
from .sources import InitSource, read_init_source

__all__ = ["ConvertResult", "Converted", "ExportConfig", "ExportResult", "InitSource", "MergeResult",
           "check_convertible", "convert_to_lora", "export_adapter", "merge_adapter", "read_conversion",
           "read_init_source"]
