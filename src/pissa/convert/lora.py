"""PiSSA -> LoRA conversion (paper appendix C, eqs. 9-10) and compression back to a lower rank.

Pure state-dict arithmetic on adapter files: no model is loaded, so nothing needs gathering
under ZeRO-3 or FSDP.

In PEFT's orientation (pissa.layout) the update is `scale * B @ A`. The init folder holds the initial A, B
(scale s_i). Training moved them to A', B' (scale s_t). The residual is W_res = W - s_i·B@A, so
on the original W the trained model adds

    ΔW = s_t·B'A' - s_i·BA = s_out · [B'·s_t/s_out | -B·s_i/s_out] @ [A'; A]     (rank 2r)

s_out is the scale PEFT gives the written 2r adapter. We write lora_alpha = 2·alpha, so
s_out = s_t for plain LoRA and the factors are copied bit for bit. With rsLoRA, doubling the
rank changes the scale by sqrt(2): the ratio is folded into B.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..decompose import factored_svd
from ..io.adapter_files import write_adapter
from ..io.atomic import atomic_output_dir, check_output_dir, dir_size
from ..io.jsonfile import write_json
from ..layout import CONVERSION_FILE, EMBEDDING, LINEAR
from .experts import compressed_config, convert_experts, split_experts
from .inputs import (
    base_model_of,
    check_compress_rank,
    check_config_ranks,
    check_init_match,
    check_provenance,
    check_same_layers,
    init_similarity,
    layer_scale,
    read_init,
    read_lora_adapter,
)

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

    @property
    def max_rel_err(self) -> float:
        return max((info["rel_err"] for info in self.layers.values()), default=0.0)

    def size(self) -> int:
        return dir_size(self.out)


# --- the arithmetic ---------------------------------------------------------------------------

def scaled(t: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """`factor * t` in `dtype`, computed in fp32; factor 1 is an exact copy."""
    return t.to(dtype) if factor == 1.0 else (t.float() * factor).to(dtype)


def stack_2r(trained, init, s_t: float, s_i: float, s_out: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-2r factors with s_out · B2 @ A2 = s_t·B'A' - s_i·BA."""
    (A1, B1), (A0, B0) = trained, init
    dtype = torch.promote_types(A1.dtype, A0.dtype)  # bf16 trained + fp32 init: fp32 keeps both exact
    A2 = torch.cat([A1.to(dtype), A0.to(dtype)], dim=0)  # (2r, in)
    B2 = torch.cat([scaled(B1, s_t / s_out, dtype), scaled(B0, -s_i / s_out, dtype)], dim=1)  # (out, 2r)
    return A2, B2


def delta_fro(A2: torch.Tensor, B2: torch.Tensor, scale: float) -> float:
    """‖scale·B2@A2‖_F without the dense product: trace((B2ᵀB2)(A2A2ᵀ)) on (2r, 2r) Gram matrices."""
    A, B = A2.double().flatten(1), B2.double().flatten(1)  # conv factors (2r, in, kh, kw), (out, 2r, 1, 1)
    sq = torch.sum((B.T @ B) * (A @ A.T))  # = ‖B@A‖_F², both Grams (2r, 2r) and symmetric
    return abs(scale) * float(sq.clamp_min(0).sqrt())


def truncate(A2: torch.Tensor, B2: torch.Tensor, scale: float, rank: int, s_out: float):
    """Best rank-`rank` approximation of ΔW = scale·B2@A2, never forming the dense ΔW.

    Returns (A (k, in), B (out, k), info) with s_out·B@A = the truncated ΔW (Eckart-Young). Conv
    factors (2r, in, kh, kw), (out, 2r, 1, 1) are unfolded to matrices and come back in their layout.
    """
    U, S, Vh = factored_svd(B2.double().flatten(1) * scale, A2.flatten(1))  # the core SVD is (2r, 2r)
    root = (S[:rank] / s_out).sqrt()  # (k,), split evenly between the two factors
    B = U[:, :rank] * root  # (out, k)
    A = root[:, None] * Vh[:rank]  # (k, in)
    total, tail = float(S.square().sum()), float(S[rank:].square().sum())
    info = {"delta_fro": math.sqrt(total), "err_fro": math.sqrt(tail),
            "rel_err": math.sqrt(tail / total) if total > 0 else 0.0,
            "sigma_kept": float(S[rank - 1]), "sigma_next": float(S[rank]) if rank < len(S) else 0.0}
    A = A.reshape(rank, *A2.shape[1:]).to(A2.dtype)
    B = B.reshape(B2.shape[0], rank, *B2.shape[2:]).to(B2.dtype)
    return A, B, info


# --- the output config --------------------------------------------------------------------------

def lora_config_2r(trained_config: dict, base_model: str) -> dict:
    """The plain-LoRA config of the 2r adapter: every rank and alpha doubled (so plain LoRA keeps its scale)."""
    config = {k: v for k, v in trained_config.items() if not k.lower().startswith("pissa")}
    config.update(PLAIN_LORA_FIELDS)
    config.update(
        base_model_name_or_path=base_model,
        r=2 * trained_config["r"],
        lora_alpha=2 * trained_config["lora_alpha"],
        rank_pattern={k: 2 * v for k, v in (trained_config.get("rank_pattern") or {}).items()},
        alpha_pattern={k: 2 * v for k, v in (trained_config.get("alpha_pattern") or {}).items()},
    )
    return config


def lora_config_compressed(config_2r: dict, rank: int) -> dict:
    """One rank and alpha = rank for every layer; the factors carry each layer's own scale."""
    return {**config_2r, "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}}


# --- the entry point ----------------------------------------------------------------------------

def convert_to_lora(
    trained_dir: str | Path,
    init_dir: str | Path,
    out: str | Path,
    rank: int | None = None,
    overwrite: bool = False,
    check_init: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> ConvertResult:
    """Rewrite a trained PiSSA adapter as a LoRA adapter on the original model, written to `out`.

    rank=None gives the exact rank-2r adapter; an int truncates each layer's ΔW to that rank
    (best approximation) and reports its error. `check_init=False` skips the test that the
    trained factors started from `init_dir`'s. Nothing is written unless everything succeeds.
    """
    start = time.perf_counter()
    trained_dir, init_dir = Path(trained_dir), Path(init_dir)
    out = check_output_dir(out, overwrite)
    manifest, init_config, init = read_init(init_dir)
    trained_config, trained, others, embeddings = read_lora_adapter(trained_dir, "trained adapter")
    experts = split_experts(manifest, trained_config, trained, init, trained_dir, init_dir)  # MoE experts: per expert
    check_config_ranks(trained_config, trained, trained_dir)
    check_same_layers(trained, init, trained_dir, init_dir)
    if check_init:
        check_provenance(trained_config, init_dir, trained_dir)
    similarity = {m: init_similarity(trained[m], init[m]) for m in trained} | experts.similarity()
    if check_init:  # after the provenance check: its message is the more precise one
        check_init_match(similarity, trained_dir, init_dir)
    if rank is not None:
        check_compress_rank(rank, trained)

    config = lora_config_2r(trained_config, base_model_of(manifest))
    if rank is not None:
        config = compressed_config(lora_config_compressed(config, rank), experts, list(trained), rank)
    state, layers = convert_experts(experts, trained_config, init_config, config, rank)
    for done, module in enumerate(sorted(trained), 1):
        s_t, s_i, s_out = layer_scale(trained_config, module), layer_scale(init_config, module), \
            layer_scale(config, module)
        A2, B2 = stack_2r(trained[module], init[module], s_t, s_i, s_out)
        r = trained[module][0].shape[0]
        if rank is None:
            A, B = A2, B2
            info = {"delta_fro": delta_fro(A2, B2, s_out), "err_fro": 0.0, "rel_err": 0.0}
        else:
            A, B, info = truncate(A2, B2, s_out, rank, s_out)
        layers[module] = {"rank_in": r, "rank_out": A.shape[0], **info, "init_similarity": similarity[module]}
        key_A, key_B = (EMBEDDING if module in embeddings else LINEAR).factor_keys(module)
        state[key_A] = A  # (r_out, in)
        state[key_B] = B  # (out, r_out)
        if progress:
            progress(done, len(trained), module)
    state.update(others)

    with atomic_output_dir(out, overwrite) as tmp:
        write_adapter(tmp, config, state)
        record = {"kind": "pissa-convert", "trained_adapter": str(trained_dir.resolve()),
                  "init": str(init_dir.resolve()), "rank": rank, "layers": layers}
        write_json(tmp / CONVERSION_FILE, record)
    return ConvertResult(out=out, rank=rank, layers=layers, seconds=time.perf_counter() - start, config=config,
                         notes=quantization_notes(manifest))


def quantization_notes(manifest: dict) -> list[str]:
    """A quantized init trains on Q + B'A' with Q + BA ~ W: W + ΔW then differs from the trained model by
    the init's fitted error W - Q - BA. For QPiSSA that is the residual's quantization error (R = W - BA);
    LoftQ's residual is not W - BA (R = W - L_{T-1}), but the same error, its fitted one, applies."""
    record = manifest.get("quantization")
    if not record:
        return []
    if record.get("fit") == "loftq":
        return ["the init is LoftQ (its base Q + BA only approximates W, and its stored residual + BA is not W "
                "either): the adapter holds ΔW exactly, but original + adapter differs from the trained Q + B'A' "
                "by the init's fitted error W - Q - BA (pissa.json: layers.*.quant.error_fro), as for QPiSSA"]
    return ["the init's residual was quantized (QPiSSA): the adapter holds ΔW exactly, but original + adapter "
            "differs from the trained Q(W_res) + B'A' by the residual's quantization error (paper, appendix C)"]
