"""A lazy reader of safetensors checkpoints: one `model.safetensors` or a sharded
`model.safetensors.index.json`, read tensor by tensor, never all at once.

Everything that can be checked without reading tensor data is checked up front, so a bad
checkpoint is refused before any output is written: the index parses, every file it names
exists, every tensor it names is in its file, and every shard's header agrees with its size
(a truncated or corrupted shard is named).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import PissaError
from ..layout import INDEX_FILE, SINGLE_WEIGHTS_FILE

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

# safetensors dtype codes -> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}


class CheckpointError(PissaError):
    """A checkpoint folder, index or shard that cannot be read as it claims to be."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a shard's header describes it."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # byte offsets into the shard's data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    """A shard's parsed header: tensors in file order, and its `__metadata__`."""

    path: Path
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    data_offset: int  # where tensor data starts in the file (8 + header length)

    @property
    def data_bytes(self) -> int:
        return max((t.end for t in self.tensors), default=0)


def read_header(path: str | Path) -> ShardHeader:
    """Parse and check a safetensors header; refuses a truncated or corrupted file, naming it."""
    path = Path(path)
    fix = f"re-download or re-export {path.name}"
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes, no safetensors header); {fix}")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path} is truncated or corrupted (header claims {n} bytes, file has {size}); {fix}")
        try:
            raw = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupted header ({e}); {fix}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} has a corrupted header (not a JSON object); {fix}")
    metadata = raw.pop("__metadata__", None) or {}
    try:
        tensors = sorted(
            (TensorEntry(k, v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in raw.items()),
            key=lambda t: t.start,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has a corrupted header entry ({e}); {fix}") from e
    header = ShardHeader(path, tuple(tensors), dict(metadata), 8 + n)
    check_layout(header, size - 8 - n, fix)
    return header


def check_layout(header: ShardHeader, data_size: int, fix: str) -> None:
    """Offsets must tile the data section exactly and agree with each tensor's dtype and shape."""
    path, expected = header.path, 0
    for t in header.tensors:
        if t.dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {t.name} has unknown dtype {t.dtype}; {fix}")
        numel = 1
        for d in t.shape:
            numel *= d
        if t.start != expected or t.nbytes != numel * DTYPES[t.dtype].itemsize:
            raise CheckpointError(f"{path}: tensor {t.name} has inconsistent offsets {t.start}..{t.end}; {fix}")
        expected = t.end
    if data_size != expected:
        what = "truncated" if data_size < expected else "longer than its header says"
        raise CheckpointError(f"{path} is {what} ({data_size} data bytes, header needs {expected}); {fix}")


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint folder (single file or sharded).

    `weight_map` maps tensor name -> shard file name; `headers` holds each shard's parsed header.
    Construction validates the whole layout without reading tensor data; `read_tensor` then reads
    one tensor at a time (see init.shard_job).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index_metadata, self.weight_map = self._read_index()
        self.shards = list(dict.fromkeys(self.weight_map.values()))  # file order as the index lists them
        self.headers = {s: self._header(s) for s in self.shards}
        self._check_index_against_shards()

    @property
    def sharded(self) -> bool:
        return (self.folder / INDEX_FILE).exists()

    def _read_index(self) -> tuple[dict, dict[str, str]]:
        index = self.folder / INDEX_FILE
        if index.exists():
            try:
                data = json.loads(index.read_text())
                weight_map = dict(data["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-export the model") from e
            if not weight_map:
                raise CheckpointError(f"{index} names no tensors; re-export the model")
            return dict(data.get("metadata") or {}), weight_map
        single = self.folder / SINGLE_WEIGHTS_FILE
        if single.exists():
            return {}, {t.name: SINGLE_WEIGHTS_FILE for t in read_header(single).tensors}
        found = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
        hint = (f" (found {', '.join(found[:3])}: pickled weights; re-save with safetensors, or pass --in-memory)"
                if found else "")
        raise CheckpointError(f"{self.folder} has neither {INDEX_FILE} nor {SINGLE_WEIGHTS_FILE}{hint}")

    def _header(self, shard: str) -> ShardHeader:
        path = self.folder / shard
        if not path.exists():
            n = sum(1 for f in self.weight_map.values() if f == shard)
            raise CheckpointError(
                f"{INDEX_FILE} maps {n} tensors to {shard}, but {path} does not exist; "
                "download the missing shard or re-export the model"
            )
        return read_header(path)

    def _check_index_against_shards(self) -> None:
        for shard, header in self.headers.items():
            present = {t.name for t in header.tensors}
            missing = [k for k, f in self.weight_map.items() if f == shard and k not in present]
            if missing:
                raise CheckpointError(
                    f"{INDEX_FILE} says {shard} holds {missing[0]}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, but that shard does not; "
                    "the index and shards come from different exports; re-download the checkpoint"
                )

    def entry(self, name: str) -> TensorEntry:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.folder}")
        return next(t for t in self.headers[self.weight_map[name]].tensors if t.name == name)

    def entries(self, shard: str) -> tuple[TensorEntry, ...]:
        """The tensors of `shard` that the index assigns to it, in file order."""
        return tuple(t for t in self.headers[shard].tensors if self.weight_map.get(t.name) == shard)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (each must be in the checkpoint), read shard by shard."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            self.entry(name)  # refuses a name the checkpoint does not hold
            by_shard.setdefault(self.weight_map[name], []).append(name)
        found = {}
        for shard, shard_names in by_shard.items():
            header = self.headers[shard]
            with open(self.folder / shard, "rb") as f:
                for name in shard_names:
                    found[name] = read_tensor(f, header, self.entry(name))
        return found


def read_tensor(f: BinaryIO, header: ShardHeader, t: TensorEntry) -> torch.Tensor:
    """Read one tensor of an open shard with plain file I/O into a fresh tensor.

    Not safe_open's memory map: every mapped page of the shard read so far counts towards the
    process's RSS until the file is closed, so a 5 GB shard would cost 5 GB of RSS.
    """
    out = torch.empty(t.shape, dtype=DTYPES[t.dtype])
    f.seek(header.data_offset + t.start)
    n = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))  # raw little-endian bytes
    if n != t.nbytes:
        raise CheckpointError(f"{header.path}: tensor {t.name} is cut short ({n} of {t.nbytes} bytes); "
                              f"re-download or re-export {header.path.name}")
    return out


def read_slice(f: BinaryIO, header: ShardHeader, t: TensorEntry, index: int) -> torch.Tensor:
    """Read `tensor[index]` (along the first dimension) of an open shard, without the rest of the tensor:
    one expert of a fused (experts, ., .) tensor."""
    rows = t.shape[0]
    if not 0 <= index < rows:
        raise IndexError(f"{t.name}: index {index} out of range for {rows} rows")
    out = torch.empty(t.shape[1:], dtype=DTYPES[t.dtype])
    size = t.nbytes // rows
    f.seek(header.data_offset + t.start + index * size)
    n = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
    if n != size:
        raise CheckpointError(f"{header.path}: tensor {t.name} is cut short at row {index}; "
                              f"re-download or re-export {header.path.name}")
    return out


def is_safetensors_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and ((folder / INDEX_FILE).exists() or (folder / SINGLE_WEIGHTS_FILE).exists())
