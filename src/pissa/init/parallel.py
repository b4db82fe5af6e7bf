"""Spread shard jobs over worker processes and torch.distributed ranks.

Ranks (torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK) take every world-th job;
inside a rank, `workers` spawned processes take jobs from a pool. Output never depends on the
split: each tensor's result depends only on its name, the seed, and the thread count, which
every worker copies from its parent.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from .shard_job import ShardJob, run_shard


@dataclass
class Ranks:
    """This process's place in a torch.distributed launch (rank 0 of 1 when not launched)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="gloo")  # only barriers travel; gloo works with or without GPUs
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_device(self, device: str) -> str:
        """Under a launcher, `cuda` means this rank's own GPU."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device

    def share(self, jobs: list) -> list:
        return jobs[self.rank :: self.world]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def run_jobs(
    jobs: list[ShardJob],
    workers: int,
    progress: Callable[[int, int, str], None] | None,
    total: int,
    done: int,
) -> None:
    """Run `jobs` here (workers=1, per-layer progress) or in a spawned process pool (per-shard progress)."""
    if progress:
        progress(done, total, "")
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            def step(name: str) -> None:
                nonlocal done
                done += 1
                if progress:
                    progress(done, total, name)

            run_shard(job, step)
        return
    # spawn, not fork: a forked copy of a process that already ran OpenMP/MKL threads can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(run_shard, job): job for job in jobs}
        try:
            for future in as_completed(futures):
                future.result()  # re-raises a worker's error here
                done += len(futures[future].targets)
                if progress:
                    progress(done, total, futures[future].shard)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # finished shards stay recorded for the resume
            raise
