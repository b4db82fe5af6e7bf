"""One unit of streaming work: turn one input shard into its residual shard and adapter factors.

A job is plain data (picklable), so a worker process or a torch.distributed rank can run it. Its
outputs are written so that a crash at any point leaves either a complete, recorded shard or
nothing the resume will trust: residual shard, then adapter part, then the completion record.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import PissaConfig, decompose_weight
from ..errors import PissaError
from .plan import Target
from .reader import CheckpointError, ShardHeader, TensorEntry, read_tensor
from .writer import ShardWriter, layout, os_error, write_tensors

STATE_DIR = ".stream"  # inside the work folder; removed before the final rename


@dataclass(frozen=True)
class ShardJob:
    source: Path  # input checkpoint folder
    shard: str  # shard file name, kept in the output
    header: ShardHeader  # the input shard's parsed header (its `__metadata__` is kept)
    entries: tuple[TensorEntry, ...]  # the tensors the index assigns to the shard, in file order
    targets: dict[str, Target]  # tensor name -> target, for this shard only
    config: PissaConfig
    work: Path  # the work folder that becomes OUT
    device: str
    threads: int  # torch threads; LAPACK results depend on it, so every worker uses the same count


def done_record(work: Path, shard: str) -> Path:
    return work / STATE_DIR / "done" / f"{shard}.json"


def adapter_part(work: Path, shard: str) -> Path:
    return work / STATE_DIR / "adapter" / shard


@torch.no_grad()
def decompose_target(stored: torch.Tensor, target: Target, config: PissaConfig, device: str):
    """(residual in the stored layout, {adapter key: tensor}, info) for one checkpoint weight."""
    start = time.perf_counter()
    W = target.matrix(stored.to(device))  # (out, in)
    f = decompose_weight(W, target.module, config, target.rank, target.scale)
    residual = target.stored(f.residual, stored.shape).cpu()
    factors = target.adapter_tensors(f.A.cpu(), f.B.cpu(), stored.shape)  # A (r, in), B (out, r)
    if target.save_base:
        factors[f"{target.module}.base_layer.weight"] = residual
    return residual, factors, {**f.info, "seconds": time.perf_counter() - start}


def return_big_frees_to_os() -> None:
    """Serve allocations of 1 MB and more by mmap, so a freed tensor goes back to the OS at once
    (a process-wide glibc setting). By default glibc raises its mmap threshold after the first big
    free (up to 32 MB) and carves later tensors from the heap, where small long-lived objects pin
    the freed space: streaming RSS crept up ~15 MB per layer (measured) instead of staying flat."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MB
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def run_shard(job: ShardJob, progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Write `job.shard`'s residual shard, adapter part and completion record; returns layer infos."""
    torch.set_num_threads(job.threads)
    return_big_frees_to_os()
    residual_path = job.work / "residual" / job.shard
    out_entries = layout([(t.name, t.dtype, t.shape) for t in job.entries])
    factors, layers = {}, {}
    src = job.source / job.shard
    try:
        with open(src, "rb") as f, ShardWriter(residual_path, out_entries, job.header.metadata) as w:
            for entry in job.entries:
                tensor = read_tensor(f, job.header, entry)
                target = job.targets.get(entry.name)
                if target is not None:
                    tensor, parts, layers[target.module] = decompose_target(tensor, target, job.config, job.device)
                    factors.update(parts)
                    if progress:
                        progress(target.module)
                w.write(entry.name, tensor)
                del tensor
    except OSError as e:
        if isinstance(e, PissaError):
            raise
        raise CheckpointError(f"{src} could not be read ({e}); re-download or re-export {job.shard}") from e
    write_tensors(adapter_part(job.work, job.shard), factors)
    write_record(done_record(job.work, job.shard), layers)
    return layers


def write_record(path: Path, layers: dict[str, dict]) -> None:
    """The completion record goes last and appears atomically: its presence means the shard is done."""
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(json.dumps(layers) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise os_error(e, path) from e


def read_record(work: Path, shard: str) -> dict[str, dict] | None:
    path = done_record(work, shard)
    if not path.exists() or not (work / "residual" / shard).exists() or not adapter_part(work, shard).exists():
        return None
    return json.loads(path.read_text())
