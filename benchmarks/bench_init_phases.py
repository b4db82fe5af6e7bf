"""Where `pissa init` spends its time, phase by phase, against the copy and decompose-only floors.

On the checkpoints of `bench_e2e.py` (synthetic bf16 Llamas, hidden 2048, 500 MB shards: ~1.08 GB with 8 layers,
~4.17 GB with 38), in fresh processes:

  - `pissa init CKPT --rank 16 --niter 4` through the command line, with each phase timed by wrapping the function
    that does it (wall time inside it and the CPU time of the thread that ran it): the command line's imports, the
    plan (meta model, PEFT's target matcher, shard headers: and whatever they import), reading tensors (reader
    thread), the main thread waiting for a read, the randomized SVD, the residual and its error statistics (the
    bf16 cast included), the rest of `decompose` (the fp32 copy of W, checks), writing tensors (writer thread),
    closing each shard (fsync, rename), and finalizing the adapter and manifest. Also the time from the process's
    start to its first tensor read, and which heavy packages the run imported;
  - the copy and decompose-only floors (`_floors.py`): the same shard files copied with fsync, and every targeted
    weight decomposed as `pissa init` does it with no I/O.

`--src` times another source tree with the same wrappers (each phase is timed where that tree has its function),
so one file holds the before and after of a change:

    .venv/bin/python benchmarks/bench_init_phases.py --src /path/to/old/checkout --label before
    .venv/bin/python benchmarks/bench_init_phases.py --label after
    .venv/bin/python benchmarks/bench_init_phases.py --quick           (2 tiny layers, prints only, < 1 min)

Each run replaces its label in results/init_phases.json, and results/init_phases.md is rewritten from every label
there. Run on an idle machine (about 3 min a label; ~10 GB free disk).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _checkpoints import write_llama
from _common import RESULTS, LoadWatch, write_result
from _floors import floors

ROOT = Path(__file__).parents[1]
RANK, NITER = 16, 4
WATCH = LoadWatch(threads=torch.get_num_threads())

DRIVER = r"""
import dataclasses, json, sys, threading, time
T0 = time.perf_counter()
import pissa.cli
IMPORTED = time.perf_counter() - T0
import pissa.decompose.base as base, pissa.init.pipeline as pipeline, pissa.init.run, pissa.init.stream as stream
import pissa.io.writer as writer

PHASES, LOCK, FIRST = {}, threading.Lock(), []

def timed(fn, phase, on_call=None):
    def wrapper(*args, **kwargs):
        if on_call:
            on_call()
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            thread = threading.current_thread().name.split("_")[0].split(" ")[0]  # decompose_0 -> decompose
            with LOCK:
                row = PHASES.setdefault(phase, {"thread": thread, "calls": 0, "wall_s": 0.0, "cpu_s": 0.0})
                row["calls"] += 1; row["wall_s"] += wall; row["cpu_s"] += cpu
    return wrapper

def wrap(owner, attr, phase, on_call=None):
    # Where `from module import fn` bound it by name, wrap it there too: every pissa module holding the object.
    fn = getattr(owner, attr, None)
    if fn is None:
        return
    wrapped = timed(fn, phase, on_call)
    for module in [owner] + [m for n, m in list(sys.modules.items()) if n.startswith("pissa") and m is not owner]:
        if getattr(module, attr, None) is fn:
            setattr(module, attr, wrapped)

def first_read():
    if not FIRST:
        FIRST.append(time.perf_counter() - T0)

method = base.METHODS["pissa"]
base.METHODS["pissa"] = dataclasses.replace(method, fn=timed(method.fn, "randomized SVD"))
wrap(stream, "make_plan", "plan (meta model, targets, headers)")
wrap(pipeline, "read_tensor", "read tensors", first_read)
wrap(pipeline.ShardIO, "get", "main thread waits for a read")
wrap(base, "decompose", "decompose, whole")
wrap(base, "residual_chunks_", "residual + error statistics (bf16 cast included)")
wrap(writer.ShardWriter, "write_rows", "write tensors")
wrap(writer.ShardWriter, "__exit__", "close shards (fsync, rename)")
wrap(stream, "finish", "finalize (adapter, manifest, rename)")
wrap(stream, "stream_init", "transform, whole")

HEAVY = ("transformers.modeling_utils", "peft", "bitsandbytes", "trl", "datasets", "matplotlib", "accelerate")
sys.argv = ["pissa", *sys.argv[1:]]
try:
    pissa.cli.main()
except SystemExit as e:
    if e.code:
        raise
print(json.dumps({"imports_s": IMPORTED, "first_read_s": FIRST[0] if FIRST else None,
                  "in_process_s": time.perf_counter() - T0, "phases": PHASES,
                  "loaded": [m for m in HEAVY if m in sys.modules]}))
"""

def run(code: str, args: list[str], src: Path, tmp: Path) -> dict:
    """`python -c code args` in a fresh process importing pissa from `src`; its JSON line plus the outside wall."""
    script = tmp / "script.py"
    script.write_text(code)
    env = {"PYTHONPATH": str(src / "src"), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=tmp)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall}


def measure(ckpt: Path, src: Path, tmp: Path) -> dict:
    out = tmp / "out"
    init = run(DRIVER, ["init", str(ckpt), "--rank", str(RANK), "--niter", str(NITER), "--out", str(out)], src, tmp)
    shutil.rmtree(out)
    return {"init": init, **floors(ckpt, tmp, RANK, NITER, pythonpath=src / "src")}


def section(label: str, run_: dict) -> list[str]:
    lines = [f"## {label}", "", f"Source: `{run_['commit']}`. {run_['header']}", ""]
    for res in run_["results"]:
        init = res["init"]
        bound = max(res["copy_s"], res["decompose_only_s"])
        plan = init["phases"]["plan (meta model, targets, headers)"]["wall_s"]
        work = init["phases"]["transform, whole"]["wall_s"] - plan  # the plan holds imports in trees that defer them
        lines += [
            f"### {res['gb']:.2f} GB ({res['layers']} layers)", "",
            f"Process wall {init['wall_s']:.1f} s (in-process {init['in_process_s']:.1f} s); start-up to the first "
            f"tensor read {init['first_read_s']:.2f} s, of which the command line's imports {init['imports_s']:.2f} s; "
            f"heavy packages loaded: {', '.join(init['loaded']) or 'none'}. Copy floor {res['copy_s']:.1f} s, "
            f"decompose-only floor {res['decompose_only_s']:.1f} s: the transform after its plan took {work:.1f} s, "
            f"{work / bound:.2f}x max(copy, decompose-only).", "",
            "| phase | thread | calls | wall | CPU |", "|---|---|---:|---:|---:|",
        ]
        for phase, row in init["phases"].items():
            lines.append(f"| {phase} | {row['thread']} | {row['calls']} | {row['wall_s']:.2f} s | "
                         f"{row['cpu_s']:.2f} s |")
        lines.append("")
    return lines


def report(runs: dict) -> str:
    lines = [
        "# pissa init, phase by phase",
        "",
        f"Written by `benchmarks/bench_init_phases.py`: `pissa init CKPT --rank {RANK} --niter {NITER}` (streaming, "
        "the command line) in a fresh process, each phase timed inside the function that does it: wall time, and "
        "the CPU time of the thread that ran it (summed over the threads of one kind: `decompose` is every "
        "decomposition worker). Phases nest (`transform, whole` holds the reads, decompositions "
        "and writes; `decompose, whole` holds the SVD and the residual) and the reader and writer threads overlap "
        "the main thread, so the rows do not add up to the wall. Floors measured in the same run: copying the "
        "shard files with fsync, and every targeted weight decomposed with no I/O.",
        "",
    ]
    for label, run_ in runs.items():
        lines += section(label, run_)
    return "\n".join(lines)


def commit_of(src: Path) -> str:
    done = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "src"], capture_output=True, text=True)
    return (done.stdout.strip()[:72] or str(src)) + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 38],
                        help="decoder layers (8: ~1.1 GB, 38: ~4.2 GB)")
    parser.add_argument("--src", type=Path, default=ROOT, help="the source tree to time (default: this checkout)")
    parser.add_argument("--label", default="after", help="the section of results/init_phases.md this run fills")
    parser.add_argument("--tmp", default=None, help="folder for checkpoints and outputs (default: system temp)")
    parser.add_argument("--quick", action="store_true", help="2 tiny layers (hidden 256), prints only")
    args = parser.parse_args()
    shape = dict(hidden=256, intermediate=688, vocab=4096, heads=4) if args.quick else {}
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for layers in [2] if args.quick else args.layers:
            ckpt = Path(tmp) / f"llama-{layers}"
            total = write_llama(ckpt, layers, **shape)
            print(f"== {total / 1e9:.2f} GB, {layers} layers", flush=True)
            results.append({"layers": layers, "gb": total / 1e9, **measure(ckpt, args.src.resolve(), Path(tmp))})
            shutil.rmtree(ckpt)
    this = {"commit": commit_of(args.src), "header": WATCH.header(), "results": results}
    if args.quick:  # a smoke run: its figures are not results
        print(report({args.label: this}))
        return
    saved = RESULTS / "init_phases.json"
    runs = json.loads(saved.read_text()) if saved.exists() else {}
    runs[args.label] = this
    write_result("init_phases", report(ordered(runs)), runs)


def ordered(runs: dict) -> dict:
    return dict(sorted(runs.items(), key=lambda kv: kv[0] != "before"))


if __name__ == "__main__":
    sys.exit(main())
