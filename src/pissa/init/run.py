"""`pissa init` as a library call: decompose a model's targeted layers and write the two stock
artefacts plus the manifest, atomically (pissa.layout names them):

    OUT/residual/   HF model folder with W_res in place of each targeted W (AutoModel* loads it)
    OUT/adapter/    PEFT LoRA adapter holding A and B (PeftModel.from_pretrained loads it)
    OUT/pissa.json  method, options, seed, versions, per-layer reconstruction error

A local safetensors folder is streamed shard by shard (`init.stream`); anything else (a hub id, a
pickled checkpoint, `--in-memory`) is loaded whole and initialised in memory (`init.layers`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import dtype_name
from ..errors import PissaError
from ..io.atomic import atomic_output_dir, check_output_dir, dir_size
from ..io.manifest import build_manifest, read_manifest, write_manifest
from ..io.reader import is_safetensors_folder
from ..layout import ADAPTER_CONFIG_FILE, ADAPTER_DIR, MANIFEST_FILE, RESIDUAL_DIR, InitDir
from ..models import load_model, meta_model, resolve_model
from .config import PissaConfig
from .coverage import coverage
from .layers import init_model, residual_state_dict
from .quantized import record_into_
from .stream import StreamOptions, stream_init
from .targets import resolve_targets


@dataclass
class InitResult:
    out: Path
    manifest: dict
    trainable_params: int
    seconds: float

    def sizes(self) -> dict[str, int]:
        return {name: dir_size(self.out / name) for name in (RESIDUAL_DIR, ADAPTER_DIR, MANIFEST_FILE)}


def point_adapter_at(adapter_dir: Path, base: Path) -> None:
    """Set the adapter's base_model_name_or_path (read by AutoPeftModel*) to `base`."""
    path = adapter_dir / ADAPTER_CONFIG_FILE
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run_init(
    model: str,
    config: PissaConfig,
    out: str | Path,
    overwrite: bool = False,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    *,
    stream: bool | None = None,
    workers: int = 1,
    device: str = "cpu",
    resume: bool = True,
    batch: bool | None = None,
) -> InitResult:
    """Initialise `model` with `config` and write OUT/{residual,adapter,pissa.json}.

    `progress(done, total, layer_name)` lets a caller drive a progress bar. A local safetensors folder
    (embedded names resolve to one) is streamed in bounded memory (`workers`, `device`, `resume` and
    `batch` apply there, see `StreamOptions`; `dtype` casts each tensor as it streams); `stream=False`
    forces the in-memory path, which also serves hub ids and pickled checkpoints.
    """
    start = time.perf_counter()
    resolved = resolve_model(model)  # once: an embedded name is converted to a folder on first use
    local = is_safetensors_folder(resolved)
    if stream and config.modules_to_save:
        raise PissaError("--modules-to-save: the streaming init does not write the saved modules' copies into the "
                         "adapter; add --in-memory (the modules to save are small, but the whole model is loaded)")
    if stream is None:  # modules to save: PEFT's own save_pretrained writes their copies
        stream = local and not config.modules_to_save
    if stream:
        options = StreamOptions(workers=workers, device=device, resume=resume, batch=batch)
        stream_init(model, resolved, config, out, overwrite, trust_remote_code, progress, options, dtype)
        manifest = read_manifest(out)
    else:
        if workers != 1 or device != "cpu" or batch:
            raise PissaError("--workers, --device and --batch-same-shape apply to streaming init only; drop them "
                             "with --in-memory")
        why = ("asked for (--in-memory)" if not config.modules_to_save else "modules_to_save (PEFT writes their "
               "copies)") if local else "not a local safetensors folder"
        manifest = init_in_memory(model, resolved, config, Path(out), overwrite, dtype, trust_remote_code, progress,
                                  why)
    return InitResult(out=Path(out), manifest=manifest, trainable_params=manifest["trainable_params"],
                      seconds=time.perf_counter() - start)


def init_in_memory(model: str, resolved: str, config: PissaConfig, out: Path, overwrite: bool, dtype: str,
                   trust_remote_code: bool, progress, why: str = "asked for") -> dict:
    """Load the whole model, initialise it with PEFT in memory, and write OUT; returns the manifest, whose
    `in_memory` entry says `why` this path ran."""
    out = check_output_dir(out, overwrite, inputs=[resolved])  # fail before the (slow) load, not after
    resolve_targets(meta_model(resolved, trust_remote_code), config)  # bad targets fail before the load too
    base, tokenizer, path = load_model(resolved, dtype, trust_remote_code)
    covered = coverage(base, resolve_targets(base, config))  # before PEFT wraps the model
    peft_model, layers = init_model(base, config, progress)
    # QPiSSA: the loader settings that reproduce the fitted quantization (None without --quantize).
    quantization = record_into_(peft_model.get_base_model().config, config, layers)
    trainable = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)
    target = InitDir(out)
    with atomic_output_dir(out, overwrite) as tmp:
        folder = InitDir(tmp)
        peft_model.save_pretrained(folder.adapter)
        # AutoPeftModel* finds the residual through this path once the folder is renamed into place.
        point_adapter_at(folder.adapter, target.residual.resolve())
        residual = residual_state_dict(peft_model)
        peft_model.get_base_model().save_pretrained(folder.residual, state_dict=residual)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder.residual)
            tokenizer.save_pretrained(folder.adapter)
        manifest = build_manifest(
            source=str(model),
            config=config.to_dict(),
            layers=layers,
            resolved_path=path,
            residual_dtype=dtype_name(next(iter(residual.values())).dtype),
            trainable_params=trainable,
            quantization=quantization,
            coverage=covered,
        )
        manifest["in_memory"] = {"why": why, "dtype": dtype}
        write_manifest(tmp, manifest)
    return manifest
