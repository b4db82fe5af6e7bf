"""Streaming (out-of-core) PiSSA init of a safetensors checkpoint folder.

Reads one tensor at a time, decomposes each targeted weight with `init.weights.decompose_weight`
(the same per-tensor function as the in-memory path, so outputs are equal tensor for tensor),
and writes, into a work folder that is renamed to OUT only when complete:

    OUT/residual/   same shard files, tensor names, dtypes and index as the input; W_res in place
                    of each targeted W; config, tokenizer and generation files copied
    OUT/adapter/    adapter_config.json (PEFT's own) + adapter_model.safetensors
    OUT/pissa.json  the manifest, as the in-memory path writes it

Memory: about one input tensor plus its fp32 copies (the residual shard is written tensor by
tensor). Resume: every finished shard leaves a completion record in the work folder
`.OUT.partial`; running the same command again skips those shards. Shards can be split across
`workers` processes and across torch.distributed ranks (torchrun / accelerate launch).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dtypes import dtype_name, parse_dtype
from ..errors import PissaError
from ..io.atomic import check_output_dir, replace_dir
from ..io.manifest import versions
from ..io.writer import DiskFullError, os_error
from ..layout import ADAPTER_DIR, MANIFEST_FILE, RESIDUAL_DIR
from .config import PissaConfig
from .finalize import finalize, write_json
from .parallel import Ranks, run_jobs
from .plan import Plan, make_plan
from .shard_job import STATE_DIR, ShardJob, read_record

# Reads run ahead and writes run behind the decomposition in threads (init.pipeline); False runs one thing
# at a time, which gives the same bits (tests compare the two).
OVERLAP = True

# Same-shape weights of a shard are decomposed in batches of up to this many fp32 bytes (the batch then
# holds ~3x that on the device, its inputs and residuals ~1x more on the host). On by default on GPUs,
# where one small SVD leaves the device idle; off on the CPU, where it buys little and costs memory.
BATCH_BYTES = 2 << 30


@dataclass
class StreamOptions:
    """How a streaming init runs; none of these change its output (resume and batching are exact up to
    the summation order of batched kernels)."""

    workers: int = field(default=1, metadata={"help": "Streaming: processes that decompose shards in parallel."})
    device: str = field(default="cpu", metadata={
        "help": "Streaming: where the SVDs run (cpu, cuda; under torchrun each rank's own GPU)."})
    resume: bool = field(default=True, metadata={
        "help": "Streaming: continue an interrupted run into the same --out, or start over.", "negative": "restart"})
    batch: bool | None = field(default=None, metadata={
        "help": "Streaming: decompose a shard's same-shape weights in batched calls (default: on with --device "
                "cuda, off on the CPU, where it costs memory).", "flag": "batch-same-shape"})

    def __post_init__(self):
        if self.workers < 1:
            raise PissaError(f"--workers must be >= 1, got {self.workers}")


@dataclass
class StreamStats:
    shards: int
    resumed_shards: int
    workers: int
    world_size: int
    device: str
    batch_bytes: int  # 0: one weight at a time
    threads: int  # weights each worker decomposes at once (one torch thread each)
    cast: str | None = None  # --dtype: the dtype float tensors were cast to as they streamed


def work_dir_for(out: Path) -> Path:
    """The work folder: a fixed name (not per-pid) so a re-run and every rank find it."""
    return out.parent / f".{out.name}.partial"


def fingerprint(plan: Plan, config: PissaConfig, device: str, batch_bytes: int) -> dict:
    """What must match for finished shards to be reused: inputs, settings, and what affects bits (not the thread
    count: a CPU decomposition runs on one torch thread whatever it is, `init.weights`)."""
    shards = {s: [h.path.stat().st_size, h.path.stat().st_mtime_ns] for s, h in plan.reader.headers.items()}
    casts = {name: dtype_name(d) for name, d in plan.casts.items()}
    return {"source": str(plan.reader.folder.resolve()), "shards": shards, "config": config.to_dict(),
            "device": device, "batch_bytes": batch_bytes, "casts": casts, "versions": versions()}


def batch_size_bytes(batch: bool | None, device: str) -> int:
    """`batch`: True batches same-shape weights, False never, None on GPUs only (see BATCH_BYTES)."""
    if batch is None:
        batch = not device.startswith("cpu")
    return BATCH_BYTES if batch else 0


def prepare_work(work: Path, state: dict, resume: bool) -> int:
    """Create or reuse the work folder; returns how many shards are already done."""
    state_file = work / STATE_DIR / "state.json"
    if work.exists():
        old = json.loads(state_file.read_text()) if state_file.exists() else None
        if not resume or old != state:
            shutil.rmtree(work)  # another run's leftovers (other settings or inputs): start over
    try:
        for sub in (RESIDUAL_DIR, ADAPTER_DIR, f"{STATE_DIR}/done", f"{STATE_DIR}/{ADAPTER_DIR}"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=1) + "\n")
    except OSError as e:
        raise os_error(e, work) from e
    return sum(1 for s in state["shards"] if read_record(work, s) is not None)


def shard_jobs(plan: Plan, config: PissaConfig, work: Path, device: str, threads: int,
               batch_bytes: int = 0) -> list[ShardJob]:
    reader = plan.reader
    return [
        ShardJob(
            source=reader.folder,
            shard=s,
            header=reader.headers[s],
            entries=reader.entries(s),
            targets={t.name: plan.targets[t.name] for t in reader.entries(s) if t.name in plan.targets},
            config=config,
            work=work,
            device=device,
            threads=threads,
            batch_bytes=batch_bytes,
            casts={t.name: plan.casts[t.name] for t in reader.entries(s) if t.name in plan.casts},
            overlap=OVERLAP,
        )
        for s in reader.shards
    ]


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PissaError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError as e:
        raise PissaError(f"--device {device!r} is not a torch device ({e}); use cpu or cuda") from e
    return device


def stream_init(
    model: str,
    path: str | Path,
    config: PissaConfig,
    out: str | Path,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    options: StreamOptions | None = None,
    dtype: str = "auto",
) -> Path:
    """Stream-initialise the safetensors checkpoint folder `path` into OUT; returns OUT.

    `dtype` (not auto) casts every float tensor as it streams, as `from_pretrained(dtype=...)` loads it.

    `model` is what the user typed (recorded in the manifest). `options.workers` processes split the
    shards; under torch.distributed each rank takes its share too. A run that crashed, was killed or
    filled the disk keeps `.OUT.partial`, and the same call resumes it; `resume=False` starts over.
    `batch` decomposes same-shape weights of a shard in batched calls (None: on GPUs only); a batched
    weight equals its one-at-a-time result up to the summation order of batched kernels.
    """
    options = options or StreamOptions()
    out = check_output_dir(out, overwrite, inputs=[path])
    ranks = Ranks.from_env()
    device = check_device(ranks.local_device(options.device))
    plan = make_plan(path, config, trust_remote_code, dtype)  # every check happens before anything is written
    threads = torch.get_num_threads()
    work = work_dir_for(out)
    batch_bytes = batch_size_bytes(options.batch, device)
    state = fingerprint(plan, config, device.split(":")[0], batch_bytes)
    resumed = prepare_work(work, state, options.resume) if ranks.is_main else 0
    ranks.barrier()
    # Split all shards (not just the unfinished ones), so every rank sees the same split even while
    # another rank is already recording finished shards.
    mine = ranks.share(shard_jobs(plan, config, work, device, threads, batch_bytes))
    jobs = [j for j in mine if read_record(work, j.shard) is None]
    total = sum(len(j.targets) for j in mine)
    stats = StreamStats(len(plan.reader.shards), resumed, options.workers, ranks.world, device, batch_bytes, threads,
                        None if dtype == "auto" else dtype_name(parse_dtype(dtype)))
    try:
        run_jobs(jobs, options.workers, progress, total, total - sum(len(j.targets) for j in jobs))
        ranks.barrier()
        if ranks.is_main:
            finish(model, plan, config, work, out, stats)
    except PissaError as e:
        # A bad input (e.g. NaN in a weight) means a changed checkpoint, so nothing will resume: clean up.
        # A full disk is worth resuming once space is freed: keep the finished shards.
        if ranks.is_main and not isinstance(e, DiskFullError):
            shutil.rmtree(work, ignore_errors=True)
        raise
    ranks.barrier()
    ranks.close()
    return out


def finish(model: str, plan: Plan, config: PissaConfig, work: Path, out: Path, stats: StreamStats) -> None:
    """Write the final files into the work folder and rename it to OUT."""
    manifest = finalize(model, plan, config, work, out)
    manifest["stream"] = vars(stats)
    write_json(work / MANIFEST_FILE, manifest)
    shutil.rmtree(work / STATE_DIR)
    replace_dir(work, out)
