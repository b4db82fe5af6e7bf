"""`pissa eval` as a library call: resolve what to evaluate (a model, a `pissa init` folder, a
training run, or an adapter), check the adapter fits the model, evaluate, and write the results
atomically:

    OUT/eval.json          accuracy, perplexity, counts, what was evaluated and how
    OUT/predictions.jsonl  one line per example: prompt, output, extracted, gold, correct
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PissaError
from ..init.experts import pattern_warnings_checked
from ..init.load import load_quantized_residual
from ..io.adapter_files import read_adapter_config
from ..io.atomic import atomic_output_dir, check_output_dir
from ..layout import ADAPTER_DIR, RUN_EVAL_DIR, InitDir
from ..models import load_model, load_tokenizer
from .classify import classifier_task, run_classify_eval
from .data import load_eval_examples
from .generate import Progress, generate_vllm, vllm_available
from .scoring import EvalConfig, EvalResult, evaluate, write_results
from .targets import (
    Target,
    check_adapter_fits,
    check_finite_weights,
    check_no_recomputed_base,
    check_pissa_base,
    quantized_init_of,
    resolve_target,
)


def load_target(target: Target, dtype: str = "auto", trust_remote_code: bool = False):
    """(model with the adapter applied, tokenizer) ready to evaluate."""
    init = quantized_init_of(target.model)
    if init is not None:  # the residual of `pissa init --quantize`: it loads in 4-bit, as it was trained
        model = load_quantized_residual(init, "cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = load_tokenizer(InitDir(init).residual)
    else:
        model, tokenizer, _ = load_model(target.model, dtype, trust_remote_code)
    if tokenizer is None and target.adapter is not None:
        tokenizer = load_tokenizer(target.adapter)
    if tokenizer is None:
        raise PissaError(f"model {target.model} has no tokenizer files; evaluation needs its tokenizer")
    if target.adapter is not None:
        from peft import PeftModel

        check_adapter_fits(model, target.adapter, target.model)
        check_pissa_base(target)
        check_no_recomputed_base(target.adapter)
        with pattern_warnings_checked(read_adapter_config(target.adapter).get("target_parameters")):
            model = PeftModel.from_pretrained(model, str(target.adapter))
    check_finite_weights(model, target)
    return model.eval(), tokenizer


def default_out(target: Target, data: str, task: str) -> Path:
    """Runs and init folders keep their results inside: RUN/eval/<data>-<task>; else ./eval-<name>-<task>."""
    label = Path(data.replace(":", "-")).stem
    spec = Path(target.model)
    if target.kind in ("run", "init", "adapter") and target.adapter is not None:
        root = target.adapter.parent if target.adapter.name in (ADAPTER_DIR, "final") else target.adapter
        return root / RUN_EVAL_DIR / f"{label}-{task}"
    return Path(f"eval-{spec.name}-{label}-{task}")


def run_eval(
    spec: str,
    data: str,
    config: EvalConfig,
    adapter: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> tuple[EvalResult, Path, Target]:
    """Evaluate RUN_OR_MODEL on `data` and write OUT/{eval.json, predictions.jsonl}."""
    target = resolve_target(spec, adapter)
    task = classifier_task(target.model)
    if task is not None:  # a sequence or image classifier: accuracy, F1, MCC on labelled records
        return run_classify_eval(target, task, data, config, out, overwrite, dtype, progress)
    out = check_output_dir(out or default_out(target, data, config.task), overwrite,
                           inputs=[target.model, target.adapter, data])
    examples = load_eval_examples(data, config.limit)
    backend = config.backend
    if backend == "vllm" or (backend == "auto" and vllm_available()):
        backend = "vllm"
    model, tokenizer = load_target(target, dtype, trust_remote_code)
    generate = None
    if backend == "vllm":
        from ..models import resolve_model

        def generate(prompt_ids):
            return generate_vllm(resolve_model(target.model), target.adapter, prompt_ids, config.max_new_tokens)

    result = evaluate(model, tokenizer, examples, config, progress, generate=generate)
    meta = {"model": target.model, "adapter": str(target.adapter) if target.adapter else None, "kind": target.kind,
            "data": data, "config": config.to_dict()}
    with atomic_output_dir(out, overwrite) as tmp:
        write_results(tmp, result, meta)
    return result, out, target
