"""The end of a streaming init: the per-shard records merged into the adapter folder, the residual's
shard index, the model's config and tokenizer files, and the manifest."""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

from ..dtypes import dtype_name
from ..errors import PissaError
from ..io.jsonfile import write_json as write_plain_json
from ..io.manifest import build_manifest
from ..io.reader import DTYPES, read_header
from ..io.writer import ShardWriter, copy_side_files, layout, os_error, write_index
from ..layout import ADAPTER_DIR, ADAPTER_KEY_PREFIX, ADAPTER_WEIGHTS_FILE, MODEL_CONFIG_FILE, RESIDUAL_DIR
from .config import PissaConfig
from .plan import Plan
from .shard_job import adapter_part, read_record


def finalize(model: str, plan: Plan, config: PissaConfig, work: Path, out: Path) -> dict:
    """Merge the per-shard records into the adapter, index, copied files and manifest."""
    records = {}
    for shard in plan.reader.shards:
        record = read_record(work, shard)
        if record is None:
            raise PissaError(f"shard {shard} was not completed by any worker; run the same command again to resume")
        records.update(record)
    order = [t.module for t in plan.targets.values()]
    layers = {m: records[m] for m in order}
    trainable = write_adapter_folder(plan, work, out, order)
    write_residual_index(plan, work)
    copy_side_files(plan.reader.folder, work / RESIDUAL_DIR, tokenizer_to=work / ADAPTER_DIR)
    first = next(iter(plan.targets))
    residual_dtype = dtype_name(plan.casts.get(first, DTYPES[plan.reader.entry(first).dtype]))
    if plan.casts:  # as save_pretrained writes it for a model loaded with dtype=...
        set_config_dtype(work / RESIDUAL_DIR / MODEL_CONFIG_FILE, residual_dtype)
    quantization = record_quantization(config, layers, work / RESIDUAL_DIR)
    return build_manifest(
        source=str(model),
        config=config.to_dict(),
        layers=layers,
        resolved_path=str(plan.reader.folder),
        residual_dtype=residual_dtype,
        trainable_params=trainable,
        quantization=quantization,
    )


def record_quantization(config: PissaConfig, layers: dict[str, dict], residual: Path) -> dict | None:
    """QPiSSA: write the loader settings into residual/config.json, as the in-memory path does."""
    if getattr(config, "quantize", None) is None:
        return None
    from transformers import AutoConfig

    from .quantized import record_into_

    hf_config = AutoConfig.from_pretrained(residual)
    record = record_into_(hf_config, config, layers)
    hf_config.save_pretrained(residual)
    return record


def write_adapter_folder(plan: Plan, work: Path, out: Path, order: list[str]) -> int:
    """adapter_config.json as PEFT writes it, and the per-shard factors merged in module order."""
    from safetensors import safe_open

    folder = work / ADAPTER_DIR
    lora = plan.lora
    lora.base_model_name_or_path = str((out / RESIDUAL_DIR).resolve())  # where the residual will be
    lora.inference_mode = True
    auto_mapping = None
    if lora.task_type is None:  # PEFT records the class of a model it has no task for
        auto_mapping = {"base_model_class": plan.model_class.__name__, "parent_library": plan.model_class.__module__}
    lora.save_pretrained(str(folder), auto_mapping_dict=auto_mapping)
    with ExitStack() as stack:
        parts = [stack.enter_context(safe_open(adapter_part(work, s), framework="pt")) for s in plan.reader.shards]
        where = {k: p for p in parts for k in p.keys()}
        keys = [k for m in order for k in sorted(k for k in where if k.startswith(m + "."))]  # (base,) A, B
        specs = [(ADAPTER_KEY_PREFIX + k, where[k].get_slice(k).get_dtype(), tuple(where[k].get_slice(k).get_shape()))
                 for k in keys]
        with ShardWriter(folder / ADAPTER_WEIGHTS_FILE, layout(specs), {"format": "pt"}) as w:
            for k in keys:
                w.write(ADAPTER_KEY_PREFIX + k, where[k].get_tensor(k))
    return sum(math.prod(s[2]) for s in specs)


def set_config_dtype(path: Path, dtype: str) -> None:
    """Record the residual's dtype in its config.json under the key transformers writes (`dtype`; older
    configs also carry `torch_dtype`)."""
    import json

    config = json.loads(path.read_text())
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    write_json(path, config)


def write_residual_index(plan: Plan, work: Path) -> None:
    reader = plan.reader
    if not reader.sharded:
        return
    # residuals keep every shape, and every dtype unless --dtype cast it: read the sizes from the files
    total = sum(read_header(work / RESIDUAL_DIR / s).data_bytes for s in reader.shards)
    write_index(work / RESIDUAL_DIR, reader.weight_map, total, {k: v for k, v in reader.index_metadata.items()
                                                             if k != "total_size"})


def write_json(path: Path, data: dict) -> None:
    """`io.jsonfile.write_json` with a failed write (a full disk) reported as a user error."""
    try:
        write_plain_json(path, data)
    except OSError as e:
        raise os_error(e, path) from e
