"""Streaming (out-of-core) PiSSA init of a safetensors checkpoint folder.

Reads one tensor at a time, decomposes each targeted weight with `adapters.decompose_weight`
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
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import PissaConfig
from ..errors import PissaError
from .atomic import check_output_dir, replace_dir
from .parallel import Ranks, run_jobs
from .plan import Plan, make_plan
from .shard_job import STATE_DIR, ShardJob, adapter_part, read_record
from .writer import DiskFullError, os_error, write_index

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab.", "merges.txt", "chat_template",
                      "spiece.model", "sentencepiece")
# Same-shape weights of a shard are decomposed in batches of up to this many fp32 bytes (the batch then
# holds ~3x that on the device, its inputs and residuals ~1x more on the host). On by default on GPUs,
# where one small SVD leaves the device idle; off on the CPU, where it buys little and costs memory.
BATCH_BYTES = 2 << 30


@dataclass
class StreamStats:
    shards: int
    resumed_shards: int
    workers: int
    world_size: int
    device: str
    batch_bytes: int  # 0: one weight at a time


def work_dir_for(out: Path) -> Path:
    """The work folder: a fixed name (not per-pid) so a re-run and every rank find it."""
    return out.parent / f".{out.name}.partial"


def fingerprint(plan: Plan, config: PissaConfig, device: str, threads: int, batch_bytes: int) -> dict:
    """What must match for finished shards to be reused: inputs, settings, and what affects bits."""
    from ..manifest import versions

    shards = {s: [h.path.stat().st_size, h.path.stat().st_mtime_ns] for s, h in plan.reader.headers.items()}
    return {"source": str(plan.reader.folder.resolve()), "shards": shards, "config": config.to_dict(),
            "device": device, "threads": threads, "batch_bytes": batch_bytes, "versions": versions()}


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
        for sub in ("residual", "adapter", f"{STATE_DIR}/done", f"{STATE_DIR}/adapter"):
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
    workers: int = 1,
    device: str = "cpu",
    resume: bool = True,
    batch: bool | None = None,
):
    """Stream-initialise the safetensors checkpoint folder `path` into OUT; returns an InitResult.

    `model` is what the user typed (recorded in the manifest). `workers` processes split the shards;
    under torch.distributed each rank takes its share too. A run that crashed, was killed or filled
    the disk keeps `.OUT.partial`, and the same call resumes it; `resume=False` starts over.
    `batch` decomposes same-shape weights of a shard in batched calls (None: on GPUs only); a batched
    weight equals its one-at-a-time result up to the summation order of batched kernels.
    """
    from ..initialize import InitResult

    start = time.perf_counter()
    if workers < 1:
        raise PissaError(f"--workers must be >= 1, got {workers}")
    out = check_output_dir(out, overwrite)
    ranks = Ranks.from_env()
    device = check_device(ranks.local_device(device))
    plan = make_plan(path, config, trust_remote_code)  # every check happens before anything is written
    threads = torch.get_num_threads()
    work = work_dir_for(out)
    batch_bytes = batch_size_bytes(batch, device)
    state = fingerprint(plan, config, device.split(":")[0], threads, batch_bytes)
    resumed = prepare_work(work, state, resume) if ranks.is_main else 0
    ranks.barrier()
    # Split all shards (not just the unfinished ones), so every rank sees the same split even while
    # another rank is already recording finished shards.
    mine = ranks.share(shard_jobs(plan, config, work, device, threads, batch_bytes))
    jobs = [j for j in mine if read_record(work, j.shard) is None]
    total = sum(len(j.targets) for j in mine)
    try:
        run_jobs(jobs, workers, progress, total, total - sum(len(j.targets) for j in jobs))
        ranks.barrier()
        if ranks.is_main:
            manifest = finalize(model, plan, config, work, out)
            manifest["stream"] = vars(StreamStats(len(plan.reader.shards), resumed, workers, ranks.world, device,
                                                  batch_bytes))
            write_json(work / "pissa.json", manifest)
            shutil.rmtree(work / STATE_DIR)
            replace_dir(work, out)
    except PissaError as e:
        # A bad input (e.g. NaN in a weight) means a changed checkpoint, so nothing will resume: clean up.
        # A full disk is worth resuming once space is freed: keep the finished shards.
        if ranks.is_main and not isinstance(e, DiskFullError):
            shutil.rmtree(work, ignore_errors=True)
        raise
    ranks.barrier()
    ranks.close()
    from ..manifest import read_manifest

    manifest = read_manifest(out)
    return InitResult(out=out, manifest=manifest, trainable_params=manifest["trainable_params"],
                      seconds=time.perf_counter() - start)


def finalize(model: str, plan: Plan, config: PissaConfig, work: Path, out: Path) -> dict:
    """Merge the per-shard records into the adapter, index, copied files and manifest."""
    from ..manifest import build_manifest

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
    copy_side_files(plan.reader.folder, work)
    quantization = record_quantization(config, layers, work / "residual")
    residual_dtype = str(plan.reader.entry(next(iter(plan.targets))).dtype)
    return build_manifest(
        source=str(model),
        config=config.to_dict(),
        layers=layers,
        resolved_path=str(plan.reader.folder),
        residual_dtype=str(DTYPE_NAMES.get(residual_dtype, residual_dtype)),
        trainable_params=trainable,
        quantization=quantization,
    )


def record_quantization(config: PissaConfig, layers: dict[str, dict], residual: Path) -> dict | None:
    """QPiSSA: write the loader settings into residual/config.json, as the in-memory path does."""
    if getattr(config, "quantize", None) is None:
        return None
    from transformers import AutoConfig

    from ..quant.config import record_into_

    hf_config = AutoConfig.from_pretrained(residual)
    record = record_into_(hf_config, config, layers)
    hf_config.save_pretrained(residual)
    return record


DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def write_adapter_folder(plan: Plan, work: Path, out: Path, order: list[str]) -> int:
    """adapter_config.json as PEFT writes it, and the per-shard factors merged in module order."""
    from safetensors import safe_open

    from .adapter_io import KEY_PREFIX, WEIGHTS_FILE
    from .writer import ShardWriter, layout

    folder = work / "adapter"
    lora = plan.lora
    lora.base_model_name_or_path = str((out / "residual").resolve())  # where the residual will be
    lora.inference_mode = True
    auto_mapping = None
    if lora.task_type is None:  # PEFT records the class of a model it has no task for
        auto_mapping = {"base_model_class": plan.model_class.__name__, "parent_library": plan.model_class.__module__}
    lora.save_pretrained(str(folder), auto_mapping_dict=auto_mapping)
    with ExitStack() as stack:
        parts = [stack.enter_context(safe_open(adapter_part(work, s), framework="pt")) for s in plan.reader.shards]
        where = {k: p for p in parts for k in p.keys()}
        keys = [k for m in order for k in sorted(k for k in where if k.startswith(m + "."))]  # (base,) A, B
        specs = [(KEY_PREFIX + k, where[k].get_slice(k).get_dtype(), tuple(where[k].get_slice(k).get_shape()))
                 for k in keys]
        with ShardWriter(folder / WEIGHTS_FILE, layout(specs), {"format": "pt"}) as w:
            for k in keys:
                w.write(KEY_PREFIX + k, where[k].get_tensor(k))
    return sum(_numel(s[2]) for s in specs)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_residual_index(plan: Plan, work: Path) -> None:
    reader = plan.reader
    if not reader.sharded:
        return
    total = sum(reader.headers[s].data_bytes for s in reader.shards)  # residuals keep every dtype and shape
    write_index(work / "residual", reader.weight_map, total, {k: v for k, v in reader.index_metadata.items()
                                                             if k != "total_size"})


def copy_side_files(source: Path, work: Path) -> None:
    """Config, generation config and tokenizer files go to residual/; tokenizer files to adapter/ too."""
    for f in sorted(source.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(
                ".index.json"):
            continue
        dests = [work / "residual"] + ([work / "adapter"] if f.name.startswith(TOKENIZER_PREFIXES) else [])
        for d in dests:
            try:
                shutil.copy2(f, d / f.name)
            except OSError as e:
                raise os_error(e, d / f.name) from e


def write_json(path: Path, data: dict) -> None:
    try:
        path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as e:
        raise os_error(e, path) from e
