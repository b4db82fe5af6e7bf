"""What a training run writes into its folder: the resolved config before training, and afterwards the
trained weights (adapter/ or model/), the residual and initial adapter an on-the-fly PiSSA run needs
(residual/, init/), the loss curve, the optional conversion to a LoRA (lora/) and summary.json."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..init import ADAPTER_NAME, residual_state_dict
from ..io.adapter_files import read_adapter_config, write_adapter
from ..io.atomic import atomic_output_dir
from ..io.manifest import build_manifest, read_manifest, write_manifest
from ..layout import ADAPTER_DIR, RUN_MODEL_DIR, InitDir
from ..plots import plot_loss
from .config import DEFAULT_RANK
from .log import read_log


class RunWriter:
    """Writes a recipe's run folder; `prepare()` before training, `save()` after (main process only)."""

    def __init__(self, recipe):
        self.recipe = recipe
        self.config = recipe.config
        self.run = recipe.run_dir

    def prepare(self) -> None:
        """Create (or, with --overwrite, replace) the run folder and write train_config.yaml."""
        import yaml

        out = self.run.root
        if self.config.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        header = f"# {self.config.command()}\n# resolved config of this run; add --resume to continue it\n"
        record = {**self.config.to_dict(), "resolved": self.resolved()}
        self.run.config.write_text(header + yaml.safe_dump(record, sort_keys=False))

    def resolved(self) -> dict:
        """What the options resolved to (the method an --init trains as, its ranks), and where the inputs are
        relative to the run folder, so `pissa eval RUN` finds them after the project folder moves."""
        c, method = self.config, self.recipe.method
        ranks = sorted(read_manifest(c.init)["summary"]["ranks"]) if c.init else [c.rank or DEFAULT_RANK]
        relative = {name: os.path.relpath(getattr(c, name), self.run.root.resolve())
                    for name in ("init", "model", "data") if getattr(c, name) and Path(getattr(c, name)).is_absolute()}
        return {"method": method.name, "ranks": ranks if method.adapter else None, "run_relative": relative}

    def save(self, weights: dict | None = None) -> dict:
        """Write the trained weights (`weights`: gathered whole from a sharded model, else None: the model's
        own), the loss curve and summary.json; returns the summary."""
        method = self.recipe.method
        self.save_weights(weights)
        summary = self.summary()
        plot_loss({method.name: read_log(self.run.root)}, self.run.loss_png, title=f"{method.name}: training loss")
        if self.config.convert_at_end:
            summary["converted"] = str(self.convert())
        self.run.summary.write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def save_weights(self, weights: dict | None = None) -> None:
        recipe = self.recipe
        model = recipe.trainer.accelerator.unwrap_model(recipe.trainer.model)
        name = ADAPTER_DIR if recipe.method.adapter else RUN_MODEL_DIR
        on_its_residual = self.config.model is not None and recipe.method.converts and not recipe.init_written_first
        if on_its_residual:
            # The adapter belongs on the residual, not on the original model: point loaders (AutoPeftModel*) there.
            model.peft_config[ADAPTER_NAME].base_model_name_or_path = str(self.run.residual.resolve())
            if self.config.save_residual:  # first: saving the adapter reads its base's config.json
                self.save_residual(model)
        # DPO adds a frozen "ref" copy of the initial adapter; only the trained one is the run's.
        only_trained = {"selected_adapters": [ADAPTER_NAME]} if recipe.method.adapter else {}
        with atomic_output_dir(self.run.root / name, overwrite=True) as tmp:
            model.save_pretrained(tmp, state_dict=weights, **only_trained)
            recipe.tokenizer.save_pretrained(tmp)
        if on_its_residual:
            self.save_init()  # (a quantized method on the fly already wrote RUN/init before training)

    def save_residual(self, model) -> None:
        """RUN/residual: the frozen base the trained adapter needs."""
        with atomic_output_dir(self.run.residual, overwrite=True) as tmp:
            model.get_base_model().save_pretrained(tmp, state_dict=residual_state_dict(model))
            self.recipe.tokenizer.save_pretrained(tmp)

    def save_init(self) -> None:
        """RUN/init: a `pissa init`-style folder (initial adapter + pissa.json), what `pissa convert` reads."""
        recipe = self.recipe
        # The trained adapter's config, unless it was re-expressed as AdaLoRA: then the initial LoRA's.
        config = (json.loads(json.dumps(recipe.initial_config.to_dict(), default=sorted))
                  if self.config.train_singular_values else read_adapter_config(self.run.adapter))
        adapter_config = {**config, "base_model_name_or_path": str(self.run.residual.resolve())}
        with atomic_output_dir(self.run.init.root, overwrite=True) as tmp:
            write_adapter(InitDir(tmp).adapter, adapter_config, recipe.initial_adapter)
            write_manifest(tmp, build_manifest(source=self.config.model, config=recipe.pissa_config().to_dict(),
                                               layers=recipe.init_report, resolved_path=recipe.model_path))

    def convert(self) -> Path:
        """The trained PiSSA adapter as a rank-2r LoRA on the original base (RUN/lora), via pissa.convert."""
        from ..convert import convert_to_lora

        init_dir = Path(self.config.init) if self.config.init else self.run.init.root
        return convert_to_lora(self.run.adapter, init_dir, self.run.lora, overwrite=True).out

    def summary(self) -> dict:
        recipe, c = self.recipe, self.config
        log = read_log(self.run.root)
        # ds_numel: a ZeRO-3 parameter's own numel is its (empty) local partition's
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in recipe.model.parameters() if p.requires_grad)
        speeds = [r["tokens_per_s"] for r in log if r["tokens_per_s"]]
        state = recipe.trainer.state
        return {
            "command": c.command(),
            "stage": c.stage,
            "method": recipe.method.name + ("+dora" if c.dora else "")
            + ("+singular-values" if c.train_singular_values else ""),
            "steps": state.global_step,
            "first_loss": log[0]["loss"] if log else None,
            "final_loss": log[-1]["loss"] if log else None,
            "tokens": state.num_input_tokens_seen,
            "tokens_per_s_median": sorted(speeds)[len(speeds) // 2] if speeds else None,
            "train_seconds": round(recipe.train_seconds, 2),
            "trainable_params": trainable,
            **recipe.data.summary(),
            **({"first_margin": log[0].get("margin"), "final_margin": log[-1].get("margin"),
                "final_reward_accuracy": log[-1].get("reward_accuracy")} if c.stage == "dpo" and log else {}),
        }
