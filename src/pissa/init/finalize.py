"""The end of a streaming init: the per-shard records merged into the adapter folder, the residual's
shard index, the model's config and tokenizer files, and the manifest."""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import torch

from ..dtypes import dtype_name
from ..errors import PissaError
from ..io.jsonfile import write_json as write_plain_json
from ..io.manifest import build_manifest
from ..io.reader import DTYPES, read_header, read_tensor
from ..io.writer import ShardWriter, copy_side_files, layout, os_error, write_index
from ..layout import (
    ADAPTER_DIR,
    ADAPTER_KEY_PREFIX,
    ADAPTER_WEIGHTS_FILE,
    LINEAR,
    LINEAR_KEYS,
    MODEL_CONFIG_FILE,
    RESIDUAL_DIR,
)
from .config import PissaConfig
from .expert_layers import expert_info
from .experts import ExpertTarget
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
    order = [t.module for t in plan.targets.values() if t.expert is None]
    layers = {m: records[m] for m in order}
    for t in plan.experts.values():  # one entry per fused tensor, as the in-memory path writes it
        infos = [records[t.matrix_name(e, p)] for e in range(t.tensor.num_experts) for p in range(t.layout.n_parts)]
        layers[t.adapter_module] = expert_info(infos, t, sum(i["seconds"] for i in infos))
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
        coverage=plan.coverage,
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


class Parts:
    """The per-shard adapter parts of a streaming init, read tensor by tensor with plain file I/O: memory-mapping
    them all would count every page read towards RSS, and a MoE adapter's parts are gigabytes."""

    def __init__(self, paths: list[Path], stack: ExitStack):
        self.where = {}
        for path in paths:
            header = read_header(path)
            f = stack.enter_context(open(path, "rb"))
            self.where.update({t.name: (f, header, t) for t in header.tensors})

    def spec(self, key: str, name: str) -> tuple[str, str, tuple[int, ...]]:
        _, _, t = self.where[key]
        return name, t.dtype, t.shape

    def read(self, key: str) -> torch.Tensor:
        return read_tensor(*self.where[key])


def write_adapter_folder(plan: Plan, work: Path, out: Path, order: list[str]) -> int:
    """adapter_config.json as PEFT writes it, and the per-shard factors merged in module order; the factors of
    a fused expert tensor packed as PEFT's ParamWrapper holds them."""
    folder = work / ADAPTER_DIR
    lora = plan.lora
    lora.base_model_name_or_path = str((out / RESIDUAL_DIR).resolve())  # where the residual will be
    lora.inference_mode = True
    auto_mapping = None
    if lora.task_type is None:  # PEFT records the class of a model it has no task for
        auto_mapping = {"base_model_class": plan.model_class.__name__, "parent_library": plan.model_class.__module__}
    lora.save_pretrained(str(folder), auto_mapping_dict=auto_mapping)
    with ExitStack() as stack:
        parts = Parts([adapter_part(work, s) for s in plan.reader.shards], stack)
        keys = [k for m in order for k in sorted(k for k in parts.where if k.startswith(m + "."))]  # (base,) A, B
        specs = [parts.spec(k, ADAPTER_KEY_PREFIX + k) for k in keys]
        packed = {t.adapter_module: t for t in plan.experts.values()}
        for module, t in packed.items():
            dtype = parts.spec(expert_factor_keys(t, 0, 0)[0], "")[1]
            (n_out, n_in), E, R = t.tensor.matrix_shape, t.tensor.num_experts, t.peft_rank
            specs += [(ADAPTER_KEY_PREFIX + module + LINEAR_KEYS[0], dtype, (R * E, n_in)),
                      (ADAPTER_KEY_PREFIX + module + LINEAR_KEYS[1], dtype, (n_out, R * E))]
        with ShardWriter(folder / ADAPTER_WEIGHTS_FILE, layout(specs), {"format": "pt"}) as w:
            for k in keys:
                w.write(ADAPTER_KEY_PREFIX + k, parts.read(k))
            for module, t in packed.items():  # one fused tensor's factors in memory at a time
                for key, tensor in zip(t.layout.factor_keys(module), packed_factors(t, parts), strict=True):
                    w.write(key, tensor)
    return sum(math.prod(s[2]) for s in specs)


def expert_factor_keys(t: ExpertTarget, expert: int, part: int) -> tuple[str, str]:
    """The keys a shard job stores one expert matrix's A (k, in) and B (out/parts, k) under."""
    return LINEAR.factor_keys(t.matrix_name(expert, part), prefix="")


def packed_factors(t: ExpertTarget, parts: Parts) -> tuple:
    """PEFT's lora_A (R*E, in), lora_B (out, R*E) of a fused tensor from its experts' per-matrix factors."""
    As, Bs = [], []
    for p in range(t.layout.n_parts):
        keys = [expert_factor_keys(t, e, p) for e in range(t.tensor.num_experts)]
        As.append(torch.stack([parts.read(a) for a, _ in keys]))  # (E, k, in)
        Bs.append(torch.stack([parts.read(b) for _, b in keys]))  # (E, out/parts, k)
    return t.layout.pack(*t.layout.block_factors(As, Bs))


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
