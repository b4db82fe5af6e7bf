"""Where a model comes from (an embedded name, a local folder or a hub id) and loading it with stock
transformers. Never sets trust_remote_code unless the user asked."""

from .embedded import EMBEDDED, is_embedded, resolve_embedded
from .load import (
    check_not_quantized,
    is_causal_lm,
    is_causal_lm_model,
    load_model,
    load_tokenizer,
    meta_model,
    resolve_model,
)

__all__ = ["EMBEDDED", "check_not_quantized", "is_causal_lm", "is_causal_lm_model", "is_embedded", "load_model",
           "load_tokenizer", "meta_model", "resolve_embedded", "resolve_model"]
