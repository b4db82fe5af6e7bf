"""`pissa export`: a LoRA adapter rewritten so that a serving engine (vLLM, SGLang, TGI) loads it as it is
and serves the same model (what each engine reads and refuses: `engines`).

- Every layer's scale is folded into B and the adapter is written with r = lora_alpha = R and no rsLoRA,
  so the one scale every engine computes from the global r and alpha is 1, whatever the rank and alpha
  patterns or rsLoRA of the source.
- Every layer gets the one rank R (from the engine's set): padded exactly with zero rows and columns, or,
  when R is below a layer's rank, truncated to its best rank-R approximation (`lora.truncate`, error
  reported per layer).
- Tensors other than the factors (modules_to_save copies, trained biases) are dropped only where they equal
  the base's, which is exact; otherwise they are refused, as is DoRA, whose normalisation is not a low-rank
  update: those adapters are served as merged models (`pissa merge`).
- A parity check (`parity`) loads the exported adapter with stock transformers + PEFT, reading only the
  config fields the engine reads, and compares its logits with the source adapter merged into the base.

The source is a LoRA for the original model (a converted adapter), or a trained PiSSA adapter with the
init it started from, converted first in memory (`lora.read_conversion`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PissaError
from ..io.adapter_files import base_changing_init, read_lora_form, write_adapter
from ..io.atomic import atomic_output_dir, check_output_dir, dir_size
from ..io.jsonfile import read_json, write_json
from ..io.reader import CheckpointReader
from ..layout import EXPORT_FILE, MAGNITUDE_KEY, MODEL_CONFIG_FILE, init_of_residual, is_init_dir, kind_from_factors
from .engines import ENGINES, EXPORT_FIELDS, Engine
from .factors import scaled, truncate
from .inputs import layer_scale, split_adapter
from .lora import PLAIN_LORA_FIELDS, read_conversion
from .merge import check_fits, open_base, replaced_key, resolve_base
from .sources import init_folder_of, is_llama_factory_model


@dataclass
class ExportConfig:
    """How to export an adapter for a serving engine."""

    engine: str = field(metadata={"flag": "for", "help": "The serving engine: vllm, sglang or tgi."})
    base: str | None = field(default=None, metadata={
        "flags": ("-b",), "help": "The ORIGINAL model the adapter applies to (folder, hub id, embedded name); "
                                  "default: the adapter's base_model_name_or_path."})
    rank: int | None = field(default=None, metadata={
        "flags": ("-r",), "help": "One rank for every layer (vLLM: 1, 8, 16, 32, 64, 128, 256, 320 or 512). "
                                  "Default: the smallest allowed rank >= the largest layer rank (exact zero "
                                  "padding); a lower rank keeps each larger layer's best rank-R approximation "
                                  "and reports its error."})
    init: str | None = field(default=None, metadata={
        "flags": ("-i",), "help": "ADAPTER is a trained PiSSA adapter: the init it started from (`pissa init` "
                                  "folder, PEFT initial adapter, LLaMA-Factory output); it is converted first, in "
                                  "memory."})
    init_check: bool = field(default=True, metadata={
        "help": "With --init: refuse an adapter whose factors did not start from --init's."})
    name: str | None = field(default=None, metadata={
        "help": "The adapter's name in the serving command (default: the output folder's name)."})
    parity: bool = field(default=True, metadata={
        "help": "Compare the exported adapter's logits with the merged model's (loads the base in fp32)."})
    sequences: int = field(default=4, metadata={"help": "Parity check: random token sequences (seeded)."})
    length: int = field(default=32, metadata={"help": "Parity check: tokens per sequence."})
    device: str = field(default="auto", metadata={"help": "Parity check: cpu, cuda, ... (auto: cuda if any)."})

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise PissaError(f"--for {self.engine!r} is not a serving engine pissa exports for; choose one of: "
                             f"{', '.join(ENGINES)}")
        engine = ENGINES[self.engine]
        if self.rank is not None and (self.rank <= 0 or not engine.allowed(self.rank)):
            allowed = ", ".join(map(str, engine.ranks)) if engine.ranks else "a positive integer"
            raise PissaError(f"--rank {self.rank} is not a rank {engine.title} accepts ({allowed})")
        if self.sequences <= 0 or self.length <= 0:
            raise PissaError("--sequences and --length must be positive")


@dataclass
class ExportResult:
    out: Path
    engine: Engine
    rank: int
    base: str  # the base model as the serving command names it
    layers: dict[str, dict]  # module -> {rank_in, action (kept | padded | compressed), rel_err, ...}
    dropped: list[str]  # full tensors left out because they equal the base's
    parity: dict | None
    command: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def max_rel_err(self) -> float:
        return max((info["rel_err"] for info in self.layers.values()), default=0.0)

    def size(self) -> int:
        return dir_size(self.out)


# --- the source adapter and the base --------------------------------------------------------------

def read_source(adapter: Path, config: ExportConfig) -> tuple[dict, dict, list[str]]:
    """(config, state, notes) of the LoRA to export: the adapter as it is, or converted from its --init."""
    if config.init is not None:
        converted = read_conversion(adapter, config.init, check_init=config.init_check, base=config.base)
        return converted.config, converted.state, converted.notes
    lora_config, state = read_lora_form(adapter)
    found = init_folder_of(str(lora_config.get("base_model_name_or_path") or ""))
    init = base_changing_init(lora_config)
    if found is not None or init is not None:
        how = f"trained on the residual {lora_config['base_model_name_or_path']}" if found else \
            f"its config says init_lora_weights={init!r}: PEFT trained it on a base it changed in memory"
        raise PissaError(f"{adapter} is a trained PiSSA-style adapter ({how}); it does not apply to the original "
                         f"model as it is. Pass --init {found[0] if found else 'INITIAL_ADAPTER'} to convert it first")
    return lora_config, state, []


def open_original(base: str | None, adapter: Path) -> tuple[Path, CheckpointReader, str]:
    """(local folder, reader, name for the serving command) of the original model; refuses a residual."""
    from ..models import is_embedded

    if not base:
        raise PissaError(f"{adapter} names no base_model_name_or_path; pass --base ORIGINAL_MODEL")
    folder = Path(str(base)).expanduser()
    if is_init_dir(folder) or init_of_residual(folder) is not None or is_llama_factory_model(folder):
        raise PissaError(f"--base {base} is a PiSSA init or residual model; the exported adapter applies to the "
                         "ORIGINAL model: pass that as --base")
    base_dir = resolve_base(base)
    local = folder.exists() or is_embedded(str(base))
    served = str(base_dir.resolve()) if local else str(base)  # a hub id: the engine fetches it itself
    return base_dir, open_base(base_dir), served


def drop_base_copies(others: dict, reader: CheckpointReader, engine: Engine, adapter: Path) -> list[str]:
    """Names of the full tensors that equal the base's (left out: exact); refuses any other."""
    dropped = []
    for name, tensor in others.items():
        if name.endswith(MAGNITUDE_KEY):
            continue
        key = replaced_key(name, tensor, reader)
        if not torch.equal(reader.read([key])[key].to(tensor.dtype), tensor):
            raise PissaError(f"{adapter} holds {name}, a trained full tensor (modules_to_save or bias) that "
                             f"{engine.title} does not load from an adapter; serve the merged model instead "
                             "(`pissa merge`)")
        dropped.append(name)
    return dropped


# --- the rewrite ----------------------------------------------------------------------------------

def check_layers(pairs: dict, embeddings: set[str], lora_config: dict, reader: CheckpointReader,
                 engine: Engine) -> None:
    """Every layer fits the base and is one the engine applies an adapter to; embeddings cover its vocabulary."""
    vocab = read_json(reader.folder / MODEL_CONFIG_FILE, "", "").get("vocab_size")
    for module, (A, B) in pairs.items():
        kind = kind_from_factors(A, module in embeddings, bool(lora_config.get("fan_in_fan_out")))
        check_fits(module, A, B, kind, reader)
        if not engine.applies_to(module) or (module in embeddings and not engine.embeddings):
            raise PissaError(f"{engine.title} does not apply adapters to layer {module} (it would be served without "
                             "it); serve the merged model instead (`pissa merge`)")
        if module in embeddings and vocab is not None and A.shape[1] != vocab:
            raise PissaError(f"the adapter's embedding {module} covers {A.shape[1]} tokens but the base vocabulary "
                             f"has {vocab}; {engine.title} requires them equal (a resized vocabulary?)")


def choose_rank(engine: Engine, ranks: dict[str, int], requested: int | None) -> int:
    """The one rank every layer is exported at (see ExportConfig.rank)."""
    if requested is not None:
        return requested
    top = max(ranks.values())
    if engine.ranks is None:
        return top
    fits = [r for r in engine.ranks if r >= top]
    if not fits:
        module = max(ranks, key=ranks.get)
        raise PissaError(f"layer {module} has rank {top}, above the largest rank {engine.title} serves "
                         f"({engine.ranks[-1]}); pass --rank {engine.ranks[-1]} (or lower) to keep each layer's best "
                         "approximation at that rank")
    return fits[0]


def uniform_layer(A: torch.Tensor, B: torch.Tensor, scale: float, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The layer's update `scale·B@A` as factors of rank `rank` served with scale 1: zero-padded (exact), or its
    best rank-`rank` approximation. Conv factors keep their layout (A (r, in, kh, kw), B (out, r, 1, 1))."""
    r = A.shape[0]
    info = {"rank_in": r, "action": "kept" if r == rank else "padded", "rel_err": 0.0}
    if r > rank:  # the best approximation has rank <= min(out, in): then it is exact, and padded
        k = min(rank, A.flatten(1).shape[1], B.shape[0])
        A, B, fit = truncate(A, B, scale, k, 1.0)  # (k, in), (out, k), with B @ A = the truncated update
        r, scale, info = k, 1.0, {**info, "action": "compressed", **fit}
    A_out = A.new_zeros((rank, *A.shape[1:]))  # (R, in)
    A_out[:r] = A
    B_out = B.new_zeros((B.shape[0], rank, *B.shape[2:]))  # (out, R)
    B_out[:, :r] = scaled(B, scale, B.dtype)
    return A_out, B_out, info


def export_config(lora_config: dict, rank: int, base: str, pairs: dict) -> dict:
    """A minimal, standard LoRA config: one rank, alpha = rank (scale 1), nothing but LoRA factors."""
    config = {k: lora_config[k] for k in EXPORT_FIELDS if k in lora_config}
    config.update(PLAIN_LORA_FIELDS)
    config.update(peft_type="LORA", base_model_name_or_path=base, r=rank, lora_alpha=rank, use_rslora=False,
                  use_dora=False, rank_pattern={}, alpha_pattern={}, modules_to_save=None, bias="none",
                  target_modules=sorted({m.rsplit(".", 1)[-1] for m in pairs}))
    return {k: config[k] for k in sorted(config) if k in EXPORT_FIELDS}


def rewrite(lora_config: dict, pairs: dict, embeddings: set[str], rank: int, progress) -> tuple[dict, dict]:
    """(state, per-layer info) of every layer at `rank` with its scale folded into B."""
    from ..layout import EMBEDDING, LINEAR

    state, layers = {}, {}
    for done, module in enumerate(sorted(pairs), 1):
        A, B, info = uniform_layer(*pairs[module], layer_scale(lora_config, module), rank)
        key_A, key_B = (EMBEDDING if module in embeddings else LINEAR).factor_keys(module)
        state[key_A], state[key_B] = A, B  # (R, in), (out, R)
        layers[module] = info
        if progress:
            progress(done, len(pairs), module)
    return state, layers


# --- the entry point ----------------------------------------------------------------------------

def export_adapter(adapter: str | Path, out: str | Path, config: ExportConfig, overwrite: bool = False,
                   progress: Callable[[int, int, str], None] | None = None) -> ExportResult:
    """Write `adapter` to `out` as a plain LoRA that `config.engine` loads as it is (see the module docstring),
    with export.json (ranks, errors, parity, the serving command). Nothing is written unless all succeeds."""
    start, adapter, engine = time.perf_counter(), Path(adapter), ENGINES[config.engine]
    out = check_output_dir(out, overwrite, inputs=[adapter, config.init, config.base])
    lora_config, state, notes = read_source(adapter, config)
    lora_config, pairs, others, embeddings = split_adapter(lora_config, state, f"adapter {adapter}")
    if lora_config.get("use_dora"):
        raise PissaError(f"{adapter} is a DoRA adapter: {engine.title} serves LoRA only, and DoRA's normalisation is "
                         "not a low-rank update, so no LoRA equals it; serve the merged model (`pissa merge`)")
    base_dir, reader, served = open_original(config.base or lora_config.get("base_model_name_or_path"), adapter)
    dropped = drop_base_copies(others, reader, engine, adapter)
    check_layers(pairs, embeddings, lora_config, reader, engine)
    rank = choose_rank(engine, {m: A.shape[0] for m, (A, _) in pairs.items()}, config.rank)
    new_state, layers = rewrite(lora_config, pairs, embeddings, rank, progress)
    new_config = export_config(lora_config, rank, served, pairs)
    name = config.name or Path(out).name
    command = engine.command(served, name, str(Path(out).resolve()), rank, new_config["target_modules"])
    reference = reference_adapter(lora_config, state, dropped)
    with atomic_output_dir(out, overwrite) as tmp:
        write_adapter(tmp, new_config, new_state)
        parity = None
        if config.parity:
            from .parity import check_exact, parity_check

            parity = parity_check(base_dir, reference, (new_config, new_state), engine, config)
            check_exact(parity, layers)
        write_json(tmp / EXPORT_FILE, {
            "kind": "pissa-export", "engine": engine.name, "source": str(adapter.resolve()), "init": config.init,
            "base": served, "rank": rank, "engine_reads": list(engine.reads), "layers": layers,
            "dropped_equal_to_base": dropped, "parity": parity, "command": command, "notes": notes})
    return ExportResult(out, engine, rank, served, layers, dropped, parity, command, time.perf_counter() - start,
                        notes)


def reference_adapter(lora_config: dict, state: dict, dropped: list[str]) -> tuple[dict, dict]:
    """The source adapter as PEFT loads it, without the full tensors that equal the base's (no effect)."""
    if not dropped:
        return lora_config, state
    kept = {k: v for k, v in state.items() if k not in dropped}
    return {**lora_config, "modules_to_save": None, "bias": "none"}, kept
