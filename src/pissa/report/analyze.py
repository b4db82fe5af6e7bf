"""`pissa analyze`: the paper's diagnostic figures and tables for any model.

- spectra (paper fig. 3a/b): singular values of W and of W_res = W - (adapter part) for chosen layers;
- distributions (appendix G): value histograms of W and W_res per layer type with Gaussian fits
  (mu, sigma), plus the excess kurtosis that says how far each is from a Gaussian (NF4's assumption);
- initial gradients (appendix M, table 11): for one batch, the gradients of A and B of one layer
  under LoRA for several seeds (A's is exactly zero because B = 0; B's direction follows the seed)
  and under PiSSA (a function of W and the data only, identical across seeds).

Everything is computed in fp32 through `pissa.decompose` / `pissa.init`, so `--method` can be
any registered method (the residual of cur or robust is analysed the same way).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..decompose import check_weight, decompose, layer_seed
from ..errors import PissaError, check_number, check_regex
from ..init import ADAPTER_NAME, PissaConfig, init_model, linear_modules
from ..layout import kind_of

# A short fixed batch for the gradient analysis (any text works; fixed so runs are comparable).
GRADIENT_TEXTS = [
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether? Answer: 48 + 24 = 72.",
    "Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn? Answer: 12 / 60 * 50 = 10.",
]
SAMPLE_VALUES = 200_000  # values per layer type kept for a histogram (a seeded random subset)


@dataclass
class AnalyzeConfig:
    """What `pissa analyze` computes."""

    rank: int = field(default=16, metadata={"help": "Adapter rank r: W_res = W minus its rank-r adapter part.",
                                            "flags": ("-r",)})
    method: str = field(default="pissa", metadata={"help": "Decomposition whose residual is analysed.",
                                                   "flags": ("-m",)})
    layers: list[str] = field(
        default_factory=lambda: ["layers.0.self_attn.q_proj"],
        metadata={"help": "Layers (name suffix or regex) whose spectra are plotted, and whose gradients are taken.",
                  "flag": "layer", "flags": ("-l",)},
    )
    seeds: int = field(default=5, metadata={"help": "Seeds of the initial-gradient comparison (paper: 5)."})
    max_length: int = field(default=64, metadata={"help": "Tokens per text of the gradient batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the histogram subsampling and of the method."})

    def __post_init__(self):
        if self.rank <= 0:
            raise PissaError(f"--rank must be > 0, got {self.rank}")
        if self.seeds < 2:
            raise PissaError(f"--seeds must be >= 2 to compare gradients across seeds, got {self.seeds}")
        if not self.layers:
            raise PissaError("give at least one --layer")
        check_number(self.max_length, "--max-length", minimum=2)
        for pattern in self.layers:
            check_regex(pattern, "--layer")
        from ..decompose import get_method

        get_method(self.method)


def select_layers(names: list[str], patterns: list[str]) -> list[str]:
    """Layer names matching each pattern by suffix or full regex, in model order; refuses no match."""
    chosen = []
    for pattern in patterns:
        hits = [n for n in names if n == pattern or n.endswith("." + pattern) or re.fullmatch(pattern, n)]
        if not hits:
            examples = ", ".join(names[:3])
            raise PissaError(f"--layer {pattern!r} matches no linear layer; names look like: {examples}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def residual_of(W: torch.Tensor, name: str, config: AnalyzeConfig) -> torch.Tensor:
    """W_res (out, in) in fp32 after removing the rank-r part `config.method` extracts."""
    factors = decompose(W.detach().float(), config.method, min(config.rank, min(W.shape)),
                        seed=layer_seed(config.seed, name), name=f"{name}.weight")
    return factors.residual.float()


# ---------------------------------------------------------------- spectra


def spectra(weights: dict[str, torch.Tensor], config: AnalyzeConfig) -> dict[str, dict]:
    """Per layer: singular values of W and of W_res, and the share of ||W||_F^2 in the top r."""
    out = {}
    for name, W in weights.items():
        W32 = W.detach().float()  # (out, in)
        s = torch.linalg.svdvals(W32)  # (k,)
        s_res = torch.linalg.svdvals(residual_of(W32, name, config))  # (k,)
        r = min(config.rank, s.numel())
        out[name] = {"s": s, "s_res": s_res, "top_r_energy": (s[:r].pow(2).sum() / s.pow(2).sum()).item(),
                     "s_max": s[0].item(), "s_res_max": s_res[0].item()}
    return out


# ---------------------------------------------------------------- distributions


def gaussian_fit(values: torch.Tensor) -> dict:
    """mu, sigma (the maximum-likelihood Gaussian) and the excess kurtosis (0 for a Gaussian)."""
    v = values.double()
    mu, sigma = v.mean(), v.std()
    kurt = ((v - mu) / sigma).pow(4).mean() - 3 if sigma > 0 else torch.tensor(0.0)
    return {"mu": mu.item(), "sigma": sigma.item(), "excess_kurtosis": kurt.item(),
            "absmax_over_sigma": (v.abs().max() / sigma).item() if sigma > 0 else 0.0}


def subsample(values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    if values.numel() <= k:
        return values
    return values[torch.randint(values.numel(), (k,), generator=generator)]


def distributions(weights: dict[str, torch.Tensor], config: AnalyzeConfig,
                  progress: Callable[[int, int, str], None] | None = None) -> dict[str, dict]:
    """Per layer type: Gaussian fits of all W values and all W_res values, and value samples to plot.

    Each layer contributes at most SAMPLE_VALUES values (a seeded subset; all of them for small
    layers), so memory stays bounded; fits and histograms use the pooled values.
    """
    g = torch.Generator().manual_seed(config.seed)
    sums: dict[str, dict[str, list]] = {}
    for done, (name, W) in enumerate(weights.items(), 1):
        W32 = W.detach().float()
        kind = sums.setdefault(layer_type(name), {"W": [], "W_res": []})
        for key, t in (("W", W32), ("W_res", residual_of(W32, name, config))):
            kind[key].append(subsample(t.flatten(), SAMPLE_VALUES, g))
        if progress:
            progress(done, len(weights), name)
    out = {}
    for kind, parts in sums.items():
        out[kind] = {key: {**gaussian_fit(torch.cat(v)), "sample": subsample(torch.cat(v), SAMPLE_VALUES, g)}
                     for key, v in parts.items()}
    return out


# ---------------------------------------------------------------- initial gradients


def gradient_batch(tokenizer, vocab_size: int, max_length: int) -> dict[str, torch.Tensor]:
    """The fixed batch: GRADIENT_TEXTS tokenized, or seeded random ids when there is no tokenizer."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (len(GRADIENT_TEXTS), max_length), generator=g)  # (batch, length)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(GRADIENT_TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def layer_gradients(model: nn.Module, batch: dict, layer: str, method: str, rank: int, seed: int):
    """(grad A (r, in), grad B (out, r)) of `layer`'s adapter after one backward pass of the LM loss
    on `batch`, with the adapter initialised by `method` with `seed`. `model` is not modified."""
    peft_model, _ = init_model(copy.deepcopy(model), PissaConfig(rank=rank, method=method, seed=seed,
                                                                 targets=f"^{re.escape(layer)}$"))
    peft_model.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    peft_model(**batch, labels=labels).loss.backward()
    module = peft_model.base_model.model.get_submodule(layer)
    return module.lora_A[ADAPTER_NAME].weight.grad.clone(), module.lora_B[ADAPTER_NAME].weight.grad.clone()


def cosine_matrix(vectors: list[torch.Tensor]) -> torch.Tensor:
    """(n, n) cosine similarities of flattened gradients (0 where a gradient is exactly zero)."""
    X = torch.stack([v.flatten().double() for v in vectors])  # (n, d)
    norms = X.norm(dim=1, keepdim=True)  # (n, 1)
    unit = torch.where(norms > 0, X / norms.clamp_min(1e-300), torch.zeros_like(X))
    return unit @ unit.T  # (n, n)


def off_diagonal(M: torch.Tensor) -> torch.Tensor:
    return M[~torch.eye(M.shape[0], dtype=torch.bool)]


def initial_gradients(model: nn.Module, tokenizer, layer: str, config: AnalyzeConfig,
                      progress: Callable[[int, int, str], None] | None = None) -> dict[str, dict]:
    """For LoRA (lora-gaussian, as in the paper) and PiSSA: per seed the gradient norms of A and B
    of `layer`, the pairwise cosine similarities across seeds, and the largest difference between
    any seed's gradient and seed 0's."""
    batch = gradient_batch(tokenizer, model.config.vocab_size, config.max_length)
    results, total, done = {}, 2 * config.seeds, 0
    for label, method in (("LoRA", "lora-gaussian"), ("PiSSA", "pissa")):
        grads = []
        for seed in range(config.seeds):
            grads.append(layer_gradients(model, batch, layer, method, config.rank, seed))
            done += 1
            if progress:
                progress(done, total, f"{label} seed {seed}")
        row = {}
        for key, idx in (("A", 0), ("B", 1)):
            gs = [g[idx] for g in grads]
            cos = cosine_matrix(gs)
            row[key] = {
                "norms": [g.norm().item() for g in gs],
                "max_abs": max(g.abs().max().item() for g in gs),
                "cosine": cos.tolist(),
                "mean_cosine": off_diagonal(cos).mean().item(),
                "max_diff_vs_seed0": max((g - gs[0]).abs().max().item() for g in gs),
            }
        results[label] = row
    return results


# ---------------------------------------------------------------- entry point


@dataclass
class Analysis:
    spectra: dict
    distributions: dict
    gradients: dict | None  # None for models without a causal-LM loss
    gradient_layer: str | None


def analyze_model(model: nn.Module, tokenizer, config: AnalyzeConfig,
                  progress: Callable[[int, int, str], None] | None = None) -> Analysis:
    """All three analyses on a live model (the model is not modified)."""
    modules = linear_modules(model)
    if not modules:
        raise PissaError("the model has no linear layers to analyse")
    chosen = select_layers(list(modules), config.layers)
    weights = {n: kind_of(m).to_matrix(m.weight) for n, m in modules.items()}  # (out, in) each
    for name, W in weights.items():  # NaN/Inf would fail deep inside an SVD: name the tensor instead
        check_weight(W.detach(), 1, f"{name}.weight")
    spec = spectra({n: weights[n] for n in chosen}, config)
    dist = distributions(weights, config, progress)
    has_lm_loss = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    grads = initial_gradients(model, tokenizer, chosen[0], config, progress) if has_lm_loss else None
    return Analysis(spec, dist, grads, chosen[0] if has_lm_loss else None)


def gaussian_pdf(x: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    return torch.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
