"""The prepared GPU check (benchmarks/gpu/check.sh) in its CPU dry run: the same steps at tiny sizes (init one
weight at a time and batched, QPiSSA training on an NF4 base, evaluation on the 4-bit residual, the vLLM hook),
so the script a GPU machine runs cannot rot between the rare occasions one is at hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration  # a process per step
def test_gpu_check_dry_run_passes_every_step(tmp_path):
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "PYTHON": sys.executable, "PISSA_WORK": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/check.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = done.stdout[done.stdout.index("# GPU check"):]
    for section in ("## 1. pissa init --device cpu (passed)", "## 2. QPiSSA training, NF4 base (passed)",
                    "## 3. Evaluation on the 4-bit residual (passed)", "## 4. vLLM serving",
                    "## 5. Two GPUs: FSDP2 and ZeRO-3 (skipped: dry run; it needs two", "Overall: passed."):
        assert section in report, report
    assert "Linear4bit layers" in report and "Batched against one at a time" in report
    assert not (ROOT / "benchmarks/results/gpu.md").exists() or "dry run" not in (
        ROOT / "benchmarks/results/gpu.md").read_text()  # a dry run writes no result file
    assert list(tmp_path.iterdir()) == []  # its work folder is cleaned up
