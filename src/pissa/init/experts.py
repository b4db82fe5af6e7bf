"""Fused 3-D expert tensors of transformers 5 MoE models as PiSSA targets.

transformers 5 keeps a MoE block's experts as fused parameters, `mlp.experts.gate_up_proj` (E, 2I, H) and
`mlp.experts.down_proj` (E, H, I) (`pissa.layout.ExpertLayout` says where each expert's matrices are), while
the checkpoint on disk usually keeps one tensor per expert. PEFT adapts them with
`LoraConfig(target_parameters=[...])` (its `ParamWrapper`), one rank-R adapter per expert.

pissa decomposes every matrix of every expert on its own: gate and up separately at rank k each, so the
fused gate_up adapter has R = 2k (block-diagonal B; the layout PEFT itself gives per-expert gate/up adapters
of transformers 4 when it loads them), and down at rank k. That is exactly PiSSA on the checkpoint's own
per-expert matrices, as a dense model's gate_proj and up_proj get it, and each disk tensor is decomposed
alone, which is what lets the streaming init hold one expert matrix at a time.

This module says which tensors are experts and routers, which of them a config targets, their ranks, the
rank/alpha patterns that give gate_up its 2k at the same scale as a dense layer, and whether PEFT keeps a
config as written (it rewrites `target_modules` of some MoE families on transformers 5: huggingface/peft#3711).
"""

from __future__ import annotations

import ast
import copy
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..decompose import lora_scale
from ..errors import PissaError
from ..layout import ExpertLayout, expert_layout, is_experts_module, wrapper_modules


@dataclass(frozen=True)
class ExpertTensor:
    """One fused expert parameter of a model."""

    key: str  # the live parameter's name, e.g. model.layers.0.mlp.experts.gate_up_proj (PEFT's pattern key)
    module: str  # model.layers.0.mlp.experts
    param: str  # gate_up_proj
    layout: ExpertLayout
    shape: tuple[int, int, int]  # as stored: (E, out, in), or (E, in, out) when transposed

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out, in) of one expert's fused matrix."""
        return (self.shape[2], self.shape[1]) if self.layout.transposed else (self.shape[1], self.shape[2])

    @property
    def part_shape(self) -> tuple[int, int]:
        """(out, in) of one part (gate, up) of one expert: the matrix pissa decomposes."""
        out, n_in = self.matrix_shape
        return out // self.layout.n_parts, n_in


@dataclass(frozen=True)
class ExpertTarget:
    """A targeted fused expert tensor: its per-matrix rank, PEFT's scale and where PEFT saves its factors."""

    tensor: ExpertTensor
    adapter_module: str  # the ParamWrapper's path (module, or module.base_layer... when several are wrapped)
    rank: int  # k: the rank of each part of each expert
    scale: float  # the scale PEFT applies at rank k * parts

    @property
    def key(self) -> str:
        return self.tensor.key

    @property
    def layout(self) -> ExpertLayout:
        return self.tensor.layout

    @property
    def peft_rank(self) -> int:
        return self.rank * self.layout.n_parts

    def matrix_name(self, expert: int, part: int) -> str:
        """The name of one expert's part (its seed and error messages): `...gate_up_proj.3.gate`."""
        name = self.layout.part_names()[part]
        return f"{self.key}.{expert}" + (f".{name}" if name else "")

    def record(self) -> dict:
        """What pissa.json keeps about the tensor, so that convert and merge need no model."""
        t = self.tensor
        return {"kind": t.layout.name, "parameter": t.key, "num_experts": t.num_experts, "shape": list(t.shape),
                "layout": t.layout.to_dict(), "rank": self.rank, "peft_rank": self.peft_rank, "scale": self.scale}


# --- recognising experts and routers --------------------------------------------------------------

def expert_tensors(model: nn.Module) -> dict[str, ExpertTensor]:
    """Every fused expert weight of the model (not its biases), by live parameter name, in model order."""
    found = {}
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        for param, tensor in module.named_parameters(recurse=False):
            layout = expert_layout(module, param)
            if layout is not None:
                found[f"{name}.{param}"] = ExpertTensor(f"{name}.{param}", name, param, layout, tuple(tensor.shape))
    return found


def expert_containers(model: nn.Module) -> set[str]:
    """Names of the modules that hold fused experts, and of their submodules (an activation): not targets
    themselves, their fused tensors are."""
    boxes = [n for n, m in model.named_modules() if is_experts_module(m)]
    return {n for n, _ in model.named_modules() if any(n == b or n.startswith(b + ".") for b in boxes)}


def router_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The routers and gates of MoE blocks: children of a block with experts that hold a 2-D weight themselves
    (Qwen3/Mixtral `mlp.gate`, Qwen2-MoE `mlp.shared_expert_gate`, ...). Never targeted by default."""
    found = {}
    for name, block in model.named_modules():
        children = dict(block.named_children())
        if not any(is_experts_module(c) for c in children.values()):
            continue
        for child_name, child in children.items():
            weight = getattr(child, "weight", None)
            if not is_experts_module(child) and isinstance(weight, torch.Tensor) and weight.ndim == 2:
                found[f"{name}.{child_name}" if name else child_name] = child
    return found


def default_expert_targets(tensors: dict[str, ExpertTensor]) -> list[str]:
    """`target_parameters` naming every expert tensor: `experts.gate_up_proj`-style suffixes."""
    return sorted({f"{t.module.rsplit('.', 1)[-1]}.{t.param}" for t in tensors.values()})


def adapter_experts(model: nn.Module, target_parameters) -> dict[str, ExpertTensor]:
    """Where an adapter with these `target_parameters` keeps each fused tensor's factors on `model`: the
    module path PEFT saves them under (`layout.wrapper_modules`) -> the tensor. PEFT's own matching: a name
    equal to the parameter's or a suffix of it."""
    names = list(target_parameters or ())
    by_module: dict[str, list[ExpertTensor]] = {}
    for key, t in expert_tensors(model).items():
        if any(key == n or key.endswith(f".{n}") for n in names):
            by_module.setdefault(t.module, []).append(t)
    found = {}
    for module, ts in by_module.items():
        paths = wrapper_modules(module, [t.param for t in ts])
        found.update({paths[t.param]: t for t in ts})
    return found


def check_expert_factors(tensor: ExpertTensor, A: torch.Tensor, B: torch.Tensor, where: str) -> int:
    """The per-expert rank R of PEFT factors A (R*E, in), B (out, R*E) of `tensor`, or a PissaError naming `where`."""
    out, n_in = tensor.matrix_shape
    E = tensor.num_experts
    R = A.shape[0] // E if A.ndim == 2 else 0
    if A.ndim != 2 or B.ndim != 2 or A.shape != (R * E, n_in) or B.shape != (out, R * E) or R == 0:
        raise PissaError(f"{where}: the factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit {tensor.key} "
                         f"({E} experts of {out}x{n_in}); the adapter was made for another model")
    return R


# --- ranks, scales and PEFT's patterns ---------------------------------------------------------------

def pattern_value(pattern: dict, key: str, default):
    """PEFT's own lookup of a per-layer rank or alpha."""
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(list(pattern), key), default)


def expert_targets(config, tensors: list[ExpertTensor], all_targeted: dict[str, list[str]]) -> dict[str, ExpertTarget]:
    """The targets for `tensors` (per-matrix rank from --rank / --rank-pattern, PEFT's scale at k * parts).
    `all_targeted` maps each experts module to its targeted parameters in registration order."""
    found = {}
    for t in tensors:
        rank = int(pattern_value(config.rank_pattern, t.key, config.rank))
        alpha = config.alpha_for(rank)
        scale = lora_scale(peft_alpha(alpha, rank, t.layout.n_parts, config.use_rslora), rank * t.layout.n_parts,
                           config.use_rslora)
        out, n_in = t.part_shape
        if rank > min(out, n_in):
            raise PissaError(f"{t.key}: rank {rank} exceeds min(out, in) = {min(out, n_in)} of each expert's "
                             f"{out}x{n_in} matrices; lower --rank or override it with --rank-pattern")
        module = wrapper_modules(t.module, all_targeted[t.module])[t.param]
        found[t.key] = ExpertTarget(t, module, rank, scale)
    return found


def peft_alpha(alpha: float, rank: int, parts: int, rslora: bool) -> float:
    """The alpha that gives rank * parts the scale `alpha` gives `rank` (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    if parts == 1:
        return float(alpha)
    return float(alpha) * (parts ** 0.5 if rslora else parts)


def expert_patterns(config, modules: dict[str, int], experts: dict[str, ExpertTarget]) -> tuple[dict, dict]:
    """(rank_pattern, alpha_pattern) for PEFT: the config's own, plus gate_up's doubled rank and alpha.

    A user pattern that matches fused gate_up tensors gets its rank doubled (it means each of gate and up);
    it may not also match other layers. gate_up tensors no user pattern matches get one pattern of their own.
    Every target is then looked up with PEFT's own matcher, in both dict orders, to prove the result.
    """
    rank_pattern = dict(config.rank_pattern)
    alpha_pattern = {k: float(r) for k, r in config.rank_pattern.items()} if config.alpha is None else {}
    fused = {k: t for k, t in experts.items() if t.layout.n_parts > 1}
    others = [*modules, *(k for k in experts if k not in fused)]
    claimed = set()
    for pattern in config.rank_pattern:
        hits = {k for k in fused if re.match(rf"(.*\.)?({pattern})$", k)}
        if not hits:
            continue
        if any(re.match(rf"(.*\.)?({pattern})$", n) for n in others):
            raise PissaError(f"--rank-pattern {pattern} matches fused gate_up expert tensors (gate and up each get "
                             "the rank, packed as twice the rank) and other layers too; give gate_up_proj a "
                             "pattern of its own")
        claimed |= hits
        t = fused[next(iter(hits))]
        rank_pattern[pattern] = t.peft_rank
        alpha_pattern[pattern] = peft_alpha(config.alpha_for(t.rank), t.rank, t.layout.n_parts, config.use_rslora)
    rest = [k for k in fused if k not in claimed]
    if rest:
        pattern = own_pattern(rest, [*others, *claimed])
        t = fused[rest[0]]
        rank_pattern[pattern] = t.peft_rank
        alpha_pattern[pattern] = peft_alpha(config.alpha_for(t.rank), t.rank, t.layout.n_parts, config.use_rslora)
    check_patterns(config, rank_pattern, alpha_pattern, modules, experts)
    return rank_pattern, alpha_pattern


def own_pattern(keys: list[str], avoid: list[str]) -> str:
    """One PEFT pattern that matches exactly `keys`: their common leaf name when that matches nothing in
    `avoid`, else the alternation of their full names."""
    leaves = {k.rsplit(".", 1)[-1] for k in keys}
    if len(leaves) == 1:
        leaf = re.escape(next(iter(leaves)))
        if not any(re.match(rf"(.*\.)?({leaf})$", n) for n in avoid):
            return leaf
    return "|".join(re.escape(k) for k in keys)


def check_patterns(config, rank_pattern: dict, alpha_pattern: dict, modules: dict[str, int],
                   experts: dict[str, ExpertTarget]) -> None:
    """Every target gets its intended rank and scale from PEFT, whatever order the patterns are read in."""
    alpha0 = config.alpha_for(config.rank)
    for order in (list, sorted):
        ranks, alphas = {k: rank_pattern[k] for k in order(rank_pattern)}, {k: alpha_pattern[k] for k in
                                                                            order(alpha_pattern)}
        for key, t in experts.items():
            r, a = pattern_value(ranks, key, config.rank), pattern_value(alphas, key, alpha0)
            if r != t.peft_rank or abs(lora_scale(a, r, config.use_rslora) - t.scale) > 1e-12 * t.scale:
                raise PissaError(f"the rank patterns give expert tensor {key} rank {r}, not {t.peft_rank}: "
                                 f"{sorted(config.rank_pattern)} overlap; make them name disjoint layers")
        for name, rank in modules.items():
            if pattern_value(ranks, name, config.rank) != rank:
                raise PissaError(f"the rank patterns give {name} another rank than {rank}: "
                                 f"{sorted(config.rank_pattern)} overlap with gate_up_proj; make them disjoint")


# --- what PEFT does with the config ----------------------------------------------------------------

def peft_rewrites(lora, model: nn.Module) -> list[str]:
    """The `target_modules` entries that PEFT moves elsewhere when it meets this config on this model.

    On transformers 5, PEFT rewrites target_modules of MoE families it knows from transformers 4 (Mixtral,
    Qwen2-MoE-style: Qwen3-MoE, DeepSeek-V3, OLMoE, ...): names ending in gate_proj/up_proj/down_proj (w1/w3/w2)
    or gate become the fused expert tensors, also when they name dense or shared-expert layers
    (huggingface/peft#3711). It does so again whenever the adapter is loaded, so a config it would rewrite
    cannot be saved as is.
    """
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without the transformers-5 conversion rewrites nothing
        return []
    def rewritten(config) -> bool:
        probe = copy.deepcopy(config)
        try:
            convert_peft_config_for_transformers(probe, model=model, conversions=None)
        except ValueError:  # e.g. gate_proj named without up_proj: PEFT refuses to convert half a fused pair
            return True
        return (as_set(config.target_modules) != as_set(probe.target_modules)
                or set(config.target_parameters or ()) != set(probe.target_parameters or ())
                or dict(config.rank_pattern) != dict(probe.rank_pattern))

    if not rewritten(lora):
        return []
    if isinstance(lora.target_modules, str):
        return [lora.target_modules]
    return [t for t in sorted(lora.target_modules or ()) if rewritten(with_targets(lora, {t}))]


def with_targets(lora, target_modules):
    one = copy.deepcopy(lora)
    one.target_modules = target_modules
    return one


def as_set(targets):
    return targets if isinstance(targets, str) else set(targets or ())


def check_peft_keeps(lora, model: nn.Module, user_targets: bool) -> None:
    """Refuse a config PEFT would rewrite on load (it would adapt other layers than the ones decomposed)."""
    moved = peft_rewrites(lora, model)
    if not moved:
        return
    family = getattr(getattr(model, "config", None), "model_type", "this")
    what = "--targets" if user_targets else "the default targets"
    raise PissaError(
        f"{what} name {', '.join(moved)}, which PEFT rewrites to the fused expert tensors on {family} models "
        "when it loads an adapter (huggingface/peft#3711), so these dense or shared-expert layers cannot get a "
        "stock-loadable adapter; leave them out (the routed experts are targeted as experts.gate_up_proj and "
        "experts.down_proj)")


SPURIOUS = re.compile(r"The following (?:rank|alpha)_pattern keys did not match any targeted module and were "
                      r"ignored: (\[.*\])\.")


@contextmanager
def pattern_warnings_checked(target_parameters):
    """Run PEFT, dropping only its spurious warning that a rank/alpha pattern of a targeted expert tensor
    "did not match any targeted module": PEFT 0.21.2 checks patterns against target_modules only, and the
    pattern does apply (the ParamWrapper gets its rank). Every other warning is re-issued as it was."""
    params = list(target_parameters or ())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        found = SPURIOUS.search(str(w.message))
        keys = ast.literal_eval(found.group(1)) if found else None
        if keys and all(any(re.match(rf"(.*\.)?({k})$", p) for p in params) for k in keys):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
