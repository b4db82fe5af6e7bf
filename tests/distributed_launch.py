"""The script tests/test_distributed.py and benchmarks/bench_distributed.py start with `accelerate launch`: it runs
`pissa train`'s recipe for each run in a JSON file, in these processes, one after the other.

    accelerate launch --config_file docs/distributed/fsdp.yaml [CPU overrides] tests/distributed_launch.py RUNS.json

RUNS.json is a list of {"config": TrainConfig fields, "crash_at": step or null, "env": {...} or null, "cpu": true};
a run with crash_at stops there as a kill would (helpers.CrashAt, after the step's log). "env" is set for that run
only: {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"} is what `accelerate launch --zero_stage 2` passes, so one launch of
zero3.yaml runs ZeRO-3 and ZeRO-2. With "cpu", accelerate is let run FSDP / DeepSpeed in CPU processes
(helpers.allow_sharded_engines_on_cpu). Each process writes RUNS.rank<R>.json:
per run, the distributed type the Trainer ran under, the parameter shards it held (helpers.shard_counts), its step
times, the largest RSS seen at the end of a step, and the process's peak RSS so far (loading included).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from transformers import TrainerCallback  # noqa: E402

from helpers import CrashAt, allow_sharded_engines_on_cpu, shard_counts  # noqa: E402


class Observe(TrainerCallback):
    """Records the shards each process holds once the Trainer has wrapped the model, and each step's time."""

    def __init__(self):
        self.shards, self.step_seconds, self.start, self.step_rss = None, [], None, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.shards = shard_counts(model)

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self.start)
        self.step_rss = max(self.step_rss, rss_bytes("VmRSS"))


def rss_bytes(field: str = "VmHWM") -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc/self/status."""
    import re

    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def run_one(spec: dict) -> dict:
    import os

    from pissa.train import TrainConfig, TrainRecipe

    saved = {k: os.environ.get(k) for k in spec.get("env") or {}}
    os.environ.update(spec.get("env") or {})
    try:
        return train(spec, TrainConfig, TrainRecipe)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def train(spec: dict, TrainConfig, TrainRecipe) -> dict:
    observe, start = Observe(), time.perf_counter()
    callbacks = [observe] + ([CrashAt(spec["crash_at"])] if spec.get("crash_at") else [])
    recipe = TrainRecipe(TrainConfig(**spec["config"]), callbacks=callbacks)
    try:
        recipe.run()
    except KeyboardInterrupt:  # the simulated kill; the run folder keeps its last checkpoint
        pass
    state = recipe.trainer.accelerator.state
    return {"out": spec["config"]["out"], "distributed_type": str(state.distributed_type).split(".")[-1],
            "processes": state.num_processes, "shards": observe.shards, "step_seconds": observe.step_seconds,
            "seconds": time.perf_counter() - start, "step_rss_bytes": observe.step_rss, "peak_rss_bytes": rss_bytes()}


def main() -> None:
    runs_file = Path(sys.argv[1])
    specs = json.loads(runs_file.read_text())
    if any(spec.get("cpu") for spec in specs):
        allow_sharded_engines_on_cpu()
    from accelerate import PartialState

    records = [run_one(spec) for spec in specs]
    rank = PartialState().process_index
    runs_file.with_suffix(f".rank{rank}.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
