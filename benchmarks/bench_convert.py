"""Conversion, compression and merge on the embedded SmolLM2-135M-Instruct, against PEFT and a copy floor.

- convert: ours (adapter files only) vs PEFT's `save_pretrained(path_initial_model_for_weight_conversion=)`,
  which needs the residual model loaded with both adapters;
- compress to rank r: ours (QR of the two 2r-column factors + a (2r, 2r) SVD) vs a dense SVD of each
  layer's ΔW, with the largest difference of the resulting rank-r updates;
- merge: ours (streamed shard by shard) vs PEFT (load, merge_and_unload, save_pretrained) vs the
  physical floor of copying the same shard files; largest tensor difference between ours and PEFT's.

Every measured operation runs in its own subprocess, so each peak RSS is its own (`import` is the
floor of a process that imports torch, transformers and peft). The "trained" adapter is the init
plus seeded noise (conversion cost does not depend on the values; equivalence is tested in tests/).

Run (CPU, a few minutes):

    .venv/bin/python benchmarks/bench_convert.py
    .venv/bin/python benchmarks/bench_convert.py --rank 32 --shard-size 100MB --blocks 2 --threads 2

Writes benchmarks/results/convert.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import LoadWatch, peak_rss_bytes, run_fresh, write_result

THREADS = 1  # set by --threads; on a shared machine, 2 OpenMP threads make small matmuls ~100x slower


# --- the measured operations, each run in a child process ------------------------------------------

def op_import(a):
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


def op_convert_ours(a):
    from pissa.convert import convert_to_lora

    convert_to_lora(a["trained"], a["init"], a["out"], rank=a.get("rank"))


def op_convert_peft(a):
    import peft  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shutil.copytree(Path(a["init"]) / "adapter", Path(a["scratch"]) / "initial")  # PEFT rewrites its config
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(Path(a["init"]) / "residual"), a["trained"])
    model.save_pretrained(a["out"], path_initial_model_for_weight_conversion=str(Path(a["scratch"]) / "initial"))


def op_compress_compare(a):
    """Per layer of the first blocks: ours (QR + small SVD) vs forming ΔW and a full SVD, interleaved."""
    import torch

    from pissa.convert.factors import truncate
    from pissa.convert.inputs import layer_scale
    from pissa.io.adapter_files import lora_pairs, read_adapter

    config, state = read_adapter(a["lora"])
    blocks = tuple(f"layers.{i}." for i in range(a["blocks"]))
    ours_s = dense_s = diff = 0.0
    layers = [(m, AB) for m, AB in sorted(lora_pairs(state).items()) if any(b in m for b in blocks)]
    for m, (A2, B2) in layers:
        s = layer_scale(config, m)
        t = time.perf_counter()
        A, B, _ = truncate(A2, B2, s, a["rank"], 1.0)  # scale 1 out: B @ A is the truncated ΔW
        ours_s += time.perf_counter() - t
        t = time.perf_counter()
        U, S, Vh = torch.linalg.svd(s * B2.double() @ A2.double(), full_matrices=False)  # dense (out, in)
        dense = (U[:, : a["rank"]] * S[: a["rank"]]) @ Vh[: a["rank"]]  # (out, in)
        dense_s += time.perf_counter() - t
        diff = max(diff, float((B.double() @ A.double() - dense).abs().max()))
    return {"layers": len(layers), "ours_s": ours_s, "dense_s": dense_s, "max_abs_diff": diff}


def op_merge_ours(a):
    from pissa.convert import merge_adapter

    merge_adapter(a["adapter"], a["base"], a["out"])


def op_merge_peft(a):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(a["base"]), a["adapter"])
    model.merge_and_unload().save_pretrained(a["out"], max_shard_size=a["shard_size"])


def op_copy_floor(a):
    Path(a["out"]).mkdir()
    for f in Path(a["base"]).iterdir():
        shutil.copyfile(f, Path(a["out"]) / f.name)


OPS = {name.removeprefix("op_"): fn for name, fn in globals().items() if name.startswith("op_")}


def child(op: str, args: dict, threads: int | None = None) -> dict:
    """Run OPS[op] in a fresh interpreter; (seconds, peak RSS MB) of that process."""
    return run_fresh(__file__, ["--child", op, json.dumps(args)], threads=threads or THREADS)


def run_child(op: str, raw: str) -> None:
    import peft  # noqa: F401  (imports are paid before the timer: they are the same for every operation)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import pissa.convert  # noqa: F401
    import pissa.convert.merge  # noqa: F401

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    extra = OPS[op](json.loads(raw)) or {}
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_bytes() / 2**20, **extra}))


# --- setup and checks --------------------------------------------------------------------------------

def setup(work: Path, rank: int, shard_size: str) -> dict:
    """PiSSA init of SmolLM2, a noisy 'trained' adapter, and a sharded copy of the original."""
    import torch

    from pissa.init import PissaConfig, run_init
    from pissa.io.adapter_files import read_adapter, write_adapter
    from pissa.models import load_model, resolve_embedded

    original = resolve_embedded("smollm2-135m")
    run_init(str(original), PissaConfig(rank=rank, options={"niter": 4}), work / "init")
    config, state = read_adapter(work / "init" / "adapter")
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) for k, v in state.items()}
    write_adapter(work / "trained", config, noisy)
    model, tokenizer, _ = load_model(str(original))
    model.save_pretrained(work / "sharded", max_shard_size=shard_size)
    tokenizer.save_pretrained(work / "sharded")
    return {"original": str(original)}


def max_tensor_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = {}, {}
    for folder, target in ((a, ta), (b, tb)):
        for shard in folder.glob("*.safetensors"):
            target.update(load_file(shard))
    assert ta.keys() == tb.keys(), "merged folders hold different tensors"
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shard-size", default="100MB")
    p.add_argument("--blocks", type=int, default=4, help="transformer blocks in the compression comparison")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every measured process")
    args = p.parse_args()
    if args.child:
        return run_child(*args.child)
    global THREADS
    THREADS = args.threads
    watch = LoadWatch(threads=args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        setup(work, args.rank, args.shard_size)
        r, trained, init = args.rank, str(work / "trained"), str(work / "init")
        rows = {"import only (torch, transformers, peft, pissa)": child("import", {})}
        rows["convert, ours (adapter files)"] = child("convert_ours", {"trained": trained, "init": init,
                                                                       "out": str(work / "lora")})
        peft_args = {"trained": trained, "init": init, "out": str(work / "lora-peft"), "scratch": str(work / "s")}
        rows["convert, PEFT (residual model loaded)"] = child("convert_peft", peft_args)
        rows[f"convert + compress to r={r}, ours"] = child("convert_ours", {"trained": trained, "init": init,
                                                                            "out": str(work / "lora-r"), "rank": r})
        compress = child("compress_compare", {"lora": str(work / "lora"), "rank": r, "blocks": args.blocks})
        merge_args = {"adapter": str(work / "lora"), "base": str(work / "sharded"), "shard_size": args.shard_size}
        rows["merge, ours (streamed)"] = child("merge_ours", {**merge_args, "out": str(work / "m-ours")})
        rows["merge, PEFT (load, merge_and_unload, save)"] = child("merge_peft", {**merge_args,
                                                                                 "out": str(work / "m-peft")})
        rows["copy the same shard files (floor)"] = child("copy_floor", {"base": str(work / "sharded"),
                                                                         "out": str(work / "m-copy")})
        rows[f"convert, ours, {2 * args.threads} threads"] = child(
            "convert_ours", {"trained": trained, "init": init, "out": str(work / "lora-2")}, threads=2 * args.threads)
        merged_diff = max_tensor_diff(work / "m-ours", work / "m-peft")
        shards = len(list((work / "sharded").glob("*.safetensors")))
        write_results(rows, compress, merged_diff, args, shards, gb(work / "sharded"), watch)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_results(rows: dict, compress: dict, merged_diff: float, args, shards: int, size_gb: float,
                  watch: LoadWatch) -> None:
    names = list(rows)
    t = {name: rows[name]["seconds"] for name in names}
    lines = [
        "# Conversion, compression and merge (SmolLM2-135M-Instruct, fp32)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_convert.py --rank {args.rank} --shard-size {args.shard_size} "
        f"--blocks {args.blocks} --threads {args.threads}`",
        "",
        watch.header(),
        f"Model: 210 adapted linear layers, rank-{args.rank} PiSSA init, so the exact converted adapter has rank "
        f"{2 * args.rank}; the merge base is saved in {shards} shards ({size_gb:.2f} GB). The 'trained' adapter is "
        "the init plus noise (cost does not depend on values; equivalence is in tests/).",
        f"Each operation ran in its own process with {args.threads} torch/OpenMP thread(s) (see the last row: on an "
        "oversubscribed machine more threads can be far slower); seconds exclude imports; peak RSS is that process's "
        "VmHWM.",
        "",
        "| operation | seconds | peak RSS (MB) |",
        "|---|---:|---:|",
        *[f"| {name} | {rows[name]['seconds']:.2f} | {rows[name]['rss_mb']:.0f} |" for name in names],
        "",
        f"Compression core, {compress['layers']} layers of the first {args.blocks} blocks, same process, interleaved: "
        f"ours (QR of both 2r-column factors + ({2 * args.rank}, {2 * args.rank}) SVD) {compress['ours_s']:.2f} s vs "
        f"dense ΔW + full SVD {compress['dense_s']:.2f} s = {compress['dense_s'] / compress['ours_s']:.1f}x; "
        f"largest difference of the rank-{args.rank} updates {compress['max_abs_diff']:.2g}.",
        "",
        "Ratios (same run):",
        f"- convert: PEFT / ours = {t[names[2]] / t[names[1]]:.1f}x time; peak RSS "
        f"{rows[names[2]]['rss_mb']:.0f} vs {rows[names[1]]['rss_mb']:.0f} MB",
        f"- merge: ours / copy floor = {t[names[4]] / t[names[6]]:.1f}x time; PEFT / ours = "
        f"{t[names[5]] / t[names[4]]:.1f}x time; peak RSS ours {rows[names[4]]['rss_mb']:.0f} MB vs PEFT "
        f"{rows[names[5]]['rss_mb']:.0f} MB (floor: import only {rows[names[0]]['rss_mb']:.0f} MB)",
        f"- merged tensors, ours vs PEFT merge_and_unload: largest difference {merged_diff:.3g}",
        "",
    ]
    write_result("convert", "\n".join(lines))


if __name__ == "__main__":
    main()
