"""What each serving engine reads from a LoRA adapter folder, what it refuses, and how it is started with one.

Read from the engines' own loaders (vLLM `lora/peft_helper.py`, `lora/lora_model.py`, `config/lora.py`;
SGLang `srt/lora/lora_config.py`, `lora.py`; TGI `server/text_generation_server/adapters/lora.py`):
- all three read only the global `r` and `lora_alpha` (vLLM and TGI also `use_rslora`; SGLang does not, so an
  rsLoRA adapter runs sqrt(r) times too weak there): `rank_pattern` and `alpha_pattern` are ignored;
- they load `lora_A`/`lora_B` (and `lora_embedding_A/B`) only: vLLM refuses DoRA, `modules_to_save` and
  biases; SGLang refuses DoRA; TGI ignores all three silently (a DoRA adapter is served as plain LoRA);
- vLLM's `--max-lora-rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 and sizes its memory; an
  embedding adapter must cover exactly the base vocabulary;
- TGI applies adapters only to `model.layers.N.{self_attn,mlp}` projections (never embeddings or lm_head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TGI_MODULES = (r"model\.layers\.\d+\."
               r"(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj|mlp\.c_fc|mlp\.c_proj)")
# Fields every PEFT since 0.9 parses, and all an exported adapter needs: the engines and older PEFT copies
# (TGI parses the config with its own PEFT) read nothing else.
EXPORT_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout",
                 "target_modules", "fan_in_fan_out", "bias", "use_rslora", "use_dora", "modules_to_save",
                 "init_lora_weights", "inference_mode", "rank_pattern", "alpha_pattern")
PEFT_PLUMBING = ("peft_type", "task_type", "base_model_name_or_path", "target_modules")


@dataclass(frozen=True)
class Engine:
    name: str
    title: str
    ranks: tuple[int, ...] | None  # the ranks its --max-lora-rank accepts (None: any)
    embeddings: bool  # applies LoRA to embed_tokens / lm_head
    modules: str | None  # regex (full match) of the module names it applies LoRA to (None: its model decides)
    reads: tuple[str, ...]  # adapter_config.json fields its loader uses

    def allowed(self, rank: int) -> bool:
        return self.ranks is None or rank in self.ranks

    def applies_to(self, module: str) -> bool:
        return self.modules is None or re.fullmatch(self.modules, module) is not None

    def view(self, config: dict) -> dict:
        """The config as the engine reads it: its fields (and what PEFT needs to build the layers), nothing else."""
        return {k: config[k] for k in PEFT_PLUMBING + self.reads if k in config}

    def command(self, base: str, name: str, folder: str, rank: int, targets: list[str]) -> str:
        """The command line that serves `base` with the exported adapter."""
        if self.name == "vllm":
            return f"vllm serve {base} --enable-lora --lora-modules {name}={folder} --max-lora-rank {rank}"
        if self.name == "sglang":
            return (f"python -m sglang.launch_server --model-path {base} --enable-lora --lora-paths {name}={folder} "
                    f"--max-lora-rank {rank} --lora-target-modules {' '.join(targets)}")
        return f"text-generation-launcher --model-id {base} --lora-adapters {name}={folder}"


ENGINES = {e.name: e for e in (
    Engine("vllm", "vLLM", VLLM_RANKS, True, None,
           ("r", "lora_alpha", "bias", "modules_to_save", "use_rslora", "use_dora")),
    Engine("sglang", "SGLang", None, True, None, ("r", "lora_alpha", "use_dora")),
    Engine("tgi", "TGI", None, False, TGI_MODULES, ("r", "lora_alpha", "fan_in_fan_out", "use_rslora")),
)}
