"""Helpers shared by the test modules: tiny models built from a config (no download), a character-level
tokenizer, a memorisable training set, short real training loops and small assertions. Fixtures that use
them live in conftest.py; no test module imports another."""

from __future__ import annotations

import torch

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
