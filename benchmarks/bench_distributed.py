"""Step time and peak memory per process of `pissa train` under DDP, FSDP2 and DeepSpeed ZeRO-3, on one model.

The same `pissa init` output (PiSSA rank 16 on every linear layer of a synthetic Llama: 6 layers, hidden 768,
intermediate 2048, vocabulary 8192, 55M parameters, fp32) trains on the tests' sums set (helpers.RECORDS) for the
same steps at the same global batch under each engine, launched by `accelerate launch` with the shipped configs
(docs/distributed/ddp.yaml, fsdp.yaml, zero3.yaml) on 2 processes; on a CPU machine with gloo, the CPU overrides of
tests/test_distributed.py and its `allow_sharded_engines_on_cpu`. DDP is the floor for step time (no gathers); for
memory, the model's own bytes per process (the residual, and the adapter's weights, gradients and AdamW states: all
of it under DDP, half under FSDP2 and ZeRO-3) stand beside the measured peak RSS (imports, data and activations come
on top, about the same under each engine).

    .venv/bin/python benchmarks/bench_distributed.py            # ~3 min on 2 idle cores
    .venv/bin/python benchmarks/bench_distributed.py --quick    # a tiny model, 3 steps: checks that it runs

Writes benchmarks/results/distributed.md and distributed.json (not with --quick, which prints its table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import LoadWatch, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers: the tiny Llama builder, the character tokenizer, free_port
CONFIGS = ROOT / "docs" / "distributed"
LAUNCHED = ROOT / "tests" / "distributed_launch.py"
ENGINES = {"DDP": "ddp.yaml", "FSDP2": "fsdp.yaml", "ZeRO-3": "zero3.yaml"}
SIZES = {"full": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=8192),
         "quick": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512)}


def make_init(work: Path, size: dict, rank: int) -> tuple[Path, int, int]:
    """The synthetic model and its `pissa init`, and the data; returns (init folder, model parameters, adapter
    parameters)."""
    from helpers import RECORDS, build_tiny_llama, char_tokenizer
    from pissa.init import PissaConfig, run_init

    (work / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    model = build_tiny_llama(seed=0, **size)
    model.save_pretrained(work / "model")
    char_tokenizer().save_pretrained(work / "model")
    result = run_init(str(work / "model"), PissaConfig(rank=rank), work / "init")
    return result.out, sum(p.numel() for p in model.parameters()), result.trainable_params


def launch(engine: str, init: Path, args, work: Path) -> list[dict]:
    """One `accelerate launch` of one run under `engine`; returns every process's record."""
    from helpers import free_port

    out = work / engine
    config = dict(out=str(out), init=str(init), data=str(work / "sums.jsonl"), max_length=128,
                  batch_size=args.batch_size, max_steps=args.steps, lr=1e-4, warmup_ratio=0.0, tensorboard=False)
    spec = work / f"{engine}.json"
    spec.write_text(json.dumps([{"config": config, "cpu": not torch.cuda.is_available()}]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / ENGINES[engine]),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(LAUNCHED), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error",
           "HF_HOME": str(work / "hf"), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text())[0] for p in sorted(work.glob(f"{engine}.rank*.json"))]


def measure(engine: str, init: Path, args, work: Path) -> dict:
    records = launch(engine, init, args, work)
    steps = [s for r in records for s in r["step_seconds"][1:]]  # the first step warms up
    return {"engine": engine, "distributed_type": records[0]["distributed_type"],
            "step_s": statistics.median(steps), "peak_rss_gb": max(r["peak_rss_bytes"] for r in records) / 1e9,
            "step_rss_gb": max(r["step_rss_bytes"] for r in records) / 1e9,
            "held_fraction": records[0]["shards"]["frozen"]["local"] / records[0]["shards"]["frozen"]["whole"]}


def model_bytes_per_process(params: int, adapter: int, fraction: float) -> float:
    """fp32 residual (4 bytes) + the adapter's fp32 weight, gradient and AdamW moments (16 bytes), held share."""
    return fraction * (4 * params + 16 * adapter)


def table(rows: list[dict], params: int, adapter: int) -> str:
    ddp = next(r for r in rows if r["engine"] == "DDP")
    lines = ["| engine | accelerate ran | share of each weight held | median step s | x DDP | RSS while training GB "
             "| peak RSS, loading included, GB | model bytes per process GB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['distributed_type']} | {r['held_fraction']:.2f} | {r['step_s']:.3f} | "
                     f"{r['step_s'] / ddp['step_s']:.2f} | {r['step_rss_gb']:.2f} | {r['peak_rss_gb']:.2f} | "
                     f"{model_bytes_per_process(params, adapter, r['held_fraction']) / 1e9:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model and 3 steps; print, write nothing")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per engine (default 8; --quick 3)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=2, help="per process (global batch: 2x this)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (2 processes)")
    args = p.parse_args()
    args.steps = args.steps or (3 if args.quick else 8)
    watch = LoadWatch(threads=2 * args.threads)
    size = SIZES["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init, params, adapter = make_init(work, size, args.rank)
        rows = [measure(engine, init, args, work) for engine in ENGINES]
    shape = ", ".join(f"{k} {v}" for k, v in size.items())
    text = (f"# `pissa train` under DDP, FSDP2 and ZeRO-3: step time and peak memory per process\n\n"
            f"`benchmarks/bench_distributed.py{' --quick' if args.quick else ''}`; {watch.header()}\n\n"
            f"A synthetic Llama ({shape}: {params / 1e6:.0f}M parameters, fp32), PiSSA rank {args.rank} on every "
            f"linear layer ({adapter / 1e6:.1f}M adapter parameters), trained from the same `pissa init` output for "
            f"{args.steps} steps on 2 processes at batch {args.batch_size} each (the tests' sums set), launched "
            "with the shipped docs/distributed configs; step time is the median over both processes after the "
            "first step.\n\n" + table(rows, params, adapter) + "\n\n"
            "`model bytes per process` is what the engine leaves each process to hold of the residual (4 bytes per "
            "parameter) and of the adapter (16 bytes: weight, gradient, two AdamW moments). Both RSS figures are the "
            "largest over the 2 processes; they add the imports, the data, the activations and whatever is gathered "
            "at a time. `RSS while training` is the largest at the end of a step; the peak includes loading, where "
            "under FSDP2 (cpu_ram_efficient_loading) rank 0 reads the whole residual and sends each process its "
            "shard.\n")
    if args.quick:
        print(text)
    else:
        write_result("distributed", text, {"rows": rows, "params": params, "adapter_params": adapter,
                                           "steps": args.steps, "shape": size})


if __name__ == "__main__":
    main()
