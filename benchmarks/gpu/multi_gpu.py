"""Step 5 of the GPU check (benchmarks/gpu/check.py): `pissa train` on two GPUs under FSDP2 and DeepSpeed ZeRO-3, and
QPiSSA under FSDP2, launched with the shipped configs (docs/distributed/fsdp.yaml, zero3.yaml) as a user would, with
NCCL and the configs' bf16 mixed precision. Skipped, and said so, on a machine with fewer than two GPUs and in the
dry run (the CPU form of these runs is tests/test_distributed.py).

Each 2-GPU run trains the same `pissa init` output for a few steps at batch 2 per GPU; one GPU with 2 accumulation
steps (the same micro-batches) is the reference. A run passes when it ran under the engine asked for, logged every
step, wrote a whole adapter (the init's tensor names and shapes) and its losses stay within LOSS_ATOL of the
reference: bf16 rounds each product to 2^-8 relative, and the two sum the micro-batch gradients in another order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "docs" / "distributed"
STEPS, RANK, LOSS_ATOL = 5, 16, 0.05


def train_args(init: Path, out: Path) -> list[str]:
    return ["train", "--init", str(init), "--data", "arith", "--limit", "64", "--max-steps", str(STEPS), "--batch-size",
            "2", "--lr", "1e-4", "--warmup-ratio", "0", "--no-tensorboard", "--out", str(out)]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def two_gpu_run(config: str, init: Path, out: Path, reference: list[float]) -> dict:
    """`accelerate launch --config_file docs/distributed/<config> --num_processes 2 -m pissa.cli train ...`."""
    from safetensors import safe_open

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "-m", "pissa.cli", *train_args(init, out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HOME": str(out.parent / "hf")})
    result = {"config": config, "seconds": time.perf_counter() - start, "returncode": done.returncode}
    if done.returncode != 0:
        return {**result, "ok": False, "error": "\n".join(done.stderr.splitlines()[-15:])}
    got = losses(out)
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f, \
            safe_open(str(init / "adapter" / "adapter_model.safetensors"), "pt") as g:
        whole = {k: f.get_slice(k).get_shape() for k in f.keys()} == {k: g.get_slice(k).get_shape() for k in g.keys()}
    diff = max(abs(a - b) for a, b in zip(got, reference, strict=True)) if len(got) == len(reference) else float("inf")
    return {**result, "losses": got, "max_loss_diff": diff, "whole_adapter": whole,
            "ok": len(got) == STEPS and whole and diff <= LOSS_ATOL}


def one_gpu_reference(init: Path, out: Path) -> list[float]:
    """The same micro-batches on one GPU: batch 2, 2 accumulation steps, the configs' bf16 mixed precision."""
    cmd = [sys.executable, "-m", "pissa.cli", *train_args(init, out), "--grad-accum", "2"]
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "CUDA_VISIBLE_DEVICES": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError("the one-GPU reference failed:\n" + "\n".join(done.stderr.splitlines()[-15:]))
    return losses(out)


def step_multi_gpu(work: Path, model_of, dry: bool) -> dict:
    """FSDP2 and ZeRO-3 PiSSA, and FSDP2 QPiSSA (NF4 in bfloat16 storage), on two GPUs, of the model `model_of()`
    names; or why it was skipped."""
    import torch

    gpus = 0 if dry else torch.cuda.device_count()
    if dry or gpus < 2:
        why = "dry run" if dry else f"this machine has {gpus} GPU{'s' if gpus != 1 else ''}"
        return {"ok": True, "skipped": f"{why}; it needs two (its CPU form: tests/test_distributed.py)"}
    from pissa.init import PissaConfig, run_init

    model = model_of()
    inits = {"pissa": run_init(model, PissaConfig(rank=RANK), work / "mg-init").out,
             "qpissa": run_init(model, PissaConfig(rank=RANK, quantize="nf4", quant_iters=2, quant_storage="bfloat16"),
                                work / "mg-qinit").out}
    runs = []
    for name, config in (("pissa", "fsdp.yaml"), ("pissa", "zero3.yaml"), ("qpissa", "fsdp.yaml")):
        reference = one_gpu_reference(inits[name], work / f"mg-{name}-one")
        runs.append({"method": name, **two_gpu_run(config, inits[name], work / f"mg-{name}-{config[:-5]}", reference)})
    return {"gpus": gpus, "runs": runs, "ok": all(r["ok"] for r in runs)}


def report_lines(result: dict, verdict: str) -> list[str]:
    if "skipped" in result:
        return [f"## 5. Two GPUs: FSDP2 and ZeRO-3 (skipped: {result['skipped']})", ""]
    lines = [f"## 5. Two GPUs: FSDP2 and ZeRO-3 ({verdict})", "",
             f"{result['gpus']} GPUs; {STEPS} steps at batch 2 per GPU against one GPU at the same micro-batches "
             f"(loss bound {LOSS_ATOL}, bf16).", "",
             "| method | config | seconds | max loss diff | whole adapter | verdict |", "|---|---|---:|---:|---|---|"]
    for r in result.get("runs", []):
        diff = r.get("max_loss_diff", float("nan"))
        whole, ok = r.get("whole_adapter", "-"), "passed" if r["ok"] else "FAILED"
        lines.append(f"| {r['method']} | {r['config']} | {r['seconds']:.0f} | {diff:.4f} | {whole} | {ok} |")
    lines += [f"\n{r['config']} error:\n```\n{r['error']}\n```" for r in result.get("runs", []) if "error" in r]
    return lines + [""]
