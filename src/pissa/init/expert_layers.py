"""In-memory PiSSA of fused expert tensors wrapped by PEFT's `ParamWrapper` (`LoraConfig(target_parameters)`).

Each part (gate, up) of each expert is decomposed on its own, exactly as the streaming path decomposes the
per-expert tensors of the checkpoint (`init.weights.decompose_weight`, one seed per matrix), the residual
replaces it in place in the fused parameter, and the factors are packed the way PEFT's ParamWrapper reads
them (`pissa.layout.ExpertLayout.pack`). On a GPU the experts of a tensor are decomposed in batched calls.
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import PissaError
from .experts import ExpertTarget
from .weights import decompose_weight, decompose_weights

BATCH_BYTES = 2 << 30  # fp32 bytes of same-shape expert matrices decomposed in one batched call (GPU only)


def expert_info(infos: list[dict], target: ExpertTarget, seconds: float) -> dict:
    """One manifest entry for a fused tensor from its experts' per-matrix infos (experts, then parts)."""
    first = infos[0]
    errors = [i["recon_max_abs_err"] for i in infos]
    return {
        **target.record(),
        "method": first["method"],
        "shape": list(target.tensor.part_shape),
        "stored_shape": list(target.tensor.shape),
        "recon_max_abs_err": max(errors),
        "recon_rel_fro_err": max(i["recon_rel_fro_err"] for i in infos),
        "residual_fro": math.sqrt(sum(i["residual_fro"] ** 2 for i in infos)),
        "expert_recon_max_abs_err": errors,  # per expert and part, in that order
        "seconds": seconds,
    }


def batched(device: torch.device) -> bool:
    """Batch the experts of a tensor on GPUs, where one small SVD leaves the device idle; never on the CPU, where
    the streaming init (one checkpoint tensor at a time) gives the same bits only without batching."""
    return device.type != "cpu"


def decompose_experts(matrices: list[torch.Tensor], names: list[str], target: ExpertTarget, config, device):
    """Factors of same-shape expert matrices: one at a time on the CPU (as streaming does), in batched calls
    of at most BATCH_BYTES on a GPU."""
    if not batched(device):
        return [decompose_weight(W, n, config, target.rank, target.scale) for W, n in zip(matrices, names, strict=True)]
    per = max(1, BATCH_BYTES // (matrices[0].numel() * 4))
    return [f for i in range(0, len(matrices), per)
            for f in decompose_weights(matrices[i:i + per], names[i:i + per], config, target.rank, target.scale)]


@torch.no_grad()
def init_experts_(wrapper, target: ExpertTarget, config, adapter: str) -> dict:
    """Decompose (in place) every expert of the tensor a PEFT ParamWrapper adapts; returns its manifest info."""
    start = time.perf_counter()
    param = wrapper.get_param()
    layout, E = target.layout, target.tensor.num_experts
    M = layout.matrices(param.data)  # (E, out, in), a view: writing it writes the parameter
    As, Bs, infos = [], [], [[] for _ in range(E)]
    for p in range(layout.n_parts):
        rows = layout.rows(M.shape[1], p)
        Ws = [M[e, rows].contiguous() for e in range(E)]  # (out/parts, in) each
        factors = decompose_experts(Ws, [target.matrix_name(e, p) for e in range(E)], target, config, param.device)
        del Ws
        for e, f in enumerate(factors):
            M[e, rows] = f.residual
            infos[e].append(f.info)
        As.append(torch.stack([f.A for f in factors]))  # (E, k, in)
        Bs.append(torch.stack([f.B for f in factors]))  # (E, out/parts, k)
    A, B = layout.block_factors(As, Bs)  # (E, R, in), (E, out, R)
    lora_A, lora_B = layout.pack(A, B)  # (R*E, in), (out, R*E)
    wrapper.lora_A[adapter].weight.data = lora_A
    wrapper.lora_B[adapter].weight.data = lora_B
    return expert_info([i for per in infos for i in per], target, time.perf_counter() - start)


def check_expert_weights(model, experts: dict[str, ExpertTarget]) -> None:
    """Refuse a non-finite expert tensor before PEFT wraps anything (the model is changed in place)."""
    params = dict(model.named_parameters())
    for key in experts:
        W = params[key].detach()
        if not W.is_floating_point():
            raise PissaError(f"{key}: dtype {W.dtype} is not a float weight (already quantized?); give the "
                             "unquantized fp32/bf16/fp16 checkpoint")
        if not torch.isfinite(W.sum()) and not torch.isfinite(W).all():
            raise PissaError(f"{key}: contains {int((~torch.isfinite(W)).sum())} NaN/Inf values; fix or re-export "
                             "the checkpoint")


def check_wrapped(peft_model, targets) -> None:
    """The modules and parameters PEFT wrapped are the ones pissa decomposes, with the ranks it planned."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    wrapped, params = set(), {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            params[name] = module
        elif isinstance(module, LoraLayer):
            wrapped.add(name)
    planned = {t.adapter_module: t for t in targets.experts.values()}
    if wrapped != set(targets.modules) or set(params) != set(planned):
        extra = sorted((wrapped ^ set(targets.modules)) | (set(params) ^ set(planned)))
        raise PissaError(f"PEFT adapted other layers than planned ({', '.join(extra[:3])}); its config was "
                         "rewritten on load (huggingface/peft#3711?); name the targets explicitly")
    for name, module in params.items():
        t = planned[name]
        if module.parameter_name != t.tensor.param or module.r["default"] != t.peft_rank:
            raise PissaError(f"PEFT wraps {module.parameter_name} at rank {module.r['default']} under {name}, "
                             f"pissa planned {t.tensor.param} at rank {t.peft_rank}")
