"""What every benchmark shares: the machine header with the load average, the peak RSS of a process,
running an operation in a fresh interpreter, and writing a result file under benchmarks/results/.

A benchmark is measured on an idle machine: `LoadWatch` records the 1-minute load average when the
benchmark starts and when it writes its result, and the header says whether other jobs shared the
machine (a load above the benchmark's own threads)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SETTLE_S = 5.0  # seconds for the disk to finish discarding freed blocks before the next measurement


def remove_and_settle(path: Path) -> None:
    """Delete a measurement's output and let the disk settle: with ext4's `discard` the freed blocks are
    trimmed after the delete, and a measurement started meanwhile pays for them (seconds per GB here)."""
    shutil.rmtree(path)
    os.sync()
    time.sleep(SETTLE_S)


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine() -> str:
    """The machine a figure was measured on."""
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


class LoadWatch:
    """The load average at the start of a benchmark and now, and the wall time in between."""

    def __init__(self, threads: int | None = None):
        self.start_load = load_average()
        self.start = time.perf_counter()
        self.threads = threads or os.cpu_count() or 1

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def header(self) -> str:
        """One sentence for a result file: machine, load at the start and end, whether it was shared."""
        end = load_average()
        shared = max(self.start_load, end) > self.threads
        verdict = ("other jobs shared the machine, so absolute times are noisy; read the ratios within this run"
                   if shared else "idle apart from this benchmark")
        return (f"Machine: {machine()}; 1-minute load average {self.start_load:.2f} at the start and {end:.2f} at "
                f"the end ({verdict}); wall time {self.seconds / 60:.1f} min.")


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from a forking parent
    across exec, while VmHWM starts afresh in a new program."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def run_fresh(script: str | Path, args: list[str], threads: int | None = None, env: dict | None = None) -> dict:
    """Run `python script *args` in a fresh interpreter (its own imports, allocator and peak RSS) and return
    the JSON object it prints on its last line of stdout."""
    env = {**os.environ, **(env or {})}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed_fresh(code: str, args: list[str], tmp: Path) -> dict:
    """Run `code` as a script in a fresh process (`run_fresh`); its JSON line plus the wall time seen from outside."""
    script = tmp / f"run_{abs(hash(code))}.py"
    script.write_text(code)
    start = time.perf_counter()
    row = run_fresh(script, args)
    script.unlink()
    return {**row, "wall_s": time.perf_counter() - start}


def write_result(name: str, text: str, data: dict | list | None = None) -> Path:
    """Write results/<name>.md (and results/<name>.json with `data`)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text if text.endswith("\n") else text + "\n")
    if data is not None:
        (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return path
