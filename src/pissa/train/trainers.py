"""The TRL trainers behind `pissa train`: `SFTTrainer` (--stage sft) and `DPOTrainer` (--stage dpo).

pissa hands TRL its records (`pissa.data.sft`, `pissa.data.preference`) and an already built model (a
PeftModel for adapter methods: PiSSA's adapter is initialised before training, never by TRL), and
adds these, each because TRL would otherwise train something other than what was asked, or slower:

- `KeepsOrthogonality`: with --train-singular-values the adapter is PEFT's AdaLoRA, whose forward adds
  the orthogonality regulariser to `outputs.loss`; TRL rebuilds the loss from per-token log-probs and
  drops it, so it is added back (scaled for gradient accumulation as TRL scales its MoE aux loss).
- `adapter_dtypes_kept`: TRL casts the trainable adapter weights of a 4-bit model to bf16; pissa trains
  fp32 adapters (the paper's set-up), and a QPiSSA/LoftQ adapter holds the fitted principal part, which
  bf16 would round away. The fp32 tensors are put back before any optimizer exists.
- The DPO reference is the model before training (`reference_for`): TRL copies a loaded adapter into a
  frozen "ref" adapter, so the reference of PiSSA/QPiSSA/LoftQ is W_res + B0 A0 = W (or the fitted
  reconstruction), and of LoRA the base (B0 = 0). Never "adapters disabled", which for PiSSA is W_res.
- `ModelLossOffTriton`: on a CPU the model's own loss, not TRL's fused LM head (the same number, faster there).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from contextlib import contextmanager

import torch

from ..init import ADAPTER_NAME
from .config import TrainConfig
from .singular_values import orthogonality_penalty


class KeepsOrthogonality:
    """Mixin for a TRL trainer: the loss includes PEFT's AdaLoRA orthogonality regulariser."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        penalty = orthogonality_penalty(self.accelerator.unwrap_model(model))
        if penalty is None:
            return result
        # Trainer divides an unscaled loss by the accumulation steps itself; a scaled one gets the penalty share.
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None)
        penalty = penalty / (self.current_gradient_accumulation_steps if scaled and model.training else 1)
        if return_outputs:
            return result[0] + penalty, result[1]
        return result + penalty


class ModelLossOffTriton:
    """Mixin for TRL's SFTTrainer: the model's own loss where TRL's fused LM head has no Triton kernel.

    TRL computes the SFT loss through a fused LM head. With Triton (CUDA, XPU) it scores only the labelled
    positions, in tiles, never holding the (batch, length, vocab) logits. Without (CPU), its torch fallback
    scores every position and recomputes the projection in backward: 1.2-1.4x the step time of the model's own
    cross-entropy on the benchmark set-up (benchmarks/results/train_step.md). Both are the sum of
    the labelled tokens' NLL over `num_items_in_batch`, so off Triton the model's own loss is used, as the
    transformers Trainer computes it. A singular-value (AdaLoRA) adapter keeps TRL's path, where
    `KeepsOrthogonality` counts its regulariser once per optimizer step.
    """

    fused_lm_head: bool | None = None  # None: decided at the first step; tests set it to compare both paths

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_lm_head is None:
            unwrapped = self.accelerator.unwrap_model(model)
            self.fused_lm_head = triton_device(self.accelerator.device) or orthogonality_penalty(unwrapped) is not None
        if self.fused_lm_head:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from transformers import Trainer

        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def triton_device(device: torch.device) -> bool:
    """Where TRL's fused LM head runs its Triton kernels (trl.kernels.chunked_logprob)."""
    import importlib.util

    return device.type in ("cuda", "xpu") and importlib.util.find_spec("triton") is not None


@functools.cache
def sft_trainer_class():
    from trl import SFTTrainer

    return type("PissaSFTTrainer", (ModelLossOffTriton, KeepsOrthogonality, SFTTrainer), {})


@functools.cache
def dpo_trainer_class():
    from trl import DPOTrainer

    return type("PissaDPOTrainer", (KeepsOrthogonality, DPOTrainer), {})


@contextmanager
def quiet_datasets():
    """No `datasets` progress bars while TRL prepares the records (pissa's own bar and summary report)."""
    from datasets.utils import logging as datasets_logging

    was_on = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            datasets_logging.enable_progress_bar()


@contextmanager
def adapter_dtypes_kept(model):
    """Undo TRL's bf16 cast of a quantized model's trainable adapter weights (the same fp32 tensors return)."""
    saved = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
    yield
    for name, p in model.named_parameters():
        if name in saved and p.data.dtype != saved[name].dtype:
            p.data = saved[name]


def _checkpointing(cls, on: bool) -> dict:
    """transformers 5 renames gradient_checkpointing to activation_checkpointing and warns on the old name;
    TRL's configs default it to True, so it is always passed, under the name this transformers has."""
    names = {f.name for f in dataclasses.fields(cls)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: on, **({f"{key}_kwargs": {"use_reentrant": False}} if on else {})}


def common_args(cls, config: TrainConfig, output_dir: str, padding_free: bool = False) -> dict:
    """The TrainingArguments every stage shares (paper defaults come from TrainConfig)."""
    c, cuda = config, torch.cuda.is_available()
    return dict(
        output_dir=output_dir, learning_rate=c.lr, lr_scheduler_type=c.scheduler,
        warmup_steps=c.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=c.weight_decay, optim="adamw_torch", num_train_epochs=c.epochs, max_steps=c.max_steps,
        per_device_train_batch_size=c.batch_size, gradient_accumulation_steps=c.grad_accum,
        max_grad_norm=c.max_grad_norm, bf16=c.precision == "bf16", **_checkpointing(cls, c.gradient_checkpointing),
        seed=c.seed, data_seed=c.seed, logging_steps=1,
        save_strategy="steps" if c.save_steps > 0 else "no", save_steps=c.save_steps if c.save_steps > 0 else 500,
        save_total_limit=c.save_total_limit,
        report_to="none",  # our MetricsLogger writes JSONL/CSV/TensorBoard itself
        # Padded batches count their attention mask; a padding-free batch has no padding (nor mask) at all.
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=cuda,
        # With no GPU, say so: accelerate then builds a gloo process group under torchrun/accelerate launch.
        use_cpu=not cuda,
    )


def training_args(config: TrainConfig, output_dir: str, adapter: bool):
    """SFTConfig (--stage sft) or DPOConfig (--stage dpo) for this run."""
    from trl import DPOConfig, SFTConfig

    if config.stage == "dpo":
        return DPOConfig(**common_args(DPOConfig, config, output_dir), beta=config.dpo_beta,
                         max_length=None,  # over-long records are already dropped
                         precompute_ref_log_probs=not adapter)  # full fine-tuning: see reference_for
    padding_free = config.packing or config.padding_free
    return SFTConfig(**common_args(SFTConfig, config, output_dir, padding_free),
                     # Over-long records are already dropped; padding-free without packing takes no max_length.
                     max_length=None if config.padding_free and not config.packing else config.max_length,
                     packing=config.packing, padding_free=config.padding_free)


def build_sft_trainer(model, data, args, callbacks: list):
    """TRL's SFTTrainer over `data` (pissa.data.sft.SFTData); the model is trained as given."""
    args.assistant_only_loss = data.assistant_only_loss
    with adapter_dtypes_kept(model), quiet_datasets():
        return sft_trainer_class()(model=model, args=args, train_dataset=data.dataset(),
                                   processing_class=data.tokenizer, callbacks=callbacks)


def reference_for(model, adapter: bool, singular_values: bool):
    """(ref_model, precompute_ref_log_probs) so that DPO's reference is the model before training.

    - an adapter: None, and TRL copies the loaded adapter into a frozen "ref" adapter. Its config must not
      name a PEFT init that rewrites the base (`init_lora_weights="pissa"`, "olora", ...): adding the copy
      would run it again, so it is set to True (plain LoRA init, then overwritten by the copy);
    - --train-singular-values (AdaLoRA allows one adapter only): a frozen merged copy of the model;
    - full fine-tuning: no second model; the reference log-probs are computed once, before training.
    """
    if not adapter:
        return None, True
    if singular_values:
        ref = copy.deepcopy(model).merge_and_unload()
        return ref.requires_grad_(False).eval(), False
    config = model.peft_config[ADAPTER_NAME]
    if not isinstance(config.init_lora_weights, bool):
        config.init_lora_weights = True
    return None, False


def build_dpo_trainer(model, data, tokenizer, args, adapter: bool, singular_values: bool, callbacks: list):
    """TRL's DPOTrainer over `data` (pissa.data.preference.PreferenceData), against the model before training."""
    ref_model, precompute = reference_for(model, adapter, singular_values)
    assert args.precompute_ref_log_probs == precompute, "training_args and reference_for disagree"
    with adapter_dtypes_kept(model), quiet_datasets():
        return dpo_trainer_class()(model=model, ref_model=ref_model, args=args, train_dataset=data.dataset(),
                                   processing_class=copy.deepcopy(tokenizer), callbacks=callbacks)
