"""PiSSA -> LoRA conversion of fused expert tensors (MoE models), per expert.

PEFT packs a fused tensor's adapters as lora_A (R*E, in) and lora_B (out, R*E) (`pissa.layout.ExpertLayout`),
so the rank-2r rewrite of `convert.lora` (appendix C) is done expert by expert: for expert e

    ΔW_e = s_t·B'_e A'_e - s_i·B_e A_e = s_out · [B'_e·s_t/s_out | -B_e·s_i/s_out] @ [A'_e; A_e]     (rank 2R)

and the result is packed again at rank 2R. Compression to `--rank k` truncates each expert's ΔW_e to its best
rank k * parts (k for each matrix of the checkpoint, so a gate_up tensor gets 2k, as `pissa init --rank k` gave
it). The init's pissa.json records which adapter modules hold fused tensors (`init.experts.ExpertTarget.record`),
so no model is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PissaError
from ..init.experts import own_pattern
from ..layout import EXPERTS, ExpertLayout
from .factors import Update, delta_fro, stack_2r, truncate
from .inputs import init_similarity, layer_rank_alpha, layer_scale


@dataclass(frozen=True)
class ExpertRef:
    """A fused expert tensor as the init's manifest records it."""

    module: str  # the adapter module PEFT saves its factors under
    parameter: str  # the live parameter (PEFT's rank/alpha pattern key)
    num_experts: int
    layout: ExpertLayout


def expert_refs(manifest: dict) -> dict[str, ExpertRef]:
    """Adapter module -> fused expert tensor, from an init's pissa.json (empty for a dense model)."""
    return {m: ExpertRef(m, info["parameter"], info["num_experts"], ExpertLayout.from_dict(info["layout"]))
            for m, info in manifest.get("layers", {}).items() if info.get("kind") == EXPERTS}


@dataclass
class Experts:
    """The expert modules of a conversion, taken out of the dense layers' way (`split_experts`)."""

    refs: dict[str, ExpertRef]
    trained: dict[str, tuple[torch.Tensor, torch.Tensor]]
    init: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def similarity(self) -> dict[str, float]:
        return {m: init_similarity(self.trained[m], self.init[m]) for m in self.trained}


def split_experts(manifest: dict, trained_config: dict, trained: dict, init: dict, trained_dir, init_dir) -> Experts:
    """Move the fused-expert modules out of `trained` and `init` (in place) and check they pair up and that the
    trained adapter's config gives them their ranks."""
    refs = expert_refs(manifest)
    experts = Experts(refs, {m: trained.pop(m) for m in refs if m in trained}, {m: init.pop(m) for m in refs})
    missing = sorted(set(refs) - set(experts.trained))
    if missing:
        raise PissaError(f"targets differ: the init adapts expert tensor {refs[missing[0]].parameter} but the trained "
                         f"adapter {trained_dir} does not; give the --init folder it was trained from ({init_dir})")
    for m, (A1, B1) in experts.trained.items():
        A0, B0 = experts.init[m]
        if A1.shape != A0.shape or B1.shape != B0.shape:
            raise PissaError(f"expert tensor {refs[m].parameter}: trained A {tuple(A1.shape)}, B {tuple(B1.shape)} "
                             f"but init A {tuple(A0.shape)}, B {tuple(B0.shape)}; give the --init folder it was "
                             "trained from")
    check_expert_ranks(trained_config, experts, trained_dir)
    return experts


def check_expert_ranks(config: dict, experts: Experts, folder) -> None:
    """The rank the adapter config gives each fused tensor must be its factors' rank per expert."""
    for m, (A, _) in experts.trained.items():
        ref = experts.refs[m]
        r = layer_rank_alpha(config, ref.parameter)[0]
        if r * ref.num_experts != A.shape[0]:
            raise PissaError(f"{folder}: adapter_config.json gives expert tensor {ref.parameter} rank {r} but its "
                             f"lora_A holds rank {A.shape[0] // ref.num_experts} per expert; re-save the adapter")


def compressed_rank(ref: ExpertRef, rank: int, A: torch.Tensor, B: torch.Tensor) -> int:
    """--rank k per checkpoint matrix: k * parts for the fused tensor; refused beyond what the 2R factors hold."""
    k = rank * ref.layout.n_parts
    limit = min(2 * A.shape[0] // ref.num_experts, A.shape[1], B.shape[0])
    if rank <= 0 or k > limit:
        raise PissaError(f"--rank {rank} gives expert tensor {ref.parameter} rank {k} ({ref.layout.n_parts} matrices "
                         f"per expert), larger than its converted rank {limit} = min(2R, in, out); choose a lower "
                         "--rank, or omit it for the exact 2r adapter")
    return k


def compressed_config(config: dict, experts: Experts, dense: list[str], rank: int) -> dict:
    """The compressed config gives fused gate_up tensors rank (and alpha) `rank` * parts."""
    fused = [r.parameter for r in experts.refs.values() if r.layout.n_parts > 1 and r.module in experts.trained]
    if not fused:
        return config
    n = next(r.layout.n_parts for r in experts.refs.values() if r.layout.n_parts > 1)
    others = dense + [r.parameter for r in experts.refs.values() if r.parameter not in fused]
    pattern = own_pattern(fused, others)
    return {**config, "rank_pattern": {pattern: rank * n}, "alpha_pattern": {pattern: rank * n}}


def convert_experts(experts: Experts, trained_config: dict, init_config: dict, config: dict,
                    rank: int | None) -> tuple[dict, dict]:
    """(adapter state, per-module info) of every fused tensor: exact rank 2R, or each expert truncated, with
    `convert.lora`'s per-matrix arithmetic."""
    state, layers = {}, {}
    for m, trained in experts.trained.items():
        ref = experts.refs[m]
        s_t, s_i, s_out = (layer_scale(c, ref.parameter) for c in (trained_config, init_config, config))
        A1, B1 = ref.layout.unpack(*trained, ref.num_experts)  # (E, R, in), (E, out, R)
        A0, B0 = ref.layout.unpack(*experts.init[m], ref.num_experts)
        k = None if rank is None else compressed_rank(ref, rank, *trained)
        As, Bs, infos = [], [], []
        for e in range(ref.num_experts):
            A2, B2 = stack_2r((A1[e], B1[e]), (A0[e], B0[e]), s_t, s_i, s_out)  # (2R, in), (out, 2R)
            if k is None:
                As.append(A2), Bs.append(B2), infos.append({"delta_fro": delta_fro(A2, B2, s_out), "err_fro": 0.0})
            else:
                A, B, info = truncate(A2, B2, s_out, k, s_out)
                As.append(A), Bs.append(B), infos.append(info)
        A, B = ref.layout.pack(torch.stack(As), torch.stack(Bs))  # (R'*E, in), (out, R'*E)
        state.update(dict(zip(ref.layout.factor_keys(m), (A, B), strict=True)))
        total = math.sqrt(sum(i["delta_fro"] ** 2 for i in infos))
        err = math.sqrt(sum(i["err_fro"] ** 2 for i in infos))
        layers[m] = {"parameter": ref.parameter, "num_experts": ref.num_experts, "rank_in": A1.shape[1],
                     "rank_out": A.shape[0] // ref.num_experts, "delta_fro": total, "err_fro": err,
                     "rel_err": err / total if total > 0 else 0.0,
                     "init_similarity": init_similarity(trained, experts.init[m])}
    return state, layers



# --- merging ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusedUpdate:
    """What to add to a checkpoint tensor that stores a whole fused expert tensor: scale * B_e @ A_e per expert."""

    A: torch.Tensor  # (E, R, in)
    B: torch.Tensor  # (E, out, R)
    scale: float
    layout: ExpertLayout

    def merge_into(self, W: torch.Tensor) -> torch.Tensor:
        """W (stored layout) + the update, added in fp32 and rounded once to W's dtype."""
        M = self.layout.matrices(W.float()) + self.scale * torch.bmm(self.B.float(), self.A.float())  # (E, out, in)
        return self.layout.from_matrices(M).to(W.dtype)


def expert_updates(adapter, config: dict, pairs: dict, reader) -> dict:
    """Checkpoint tensor -> update for the fused-expert factor pairs of an adapter (removed from `pairs`):
    per-expert checkpoint tensors get their own rows of scale * B_e @ A_e (a `merge.Update`), a fused one the
    whole stack. Where they go is read from the base's config on the meta device (`init.expert_disk`)."""
    if not config.get("target_parameters"):
        return {}
    from ..init.expert_disk import expert_slots
    from ..init.experts import adapter_experts, check_expert_factors
    from ..layout import LINEAR
    from ..models import meta_model

    model = meta_model(reader.folder)
    where = adapter_experts(model, config["target_parameters"])
    mine = {m: pairs.pop(m) for m in list(pairs) if m in where}
    factors = {}
    for m, (A, B) in mine.items():
        t = where[m]
        check_expert_factors(t, A, B, f"adapter {adapter} layer {m} on base {reader.folder}")
        factors[t.key] = (t, *t.layout.unpack(A, B, t.num_experts), layer_scale(config, t.key))
    shapes = {k: reader.entry(k).shape for k in reader.weight_map}
    plan = {}
    for key, slot in expert_slots(model, shapes, {k: f[0] for k, f in factors.items()}).items():
        t, A, B, scale = factors[slot.key]
        if slot.expert is None:
            plan[key] = FusedUpdate(A, B, scale, t.layout)
        else:
            rows = t.layout.rows(t.matrix_shape[0], slot.part)
            plan[key] = Update(A[slot.expert], B[slot.expert][rows], scale, LINEAR)  # (R, in), (out/parts, R)
    return plan
