"""What `pissa eval` evaluates, and the checks before it loads it: RUN_OR_MODEL (+ --adapter) resolved to a base
model and an adapter (a model, a `pissa init` folder, a training run, or an adapter folder), and the refusals of an
adapter that does not fit that base, a PiSSA adapter on anything but its residual, an adapter PEFT would recompute
the base for, and non-finite weights. Shared by causal-LM evaluation (`run`) and classifier evaluation
(`classify`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PissaError
from ..init.experts import adapter_experts, check_expert_factors
from ..init.load import is_quantized_init
from ..io.adapter_files import base_changing_init, lora_pairs, read_adapter_config, read_lora_form
from ..layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    MANIFEST_FILE,
    MODEL_CONFIG_FILE,
    RUN_CONFIG_FILE,
    InitDir,
    RunDir,
    init_of_residual,
    is_init_dir,
    is_run_dir,
    matrix_shape,
)
from ..models import resolve_model


@dataclass
class Target:
    """What to evaluate: a base model (name, folder or hub id) and optionally a PEFT adapter folder."""

    model: str
    adapter: Path | None
    kind: str  # model | init | run | adapter


def find_adapter(folder: Path) -> Path | None:
    """The PEFT adapter folder of a run or init output: the folder itself, or adapter/, final/ ... inside."""
    for candidate in (folder, folder / ADAPTER_DIR, folder / "final" / ADAPTER_DIR, folder / "final"):
        if (candidate / ADAPTER_CONFIG_FILE).exists():
            return candidate
    return None


def resolve_target(spec: str, adapter: str | Path | None = None) -> Target:
    """RUN_OR_MODEL (+ --adapter) -> the base model to load and the adapter to apply on it."""
    path = Path(spec).expanduser()
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / ADAPTER_CONFIG_FILE).exists():
            raise PissaError(f"--adapter {adapter} is not a PEFT adapter folder (no {ADAPTER_CONFIG_FILE})")
        if is_init_dir(path):
            return Target(str(InitDir(path).residual), adapter, "init")  # a trained PiSSA adapter on its residual
        return Target(spec, adapter, "adapter")
    if path.is_dir() and is_init_dir(path):
        return Target(str(InitDir(path).residual), InitDir(path).adapter, "init")
    if path.is_dir() and is_run_dir(path):
        return run_target(RunDir(path))
    if path.is_dir() and not (path / MODEL_CONFIG_FILE).exists():
        found = find_adapter(path)
        if found is None:
            raise PissaError(f"{path} is neither a model folder ({MODEL_CONFIG_FILE}), a `pissa init` output "
                             f"({MANIFEST_FILE}), a training run ({RUN_CONFIG_FILE}), nor an adapter folder "
                             f"({ADAPTER_CONFIG_FILE})")
        base = read_adapter_config(found).get("base_model_name_or_path")
        if not base:
            raise PissaError(f"{found}/{ADAPTER_CONFIG_FILE} names no base_model_name_or_path; pass the base model "
                             f"as RUN_OR_MODEL and the adapter with --adapter {found}")
        return Target(base, found, "adapter")
    return Target(spec, None, "model")


def run_target(run: RunDir) -> Target:
    """A `pissa train` run: its adapter on the base it trained on (the residual for PiSSA)."""
    import yaml

    config = yaml.safe_load(run.config.read_text()) or {}
    if run.model.is_dir() and not run.adapter.is_dir():  # --method full
        return Target(str(run.model), None, "run")
    if not (run.adapter / ADAPTER_CONFIG_FILE).exists():
        raise PissaError(f"run {run.root} has no trained adapter/ yet (did the run finish?); evaluate it once it has")
    if run.residual.is_dir():
        base = str(run.residual)
    elif run.init.residual.is_dir():  # a quantized method with --model: the 4-bit init it wrote first
        base = str(run.init.residual)
    elif run.base.is_dir():  # a classifier run: the model with its new head, as training started
        base = str(run.base)
    elif config.get("init"):
        base = str(InitDir(run_input(run, config, "init")).residual)
    elif run.init.exists():  # its initial adapter was kept: the trained one needs the run's residual
        raise PissaError(f"run {run.root} trained a PiSSA adapter but kept no residual/ (--no-save-residual); "
                         f"evaluate its converted LoRA, or pass the residual as RUN_OR_MODEL with --adapter")
    else:
        base = str(run_input(run, config, "model"))
    return Target(base, run.adapter, "run")


def run_input(run: RunDir, config: dict, name: str) -> Path:
    """A run's --init or --model as recorded; if that path is gone (the project folder moved), the same
    input relative to the run folder, as the run also recorded it."""
    recorded = Path(config[name])
    if not recorded.is_absolute() or recorded.exists():
        return recorded
    relative = ((config.get("resolved") or {}).get("run_relative") or {}).get(name)
    moved = (run.root / relative) if relative else None
    if moved is None or not moved.exists():
        raise PissaError(f"run {run.root} was trained from --{name} {recorded}, which no longer exists (nor at "
                         f"{moved} relative to the run); restore it, or evaluate with RUN_OR_MODEL and --adapter")
    return moved


def check_adapter_fits(model, adapter: Path, model_name: str) -> None:
    """Refuse an adapter whose layers are missing from the model or have other shapes."""
    config, state = read_lora_form(adapter)
    modules = dict(model.named_modules())
    experts = adapter_experts(model, config.get("target_parameters"))  # fused expert tensors of a MoE model
    for name, (A, B) in lora_pairs(state).items():
        if name in experts:
            check_expert_factors(experts[name], A, B, f"adapter {adapter} layer {name} on model {model_name}")
            continue
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise PissaError(f"adapter {adapter} adapts layer {name}, which model {model_name} does not have; "
                             f"evaluate it on the base model it was trained on")
        out_features, in_features = matrix_shape(module)
        if A.flatten(1).shape[1] != in_features or B.shape[0] != out_features:
            raise PissaError(f"adapter {adapter} layer {name} is {B.shape[0]}x{A.flatten(1).shape[1]} but model "
                             f"{model_name} has {out_features}x{in_features}; evaluate it on the base model it was "
                             "trained on")


def check_pissa_base(target: Target) -> None:
    """Refuse a PiSSA adapter on anything but its residual: on the original model the principal
    part would count twice (shapes match, so nothing else would notice)."""
    residual = Path(read_adapter_config(target.adapter).get("base_model_name_or_path") or "")
    init = init_of_residual(residual)
    if init is None:
        return  # not a PiSSA adapter from a `pissa init` folder (LoRA, converted, or moved)
    if residual.resolve() != Path(resolve_model(target.model)).resolve():
        raise PissaError(f"adapter {target.adapter} is a PiSSA adapter for the residual model {residual}, not for "
                         f"{target.model}; evaluate it on that residual (pass {init} as RUN_OR_MODEL), or "
                         f"convert it to a LoRA for the original model with `pissa convert`")


def check_no_recomputed_base(adapter: Path) -> None:
    """An adapter whose config makes PEFT recompute the base on load (init_lora_weights "pissa_niter_4", ...)
    would be evaluated on a base that is neither the original nor the residual it trained on."""
    init = base_changing_init(read_adapter_config(adapter))
    if init is not None:
        raise PissaError(f"{adapter} says init_lora_weights={init!r}: PEFT would recompute its base on loading it "
                         f"(a new random draw for randomized SVD), so no evaluation of it is meaningful. Convert it "
                         f"first with `pissa convert {adapter} --init INITIAL_ADAPTER` and evaluate the converted "
                         "adapter on the original model")


def check_finite_weights(model, target: Target) -> None:
    """NaN/Inf weights give a 'perplexity nan' that looks like a result: refuse them, naming the tensor."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            where = target.adapter if ".lora_" in name and target.adapter else target.model
            raise PissaError(f"{name} in {where} contains NaN/Inf values; evaluation would only measure that. Fix "
                             "or re-export the weights")


def quantized_init_of(model: str) -> Path | None:
    """The `pissa init --quantize` folder when `model` is its residual, else None."""
    init = init_of_residual(model)
    return init if init is not None and is_quantized_init(init) else None
