"""Write safetensors shards tensor by tensor, and the shard index, reproducing an input layout.

A residual shard has the same tensor names, dtypes and shapes as its input shard, so its header
is known before any tensor is computed: `ShardWriter` writes the header first, then each tensor's
bytes as it arrives, and holds at most one tensor in memory. It writes to `NAME.partial` and
renames on `close`, so a shard file that exists is complete.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import torch

from ..errors import PissaError
from ..layout import INDEX_FILE, TOKENIZER_PREFIXES, WEIGHT_SUFFIXES
from .reader import CODES, DTYPES, TensorEntry


class DiskFullError(PissaError, OSError):
    """The disk filled up while writing; free space and run the same command again to resume."""


def os_error(e: OSError, path: Path) -> PissaError:
    """A user-facing error for a failed write, naming the file."""
    if e.errno == errno.ENOSPC:
        return DiskFullError(
            f"disk full while writing {path}; free space on {path.parent} and run the same command again "
            "(finished shards are kept and the run resumes)"
        )
    return PissaError(f"could not write {path} ({e}); check the output folder's permissions and space")


def header_bytes(entries: list[TensorEntry], metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (8-byte length + JSON padded to 8 bytes) for `entries` in order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    for t in entries:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def layout(specs: list[tuple[str, str, tuple[int, ...]]]) -> list[TensorEntry]:
    """TensorEntries with packed offsets for (name, dtype code, shape) in order."""
    entries, offset = [], 0
    for name, dtype, shape in specs:
        numel = 1
        for d in shape:
            numel *= d
        end = offset + numel * DTYPES[dtype].itemsize
        entries.append(TensorEntry(name, dtype, tuple(shape), offset, end))
        offset = end
    return entries


class ShardWriter:
    """Stream tensors into one safetensors file whose layout is fixed up front.

    Use as a context manager; `write(name, tensor)` must follow the layout's order, and each
    tensor must match its declared dtype and shape. The file appears at `path` only when every
    tensor was written.
    """

    def __init__(self, path: str | Path, entries: list[TensorEntry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.entries = list(entries)
        self.metadata = metadata
        self._next = 0
        self._filled = 0  # bytes of the next tensor already written (write_rows)
        self._file = None

    def __enter__(self) -> ShardWriter:
        try:
            self._file = open(self.partial, "wb")
            self._file.write(header_bytes(self.entries, self.metadata))
        except OSError as e:
            self._abort()
            raise os_error(e, self.path) from e
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.entries[self._next]
        if name != entry.name:
            raise ValueError(f"{self.path}: expected tensor {entry.name} next, got {name}")
        if CODES.get(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape or self._filled:
            raise ValueError(
                f"{self.path}: {name} is {tensor.dtype} {tuple(tensor.shape)}, layout says {entry.dtype} {entry.shape}"
            )
        self.write_rows(name, tensor)

    def write_rows(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next rows (along the first dimension) of tensor `name`: a big tensor can arrive in pieces,
        e.g. a fused expert tensor one expert at a time. The next tensor starts once these fill it."""
        entry = self.entries[self._next]
        if name != entry.name:
            raise ValueError(f"{self.path}: expected tensor {entry.name} next, got {name}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # raw little-endian bytes
        if CODES.get(tensor.dtype) != entry.dtype or self._filled + data.nbytes > entry.nbytes:
            raise ValueError(f"{self.path}: {name} rows {tuple(tensor.shape)} {tensor.dtype} overflow its layout "
                             f"{entry.dtype} {entry.shape}")
        try:
            self._file.write(memoryview(data))
        except OSError as e:
            self._abort()
            raise os_error(e, self.path) from e
        self._filled += data.nbytes
        if self._filled == entry.nbytes:
            self._next, self._filled = self._next + 1, 0

    def sync(self) -> None:
        """Push what was written so far to the disk (fdatasync), so the disk writes while the caller computes and
        `close` has little left to wait for: the kernel would otherwise hold a shard's GBs until its fsync."""
        try:
            self._file.flush()
            os.fdatasync(self._file.fileno())
        except OSError as e:
            self._abort()
            raise os_error(e, self.path) from e

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        if self._next != len(self.entries):
            self._abort()
            raise ValueError(f"{self.path}: only {self._next} of {len(self.entries)} tensors were written")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.partial, self.path)
        except OSError as e:
            self._abort()
            raise os_error(e, self.path) from e

    def _abort(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        self.partial.unlink(missing_ok=True)


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write small tensors (e.g. adapter factors) as one safetensors file, atomically."""
    entries = layout([(k, CODES[v.dtype], tuple(v.shape)) for k, v in tensors.items()])
    with ShardWriter(path, entries, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)


def write_index(folder: str | Path, weight_map: dict[str, str], total_size: int, metadata: dict | None = None) -> Path:
    """Write `model.safetensors.index.json` (transformers' layout: metadata.total_size + weight_map)."""
    path = Path(folder) / INDEX_FILE
    data = {"metadata": {**(metadata or {}), "total_size": total_size}, "weight_map": dict(weight_map)}
    try:
        path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as e:
        raise os_error(e, path) from e
    return path


def copy_side_files(source: Path, dest: Path, tokenizer_to: Path | None = None) -> None:
    """Copy a model folder's small files (config, generation config, tokenizer, ...) into `dest`, and its
    tokenizer files also into `tokenizer_to`: everything but the weights, their index and hidden files."""
    import shutil

    for f in sorted(source.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.endswith((*WEIGHT_SUFFIXES, ".index.json")):
            continue
        dests = [dest] + ([tokenizer_to] if tokenizer_to and f.name.startswith(TOKENIZER_PREFIXES) else [])
        for d in dests:
            try:
                shutil.copy2(f, d / f.name)
            except OSError as e:
                raise os_error(e, d / f.name) from e
