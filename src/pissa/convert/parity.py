"""The parity check of an exported adapter, with stock transformers + PEFT only.

The exported folder is loaded the way the engine reads it: a config holding only the fields its loader uses
(`engines.Engine.view`: the global r and alpha, never the patterns), the tensors as written. Its logits
are compared with the source adapter merged into the base by PEFT's own `merge_and_unload`, on a few
seeded random token sequences, in fp32. One copy of the base is loaded: both adapters sit on it, the
exported one is read first, then the source is merged (which also unloads the exported one).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..errors import PissaError
from ..io.adapter_files import write_adapter
from .engines import Engine

# An exact export (no layer compressed) must reproduce the merged model up to fp32 rounding; past this
# fraction of the largest logit something is wrong, and nothing is written.
EXACT_TOLERANCE = 1e-3


def outputs(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM (the last hidden state of a bare encoder)."""
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().cpu()


def parity_check(base_dir: Path, reference: tuple[dict, dict], exported: tuple[dict, dict], engine: Engine,
                 config) -> dict:
    """max |logits(base + exported, read as `engine` reads it) - logits(base with `reference` merged)|."""
    from peft import PeftModel

    from ..models import load_model

    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    view = engine.view(exported[0])
    with tempfile.TemporaryDirectory(prefix="pissa-parity-") as tmp:
        write_adapter(Path(tmp) / "engine-view", view, exported[1])
        write_adapter(Path(tmp) / "reference", *reference)
        model, _, _ = load_model(base_dir, "float32", tokenizer=False)
        model.to(device).eval()
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model.config.vocab_size, (config.sequences, config.length), generator=generator)
        tokens = tokens.to(device)
        peft_model = PeftModel.from_pretrained(model, str(Path(tmp) / "engine-view"), adapter_name="export").eval()
        served = outputs(peft_model, tokens)
        peft_model.load_adapter(str(Path(tmp) / "reference"), adapter_name="reference")
        with peft_model.disable_adapter():
            base = outputs(peft_model, tokens)
        merged = outputs(peft_model.merge_and_unload(adapter_names=["reference"]), tokens)
    record = {"sequences": config.sequences, "length": config.length, "seed": 0, "device": str(device),
              "dtype": "float32", "engine_view": sorted(view),
              "max_abs_logit_diff": float((served - merged).abs().max()),
              "max_abs_logit": float(merged.abs().max()),
              "max_abs_adapter_effect": float((merged - base).abs().max())}
    return record


def check_exact(record: dict, layers: dict) -> None:
    """An export with no compressed layer must match the merged model; refuse (nothing written) if it does not."""
    if any(info["action"] == "compressed" for info in layers.values()):
        return
    limit = EXACT_TOLERANCE * max(1.0, record["max_abs_logit"])
    if record["max_abs_logit_diff"] > limit:
        raise PissaError(f"the exported adapter, read as the engine reads it, differs from the merged model by "
                         f"{record['max_abs_logit_diff']:.3g} in the logits (> {limit:.3g}) although no layer was "
                         "compressed; nothing was written. This is a pissa bug: please report it with export.json")
