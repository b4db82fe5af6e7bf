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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..decompose import reused_fp32_copies
from ..errors import PissaError
from ..io.reader import CODES, CheckpointError, ShardHeader, TensorEntry, read_slice
from ..io.writer import ShardWriter, layout, os_error, write_tensors
from ..layout import ADAPTER_DIR, LINEAR, RESIDUAL_DIR, embedding_base_key
from .concurrent import OrderedWork
from .config import PissaConfig
from .pipeline import ShardIO
from .plan import Target
from .weights import decompose_weight, decompose_weights

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
    threads: int  # weights decomposed at once on the CPU, each on one torch thread (results do not depend on it)
    batch_bytes: int = 0  # fp32 bytes of same-shape weights decomposed in one batched call; 0: one at a time
    casts: dict[str, torch.dtype] = field(default_factory=dict)  # --dtype: tensor name -> dtype it is cast to
    overlap: bool = True  # read ahead and write behind in threads (False: one thing at a time; same bits)


def done_record(work: Path, shard: str) -> Path:
    return work / STATE_DIR / "done" / f"{shard}.json"


def adapter_part(work: Path, shard: str) -> Path:
    return work / STATE_DIR / ADAPTER_DIR / shard


@torch.no_grad()
def decompose_target(stored: torch.Tensor, target: Target, config: PissaConfig, device: str):
    """(residual in the stored layout, {adapter key: tensor}, info) for one checkpoint weight."""
    return decompose_targets([stored], [target], config, device)[0]


@torch.no_grad()
def decompose_targets(stored: list[torch.Tensor], targets: list[Target], config: PissaConfig, device: str):
    """`decompose_target` for each weight of a batch (same matrix shape, dtype, rank and scale), in
    one batched call where the method has a batched form; a batch of one is the per-tensor path."""
    start = time.perf_counter()
    Ws = [t.kind.to_matrix(s.to(device)) for s, t in zip(stored, targets, strict=True)]  # (out, in) each
    factors = decompose_weights(Ws, [t.module for t in targets], config, targets[0].rank, targets[0].scale)
    seconds = (time.perf_counter() - start) / len(Ws)  # a batch's time, shared out
    results = []
    for s, t, f in zip(stored, targets, factors, strict=True):
        residual = t.kind.from_matrix(f.residual, s.shape).cpu()
        parts = t.kind.adapter_tensors(t.module, f.A.cpu(), f.B.cpu(), s.shape)  # A (r, in), B (out, r)
        if t.save_base:
            parts[embedding_base_key(t.module)] = residual
        results.append((residual, parts, {**f.info, "seconds": seconds}))
    return results


def plan_batches(entries: tuple[TensorEntry, ...], targets: dict[str, Target],
                 batch_bytes: int) -> dict[str, list[str]]:
    """Tensor name -> the names of the batch it is decomposed in (itself first when it starts one).

    Targets join a batch in file order while their matrices share shape, dtype, rank and scale and
    the batch's fp32 copies stay within `batch_bytes`; 0 puts every target alone.
    """
    batches: dict[str, list[str]] = {}
    open_batch: dict[tuple, list[str]] = {}
    for e in entries:
        t = targets.get(e.name)
        if t is None or is_fused(t):
            continue
        shape = tuple(t.kind.to_matrix(torch.empty(e.shape, device="meta")).shape)  # (out, in)
        key = (shape, e.dtype, t.rank, t.scale)
        batch = open_batch.get(key)
        if batch is None or (len(batch) + 1) * shape[0] * shape[1] * 4 > batch_bytes:
            batch = open_batch[key] = []
        batch.append(e.name)
        batches[e.name] = batch
    return batches


def is_fused(target: Target) -> bool:
    """The checkpoint tensor is a whole fused expert tensor (gpt-oss, or saved in transformers' live layout)."""
    return target.slot is not None and target.slot.expert is None


@torch.no_grad()
def decompose_fused(f, header: ShardHeader, entry: TensorEntry, target: Target, config: PissaConfig, device: str):
    """Yield (residual rows of one expert in the stored layout, {factor key: tensor}, {matrix name: info}) for
    each expert of a fused checkpoint tensor, reading one expert at a time; each part of each expert is
    decomposed alone, as the in-memory path and per-expert checkpoints do (`init.expert_layers`)."""
    t = target.expert
    for e in range(t.tensor.num_experts):
        start = time.perf_counter()
        stored = read_slice(f, header, entry, e)  # (., .) expert e as stored
        M = t.layout.matrices(stored[None])[0]  # (out, in) view
        residual, parts, infos = torch.empty_like(M), {}, {}
        for p in range(t.layout.n_parts):
            rows, name = t.layout.rows(M.shape[0], p), t.matrix_name(e, p)
            factors = decompose_weight(M[rows].contiguous().to(device), name, config, t.rank, t.scale)
            residual[rows] = factors.residual.cpu()
            parts.update(LINEAR.adapter_tensors(name, factors.A.cpu(), factors.B.cpu(), tuple(M[rows].shape)))
            infos[name] = factors.info
        seconds = (time.perf_counter() - start) / t.layout.n_parts
        yield t.layout.from_matrices(residual[None])[0], parts, {n: {**i, "seconds": seconds} for n, i in
                                                                infos.items()}


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
    """Write `job.shard`'s residual shard, adapter part and completion record; returns layer infos.

    Reads run ahead and writes run behind the decompositions in threads (`init.pipeline.ShardIO`), within a byte
    budget (`read_order`); on the CPU `job.threads` weights decompose at once, one torch thread each, and reach the
    writer in file order (`init.concurrent`)."""
    return_big_frees_to_os()
    residual_path = job.work / RESIDUAL_DIR / job.shard
    out_entries = layout([(t.name, CODES[job.casts[t.name]] if t.name in job.casts else t.dtype, t.shape)
                          for t in job.entries])
    factors, layers = {}, {}
    src = job.source / job.shard
    batches = plan_batches(job.entries, job.targets, job.batch_bytes)
    # A fused expert tensor is read and written one expert at a time by the main thread (decompose_fused):
    # it stays out of the read-ahead, and a shard holding one runs its reads and writes in order.
    fused = {e.name for e in job.entries if e.name in job.targets and is_fused(job.targets[e.name])}
    workers = job.threads if job.device == "cpu" and not fused else 1  # a GPU takes one weight (or batch) at a time
    order, budget = read_order(tuple(e for e in job.entries if e.name not in fused), job.targets, batches, workers)
    try:
        with open(src, "rb") as f, ShardWriter(residual_path, out_entries, job.header.metadata) as w, \
                ShardIO(f, job.header, order, w, budget, job.overlap and not fused) as io, reused_fp32_copies():
            if fused:
                transform_in_order(job, f, w, io, batches, factors, layers, progress)
            else:
                transform_concurrently(job, io, batches, factors, layers, progress, workers)
            io.close()
    except OSError as e:
        if isinstance(e, PissaError):
            raise
        raise CheckpointError(f"{src} could not be read ({e}); re-download or re-export {job.shard}") from e
    write_tensors(adapter_part(job.work, job.shard), factors)
    write_record(done_record(job.work, job.shard), layers)
    return layers


def transform_concurrently(job: ShardJob, io: ShardIO, batches: dict[str, list[str]], factors: dict, layers: dict,
                           progress: Callable[[str], None] | None, workers: int) -> None:
    """Every tensor of the shard through `io`: targets decomposed `workers` at a time (a batch in one call), the
    rest copied through, each written in file order once what comes before it is."""
    def take(name: str, value) -> None:  # on the committing thread, in file order
        target = job.targets.get(name)
        if target is not None:
            value, parts, layers[target.module] = value
            factors.update(parts)
            if progress:
                progress(target.module)
        io.put(name, value)

    with OrderedWork(workers, take) as work:
        started: dict[str, tuple] = {}  # batch member -> (its batch's future, its index in the batch)
        for entry in job.entries:
            if entry.name not in job.targets:
                work.put(entry.name, cast(io.get(entry.name), job.casts.get(entry.name)))
                continue
            names = batches[entry.name]
            if entry.name not in started:  # the first of its batch: read and submit them all
                stored = [cast(io.get(n), job.casts.get(n)) for n in names]
                future = work.submit(decompose_targets, stored, [job.targets[n] for n in names], job.config,
                                     job.device)
                started.update({n: (future, i) for i, n in enumerate(names)})
                del stored  # the future holds them until decomposed: nothing else may (see ShardIO's budget)
            future, index = started.pop(entry.name)
            work.take_result(entry.name, future, index)
        work.close()


def transform_in_order(job: ShardJob, f, w: ShardWriter, io: ShardIO, batches: dict[str, list[str]], factors: dict,
                       layers: dict, progress: Callable[[str], None] | None) -> None:
    """`transform_concurrently` one thing at a time on this thread, for a shard that holds a fused expert tensor,
    whose experts are read and written one at a time (`decompose_fused`)."""
    ahead: dict[str, tuple] = {}  # results of batch members decomposed before their turn to be written
    for entry in job.entries:
        target = job.targets.get(entry.name)
        if target is not None and is_fused(target):  # all experts in one tensor: one expert at a time
            for residual, parts, infos in decompose_fused(f, job.header, entry, target, job.config, job.device):
                w.write_rows(entry.name, residual)
                factors.update(parts)
                layers.update(infos)
            if progress:
                progress(target.module)
            continue
        if target is None:
            tensor = cast(io.get(entry.name), job.casts.get(entry.name))
        else:
            if entry.name not in ahead:  # the first of its batch: read and decompose them all
                names = batches[entry.name]
                stored = [cast(io.get(n), job.casts.get(n)) for n in names]
                results = decompose_targets(stored, [job.targets[n] for n in names], job.config, job.device)
                del stored
                ahead.update(zip(names, results, strict=True))
                del results  # `ahead` holds them until written: nothing else may (see ShardIO's budget)
            tensor, parts, layers[target.module] = ahead.pop(entry.name)
            factors.update(parts)
            if progress:
                progress(target.module)
        io.put(entry.name, tensor)
        del tensor


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None else tensor.to(dtype)


def read_order(entries: tuple[TensorEntry, ...], targets: dict[str, Target],
               batches: dict[str, list[str]], workers: int = 1) -> tuple[list[TensorEntry], int]:
    """The order `run_shard` asks for tensors (file order, a batch's members together at its first), and the
    read-ahead budget in bytes: a batch per decomposition that may be unfinished or untaken (`workers` + 1),
    plus one largest targeted tensor (at least 32 MB). While the weights decompose, the last residuals are
    written and the next weights read; more bought no overlap and cost memory (peak RSS binds at 1 GB)."""
    by_name = {e.name: e for e in entries}
    order, seen = [], set()
    for e in entries:
        for name in batches[e.name] if e.name in targets else [e.name]:
            if name not in seen:
                seen.add(name)
                order.append(by_name[name])
    largest = max((e.nbytes for e in entries if e.name in targets), default=0)
    batch = max((sum(by_name[n].nbytes for n in names) for names in batches.values()), default=0)
    return order, max((workers + 1) * batch + largest, 32 << 20)


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
    if not path.exists() or not (work / RESIDUAL_DIR / shard).exists() or not adapter_part(work, shard).exists():
        return None
    return json.loads(path.read_text())
