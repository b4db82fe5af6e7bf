"""The floors a streaming init is measured against, each run in a fresh process on the same checkpoint:

- copy: copying the checkpoint's shard files (read + write + fsync, as the shard writer does): the I/O alone;
- decompose-only: every weight `pissa init` targets, decomposed as it does it (`decompose_weight`, the same
  settings, several at once where the tree does that), all read beforehand, outside the clock: the init's
  compute with no I/O.

`pythonpath` picks the source tree that is measured (another checkout's `src`, for a before/after)."""

from __future__ import annotations

import os
from pathlib import Path

from _common import remove_and_settle, run_fresh

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
import torch
from pissa.init import PissaConfig
from pissa.init.plan import make_plan
try:
    from pissa.init.weights import decompose_weight
except ImportError:  # trees before init/weights.py
    from pissa.init.layers import decompose_weight
config = PissaConfig(rank=int(sys.argv[2]), options={"niter": int(sys.argv[3])})
plan = make_plan(sys.argv[1], config)
read = plan.reader.read(list(plan.targets))
weights = [(plan.targets[k].kind.to_matrix(W), plan.targets[k]) for k, W in read.items()]
try:  # as the streaming init decomposes them: several at once, one reused fp32 copy each
    from pissa.decompose import reused_fp32_copies
    from pissa.init.concurrent import OrderedWork
except ImportError:  # trees before: one at a time, on the process's threads
    OrderedWork = None
start = time.perf_counter()
if OrderedWork is None:
    for W, t in weights:
        decompose_weight(W, t.module, config, t.rank, t.scale)
else:
    with reused_fp32_copies(), OrderedWork(torch.get_num_threads(), lambda key, result: None) as work:
        for W, t in weights:
            work.take_result(t.module, work.submit(lambda W=W, t=t: [decompose_weight(W, t.module, config, t.rank,
                                                                                       t.scale)]), 0)
        work.close()
print(json.dumps({"decompose_only_s": time.perf_counter() - start, "weights": len(weights)}))
"""


def floors(checkpoint: Path, work: Path, rank: int, niter: int, pythonpath: Path | None = None) -> dict:
    """{"copy_s", "decompose_only_s"}: both floors of `checkpoint`, measured now (`work` holds the copy)."""
    env = {"PYTHONPATH": str(pythonpath)} if pythonpath else None
    scripts = {name: work / f"floor_{name}.py" for name in ("copy", "decompose")}
    scripts["copy"].write_text(COPY)
    scripts["decompose"].write_text(DECOMPOSE_ONLY)
    copy = run_fresh(scripts["copy"], [checkpoint, work / "floor-copy"], env=env)
    remove_and_settle(work / "floor-copy")
    decompose = run_fresh(scripts["decompose"], [checkpoint, rank, niter], env=env)
    for script in scripts.values():
        os.remove(script)
    return {"copy_s": copy["copy_s"], "decompose_only_s": decompose["decompose_only_s"]}
