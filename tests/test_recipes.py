"""docs/recipes: the TRL recipe trains a `pissa init` output with no pissa imported, and `pissa convert` of its
adapter gives the trained model's logits on the original base; the axolotl and LLaMA-Factory YAMLs (not run
here: neither tool is installed) load and name the residual, the PiSSA adapter, and for DPO the right reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import RECORDS, load_with_adapter, make_init

RECIPES = Path(__file__).parent.parent / "docs" / "recipes"
RUN_WITHOUT_PISSA = """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
assert not any(name == "pissa" or name.startswith("pissa.") for name in sys.modules), "the recipe imported pissa"
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.integration  # a fresh process
def test_trl_recipe_trains_without_pissa_and_converts(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pissa.convert import convert_to_lora
    from pissa.io.adapter_files import read_adapter

    init = make_init(tiny_dir, tmp_path / "init", rank=4)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["query"]}],
                                        "completion": [{"role": "assistant", "content": r["response"]}]}) + "\n"
                            for r in RECORDS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"),
           "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-c", RUN_WITHOUT_PISSA, str(RECIPES / "trl_sft.py"), "--init", str(init),
           "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "3", "--lr", "1e-2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = tmp_path / "run" / "adapter"
    _, before = read_adapter(init / "adapter")
    _, after = read_adapter(trained)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    lora = convert_to_lora(trained, init, tmp_path / "lora").out
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        expected = load_with_adapter(init / "residual", trained)(ids).logits
        original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), lora).eval()
        torch.testing.assert_close(original(ids).logits, expected, rtol=1e-4, atol=1e-4)


def load_recipe(name: str) -> dict:
    text = (RECIPES / name).read_text()
    assert text.startswith("# "), f"{name} starts with the command that runs it"
    return yaml.safe_load(text)


def test_axolotl_recipe_keeps_training_the_pissa_adapter():
    config = load_recipe("axolotl.yaml")
    assert config["base_model"].endswith("/residual") and config["lora_model_dir"].endswith("/adapter")
    assert config["base_model"].rsplit("/", 1)[0] == config["lora_model_dir"].rsplit("/", 1)[0]  # one init
    assert config["adapter"] == "lora" and config["learning_rate"] == 2e-5
    (dataset,) = config["datasets"]
    assert dataset["type"] == "chat_template" and dataset["roles_to_train"] == ["assistant"]


@pytest.mark.parametrize("name", ["llama_factory_sft.yaml", "llama_factory_dpo.yaml"])
def test_llama_factory_recipes_keep_training_the_pissa_adapter(name):
    config = load_recipe(name)
    assert config["model_name_or_path"].endswith("/residual") and config["adapter_name_or_path"].endswith("/adapter")
    assert config["finetuning_type"] == "lora" and config["create_new_adapter"] is False
    assert "pissa_init" not in config  # the adapter is already initialised; no SVD in the trainer
    if config["stage"] == "dpo":  # reference = residual + initial adapter = W, not the adapter-disabled residual
        assert config["ref_model"] == config["model_name_or_path"]
        assert config["ref_model_adapters"] == config["adapter_name_or_path"]
