"""Step time of `pissa train` on TRL's SFTTrainer against the recipe it replaced (the transformers Trainer with
pissa's padding collator), on the convergence benchmark's set-up: SmolLM2-135M, PiSSA rank 16 on every linear
layer, fp32, a batch of 4 `arith` examples, max length 160.

Both trainers get the same tokens (the rows TRL prepared, padded by each trainer's own collator) and train their
own copy of the same PiSSA model. One step is forward + backward (`Trainer.training_step`, so each trainer's own
loss: TRL's chunked log-probs, the model's cross-entropy) + the AdamW step; the two are interleaved in one
process, alternating who goes first, and the first round is a warm-up.

    python benchmarks/bench_train_step.py [--steps 8] [--threads 1] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _common import LoadWatch, write_result


def trainers(args, out):
    """(new: pissa's TRL trainer, old: transformers.Trainer + PadCollator), each with its own model copy."""
    from transformers import Trainer, TrainingArguments

    from pissa.data.tokens import PadCollator, pad_id
    from pissa.init import init_model
    from pissa.models import load_model
    from pissa.train import TrainConfig, TrainRecipe

    config = TrainConfig(out=str(out / "new"), model=args.model, method="pissa", rank=args.rank, data="arith",
                         limit=64, batch_size=args.batch_size, max_length=args.max_length, max_steps=10,
                         tensorboard=False, niter=4)
    new = TrainRecipe(config).setup()
    base, tokenizer, _ = load_model(args.model, "float32")
    old_model, _ = init_model(base, new.pissa_config())
    old_args = TrainingArguments(output_dir=str(out / "old"), learning_rate=config.lr, per_device_train_batch_size=4,
                                 max_steps=10, report_to="none", use_cpu=True, disable_tqdm=True,
                                 remove_unused_columns=False)
    old = Trainer(model=old_model, args=old_args, data_collator=PadCollator(pad_id(tokenizer)),
                  train_dataset=[{"input_ids": [0], "labels": [0]}])
    return new.trainer, old


def time_steps(args) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        new, old = trainers(args, Path(tmp))
        rows = [new.train_dataset[i] for i in range(args.batch_size)]
        batches = {"trl": new.data_collator(rows),
                   "transformers": old.data_collator([{"input_ids": r["input_ids"], "labels": r["labels"]}
                                                      for r in rows])}
        tokens = int(sum(len(r["input_ids"]) for r in rows))
        loss_tokens = int(sum(sum(t != -100 for t in r["labels"][1:]) for r in rows))
        batches["trl-fused"] = batches["trl"]
        # pissa's trainer as it runs here (model loss off Triton), and forced onto TRL's fused LM head
        runs = {"trl": (new, None), "trl-fused": (new, True), "transformers": (old, None)}
        for trainer, _ in runs.values():
            trainer.model.train()
            trainer.create_optimizer()
        times = {name: [] for name in runs}
        for i in range(args.steps + 1):
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                trainer, fused = runs[name]
                if trainer is new:
                    new.fused_lm_head = fused
                start = time.perf_counter()
                trainer.training_step(trainer.model, dict(batches[name]), torch.tensor(loss_tokens))
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()
                if i > 0:
                    times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"trl_s": median["trl"], "trl_fused_s": median["trl-fused"], "transformers_s": median["transformers"],
            "ratio": median["trl"] / median["transformers"],
            "fused_ratio": median["trl-fused"] / median["transformers"], "steps": args.steps, "tokens": tokens,
            "threads": args.threads, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--steps", type=int, default=8, help="interleaved timed steps per trainer")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    watch = LoadWatch(threads=args.threads)
    r = time_steps(args)
    text = (f"# Step time: `pissa train` on TRL vs the transformers Trainer it replaced\n\n"
            f"`benchmarks/bench_train_step.py --steps {args.steps} --threads {args.threads}`; {watch.header()}\n\n"
            f"{args.model}, PiSSA rank {args.rank} on every linear layer, fp32, a batch of {args.batch_size} "
            f"`arith` examples ({r['tokens']} tokens), forward + backward + AdamW, the three interleaved in one "
            f"process, alternating who goes first.\n\n"
            f"| trainer | median step s |\n|---|---|\n"
            f"| transformers Trainer + pad collator (before) | {r['transformers_s']:.3f} |\n"
            f"| pissa train now: TRL SFTTrainer, the model's own loss off Triton | {r['trl_s']:.3f} |\n"
            f"| TRL SFTTrainer forced onto its fused LM head | {r['trl_fused_s']:.3f} |\n\n"
            f"**Ratio pissa train now / before: {r['ratio']:.3f}**; the fused LM head / before: "
            f"{r['fused_ratio']:.3f} (median of {args.steps} interleaved steps each, on {r['device']}). Off "
            "Triton (this CPU) TRL's fused head scores every position and recomputes the projection in backward, "
            "which is why `pissa train` uses the model's own loss there (`train.trainers.ModelLossOffTriton`); "
            "with Triton it scores only the labelled positions and never holds the full logits.\n")
    write_result("train_step", text, r)


if __name__ == "__main__":
    main()
