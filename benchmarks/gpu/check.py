"""The prepared GPU check (issue 14), run by benchmarks/gpu/check.sh: every GPU path of pissa once, in a few
minutes, with a verdict per step in benchmarks/results/gpu.md.

1. init: `pissa init --device cuda` (streaming) of a 7B-shaped synthetic checkpoint (a few layers of
   hidden 4096 / intermediate 11008, bf16, realistic spectra), one weight at a time and batched
   (--batch-same-shape); the two must agree, and both are timed against copying the same files.
2. train: QPiSSA on SmolLM2-135M (embedded) with a bitsandbytes NF4 base, 20 steps on the GPU; the loss
   must fall. Without the embedded package (no network), a SmolLM2-shaped random model with a character
   tokenizer trains instead, and the report says so.
3. eval: the trained adapter on its 4-bit residual (accuracy and perplexity on the bundled arith set).
4. vLLM: the hook below runs benchmarks/gpu/serve_vllm.py when it exists (another engineer's).
5. two GPUs: FSDP2 and ZeRO-3 PiSSA and FSDP2 QPiSSA through `accelerate launch` with the shipped configs, against
   one GPU (benchmarks/gpu/multi_gpu.py); skipped, and said so, with fewer than two GPUs.

`--dry-run`: the same steps at tiny sizes on the CPU, in well under a minute (tests/test_gpu_check.py runs
it, so the script cannot rot); it prints its report instead of writing results/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.char_tokenizer: the test suite's character-level tokenizer
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import multi_gpu  # noqa: E402

SIZES = {  # (checkpoint shape, training, evaluation) for the real check and the dry run
    "gpu": dict(ckpt=dict(layers=3, hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=32),
                niter=3, rank=16, train_rank=16, steps=20, batch=8, lr=5e-4, eval_limit=20, new_tokens=64),
    "dry": dict(ckpt=dict(layers=2, hidden=128, intermediate=344, vocab=512, heads=4, kv_heads=2),
                niter=2, rank=8, train_rank=4, steps=20, batch=4, lr=5e-3, eval_limit=2, new_tokens=8),
}


def copy_floor(src: Path, dst: Path) -> float:
    """Seconds to copy a checkpoint folder file by file with an fsync each, as the streaming writer writes."""
    start = time.perf_counter()
    dst.mkdir()
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, dst / f.name)
        fd = os.open(dst / f.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - start


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def agreement(a: Path, b: Path) -> float:
    """The largest relative Frobenius difference between two init outputs, over residual and adapter tensors."""
    worst = 0.0
    for part in ("residual", "adapter"):
        x, y = tensors(a / part), tensors(b / part)
        assert sorted(x) == sorted(y), f"{part}: different tensors"
        for k in x:
            diff = (x[k].double() - y[k].double()).norm() / x[k].double().norm().clamp_min(1e-30)
            worst = max(worst, diff.item())
    return worst


def step_init(work: Path, size: dict, device: str) -> dict:
    from _checkpoints import write_llama

    from pissa.init import PissaConfig, run_init

    src = work / "ckpt"
    total = write_llama(src, shard_bytes=1 << 30, **size["ckpt"])
    copy_s = copy_floor(src, work / "copy")
    shutil.rmtree(work / "copy")
    config = PissaConfig(rank=size["rank"], options={"niter": size["niter"]})
    runs = {}
    for label, batch in (("one weight at a time", False), ("batched", True)):
        start = time.perf_counter()
        result = run_init(str(src), config, work / label.replace(" ", "-"), device=device, batch=batch)
        runs[label] = {"seconds": time.perf_counter() - start, "mode": result.manifest["stream"],
                       "max_recon_err": result.manifest["summary"]["max_recon_abs_err"]}
    diff = agreement(work / "one-weight-at-a-time", work / "batched")
    return {"checkpoint_gb": total / 1e9, "shape": size["ckpt"], "copy_s": copy_s, "runs": runs,
            "max_rel_diff": diff, "ok": diff <= 1e-2}


def training_model(work: Path, dry: bool) -> tuple[str, str]:
    """(model to train, what it is): SmolLM2-135M when the embedded package is there (not in a dry run)."""
    if not dry:
        try:
            from pissa.models import resolve_embedded

            return str(resolve_embedded("smollm2-135m")), "SmolLM2-135M-Instruct (embedded)"
        except Exception as e:  # no package, no network: say so in the report and train a stand-in
            why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import char_tokenizer

    tokenizer = char_tokenizer()
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if dry else dict(hidden_size=576, intermediate_size=1536,
                                                         num_hidden_layers=30, num_attention_heads=9,
                                                         num_key_value_heads=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **shape))
    folder = work / "stand-in"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    what = "a tiny random Llama (dry run)" if dry else f"a SmolLM2-shaped random model (SmolLM2 unavailable: {why})"
    return str(folder), what


def step_train(work: Path, size: dict, dry: bool) -> dict:
    from pissa.train import SFTRecipe, TrainConfig
    from pissa.train.log import read_log

    model, what = training_model(work, dry)
    run = work / "qpissa"
    start = time.perf_counter()
    SFTRecipe(TrainConfig(out=str(run), model=model, method="qpissa", quant_type="nf4", quant_iters=2,
                          niter=size["niter"], rank=size["train_rank"], lr=size["lr"], max_steps=size["steps"],
                          batch_size=size["batch"], warmup_ratio=0.0, max_length=256, tensorboard=False)).run()
    losses = [r["loss"] for r in read_log(run)]
    head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    return {"model": what, "run": str(run), "seconds": time.perf_counter() - start, "steps": len(losses),
            "first5": head, "last5": tail, "losses": losses, "ok": len(losses) == size["steps"] and tail < head}


def step_eval(run: str, size: dict, work: Path) -> dict:
    from pissa.eval import EvalConfig, run_eval
    from pissa.eval.run import load_target, resolve_target

    model, _ = load_target(resolve_target(run))
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    del model
    config = EvalConfig(limit=size["eval_limit"], max_new_tokens=size["new_tokens"], backend="transformers")
    start = time.perf_counter()
    result, out, _ = run_eval(run, "arith", config, out=work / "eval")
    return {"seconds": time.perf_counter() - start, "linear4bit_layers": four_bit, **result.summary(),
            "ok": four_bit > 0 and result.total == size["eval_limit"] and result.perplexity is not None}


SERVE_SKIPPED = 3  # serve_vllm.py's exit status when vLLM or CUDA is missing


def step_vllm(run: str, work: Path, dry: bool) -> dict:
    """benchmarks/gpu/serve_vllm.py: builds its own init, trains, converts, `pissa export --for vllm`, serves the
    export with vLLM and compares it with transformers on the merged model (results/serve_vllm.md). Exit 0:
    passed, 1: failed, 3: skipped (no vLLM or no CUDA: always so in a dry run). Its last lines go in the report."""
    hook = ROOT / "benchmarks" / "gpu" / "serve_vllm.py"
    if not hook.exists():
        return {"present": False, "ok": True}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(hook)], capture_output=True, text=True, env=env)
    return {"present": True, "ok": done.returncode in (0, SERVE_SKIPPED), "skipped": done.returncode == SERVE_SKIPPED,
            "seconds": time.perf_counter() - start, "output": "\n".join((done.stdout + done.stderr).splitlines()[-40:])}


def machine(device: str) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU (dry run)"
    return (f"{gpu}; {os.cpu_count()} CPU cores; torch {torch.__version__} (CUDA {torch.version.cuda}); "
            f"Python {platform.python_version()}")


def report(results: dict, args, device: str, seconds: float) -> str:
    init, train, ev, vllm, multi = (results.get(k) for k in ("init", "train", "eval", "vllm", "multi-gpu"))
    verdict = lambda r: "passed" if r and r.get("ok") else "FAILED"  # noqa: E731
    lines = ["# GPU check", "", f"Written by `benchmarks/gpu/check.sh{' --dry-run' if args.dry_run else ''}` on "
             f"{machine(device)}; {seconds / 60:.1f} min in all.", ""]
    if init:
        c = init["shape"]
        lines += [f"## 1. pissa init --device {device} ({verdict(init)})", "",
                  f"Llama checkpoint of {c['layers']} layers, hidden {c['hidden']}, intermediate {c['intermediate']}, "
                  f"bf16, {init['checkpoint_gb']:.2f} GB; copying its files took {init['copy_s']:.1f} s.", "",
                  "| run | seconds | x copy | max recon error |", "|---|---:|---:|---:|"]
        lines += [f"| {label} | {r['seconds']:.1f} | {r['seconds'] / init['copy_s']:.1f} | {r['max_recon_err']:.3g} |"
                  for label, r in init["runs"].items()]
        lines += ["", f"Batched against one at a time: largest relative difference {init['max_rel_diff']:.2e} "
                      "(bound 1e-2: bf16 residual rounding).", ""]
    if train:
        lines += [f"## 2. QPiSSA training, NF4 base ({verdict(train)})", "", f"Model: {train['model']}. "
                  f"{train['steps']} steps in {train['seconds']:.0f} s; mean loss of the first 5 steps "
                  f"{train['first5']:.4f}, of the last 5 {train['last5']:.4f}.", ""]
    if ev:
        lines += [f"## 3. Evaluation on the 4-bit residual ({verdict(ev)})", "",
                  f"{ev['linear4bit_layers']} bitsandbytes Linear4bit layers; arith, {ev['total']} problems: "
                  f"accuracy {ev['accuracy']:.3f}, perplexity {ev['perplexity']:.3f}, {ev['seconds']:.0f} s.", ""]
    if vllm is not None:
        body = (["benchmarks/gpu/serve_vllm.py is not in this checkout yet: not run."] if not vllm["present"]
                else ["```", vllm["output"], "```"])
        lines += [f"## 4. vLLM serving ({'not present' if not vllm['present'] else verdict(vllm)})", "", *body, ""]
    if multi is not None:
        lines += multi_gpu.report_lines(multi, verdict(multi))
    failed = [k for k, r in results.items() if r is not None and not r.get("ok")]
    lines.append(f"Overall: {'FAILED: ' + ', '.join(failed) if failed else 'passed'}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU; print the report")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one, deleted)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["init", "train", "eval", "vllm", "multi-gpu"])
    args = parser.parse_args()
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: torch sees no CUDA GPU; run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    size = SIZES["dry" if args.dry_run else "gpu"]
    start, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        steps = [("init", lambda: step_init(work, size, device)),
                 ("train", lambda: step_train(work, size, args.dry_run)),
                 ("eval", lambda: step_eval(results["train"]["run"], size, work)),
                 ("vllm", lambda: step_vllm(results["train"]["run"], work, args.dry_run)),
                 ("multi-gpu", lambda: multi_gpu.step_multi_gpu(work, lambda: training_model(work, False)[0],
                                                                args.dry_run))]
        for name, run in steps:
            if name in args.skip or (name in ("eval", "vllm") and not (results.get("train") or {}).get("ok")):
                continue
            print(f"== {name}", flush=True)
            try:
                results[name] = run()
            except Exception as e:  # a failed step is a finding: record it and go on
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                print(f"   {name} failed: {results[name]['error']}", file=sys.stderr, flush=True)
            print(json.dumps({k: v for k, v in results[name].items() if k != "losses"}, default=str), flush=True)
    text = report(results, args, device, time.perf_counter() - start)
    for name, r in results.items():
        if "error" in r:
            text += f"\n{name} error: {r['error']}\n"
    if args.dry_run:
        print(text)
    else:
        (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
        (ROOT / "benchmarks" / "results" / "gpu.md").write_text(text)
        print(text)
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
