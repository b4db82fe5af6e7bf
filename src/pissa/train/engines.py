"""The distributed engine a run is launched under, what pissa needs from it, and what it refuses before any work.

`accelerate launch` (docs/distributed.md, the configs in docs/distributed/) starts the processes and says which
engine through the environment: ACCELERATE_USE_FSDP with FSDP_VERSION, ACCELERATE_USE_DEEPSPEED with
ACCELERATE_DEEPSPEED_ZERO_STAGE (or the stage in ACCELERATE_DEEPSPEED_CONFIG_FILE). pissa reads it there, before a
model is loaded, so that what cannot work is refused first; the Trainer's Accelerator reads the same variables.

- DDP, ZeRO-1 and ZeRO-2 hold every parameter whole on every process; nothing changes for pissa.
- FSDP2 (`fully_shard`) holds a shard of each parameter (a DTensor), ZeRO-3 a partition (the module's own tensor is
  empty). So with `--model`, the adapter is not initialised in memory (an SVD needs the whole weight): the init is
  first written to RUN/init (a local checkpoint streamed as `pissa init` under torchrun streams it, each process
  taking its share of the shards), and every process loads that folder as with `--init`. After training, the
  trained weights are gathered whole (`whole_weights`, a collective: every process calls it), and the main process
  saves them as an ordinary, unsharded PEFT adapter.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import PissaError, PissaWarning

DOCS = "docs/distributed.md"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Engine:
    """How the launched processes hold the model: "single", "ddp", "fsdp" or "deepspeed"."""

    name: str
    processes: int = 1
    fsdp_version: int | None = None
    zero_stage: int | None = None

    @property
    def shards_weights(self) -> bool:
        """Each process holds only a part of each weight (FSDP, ZeRO-3)."""
        return self.name == "fsdp" or (self.name == "deepspeed" and self.zero_stage == 3)

    def describe(self) -> str:
        if self.name == "fsdp":
            return f"FSDP{self.fsdp_version}"
        if self.name == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return self.name.upper() if self.name == "ddp" else "one process"


def zero_stage_from_env() -> int:
    """The ZeRO stage accelerate launch passes: its own variable, or the stage in a DeepSpeed JSON config."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none" and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage")
        if isinstance(stage, int):
            return stage
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))  # accelerate's own default


def launched_engine() -> Engine:
    """The engine this process was launched under (accelerate launch, torchrun, or none)."""
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if _flag("ACCELERATE_USE_FSDP"):
        return Engine("fsdp", processes, fsdp_version=int(os.environ.get("FSDP_VERSION", 1)))
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return Engine("deepspeed", processes, zero_stage=zero_stage_from_env())
    return Engine("ddp" if processes > 1 else "single", processes)


def check_engine(engine: Engine, config, method) -> None:
    """Refuse, with the reason and the fix, what the engine cannot train (before anything is loaded or written)."""
    where = f"under {engine.describe()}"
    if engine.name == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise PissaError(f"accelerate launched this run {where}, and DeepSpeed is not installed: "
                             "`pip install 'pissa[distributed]'` (or `pip install deepspeed`)")
    if engine.name == "fsdp" and engine.fsdp_version == 1 and not _flag("FSDP_USE_ORIG_PARAMS"):
        raise PissaError(f"{where} without use_orig_params, each wrapped block is one flat parameter, all trainable "
                         "or all frozen, but PiSSA freezes the residual and trains the adapter inside every block; "
                         f"set fsdp_version: 2 (docs/distributed/fsdp.yaml, see {DOCS})")
    if method.quantized:
        check_quant_storage(engine, config.init)
    if engine.shards_weights and config.train_singular_values:
        raise PissaError(f"--train-singular-values {where}: PEFT's AdaLoRA adds its orthogonality regulariser in "
                         "the model's forward, from every A and B whole, outside the wrapped blocks, where each "
                         "process holds only a shard of them; train it under DeepSpeed ZeRO-2 (zero3.yaml with "
                         f"--zero_stage 2), see {DOCS}")


def check_quant_storage(engine: Engine, init: str | None) -> None:
    """Warn when FSDP will not shard a QPiSSA/LoftQ residual: FSDP2 shards floating-point tensors only, and keeps
    bitsandbytes' 4-bit codes packed in uint8 whole on every process (tests/test_distributed.py)."""
    if engine.name != "fsdp" or init is None:
        return
    from ..io.manifest import read_manifest

    storage = (read_manifest(init).get("quantization") or {}).get("quant_storage")
    if storage == "uint8":
        warnings.warn(f"under {engine.describe()} the 4-bit residual of --init {init} is packed in uint8, which FSDP "
                      "does not shard: every process holds all of it; re-run `pissa init` with --quant-storage "
                      "bfloat16 (the same codes, the same fitted adapter) to shard it", PissaWarning, stacklevel=2)


def whole_weights(model, adapter: bool) -> dict[str, torch.Tensor] | None:
    """The trained weights, whole and on the CPU, named as in `model.state_dict()`: the trainable parameters of an
    adapter, or every parameter and buffer of a fully fine-tuned model. Under FSDP and ZeRO-3 it gathers them (a
    collective: every process must call it, in the same order); elsewhere it returns None (save as usual)."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad or not adapter]
    sharded = [p for _, p in params if _is_zero3(p)]
    if not sharded and not any(_is_dtensor(p) for _, p in params):
        return None
    out = {}
    with _gathered_zero3(sharded):
        for name, p in params:
            whole = p.full_tensor() if _is_dtensor(p) else p.data  # an all-gather for a DTensor; same shape as p
            out[name] = whole.detach().to("cpu", copy=True)
    if not adapter:  # buffers are whole on every process; state_dict() names the persistent ones
        saved = set(model.state_dict())
        out.update({name: b.detach().cpu() for name, b in model.named_buffers() if name in saved})
    return out


def _is_dtensor(p) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _is_zero3(p) -> bool:
    return hasattr(p, "ds_id")  # a ZeRO-3 partitioned parameter


def _gathered_zero3(params):
    """deepspeed.zero.GatheredParameters over ZeRO-3 parameters (read-only), or a no-op."""
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
