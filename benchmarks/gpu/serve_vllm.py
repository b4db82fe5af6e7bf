"""Serve a `pissa export --for vllm` adapter with vLLM and compare it with transformers, on a CUDA machine.

The adapter is made here, offline, the way a user makes one: a model (by default a small Llama built from a
config and saved, so no download is needed; or --model, any local folder or embedded name), `pissa init`
with rsLoRA, alpha != r and a rank pattern (so every layer has its own scale, which engines ignore), a few
real AdamW steps on residual + adapter, `pissa convert`, then `pissa export --for vllm` (padded to one rank
from vLLM's set, scale folded into B, its own parity check). Then:

- vLLM (`LLM(enable_lora=True, max_lora_rank=R)`) generates greedily from seeded random prompts (token ids,
  no tokenizer), with and without the adapter (`LoRARequest`), keeping each chosen token's logprob;
- transformers scores the same sequences (teacher-forced on vLLM's tokens): the original model, and the
  model merged by `pissa merge` (the reference the exported adapter must reproduce).

Figures: the largest |logprob| difference of vLLM + adapter vs the merged model, against the floor measured
in the same run (vLLM without the adapter vs the original model: kernels and dtype alone); the share of
positions where transformers' greedy token is vLLM's; and the adapter's own effect (merged vs original), so
the comparison has something to see. PASS when the adapter gap stays within max(2 x floor, 0.02) and the
adapter's effect is at least 5x that gap.

Run on any machine with a CUDA GPU and vLLM installed (pissa on the path), from the repository root:

    PYTHONPATH=src python benchmarks/gpu/serve_vllm.py                      # tiny Llama, bf16, ~2-4 min
    PYTHONPATH=src python benchmarks/gpu/serve_vllm.py --model smollm2-135m --rank 16 --steps 20

Writes benchmarks/results/serve_vllm.md and .json; exit status 0 PASS, 1 FAIL, 3 when vLLM or a GPU is
missing (nothing measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py
from _common import LoadWatch, write_result  # noqa: E402

SKIPPED = 3


def build_model(spec: str, work: Path) -> Path:
    """The original model folder: `tiny` (a 4-layer Llama saved from a config, vocab 1024) or any model."""
    import torch

    if spec != "tiny":
        from pissa.models import resolve_model

        return Path(resolve_model(spec))
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(work / "original")
    return work / "original"


def train(init: Path, out: Path, steps: int, lr: float, device: str) -> None:
    """A few AdamW steps on residual + adapter (random tokens: the point is that A and B move)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    residual = AutoModelForCausalLM.from_pretrained(init / "residual", dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(residual, init / "adapter", is_trainable=True)
    data = torch.randint(0, residual.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    data = data.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(data, labels=data).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)


def make_adapter(args, work: Path) -> tuple[Path, Path, Path, dict]:
    """(original, exported adapter, merged model, export record) made with pissa's library calls."""
    from pissa.convert import ExportConfig, convert_to_lora, export_adapter, merge_adapter
    from pissa.init import PissaConfig, run_init

    original = build_model(args.model, work)
    config = PissaConfig(rank=args.rank, alpha=args.rank * 1.5, use_rslora=True,
                         rank_pattern={"q_proj": max(1, args.rank // 2)}, options={"niter": 4})
    run_init(str(original), config, work / "init")
    train(work / "init", work / "trained", args.steps, args.lr, "cuda")
    convert_to_lora(work / "trained", work / "init", work / "lora")
    merge_adapter(work / "lora", original, work / "merged")
    result = export_adapter(work / "lora", work / "vllm-adapter", ExportConfig("vllm", base=str(original),
                                                                               device="cuda"))
    record = json.loads((result.out / "export.json").read_text())
    return original, result.out, work / "merged", record


def vllm_runs(args, original: Path, adapter: Path, rank: int, prompts: list[list[int]]) -> dict:
    """{"base": [(tokens, logprobs)], "lora": [...]}: vLLM greedy generation without and with the adapter."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(original), enable_lora=True, max_lora_rank=rank, max_loras=1, dtype=args.dtype,
              skip_tokenizer_init=True, enforce_eager=True, seed=0, gpu_memory_utilization=args.gpu_memory,
              max_model_len=args.prompt_length + args.new_tokens + 8)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, logprobs=1, detokenize=False)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    runs = {}
    for name, lora in (("base", None), ("lora", LoRARequest("pissa", 1, str(adapter)))):
        outputs = llm.generate(inputs, params, lora_request=lora)
        runs[name] = [(list(o.outputs[0].token_ids),
                       [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids,
                                                           strict=True)]) for o in outputs]
    del llm
    return runs


def hf_scores(folder: Path, dtype: str, prompts: list[list[int]], runs: list) -> tuple[list, list]:
    """transformers' logprobs of vLLM's chosen tokens (teacher-forced) and its own greedy choice there."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to("cuda").eval()
    logprobs, greedy = [], []
    with torch.no_grad():
        for prompt, (tokens, _) in zip(prompts, runs, strict=True):
            seq = torch.tensor([prompt + tokens], device="cuda")
            scores = model(seq).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)  # (new, vocab)
            chosen = torch.tensor(tokens, device="cuda")
            logprobs.append(scores.gather(1, chosen[:, None])[:, 0].tolist())
            greedy.append(scores.argmax(-1).tolist())
    del model
    torch.cuda.empty_cache()
    return logprobs, greedy


def compare(runs: list, logprobs: list, greedy: list) -> dict:
    gaps = [abs(a - b) for (_, lp), hf in zip(runs, logprobs, strict=True) for a, b in zip(lp, hf, strict=True)]
    same = [t == g for (tokens, _), hf in zip(runs, greedy, strict=True) for t, g in zip(tokens, hf, strict=True)]
    return {"max_abs_logprob_gap": max(gaps), "mean_abs_logprob_gap": sum(gaps) / len(gaps),
            "greedy_agreement": sum(same) / len(same)}


def measure(args, work: Path) -> dict:
    import torch

    original, adapter, merged, record = make_adapter(args, work)
    vocab = json.loads((original / "config.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (args.prompt_length,), generator=generator).tolist()
               for _ in range(args.prompts)]
    runs = vllm_runs(args, original, adapter, record["rank"], prompts)
    base_lp, base_greedy = hf_scores(original, args.dtype, prompts, runs["base"])
    lora_lp, lora_greedy = hf_scores(merged, args.dtype, prompts, runs["lora"])
    original_on_lora, _ = hf_scores(original, args.dtype, prompts, runs["lora"])
    effect = max(abs(a - b) for x, y in zip(lora_lp, original_on_lora, strict=True) for a, b in zip(x, y, strict=True))
    return {"model": args.model, "dtype": args.dtype, "rank": record["rank"], "command": record["command"],
            "export_parity": record["parity"], "layers": len(record["layers"]),
            "floor": compare(runs["base"], base_lp, base_greedy),
            "adapter": compare(runs["lora"], lora_lp, lora_greedy),
            "adapter_effect_max_abs_logprob": effect}


def verdict(r: dict) -> bool:
    gap, floor = r["adapter"]["max_abs_logprob_gap"], r["floor"]["max_abs_logprob_gap"]
    return gap <= max(2 * floor, 0.02) and r["adapter_effect_max_abs_logprob"] >= 5 * gap


def report(r: dict, watch: LoadWatch, ok: bool) -> str:
    a, f = r["adapter"], r["floor"]
    return "\n".join([
        "# vLLM serves the exported PiSSA adapter as transformers computes it",
        "",
        watch.header(),
        "",
        f"Model `{r['model']}` in {r['dtype']}; adapter: pissa init (rsLoRA, alpha != r, rank pattern) -> train -> "
        f"convert -> `pissa export --for vllm` at rank {r['rank']} over {r['layers']} layers "
        f"(its own fp32 parity check: max |Δlogit| {r['export_parity']['max_abs_logit_diff']:.3g}).",
        f"Served as: `{r['command']}` (offline `LLM(enable_lora=True, max_lora_rank={r['rank']})`).",
        "",
        "| vLLM vs transformers, on vLLM's greedy tokens | max abs logprob gap | mean | greedy agreement |",
        "|---|---|---|---|",
        f"| original model, no adapter (the floor) | {f['max_abs_logprob_gap']:.4f} | "
        f"{f['mean_abs_logprob_gap']:.4f} | {f['greedy_agreement']:.1%} |",
        f"| exported adapter vs `pissa merge` model | {a['max_abs_logprob_gap']:.4f} | "
        f"{a['mean_abs_logprob_gap']:.4f} | {a['greedy_agreement']:.1%} |",
        "",
        f"The adapter's own effect (merged vs original, same tokens): max abs logprob "
        f"{r['adapter_effect_max_abs_logprob']:.3f}.",
        "",
        f"**{'PASS' if ok else 'FAIL'}**: adapter gap <= max(2 x floor, 0.02) and adapter effect >= 5 x gap.",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built from a config), a local folder or embedded name")
    parser.add_argument("--rank", type=int, default=8, help="pissa init rank (the export is padded to 2r's slot)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--gpu-memory", type=float, default=0.3, help="vLLM gpu_memory_utilization")
    args = parser.parse_args()
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError as e:
        print(f"SKIPPED: {e}; install vllm (pip install vllm) on a CUDA machine")
        return SKIPPED
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device")
        return SKIPPED
    watch = LoadWatch()
    with tempfile.TemporaryDirectory(prefix="serve-vllm-") as tmp:
        result = measure(args, Path(tmp))
    ok = verdict(result)
    write_result("serve_vllm", report(result, watch, ok), {**result, "pass": ok})
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
