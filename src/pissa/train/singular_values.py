"""PiSSA with trainable singular values (paper appendix A): the adapter as B · diag(E) · A.

After the PiSSA init, each layer's principal part scale·B@A = U_r S_r V_rᵀ is re-expressed in PEFT's
AdaLoRA layout: lora_A = V_rᵀ (r, in), lora_B = U_r (out, r) and lora_E (r, 1) holding S_r, so the
singular values train as their own vector. PEFT's AdaLoRA model adds the orthogonality regulariser
w · mean over factors of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F to the training loss; PiSSA's U and V start
orthonormal, so it starts at zero and only has to keep them there.

AdaLoRA's third idea, masking E entries over a budget schedule, is not used: the paper drops it
because the masked parameters are still updated (and nothing here calls `update_and_allocate`).

The saved adapter is a stock PEFT AdaLoRA adapter on the residual model. PEFT's layer computes
x @ (A·E)ᵀ @ Bᵀ · alpha / (r + 1e-5), so E = S · (r + 1e-5) / alpha; with alpha = r, E ≈ S.
`pissa.io.adapter_files.as_lora` reads such an adapter back as LoRA pairs, for convert, merge and eval.
"""

from __future__ import annotations

import torch

from ..decompose import factored_svd
from ..errors import PissaError
from ..init.layers import ADAPTER_NAME
from ..io.adapter_files import RANKNUM_EPS


def same_signs(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, B: torch.Tensor):
    """Flip each singular pair (u_i, v_i) to point like B's column i: the SVD's signs are arbitrary, and
    keeping PiSSA's own orientation lets `pissa convert` recognise the trained factors as this init's."""
    signs = torch.sign((U * B.double()).sum(0))
    signs[signs == 0] = 1
    return U * signs, S, Vh * signs[:, None]


def lora_layers(peft_model) -> dict:
    """Full module name -> PEFT LoRA layer (the modules holding lora_A/lora_B)."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in peft_model.base_model.model.named_modules()
            if isinstance(module, LoraLayer) and module.r.get(ADAPTER_NAME)}


def check_convertible(peft_model, layers: dict) -> int:
    """The one rank every layer shares; refuses what AdaLoRA's layout cannot hold."""
    config = peft_model.peft_config[ADAPTER_NAME]
    if config.use_dora:
        raise PissaError("--train-singular-values and --dora cannot be combined (PEFT's AdaLoRA layout has no "
                         "DoRA magnitude); drop one of them")
    ranks = {module.r[ADAPTER_NAME] for module in layers.values()}
    if len(ranks) > 1:
        raise PissaError(f"--train-singular-values needs one rank for every layer, the adapter has ranks "
                         f"{sorted(ranks)} (a rank pattern); re-run `pissa init` without --rank-pattern")
    from transformers.pytorch_utils import Conv1D

    for name, module in layers.items():
        if not isinstance(module.get_base_layer(), (torch.nn.Linear, Conv1D)):
            raise PissaError(f"--train-singular-values supports linear layers only; {name} "
                             f"({type(module.get_base_layer()).__name__}) is not one: leave it out of --targets")
    return ranks.pop()


@torch.no_grad()
def to_singular_value_adapters(peft_model, orth_reg_weight: float, total_steps: int):
    """Re-express a PiSSA LoRA PeftModel as an AdaLoRA PeftModel with the same outputs.

    The base weights (the residual) are kept; each layer gets A = V_rᵀ, B = U_r, E from S_r.
    `total_steps` is recorded in the AdaLoRA config (PEFT requires one); no rank budget is applied.
    """
    from peft import AdaLoraConfig, get_peft_model

    if orth_reg_weight < 0:
        raise PissaError(f"--orth-reg-weight must be >= 0, got {orth_reg_weight}")
    layers = lora_layers(peft_model)
    rank = check_convertible(peft_model, layers)
    lora = peft_model.peft_config[ADAPTER_NAME]
    if lora.task_type is None:  # PEFT applies the regulariser in its task models' forward only
        raise PissaError("--train-singular-values needs a causal LM adapter (PEFT task_type CAUSAL_LM); this "
                         "adapter has no task type")
    factors = {}
    for name, module in layers.items():
        scaled_B = module.lora_B[ADAPTER_NAME].weight * module.scaling[ADAPTER_NAME]
        factors[name] = same_signs(*factored_svd(scaled_B.double(), module.lora_A[ADAPTER_NAME].weight.double()),
                                  scaled_B)
        if not bool(factors[name][1].gt(0).all()):
            raise PissaError(f"{name}: the adapter's B @ A is rank-deficient (a LoRA init starts at zero); "
                             "--train-singular-values applies to --method pissa")
    dtype = next(iter(layers.values())).lora_A[ADAPTER_NAME].weight.dtype
    base = peft_model.unload()  # drops the LoRA layers; the base weights stay the residual
    config = AdaLoraConfig(init_r=rank, target_r=rank, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                           target_modules=sorted(layers), fan_in_fan_out=lora.fan_in_fan_out,
                           total_step=max(total_steps, 1), orth_reg_weight=orth_reg_weight, task_type=lora.task_type,
                           base_model_name_or_path=lora.base_model_name_or_path)
    model = get_peft_model(base, config)
    modules = dict(model.base_model.model.named_modules())
    for name, (U, S, Vh) in factors.items():
        module = modules[name]
        multiplier = module.scaling[ADAPTER_NAME] / (module.ranknum[ADAPTER_NAME].item() + RANKNUM_EPS)
        module.lora_A[ADAPTER_NAME].copy_(Vh.to(dtype))
        module.lora_B[ADAPTER_NAME].copy_(U.to(dtype))
        module.lora_E[ADAPTER_NAME].copy_((S / multiplier).to(dtype)[:, None])
    return model


def orthogonality_penalty(model) -> torch.Tensor | None:
    """orth_reg_weight · mean over the AdaLoRA factors of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F, exactly as PEFT's
    `AdaLoraModel.forward` adds it to `outputs.loss`; None for a model that is not a singular-value adapter.

    TRL's trainers rebuild the loss from per-token log-probs and so drop what PEFT added: the recipe's
    trainers add this back (`pissa.train.trainers.KeepsOrthogonality`)."""
    config = getattr(model, "peft_config", {}).get(ADAPTER_NAME)
    if config is None or getattr(config, "peft_type", None) != "ADALORA":  # PeftType is a str enum
        return None
    if not config.orth_reg_weight:
        return None
    norms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and f".{ADAPTER_NAME}" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p  # (r, r)
            norms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)))
    return config.orth_reg_weight * torch.stack(norms).mean() if norms else None
