"""`pissa demo`: the whole method in one run, on the embedded SmolLM2-135M and the bundled `arith` set.

1. initialise PiSSA offline (`pissa init`: residual model + adapter) and note the LoRA init;
2. quantization error of QLoRA / LoftQ / QPiSSA on a few layers (when `pissa.quant` + bitsandbytes exist);
3. train LoRA and PiSSA for the same steps, data order, seed and learning rate;
4. evaluate the base model, LoRA and PiSSA on the held-out test split (accuracy + perplexity);
5. convert the trained PiSSA adapter to a plain rank-2r LoRA on the original model and check that
   the logits match (max |diff|);
6. write OUT/ with report.md, loss / grad-norm / accuracy / spectrum PNGs, the per-example outputs,
   and demo.json holding every number of the report.

Every figure is computed in the run. Intermediate models go to a scratch folder beside OUT that is
deleted at the end (keep it with `keep_work=True`). `tiny=True` swaps SmolLM2 for a 2-layer model
with SmolLM2's tokenizer, for CI.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PissaError, check_number
from ..io.atomic import check_output_dir
from ..layout import RUN_EVAL_DIR, InitDir, RunDir

Log = Callable[[str], None]
SPECTRUM_LAYERS = ("layers.0.self_attn.q_proj", "layers.{mid}.self_attn.v_proj", "layers.{last}.mlp.down_proj")
QUANT_LAYER_TYPES = ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class DemoConfig:
    """What `pissa demo` runs; saved in demo.json."""

    steps: int = field(default=30, metadata={"help": "Optimizer steps of LoRA and of PiSSA (same for both)."})
    tiny: bool = field(default=False, metadata={"help": "A 2-layer model with SmolLM2's tokenizer (seconds; CI)."})
    rank: int = field(default=8, metadata={"help": "Adapter rank r of LoRA and PiSSA.", "flags": ("-r",)})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate of both runs (cosine, warmup 3%)."})
    batch_size: int = field(default=4, metadata={"help": "Training examples per step."})
    max_length: int = field(default=256, metadata={"help": "Training examples longer than this are dropped."})
    test_examples: int = field(default=30, metadata={"help": "Held-out arith problems to evaluate."})
    max_new_tokens: int = field(default=96, metadata={"help": "Generation limit per test problem."})
    eval_batch_size: int = field(default=10, metadata={"help": "Test prompts generated together."})
    seed: int = field(default=0, metadata={"help": "Seed of the init, data order and everything else."})
    keep_work: bool = field(default=False, metadata={"help": "Keep the scratch folder (inits, runs, converted)."})

    def __post_init__(self):
        for name in ("steps", "rank", "batch_size", "max_length", "test_examples", "max_new_tokens",
                     "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise PissaError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        check_number(self.lr, "--lr", above=0)
        from ..data.synthetic import DEFAULT_SIZES

        check_number(self.test_examples, "--test-examples", maximum=DEFAULT_SIZES["test"])  # arith's held-out split


def tiny_model(folder: Path, seed: int) -> Path:
    """A 2-layer Llama (hidden 64) sized for SmolLM2's tokenizer, saved with that tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..models import resolve_embedded

    tokenizer = AutoTokenizer.from_pretrained(resolve_embedded("smollm2-135m"))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Demo:
    """The demo as one readable class: `run()` calls each step in order and records its numbers."""

    def __init__(self, config: DemoConfig, out: str | Path, overwrite: bool = False, log: Log = print):
        self.config = config
        self.out = check_output_dir(out, overwrite)
        self.overwrite = overwrite
        self.log = log
        self.work = self.out.parent / f".{self.out.name}.work"
        self.results: dict = {"config": dataclasses.asdict(config), "seconds": {}}

    def timed(self, name: str, fn, *args, **kwargs):
        self.log(f"[bold]{name}[/] ...")
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        self.results["seconds"][name] = round(time.perf_counter() - start, 2)
        return value

    def run(self) -> Path:
        start = time.perf_counter()
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        try:
            self.model = self.timed("model", self.resolve_model)
            self.timed("init", self.init_pissa)
            self.results["quantization"] = self.timed("quantization error", self.quant_table)
            for method in ("lora", "pissa"):
                self.timed(f"train {method}", self.train, method)
            for name in ("base", "lora", "pissa"):
                self.timed(f"eval {name}", self.evaluate, name)
            self.timed("convert", self.convert)
            self.timed("spectra", self.spectra)
            self.results["seconds"]["total"] = round(time.perf_counter() - start, 2)
            return self.write()
        finally:
            if not self.config.keep_work:
                shutil.rmtree(self.work, ignore_errors=True)

    # --- steps ------------------------------------------------------------------------------------

    def resolve_model(self) -> str:
        if self.config.tiny:
            return str(tiny_model(self.work / "tiny-model", self.config.seed))
        from ..models import resolve_embedded

        return str(resolve_embedded("smollm2-135m"))

    def pissa_config(self):
        from ..init import PissaConfig

        return PissaConfig(rank=self.config.rank, method="pissa", seed=self.config.seed)

    def init_pissa(self) -> None:
        from ..init import run_init

        result = run_init(self.model, self.pissa_config(), self.work / "pissa-init")
        summary = result.manifest["summary"]
        self.results["init"] = {"layers": summary["layers"], "rank": self.config.rank,
                                "max_recon_abs_err": summary["max_recon_abs_err"],
                                "trainable_params": result.trainable_params, "seconds": round(result.seconds, 2)}

    def weights(self, folder: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
        """Named weights (module names) read from a safetensors model folder."""
        from ..io.reader import CheckpointReader

        tensors = CheckpointReader(Path(folder)).read([f"{name}.weight" for name in names])
        return {name.removesuffix(".weight"): W for name, W in tensors.items()}

    def layer_names(self) -> list[str]:
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(self.model).num_hidden_layers
        return [f"model.{p.format(mid=layers // 2, last=layers - 1)}" for p in SPECTRUM_LAYERS]

    def quant_table(self) -> dict | None:
        """QLoRA / LoftQ / QPiSSA error reduction on block 0's layers, or None without pissa.quant."""
        try:
            from ..quant import require_bnb
            from .quant import ReportConfig, measure, quant_table, summarize

            require_bnb()
        except (ImportError, PissaError) as e:
            self.log(f"  skipped: {e}")
            return None
        names = [f"model.layers.0.{t}" for t in QUANT_LAYER_TYPES]
        weights = self.weights(self.model, names)
        rows = measure(((n, weights[n]) for n in names if n in weights),
                       ReportConfig(ranks=[self.config.rank], iters=[1, 5], seed=self.config.seed))
        types, table = summarize(rows)
        return {"layers": names, "markdown": quant_table(types, table), "table": table}

    def train(self, method: str) -> None:
        from ..train import SFTRecipe, TrainConfig

        c = self.config
        source = {"init": str(self.work / "pissa-init")} if method == "pissa" else {"model": self.model, "rank": c.rank}
        config = TrainConfig(out=str(self.work / method), method=method, lr=c.lr, max_steps=c.steps,
                             batch_size=c.batch_size, limit=c.steps * c.batch_size, max_length=c.max_length,
                             seed=c.seed, tensorboard=False, data="arith:train", **source)
        summary = SFTRecipe(config).run()
        self.results.setdefault("train", {})[method] = summary

    def evaluate(self, name: str) -> None:
        from ..eval import EvalConfig, run_eval

        c = self.config
        config = EvalConfig(task="gsm8k", max_new_tokens=c.max_new_tokens, batch_size=c.eval_batch_size,
                            limit=c.test_examples, max_length=c.max_length, backend="transformers")
        spec = self.model if name == "base" else str(self.work / name)
        out = self.work / "base" / RUN_EVAL_DIR / "arith-test-gsm8k" if name == "base" else None
        result, folder, _ = run_eval(spec, "arith:test", config, out=out)
        self.results.setdefault("eval", {})[name] = {**result.summary(), "folder": str(folder)}

    def convert(self) -> None:
        """PiSSA -> LoRA (2r) on the original model; the logits must match residual + PiSSA adapter."""
        from ..convert import convert_to_lora

        converted = convert_to_lora(RunDir(self.work / "pissa").adapter, self.work / "pissa-init",
                                    self.work / "pissa-as-lora")
        diff, scale = self.logit_gap(converted.out)
        self.results["convert"] = {"rank_out": 2 * self.config.rank, "layers": len(converted.layers),
                                   "max_abs_logit_diff": diff, "max_abs_logit": scale,
                                   "seconds": round(converted.seconds, 2)}

    @torch.no_grad()
    def logit_gap(self, converted: Path) -> tuple[float, float]:
        """max |logits(original + converted LoRA) - logits(residual + trained PiSSA)| on test prompts."""
        from peft import PeftModel

        from ..data.tokens import PadCollator
        from ..eval.data import encode_with_response, load_eval_examples
        from ..models import load_model

        base, tokenizer, _ = load_model(self.model, "float32")
        lora = PeftModel.from_pretrained(base, str(converted)).eval()
        residual, _, _ = load_model(InitDir(self.work / "pissa-init").residual, "float32", tokenizer=False)
        pissa = PeftModel.from_pretrained(residual, str(RunDir(self.work / "pissa").adapter)).eval()
        examples = load_eval_examples("arith:test", limit=4)
        batch = [encode_with_response(tokenizer, ex, self.config.max_length) for ex in examples]
        padded = PadCollator(tokenizer.eos_token_id or 0)([{"input_ids": i, "labels": x} for i, x in batch])
        ids, mask = padded["input_ids"], padded["attention_mask"]
        a = lora(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        b = pissa(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        keep = mask.bool()  # compare real tokens only
        return (a - b).abs()[keep].max().item(), b.abs()[keep].max().item()

    def spectra(self) -> None:
        """Singular values of W (original) and of W_res (the PiSSA residual) for three layers."""
        from ..plots import save, spectra_figure

        names = self.layer_names()
        original = self.weights(self.model, names)
        residual = self.weights(InitDir(self.work / "pissa-init").residual, names)
        spectra, numbers = {}, {}
        for name in names:
            s, s_res = torch.linalg.svdvals(original[name].float()), torch.linalg.svdvals(residual[name].float())
            spectra[name.removeprefix("model.")] = {"W": s, "W_res (PiSSA residual)": s_res}
            numbers[name] = {"sigma_1": s[0].item(), f"sigma_{self.config.rank + 1}": s[self.config.rank].item(),
                             "residual_sigma_1": s_res[0].item()}
        title = "Singular values: W vs the PiSSA residual (top r moved to the adapter)"
        self.spectrum_png = save(spectra_figure(spectra, rank=self.config.rank, title=title),
                                 self.work / "spectrum.png")
        self.results["spectra"] = numbers

    # --- report -----------------------------------------------------------------------------------

    def write(self) -> Path:
        from .runs import load_run, write_run_report

        runs = [load_run(self.work / "base" / RUN_EVAL_DIR / "arith-test-gsm8k", "base"),
                load_run(self.work / "lora", "lora"), load_run(self.work / "pissa", "pissa")]
        (self.work / "demo.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        tiny = "a tiny 2-layer Llama (random weights, SmolLM2 tokenizer)"
        model = tiny if self.config.tiny else "SmolLM2-135M-Instruct"
        title = f"pissa demo: PiSSA vs LoRA on {model}"
        return write_run_report(runs, self.out, title=title, overwrite=self.overwrite, sections=demo_sections(self),
                            extra_files={"spectrum.png": self.spectrum_png, "demo.json": self.work / "demo.json"},
                            source=f"by `{self.command()}`; every number below was computed in that run.")

    def command(self) -> str:
        c, defaults = self.config, DemoConfig()
        flags = [f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(c).items()
                 if v != getattr(defaults, k) and not isinstance(v, bool)]
        flags += [f"--{k.replace('_', '-')}" for k, v in dataclasses.asdict(c).items() if v is True]
        return " ".join(["pissa demo", *flags])


def demo_sections(demo: Demo) -> list[str]:
    """The demo's own markdown: setup, init, quantization error, conversion, spectra, timings."""
    r, c = demo.results, demo.config
    init, conv = r["init"], r["convert"]
    sections = [
        "## Setup\n\n"
        f"Data: the bundled synthetic `arith` set (template-generated grade-school word problems, not GSM8K), "
        f"{c.steps * c.batch_size} training problems, {c.test_examples} held-out test problems. "
        f"LoRA and PiSSA: rank {c.rank}, alpha = r, every linear layer, lr {c.lr:g} (cosine, warmup 3%), "
        f"{c.steps} steps of batch {c.batch_size}, seed {c.seed}: same data order for both. Greedy decoding, "
        f"at most {c.max_new_tokens} new tokens; the answer is read from `The answer is: N`.",
        "## Initialisation\n\n"
        f"PiSSA moved the top-{c.rank} singular triplets of {init['layers']} layers into the adapter "
        f"({init['trainable_params']:,} trainable parameters) in {init['seconds']:.1f} s. Largest |W_res + B A - W| "
        f"after the cast to storage dtype: {init['max_recon_abs_err']:.3g}. LoRA starts from Kaiming-uniform A "
        "and zero B (PEFT's default).",
    ]
    quant = r.get("quantization")
    if quant:
        sections.append("## Quantization error (NF4), block 0\n\nReduction of the nuclear-norm error relative to "
                        f"QLoRA, in % (higher is better), for {', '.join(quant['layers'])}:\n\n{quant['markdown']}")
    else:
        sections.append("## Quantization error\n\nSkipped: `pissa.quant` or bitsandbytes is not available.")
    sections += [
        "## Conversion to a plain LoRA\n\n"
        f"The trained PiSSA adapter was rewritten as a rank-{conv['rank_out']} LoRA on the *original* model "
        f"({conv['layers']} layers, {conv['seconds']:.2f} s). On 4 test sequences, max |logits(original + "
        f"converted LoRA) − logits(residual + PiSSA)| = {conv['max_abs_logit_diff']:.3g} (largest |logit| "
        f"{conv['max_abs_logit']:.3g}).",
        "## Spectra\n\n![singular values](spectrum.png)",
        "## Timings\n\n" + "\n".join(f"- {k}: {v:.1f} s" for k, v in r["seconds"].items()),
    ]
    return sections
