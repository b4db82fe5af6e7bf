"""Where a trained PiSSA adapter started: its initial adapter, recognised from the files `--init` names.

- a `pissa init` output (pissa.json + adapter/ + residual/), also when given as its adapter/ folder;
- a LLaMA-Factory output holding `pissa_init/`: a training output_dir (`pissa_convert: true` saves the
  initial adapter there before the first step) or the model folder of its `scripts/pissa_init.py` (the
  residual model, with the initial adapter inside);
- a PEFT initial adapter: the folder PEFT's docs save before training (`init_lora_weights="pissa"` or
  `"pissa_niter_N"`, then `save_pretrained` with `init_lora_weights=True`).

Without a manifest the same checks apply as with one: same layers and shapes as the trained adapter,
trained factors near the initial ones (`inputs.check_init_match`), and the trained adapter's own record of
the base it trained on (`check_provenance`). What the converted adapter applies to is `base_model`: the
original model, or None when the files do not say (then `pissa convert --base` must).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PissaError
from ..io.manifest import read_manifest
from ..layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS_FILE,
    LLAMA_FACTORY_INIT_DIR,
    MODEL_CONFIG_FILE,
    InitDir,
    init_of_residual,
    is_init_dir,
)
from .inputs import check_config_ranks, read_lora_adapter, split_adapter

PISSA_INIT = "pissa init"
PEFT_INIT = "PEFT initial adapter"
LLAMA_FACTORY = "LLaMA-Factory pissa_init"
IN_MEMORY = "initial adapter (in memory)"


@dataclass
class InitSource:
    """The initial adapter a trained PiSSA adapter started from, and what it says about the original model."""

    kind: str  # PISSA_INIT | PEFT_INIT | LLAMA_FACTORY | IN_MEMORY
    path: Path | None  # what --init named (None: in memory)
    adapter: Path | None  # the initial adapter folder (None: in memory)
    config: dict
    pairs: dict  # module -> (A0 (r, in), B0 (out, r))
    base_model: str | None  # the original model the converted adapter applies to; None: the files do not say
    why_no_base: str = ""
    manifest: dict | None = None  # pissa.json of a `pissa init` folder
    notes: list[str] = field(default_factory=list)

    @classmethod
    def in_memory(cls, config: dict, state: dict, base_model: str) -> InitSource:
        """The initial adapter of a live run (`pissa train --model ... --convert-at-end` checks it up front)."""
        config, pairs, _, _ = split_adapter(config, state, "the initial adapter")
        return cls(IN_MEMORY, None, None, config, pairs, base_model)


def read_init_source(path: str | Path) -> InitSource:
    """The initial adapter `--init` names, recognised from its files (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise PissaError(f"--init {path} does not exist; give the `pissa init` folder, the PEFT initial adapter or "
                         "the LLaMA-Factory output the adapter was trained from")
    if is_init_dir(path):
        return pissa_init_source(path)
    if path.name == ADAPTER_DIR and is_init_dir(path.parent):
        return pissa_init_source(path.parent)
    if (path / LLAMA_FACTORY_INIT_DIR / ADAPTER_CONFIG_FILE).exists():
        return llama_factory_source(path)
    if (path / ADAPTER_CONFIG_FILE).exists():
        return peft_init_source(path)
    raise PissaError(f"--init {path} is not a `pissa init` folder (pissa.json), a PEFT initial adapter "
                     f"({ADAPTER_CONFIG_FILE}) or a LLaMA-Factory output ({LLAMA_FACTORY_INIT_DIR}/); give the "
                     "folder the trained adapter started from")


def pissa_init_source(folder: Path) -> InitSource:
    manifest = read_manifest(folder)
    if manifest.get("kind") != "pissa-init":
        raise PissaError(f"{folder}/pissa.json is a {manifest.get('kind')!r} manifest; give a `pissa init` folder")
    adapter = InitDir(folder).adapter
    config, pairs, _, _ = read_lora_adapter(adapter, "init adapter")
    missing = sorted(set(manifest.get("layers", {})) ^ set(pairs))
    if missing:
        raise PissaError(f"{folder}: the initial adapter and pissa.json disagree about layer {missing[0]}; "
                         "the init folder was modified, re-run `pissa init`")
    return InitSource(PISSA_INIT, folder, adapter, config, pairs, base_model_of(manifest), manifest=manifest,
                      notes=quantization_notes(manifest))


def peft_init_source(folder: Path, kind: str = PEFT_INIT) -> InitSource:
    config, pairs, _, _ = read_lora_adapter(folder, "init adapter")
    check_config_ranks(config, pairs, folder)
    base, why = original_model(config.get("base_model_name_or_path"))
    notes = []
    if config.get("inference_mode") is False:
        notes.append(f"{folder}/{ADAPTER_CONFIG_FILE} has inference_mode false: PEFT's own conversion "
                     "(save_pretrained(path_initial_model_for_weight_conversion=...)) already rewrote it with the "
                     "trained config; its tensors are untouched and were used")
    return InitSource(kind, folder, folder, config, pairs, base, why, notes=notes)


def llama_factory_source(root: Path) -> InitSource:
    source = peft_init_source(root / LLAMA_FACTORY_INIT_DIR, LLAMA_FACTORY)
    source.path = root
    if (root / MODEL_CONFIG_FILE).exists():  # scripts/pissa_init.py: the folder is the residual model
        source.base_model, source.why_no_base = None, (
            f"{root} is the residual model LLaMA-Factory's scripts/pissa_init.py wrote, and the original model "
            "is not recorded")
    return source


def is_llama_factory_model(path: str | Path) -> bool:
    """A model folder with the initial adapter inside: the residual written by LLaMA-Factory's scripts/pissa_init.py."""
    path = Path(str(path))
    return (path / MODEL_CONFIG_FILE).exists() and (path / LLAMA_FACTORY_INIT_DIR / ADAPTER_CONFIG_FILE).exists()


def original_model(base: str | None) -> tuple[str | None, str]:
    """(the original model an initial adapter's base_model_name_or_path stands for, or None; why not)."""
    if not base:
        return None, f"its {ADAPTER_CONFIG_FILE} names no base_model_name_or_path"
    init = init_of_residual(base)
    if init is not None:  # a copy of pissa's own initial adapter: its base is the residual
        return base_model_of(read_manifest(init)), ""
    if is_llama_factory_model(base):
        return None, f"its base {base} is the residual model LLaMA-Factory's scripts/pissa_init.py wrote, not the " \
                     "original"
    return base, ""


def init_folder_of(base: str) -> tuple[Path, Path] | None:
    """(init folder to pass as --init, its initial adapter) when a trained adapter's base is a residual model
    whose initial adapter is known: a `pissa init` residual or a LLaMA-Factory residual model folder."""
    init = init_of_residual(base)
    if init is not None:
        return init, InitDir(init).adapter
    if is_llama_factory_model(base):
        return Path(base), Path(base) / LLAMA_FACTORY_INIT_DIR
    return None


def check_provenance(trained_config: dict, source: InitSource, trained_dir: Path) -> None:
    """Refuse an adapter whose config names the residual of another, still existing, init."""
    found = init_folder_of(str(trained_config.get("base_model_name_or_path") or ""))
    if found is None or source.adapter is None:
        return
    other, adapter = found
    if adapter.resolve() == source.adapter.resolve():
        return
    theirs, ours = adapter / ADAPTER_WEIGHTS_FILE, source.adapter / ADAPTER_WEIGHTS_FILE
    if theirs.exists() and ours.exists() and theirs.read_bytes() != ours.read_bytes():
        raise PissaError(f"{trained_dir} was trained on {trained_config['base_model_name_or_path']}, whose init "
                         f"folder {other} differs from --init {source.path}; pass --init {other}")


def base_model_of(manifest: dict) -> str:
    """The original model of a `pissa init` manifest (a loadable path for embedded models)."""
    from ..models import is_embedded

    source = manifest.get("source_model", "")
    resolved = manifest.get("resolved_path")
    if resolved and (is_embedded(source) or Path(resolved).exists()):
        return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved
    return source


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
