"""Helpers shared by the test modules: tiny models built from a config (no download), a character-level
tokenizer, a memorisable training set, short real training loops and small assertions. Fixtures that use
them live in conftest.py; no test module imports another."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from pissa.init import PissaConfig, run_init
from pissa.train import TrainConfig
from pissa.train.log import read_log


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama (hidden 64) with seeded random weights, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")


def tiny_moe_config(family: str, **overrides):
    """A 2-layer MoE config (hidden 32, 4 experts of intermediate 24, top-2): sizes are multiples of 8 so
    every experts implementation (grouped_mm included) runs on the CPU, and 2I = 48 != hidden."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=128, tie_word_embeddings=False, num_experts_per_tok=2)
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=24, num_experts=4)
    elif family == "mixtral":
        config = MixtralConfig(**common, intermediate_size=24, num_local_experts=4)
    elif family == "qwen2_moe":  # also a shared expert (plain linear layers) and its scalar gate
        config = Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40, num_experts=4)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tiny_moe(family: str, seed: int = 0, **overrides):
    """A tiny MoE causal LM from a config with every matrix (experts and routers too, which transformers
    leaves empty or zero) drawn from N(0, 0.1), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.1)
    return model.eval()


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")
RECORDS = [{"query": f"{a} + {b}?", "response": f"{a} + {b} = {a + b}. The answer is: {a + b}"}
           for a, b in [(2, 3), (4, 1), (7, 5), (6, 6), (9, 2), (3, 8), (5, 5), (8, 1)]]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def wrong(record):
    """The same reasoning with a final answer off by 2."""
    answer = int(record["response"].rsplit(": ", 1)[1])
    return record["response"].rsplit(": ", 1)[0] + f": {answer + 2}"


# RECORDS as DPO preferences: the right answer chosen, a wrong final answer rejected (conftest: prefs_file).
PREFS = [{"prompt": [user(r["query"])], "chosen": [assistant(r["response"])], "rejected": [assistant(wrong(r))]}
         for r in RECORDS]


def char_tokenizer():
    """A character-level fast tokenizer (ASCII + newline) with a small chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def train_config(tmp_path, tiny_dir, data_file, name="run", **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / name), model=str(tiny_dir), data=str(data_file), rank=4, lr=1e-2,
                max_steps=10, batch_size=4, warmup_ratio=0.0, max_length=128, tensorboard=False)
    if kw.get("init") is not None:  # an --init run brings its own rank
        base.pop("rank")
    return TrainConfig(**{**base, **kw})


def losses(run) -> list[float]:
    return [r["loss"] for r in read_log(run)]


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def make_init(model_dir, out, **config):
    """`pissa init` of a saved model folder into `out`."""
    run_init(str(model_dir), PissaConfig(**config), out)
    return out


def train_pissa(init_dir, out, steps=4, lr=1e-2, seed=0, length=16):
    """A few real AdamW steps on residual + PiSSA adapter (a plain torch loop); saves the adapter to
    `out` and returns the trained PeftModel in eval mode. lr is large so that A and B really move."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    residual = AutoModelForCausalLM.from_pretrained(init_dir / "residual")
    model = PeftModel.from_pretrained(residual, init_dir / "adapter", is_trainable=True)
    vocab = residual.config.vocab_size
    data = torch.randint(0, vocab, (4, length), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(data, labels=data).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out)
    return model


def load_with_adapter(model_dir, adapter_dir, **kwargs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir, **kwargs).eval()


def assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not list(tmp_path.glob(f".{out.name}.tmp-*"))


# --- PiSSA made by PEFT (and models of other families) -----------------------------------------------

def build_tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (Conv1D layers, hidden 64) with seeded random weights, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()


def build_tiny_bert(seed: int = 0, num_labels: int | None = None):
    """A 2-layer BERT (MiniLM's architecture, hidden 64): the bare encoder, or a sequence classifier."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=num_labels or 2)
    return (BertForSequenceClassification(config) if num_labels else BertModel(config)).eval()


def outputs(model, tokens):
    """Logits, or the last hidden state of a bare encoder."""
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def training_loss(model, data):
    """A real loss for each family: causal LM, sequence classification, or the bare encoder's output."""
    name = type(model.get_base_model()).__name__
    if name.endswith("ForSequenceClassification"):
        labels = data[:, 0] % model.get_base_model().config.num_labels
        return model(input_ids=data, labels=labels).loss
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return model(input_ids=data, labels=data).loss
    hidden = model(input_ids=data).last_hidden_state  # (batch, length, hidden): fit a fixed random target
    target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    return (hidden - target).pow(2).mean()


def peft_pissa_run(model, root, init="pissa", steps=4, lr=1e-2, seed=0, length=16, **lora_kwargs):
    """PiSSA as PEFT's docs do it, on `model` (saved first to root/original): get_peft_model with
    init_lora_weights=`init`, the initial adapter saved with init_lora_weights=True (root/initial), real AdamW
    steps, and the trained adapter saved as it is (root/trained: its config still says `init`). Returns the
    trained PeftModel in eval mode (its base holds PEFT's in-memory residual)."""
    from peft import LoraConfig, get_peft_model

    model.save_pretrained(root / "original")
    model = type(model).from_pretrained(root / "original").eval()  # as users load it: its path is recorded
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=init, **lora_kwargs))
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(root / "initial")
    peft_model.peft_config["default"].init_lora_weights = init
    data = torch.randint(0, model.config.vocab_size, (4, length), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    for _ in range(steps):
        training_loss(peft_model, data).backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(root / "trained")
    return peft_model


def peft_convert(peft_model, root, name="peft"):
    """PEFT's own conversion (save_pretrained(path_initial_model_for_weight_conversion=)) into root/name, from a
    copy of root/initial (PEFT rewrites that folder's config)."""
    import shutil

    shutil.copytree(root / "initial", root / f"{name}-initial")
    peft_model.save_pretrained(root / name, path_initial_model_for_weight_conversion=str(root / f"{name}-initial"))
    return root / name


def load_auto(model_dir, adapter_dir=None):
    """A saved model (its own class, from config.json) with an optional adapter, in eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(model_dir).eval()
    if adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).eval()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `folder`, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def assert_same_output(x: Path, y: Path) -> None:
    """Two init outputs hold bit-identical residual and adapter tensors (dtypes included)."""
    for part in ("residual", "adapter"):
        assert_same_tensors(tensors(x / part), tensors(y / part))


def without_timing(layers: dict) -> dict:
    """Manifest layer infos without their timings (which differ between equal runs)."""
    return {k: {f: v for f, v in info.items() if f != "seconds"} for k, info in layers.items()}


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots`: equal snapshots mean byte-identical inputs."""
    out = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


class CrashAt(TrainerCallback):
    """Simulates a crash right after step `step` was logged (later than the last checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def squashed(text: str) -> str:
    """CLI output with every space, line break and table rule removed: a phrase inside a summary-table cell reads
    the same at any terminal width (rich wraps a cell onto the next lines of its own column), so
    `squashed(phrase) in squashed(result.output)` is a width-independent assertion."""
    return "".join(ch for ch in text if not ch.isspace() and not "\u2500" <= ch <= "\u257f")


# --- multi-process runs: DDP, FSDP and DeepSpeed on the CPU ------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def allow_sharded_engines_on_cpu() -> None:
    """Let accelerate run FSDP and DeepSpeed in CPU processes (gloo), as it runs them on GPUs.

    accelerate turns ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED into its FSDP / DEEPSPEED distributed type
    only for accelerator devices (AcceleratorState.__init__: MULTI_GPU, MULTI_XPU, ... for FSDP, `not cpu` for
    DeepSpeed), so a CPU run would silently train plain DDP. This lifts that one check, in this process: the
    plugins are the ones accelerate built from the launch config, and everything after it (accelerate's
    `fully_shard` preparation, deepspeed.initialize, the Trainer's FSDP/DeepSpeed checkpointing) is stock code."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "lifted", False):
        return
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        import importlib

        # deepspeed's CPU backend compiles a shared-memory kernel (~40 s of C++ on first use) that only its inference
        # all-reduce calls; training's collectives go through torch.distributed (gloo) either way. (The module, not
        # the `torch` name that deepspeed.comm re-exports.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    stock = AcceleratorState.__init__

    def __init__(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
                 *args, **kwargs):
        fresh = not AcceleratorState._shared_state
        stock(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
        if not fresh or self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is not None:  # what AcceleratorState does for MULTI_GPU
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
        elif deepspeed_plugin is not None:  # what it does with ACCELERATE_USE_DEEPSPEED and not cpu
            self.distributed_type = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
            self._mixed_precision = "no"
        PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__.lifted = True
    AcceleratorState.__init__ = __init__


def shard_counts(model) -> dict:
    """How many elements of the trainable (adapter) and frozen (residual) parameters this process holds, against
    their whole size: a FSDP2 DTensor's local shard, a ZeRO-3 parameter's partition, or the whole tensor."""
    from torch.distributed.tensor import DTensor

    out = {"trainable": [0, 0], "frozen": [0, 0]}
    for p in model.parameters():
        if isinstance(p, DTensor):
            local, whole = p.to_local().numel(), p.numel()
        elif hasattr(p, "ds_id"):
            local, whole = p.ds_tensor.numel(), p.ds_numel
        else:
            local = whole = p.numel()
        counts = out["trainable" if p.requires_grad else "frozen"]
        counts[0] += local
        counts[1] += whole
    return {k: {"local": v[0], "whole": v[1]} for k, v in out.items()}


# --- classifiers (pissa train --task classify | image-classify) ----------------------------------------------

SENTIMENT_WORDS = {"positive": ["good", "great", "fine", "fun"], "negative": ["bad", "awful", "dull", "boring"]}


def word_tokenizer():
    """A BERT-style word-level fast tokenizer ([CLS] a [SEP] b [SEP]) over a small sentiment vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [w for ws in SENTIMENT_WORDS.values() for w in ws] + "the film was very a plot not".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    """`text` / `label` records: "the film was very <word>", labelled by the word's polarity."""
    import random

    rng = random.Random(seed)
    labels = sorted(SENTIMENT_WORDS)
    return [{"text": f"the film was very {rng.choice(SENTIMENT_WORDS[labels[i % 2]])}", "label": labels[i % 2]}
            for i in range(n)]


def build_tiny_vit(seed: int = 0, num_labels: int | None = None):
    """A 2-layer ViT (8x8 grey images, patch 4, hidden 32): the bare model, or an image classifier."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=num_labels or 2)
    return (ViTForImageClassification(config) if num_labels else ViTModel(config)).eval()
