"""Several weights decomposed at once, each on one torch thread, their results taken in the order they were asked.

`OrderedWork(workers, take)` runs the decompositions it is given on `workers` threads and hands each result to
`take(key, result)` on one committing thread, in the order the caller queued them: a streaming shard's residuals
must reach its writer in file order, and an in-memory init sets its layers and reports progress in model order.
A value that needs no work (a tensor copied through) queues in order behind the decompositions before it.

Why threads and one torch thread each: a decomposition's torch ops release the GIL, and on the CPU
(`init.weights`) it runs single-threaded, so its bits do not depend on the thread count; a second thread per
weight spent most of its time at OpenMP barriers whenever another thread held its core. While the work runs,
the process's torch thread count is 1, so that no decomposition's `one_thread` restores a count another one
computes under.

Nothing blocks on the caller's side but `submit`, which waits while `workers` + 1 decompositions are unfinished
(the cores stay busy and no more). How many results may wait to be taken is the caller's to bound: a streaming
shard reads no further than its read-ahead budget, which every input holds until its output is written
(`init.pipeline`). The committing thread only waits on finished or running work, so it always makes progress,
and that budget, released by the writer, cannot deadlock against it. The first error of a decomposition or of
`take` is raised in the caller by the next `submit`, `put` or `close`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from ..decompose.linalg import one_thread

DONE = object()


class OrderedWork:
    """Use as a context manager; `submit`, `put` and `close` from one thread."""

    def __init__(self, workers: int, take: Callable[[str, object], None]):
        self.workers, self.take = max(1, workers), take
        self.slots = threading.BoundedSemaphore(self.workers + 1)  # decompositions submitted, not yet finished
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.committer: threading.Thread | None = None
        self._threads = one_thread()

    def __enter__(self) -> OrderedWork:
        self._threads.__enter__()
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decompose")
        self.committer = threading.Thread(target=self._commit_all, name="commit", daemon=True)
        self.committer.start()
        return self

    def submit(self, fn: Callable, *args) -> Future:
        """Start `fn(*args)`, a list of results, on a worker; `take_result` names where each one goes."""
        self._raise()
        self.slots.acquire()
        future = self.pool.submit(fn, *args)
        future.add_done_callback(lambda _: self.slots.release())
        return future

    def take_result(self, key: str, future: Future, index: int) -> None:
        """Hand `future`'s result[index] to `take(key, ...)`, after everything queued before it."""
        self._raise()
        self.queue.put((key, future, index))

    def put(self, key: str, value: object) -> None:
        """Hand `value` to `take` as is, after everything queued before it."""
        self._raise()
        self.queue.put((key, None, value))

    def close(self) -> None:
        """Wait until everything was taken; raise the first error."""
        self.queue.put(DONE)
        self.committer.join()
        self._raise()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committer.is_alive():  # leaving on an error: let the committer drain and stop
            self.error = self.error or (exc if exc is not None else RuntimeError("stopped"))
            self.queue.put(DONE)
            self.committer.join()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._threads.__exit__(None, None, None)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _commit_all(self) -> None:
        while (item := self.queue.get()) is not DONE:
            key, future, value = item
            if self.error is not None:
                continue  # after an error, results are dropped: nothing more is written
            try:
                self.take(key, value if future is None else future.result()[value])
            except BaseException as e:  # handed to the caller, which raises it
                self.error = e
