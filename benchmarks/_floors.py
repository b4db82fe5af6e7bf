"""The floors a streaming init is measured against, each run in a fresh process on the same checkpoint:

- copy: copying the checkpoint's shard files (read + write + fsync, as the shard writer does): the I/O alone;
- decompose-only: every weight `pissa init` targets, decomposed as it does it (`decompose_weight`, the same
  settings and threads), each read beforehand and outside the clock: the init's compute with no I/O.

`pythonpath` picks the source tree that is measured (another checkout's `src`, for a before/after)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from _common import run_fresh

COPY = r"""
import json, os, shutil, sys, time
src, dst = sys.argv[1], sys.argv[2]
start = time.perf_counter()
os.makedirs(dst)
for name in sorted(os.listdir(src)):
    if name.endswith(".safetensors"):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        fd = os.open(os.path.join(dst, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({"copy_s": time.perf_counter() - start}))
"""

DECOMPOSE_ONLY = r"""
import json, sys, time
from pissa.init import PissaConfig
from pissa.init.plan import make_plan
try:
    from pissa.init.weights import decompose_weight
except ImportError:  # trees before init/weights.py
    from pissa.init.layers import decompose_weight
config = PissaConfig(rank=int(sys.argv[2]), options={"niter": int(sys.argv[3])})
try:  # as the streaming init decomposes: one reused fp32 copy (trees before it allocate one per weight)
    from pissa.decompose import reused_fp32_copies
except ImportError:
    from contextlib import nullcontext as reused_fp32_copies
plan = make_plan(sys.argv[1], config)
total = 0.0
with reused_fp32_copies():
    for key, target in plan.targets.items():
        W = target.kind.to_matrix(plan.reader.read([key])[key])  # (out, in), read outside the clock
        start = time.perf_counter()
        decompose_weight(W, target.module, config, target.rank, target.scale)
        total += time.perf_counter() - start
print(json.dumps({"decompose_only_s": total, "weights": len(plan.targets)}))
"""


def floors(checkpoint: Path, work: Path, rank: int, niter: int, pythonpath: Path | None = None) -> dict:
    """{"copy_s", "decompose_only_s"}: both floors of `checkpoint`, measured now (`work` holds the copy)."""
    env = {"PYTHONPATH": str(pythonpath)} if pythonpath else None
    scripts = {name: work / f"floor_{name}.py" for name in ("copy", "decompose")}
    scripts["copy"].write_text(COPY)
    scripts["decompose"].write_text(DECOMPOSE_ONLY)
    copy = run_fresh(scripts["copy"], [checkpoint, work / "floor-copy"], env=env)
    shutil.rmtree(work / "floor-copy")
    decompose = run_fresh(scripts["decompose"], [checkpoint, rank, niter], env=env)
    for script in scripts.values():
        os.remove(script)
    return {"copy_s": copy["copy_s"], "decompose_only_s": decompose["decompose_only_s"]}
