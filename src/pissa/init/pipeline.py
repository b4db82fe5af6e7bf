"""Overlapped reads and writes of one shard: a reader thread prefetches the tensors the decomposition will
ask for next, and a writer thread writes finished tensors while the next one decomposes.

The main thread still decides everything and sees tensors in a fixed order, so the overlap changes no bit
of the output. Memory stays bounded: a tensor's bytes count against a budget from the moment it is read
until its output is written, and the reader waits while the budget is spent (a tensor larger than the
budget is read only when nothing else is in flight). Errors of either thread are re-raised in the main
thread, and leaving the `with` block stops and joins both threads before the shard's writer closes, so
a failed shard leaves no partial file behind (see `io.writer.ShardWriter`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import BinaryIO

import torch

from ..io.reader import ShardHeader, TensorEntry, read_tensor
from ..io.writer import ShardWriter

STOPPED = object()  # what the reader hands over when the pipeline stopped under it
# The writer thread syncs the shard to disk after about this many bytes, so the disk writes while the next
# weights decompose; the shard's closing fsync, on the main thread, then waits for one such piece at most.
SYNC_BYTES = 64 << 20


class ByteBudget:
    """Bytes in flight (read, not yet written), at most `limit` unless a single tensor is larger."""

    def __init__(self, limit: int):
        self.limit, self.used, self.stopped = limit, 0, False
        self._cond = threading.Condition()

    def acquire(self, n: int) -> bool:
        """Wait until `n` bytes fit; False if the pipeline stopped meanwhile."""
        with self._cond:
            self._cond.wait_for(lambda: self.stopped or self.used == 0 or self.used + n <= self.limit)
            if self.stopped:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


class ShardIO:
    """Prefetching reads of `order` (the sequence the main thread will ask for) and background writes into
    `writer` (in the writer's own order). Use as a context manager; `get` and `put` from one thread only."""

    def __init__(self, f: BinaryIO, header: ShardHeader, order: list[TensorEntry], writer: ShardWriter,
                 budget: int, overlap: bool = True):
        self.f, self.header, self.order, self.writer, self.overlap = f, header, order, writer, overlap
        self.budget = ByteBudget(budget)
        self.held: dict[str, int] = {}  # bytes each read tensor holds until its output is written
        self.lock = threading.Lock()
        self.read_q: queue.Queue = queue.Queue()
        self.write_q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None  # the writer thread's
        self.threads: list[threading.Thread] = []
        self.next = 0  # sequential mode: position in `order`

    def __enter__(self) -> ShardIO:
        if self.overlap:
            self.threads = [threading.Thread(target=self._guard, args=(self._read_all, self.read_q), daemon=True),
                            threading.Thread(target=self._guard, args=(self._write_all, None), daemon=True)]
            for t in self.threads:
                t.start()
        return self

    def get(self, name: str) -> torch.Tensor:
        """The next tensor of `order`, which must be `name`."""
        if not self.overlap:
            entry = self.order[self.next]
            self.next += 1
            got, tensor = entry.name, read_tensor(self.f, self.header, entry)
        else:
            item = self.read_q.get()
            if item is STOPPED:
                self._raise_writer_error()
                raise RuntimeError(f"{self.header.path}: the shard's reader stopped")
            if isinstance(item, BaseException):
                raise item
            got, tensor = item
        if got != name:
            raise RuntimeError(f"{self.header.path}: expected {name} next from the reader, got {got}")
        return tensor

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` as `name` (in the writer's layout order), now or in the background."""
        if not self.overlap:
            self.writer.write(name, tensor)
            return
        self._raise_writer_error()
        self.write_q.put((name, tensor))

    def close(self) -> None:
        """Wait for every queued write; re-raise a writer error."""
        if self.overlap:
            self.write_q.put(None)
            self.threads[1].join()
            self._raise_writer_error()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.budget.stop()
        self.write_q.put(None)
        for t in self.threads:
            t.join()

    def _raise_writer_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _guard(self, work: Callable[[], None], errors: queue.Queue | None) -> None:
        try:
            work()
        except BaseException as e:  # handed to the main thread, which raises it
            self.budget.stop()
            if errors is not None:
                errors.put(e)
            else:
                self.error = e

    def _read_all(self) -> None:
        for entry in self.order:
            if not self.budget.acquire(entry.nbytes):
                self.read_q.put(STOPPED)  # the writer failed (or the main thread left): unblock `get`
                return
            with self.lock:
                self.held[entry.name] = entry.nbytes
            self.read_q.put((entry.name, read_tensor(self.f, self.header, entry)))

    def _write_all(self) -> None:
        unsynced = 0
        while (item := self.write_q.get()) is not None:
            name, tensor = item
            del item  # no reference may outlive the write: the budget counts the bytes as freed
            self.writer.write(name, tensor)
            unsynced += tensor.numel() * tensor.element_size()
            del tensor
            with self.lock:
                held = self.held.pop(name, 0)
            self.budget.release(held)  # its bytes are in the page cache now: the reader may go on
            if SYNC_BYTES and unsynced >= SYNC_BYTES:  # this thread waits for the disk, not the decomposition
                self.writer.sync()
                unsynced = 0
