"""Train a `pissa init` output with plain TRL: no pissa at train time. Then convert it with pissa.

    pissa init Qwen/Qwen2.5-0.5B-Instruct --rank 16 --out out/qwen-r16
    python docs/recipes/trl_sft.py --init out/qwen-r16 --data chats.jsonl --out runs/trl --max-steps 200
    pissa convert runs/trl/adapter --init out/qwen-r16 --out out/qwen-lora   # a rank-2r LoRA for the ORIGINAL model

The init folder holds two stock artefacts, `residual/` (W_res = W - B A) and `adapter/` (A, B). Load the residual,
put the adapter on it as a trainable PeftModel, and give TRL that PeftModel. Do not give TRL a `peft_config`
instead: it would start a new adapter, and with PiSSA the model would then be the residual alone.

--data is anything `datasets.load_dataset("json", ...)` reads, in TRL's formats: `messages` (chats),
`prompt`/`completion` (strings, or lists of turns: the loss is then on the completion only), or `text`.

DPO with plain TRL works the same way: `DPOTrainer(model=peft_model, ref_model=None, ...)` copies the loaded
adapter into a frozen "ref" adapter, so the reference is residual + initial adapter = W. Given a `peft_config`,
or an adapter config naming a PEFT init such as init_lora_weights="pissa", the reference is wrong (see README.md).
"""

import argparse
from pathlib import Path

import torch
from datasets import load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, required=True, help="a `pissa init` output folder")
    parser.add_argument("--data", required=True, help="a .json/.jsonl file in a TRL format")
    parser.add_argument("--out", type=Path, required=True, help="where the trained adapter goes (OUT/adapter)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-5, help="the PiSSA paper's learning rate")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the adapter stays fp32)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.init / "residual")
    residual = AutoModelForCausalLM.from_pretrained(args.init / "residual", dtype=torch.float32)
    model = PeftModel.from_pretrained(residual, args.init / "adapter", is_trainable=True)

    config = SFTConfig(
        output_dir=str(args.out / "checkpoints"),
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a float < 1 is a ratio of the steps
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        bf16=args.bf16,  # TRL's default is bf16 on, which a machine without a GPU refuses
        use_cpu=not cuda,
        activation_checkpointing=False,  # TRL turns it on by default (gradient_checkpointing before transformers 5)
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    dataset = load_dataset("json", data_files=args.data, split="train")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

    model.save_pretrained(args.out / "adapter")  # a PEFT adapter on residual/
    tokenizer.save_pretrained(args.out / "adapter")


if __name__ == "__main__":
    main()
