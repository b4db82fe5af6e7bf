"""PiSSA -> LoRA conversion (paper appendix C, eqs. 9-10) and compression back to a lower rank.

Pure state-dict arithmetic on adapter files: no model is loaded, so nothing needs gathering
under ZeRO-3 or FSDP.

In PEFT's orientation (pissa.layout) the update is `scale * B @ A`. The init folder holds the initial A, B
(scale s_i). Training moved them to A', B' (scale s_t). The residual is W_res = W - s_i·B@A, so
on the original W the trained model adds

    ΔW = s_t·B'A' - s_i·BA = s_out · [B'·s_t/s_out | -B·s_i/s_out] @ [A'; A]     (rank 2r)

s_out is the scale PEFT gives the written 2r adapter. Every rank is doubled and every alpha (global
and in alpha_pattern) multiplied by 2, or by sqrt(2) under rsLoRA (alpha/sqrt(r)), so s_out = s_t in every
layer and the factors are copied bit for bit, as PEFT's own conversion does where it is right (it doubles
alpha_pattern under rsLoRA, which is why it refuses patterns with rsLoRA). Where the init's scale differs
from the trained one, the ratio is folded into B.

W + ΔW on the original model is W_res + s_t·B'A', the trained model's matrix, so whatever the trained
adapter applies on top of that matrix carries over unchanged: DoRA's magnitude vector (DoRA normalises
W + ΔW), modules_to_save copies and trained biases. The init may come from pissa, PEFT or LLaMA-Factory
(`sources`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PissaError
from ..io.adapter_files import as_lora, write_adapter
from ..io.atomic import atomic_output_dir, check_output_dir, dir_size
from ..io.jsonfile import write_json
from ..layout import CONVERSION_FILE, EMBEDDING, LINEAR
from .experts import compressed_config, convert_experts, split_experts
from .factors import delta_fro, stack_2r, truncate
from .inputs import (
    check_compress_rank,
    check_config_ranks,
    check_init_match,
    check_same_layers,
    init_similarity,
    layer_scale,
    read_lora_adapter,
    split_adapter,
)
from .sources import InitSource, check_provenance, read_init_source

# Config fields that describe how an adapter was initialised or trained, not how it is applied;
# reset so that the output is a plain LoRA that any PEFT consumer (vLLM, load_adapter) accepts.
PLAIN_LORA_FIELDS = {"init_lora_weights": True, "loftq_config": {}, "corda_config": None, "eva_config": None,
                     "lora_ga_config": None, "inference_mode": True}


@dataclass
class ConvertResult:
    out: Path
    rank: int | None  # None: exact conversion at 2r per layer
    layers: dict[str, dict]  # module -> {rank_in, rank_out, delta_fro, err_fro, rel_err, init_similarity}
    seconds: float
    config: dict = field(repr=False)
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. a quantized residual)
    init_kind: str = ""  # what --init was recognised as (sources: pissa init, PEFT, LLaMA-Factory)

    @property
    def max_rel_err(self) -> float:
        return max((info["rel_err"] for info in self.layers.values()), default=0.0)

    def size(self) -> int:
        return dir_size(self.out)


# --- the output config --------------------------------------------------------------------------

def lora_config_2r(trained_config: dict, base_model: str) -> dict:
    """The plain-LoRA config of the 2r adapter: every rank doubled and every alpha scaled so that each layer
    keeps its scale (x2, or x sqrt(2) under rsLoRA)."""
    config = {k: v for k, v in trained_config.items() if not k.lower().startswith("pissa")}
    config.update(PLAIN_LORA_FIELDS)
    factor = math.sqrt(2) if trained_config.get("use_rslora") else 2
    config.update(
        base_model_name_or_path=base_model,
        r=2 * trained_config["r"],
        lora_alpha=factor * trained_config["lora_alpha"],
        rank_pattern={k: 2 * v for k, v in (trained_config.get("rank_pattern") or {}).items()},
        alpha_pattern={k: factor * v for k, v in (trained_config.get("alpha_pattern") or {}).items()},
    )
    return config


def lora_config_compressed(config_2r: dict, rank: int) -> dict:
    """One rank and alpha = rank for every layer; the factors carry each layer's own scale."""
    return {**config_2r, "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}}


# --- the conversion, in memory --------------------------------------------------------------------

@dataclass
class Converted:
    """A converted adapter in memory: what `convert_to_lora` writes, and what `pissa export` starts from."""

    config: dict
    state: dict[str, torch.Tensor]
    layers: dict[str, dict]  # module -> {rank_in, rank_out, delta_fro, err_fro, rel_err, init_similarity}
    init: InitSource
    notes: list[str] = field(default_factory=list)


def convert_adapter(trained: tuple[dict, dict, dict, set[str]], init: InitSource, rank: int | None = None,
                    check_init: bool = True, base: str | None = None, trained_dir: Path | None = None,
                    progress: Callable[[int, int, str], None] | None = None) -> Converted:
    """A trained PiSSA adapter (`inputs.read_lora_adapter` / `split_adapter`) as a LoRA on the original model.

    Every check runs before any arithmetic. `base` names the original model (default: what the init
    records); tensors other than the factors (DoRA magnitudes, modules_to_save, biases) are carried as
    they are. `trained_dir` is where the trained adapter was read from (None: in memory)."""
    trained_config, pairs, others, embeddings = trained
    where, init_name = trained_dir or "the adapter", init.path or init.kind
    experts = split_experts(init.manifest or {}, trained_config, pairs, init.pairs, where, init_name)  # MoE: per expert
    check_config_ranks(trained_config, pairs, where)
    check_same_layers(pairs, init.pairs, where, init_name)
    if check_init and trained_dir is not None:
        check_provenance(trained_config, init, trained_dir)
    similarity = {m: init_similarity(pairs[m], init.pairs[m]) for m in pairs} | experts.similarity()
    if check_init:  # after the provenance check: its message is the more precise one
        check_init_match(similarity, where, init_name)
    if rank is not None:
        check_compress_rank(rank, pairs)
    base = base or init.base_model
    if not base:
        raise PissaError(f"the original model of --init {init_name} is unknown ({init.why_no_base}); pass --base "
                         "ORIGINAL_MODEL, which the converted adapter records as base_model_name_or_path")
    config = lora_config_2r(trained_config, base)
    if rank is not None:
        config = compressed_config(lora_config_compressed(config, rank), experts, list(pairs), rank)
    state, layers = convert_experts(experts, trained_config, init.config, config, rank)
    dense_state, dense_layers = convert_layers(trained_config, pairs, init, config, rank, embeddings, progress)
    state.update(dense_state)
    layers.update(dense_layers)
    for module, info in layers.items():
        info["init_similarity"] = similarity[module]
    state.update(others)
    return Converted(config, state, layers, init, list(init.notes))


def convert_layers(trained_config: dict, pairs: dict, init: InitSource, config: dict, rank: int | None,
                   embeddings: set[str], progress) -> tuple[dict, dict]:
    """(state, per-layer info) of the converted factors: exact at 2r, or truncated to `rank`."""
    state, layers = {}, {}
    for done, module in enumerate(sorted(pairs), 1):
        s_t, s_i, s_out = layer_scale(trained_config, module), layer_scale(init.config, module), \
            layer_scale(config, module)
        A2, B2 = stack_2r(pairs[module], init.pairs[module], s_t, s_i, s_out)
        if rank is None:
            A, B = A2, B2
            info = {"delta_fro": delta_fro(A2, B2, s_out), "err_fro": 0.0, "rel_err": 0.0}
        else:
            A, B, info = truncate(A2, B2, s_out, rank, s_out)
        layers[module] = {"rank_in": pairs[module][0].shape[0], "rank_out": A.shape[0], **info}
        key_A, key_B = (EMBEDDING if module in embeddings else LINEAR).factor_keys(module)
        state[key_A] = A  # (r_out, in)
        state[key_B] = B  # (out, r_out)
        if progress:
            progress(done, len(pairs), module)
    return state, layers


def read_conversion(trained_dir: str | Path, init_dir: str | Path, rank: int | None = None, check_init: bool = True,
                    base: str | None = None, progress=None) -> Converted:
    """`convert_adapter` of a trained adapter folder and the init `init_dir` names (`sources.read_init_source`)."""
    trained_dir = Path(trained_dir)
    init = read_init_source(init_dir)
    if init.adapter is not None and trained_dir.is_dir() and init.adapter.resolve() == trained_dir.resolve():
        raise PissaError(f"{trained_dir} is the initial adapter of --init {init_dir} itself; give the trained adapter "
                         "as the first argument and the folder it started from as --init")
    trained = read_lora_adapter(trained_dir, "trained adapter")
    return convert_adapter(trained, init, rank, check_init, base, trained_dir, progress)


def check_convertible(config: dict, state: dict, init: InitSource) -> None:
    """Refuse now what converting an adapter of this config and layout would refuse later: the conversion of
    the step-0 adapter (ΔW = 0), in memory (`pissa train --convert-at-end` runs it before the first step)."""
    convert_adapter(split_adapter(*as_lora(config, state), "the adapter being trained"), init)


# --- the entry point ----------------------------------------------------------------------------

def convert_to_lora(
    trained_dir: str | Path,
    init_dir: str | Path,
    out: str | Path,
    rank: int | None = None,
    overwrite: bool = False,
    check_init: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
    base: str | None = None,
) -> ConvertResult:
    """Rewrite a trained PiSSA adapter as a LoRA adapter on the original model, written to `out`.

    `init_dir` is a `pissa init` folder, a PEFT initial adapter or a LLaMA-Factory output (`sources`).
    rank=None gives the exact rank-2r adapter; an int truncates each layer's ΔW to that rank
    (best approximation) and reports its error. `check_init=False` skips the test that the
    trained factors started from `init_dir`'s. `base` names the original model when the init does not
    (or overrides it). Nothing is written unless everything succeeds.
    """
    start = time.perf_counter()
    trained_dir, init_dir = Path(trained_dir), Path(init_dir)
    out = check_output_dir(out, overwrite, inputs=[trained_dir, init_dir, base])
    converted = read_conversion(trained_dir, init_dir, rank, check_init, base, progress)
    with atomic_output_dir(out, overwrite) as tmp:
        write_adapter(tmp, converted.config, converted.state)
        record = {"kind": "pissa-convert", "trained_adapter": str(trained_dir.resolve()),
                  "init": str(init_dir.resolve()), "init_kind": converted.init.kind, "rank": rank,
                  "layers": converted.layers, "notes": converted.notes}
        write_json(tmp / CONVERSION_FILE, record)
    return ConvertResult(out=out, rank=rank, layers=converted.layers, seconds=time.perf_counter() - start,
                         config=converted.config, notes=converted.notes, init_kind=converted.init.kind)
