"""pissa train: every method trains, resume == uninterrupted, --init DIR == on the fly, DDP == one
process, DoRA/PiSSA/LoRA init keeps the logits, bad inputs, and the CLI.

Runs use a 2-layer Llama (hidden 64) with a character-level tokenizer built here, on a tiny
memorisable JSONL set, so each run takes a second or two on CPU.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import RECORDS, CrashAt, free_port, losses, train_config
from pissa.errors import PissaError
from pissa.init import init_model
from pissa.train import SFTRecipe, TrainConfig
from pissa.train.log import read_log

TESTS = Path(__file__).parent


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.long]  # conftest: tiny models, one thread


# --- every method trains ---------------------------------------------------------------------------

@pytest.mark.parametrize("method, dora, lr", [
    ("full", False, 1e-3), ("lora", False, 3e-2), ("lora-gaussian", False, 3e-2), ("pissa", False, 1e-2),
    ("pissa", True, 1e-2), ("lora", True, 3e-2),
], ids=["full", "lora", "lora-gaussian", "pissa", "pissa-dora", "lora-dora"])
def test_every_method_trains_and_memorises(tmp_path, tiny_dir, data_file, method, dora, lr):
    # 4 records in batches of 4: every step sees the same batch, which the model must start to memorise.
    summary = SFTRecipe(train_config(tmp_path, tiny_dir, data_file, method=method, dora=dora, lr=lr, limit=4)).run()
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(1, 11))
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in log)
    first, last = log[0]["loss"], log[-1]["loss"]
    # From ln(vocab) ~ 4.84 the loss falls by about 0.4-0.8 in 10 steps (tiny random model); no fall would be ~0.
    assert last < first - 0.3, (first, last)
    assert summary["steps"] == 10 and summary["final_loss"] == last
    weights = tmp_path / "run" / ("model" if method == "full" else "adapter")
    assert (weights / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).exists()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    if method == "pissa" and not dora:
        assert (tmp_path / "run" / "residual" / "model.safetensors").exists()
        assert (tmp_path / "run" / "init" / "adapter" / "adapter_model.safetensors").exists()


def test_trained_pissa_adapter_reloads_on_its_residual(tmp_path, tiny_dir, data_file):
    """residual/ + adapter/ written by a run load as stock artefacts and give the trained model's logits."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    recipe = SFTRecipe(train_config(tmp_path, tiny_dir, data_file, max_steps=3))
    recipe.run()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    trained = recipe.trainer.model.eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "residual")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    # The adapter's config names the residual as its base, so AutoPeftModel loads the right pair on its own.
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(auto(ids).logits, trained(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["qpissa", "qlora", "loftq"])
def test_quantized_methods_train(tmp_path, tiny_dir, data_file, method):
    """The base is the residual in bitsandbytes NF4 (checked against the fitted Q at load); only adapters train."""
    pytest.importorskip("bitsandbytes")
    recipe = SFTRecipe(train_config(tmp_path, tiny_dir, data_file, method=method, lr=3e-2, limit=4, quant_iters=2))
    recipe.run()
    log = read_log(tmp_path / "run")
    assert len(log) == 10 and log[-1]["loss"] < log[0]["loss"] - 0.3, [r["loss"] for r in log]
    assert (tmp_path / "run" / "init" / "pissa.json").exists()  # the 4-bit init written before training
    manifest = json.loads((tmp_path / "run" / "init" / "pissa.json").read_text())
    assert manifest["quantization"]["quant_type"] == "nf4"
    assert manifest["quantization"]["fit"] == ("loftq" if method == "loftq" else "qpissa")
    assert {type(m).__name__ for n, m in recipe.model.named_modules() if n.endswith("q_proj.base_layer")} == \
        {"Linear4bit"}
    # `pissa eval RUN` loads the same model: the trained adapter on the 4-bit residual in RUN/init
    from pissa.eval.run import load_target, resolve_target

    evaluated, _ = load_target(resolve_target(str(tmp_path / "run")))
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(evaluated(ids).logits, recipe.trainer.model.eval()(ids).logits, rtol=0, atol=1e-5)


def test_loftq_init_dir_equals_on_the_fly(tmp_path, tiny_dir, data_file):
    """`pissa init --quantize nf4 --quant-fit loftq` then --init DIR trains as --method loftq, with the same
    losses as --method loftq from --model; another --method is refused for it."""
    pytest.importorskip("bitsandbytes")
    from pissa.init import PissaConfig, run_init

    run_init(str(tiny_dir), PissaConfig(rank=4, quantize="nf4", quant_fit="loftq", quant_iters=2), tmp_path / "init")
    from_init = SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "from_init", model=None,
                                       init=str(tmp_path / "init"), max_steps=4))
    from_init.run()
    assert from_init.method.name == "loftq"
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "fly", method="loftq", max_steps=4, quant_iters=2)).run()
    torch.testing.assert_close(losses(tmp_path / "from_init"), losses(tmp_path / "fly"), rtol=1e-5, atol=1e-6)
    with pytest.raises(PissaError, match="it trains as --method loftq"):
        SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "other", model=None, init=str(tmp_path / "init"),
                         method="qpissa")).setup()


def test_convert_at_end_gives_same_logits_on_original_base(tmp_path, tiny_dir, data_file):
    """RUN/lora (rank 2r) on the original model == the trained adapter on its residual."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = SFTRecipe(train_config(tmp_path, tiny_dir, data_file, max_steps=4, convert_at_end=True))
    summary = recipe.run()
    assert summary["converted"] == str(tmp_path / "run" / "lora")
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lora = PeftModel.from_pretrained(original, tmp_path / "run" / "lora").eval()
    assert lora.peft_config["default"].r == 8  # 2r
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, recipe.trainer.model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_convert_at_end_refused_for_lora(tmp_path, tiny_dir, data_file):
    with pytest.raises(PissaError, match="needs no conversion"):
        SFTRecipe(train_config(tmp_path, tiny_dir, data_file, method="lora", convert_at_end=True)).setup()


@pytest.mark.parametrize("method, dora", [("lora", False), ("pissa", False), ("pissa", True), ("lora", True)])
def test_adapter_init_keeps_logits(tiny_llama, tokens, method, dora):
    from pissa.init import PissaConfig

    with torch.no_grad():
        before = tiny_llama(tokens).logits
    model, _ = init_model(tiny_llama, PissaConfig(rank=4, method="lora-kaiming" if method == "lora" else method),
                          dora=dora)
    if dora:
        assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=1e-4, atol=1e-4)


def test_init_dir_with_dora_keeps_logits(tmp_path, tiny_dir):
    """--init DIR --dora: the magnitude is recomputed on residual + B A, so the loaded model is the original one."""
    from transformers import AutoModelForCausalLM

    from pissa.init import PissaConfig, run_init
    from pissa.init.load import load_init_dir

    run_init(str(tiny_dir), PissaConfig(rank=4), tmp_path / "init")
    model = load_init_dir(tmp_path / "init", "float32", dora=True, device="cpu").eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    assert any("lora_magnitude_vector" in n and p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)


# --- identities between runs -----------------------------------------------------------------------

@pytest.mark.parametrize("singular_values", [False, True], ids=["pissa", "pissa-singular-values"])
def test_resume_equals_uninterrupted(tmp_path, tiny_dir, data_file, singular_values):
    kw = dict(max_steps=8, save_steps=4, method="pissa", train_singular_values=singular_values)
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "full_run", **kw)).run()
    with pytest.raises(KeyboardInterrupt):
        SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "crashed", **kw), callbacks=[CrashAt(6)]).run()
    assert [r["step"] for r in read_log(tmp_path / "crashed")] == list(range(1, 7))
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "crashed", resume=True, **kw)).run()
    assert [r["step"] for r in read_log(tmp_path / "crashed")] == list(range(1, 9))  # no duplicated steps
    torch.testing.assert_close(losses(tmp_path / "crashed"), losses(tmp_path / "full_run"), rtol=1e-5, atol=1e-6)




def test_init_dir_equals_on_the_fly(tmp_path, tiny_dir, data_file):
    from pissa.init import PissaConfig, run_init

    run_init(str(tiny_dir), PissaConfig(rank=4, seed=0), tmp_path / "init")
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "fly", method="pissa", max_steps=5)).run()
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "from_init", model=None, init=str(tmp_path / "init"),
                     max_steps=5)).run()
    torch.testing.assert_close(losses(tmp_path / "from_init"), losses(tmp_path / "fly"), rtol=1e-5, atol=1e-6)


def test_grad_accumulation_and_checkpointing_leave_losses_unchanged(tmp_path, tiny_dir, data_file):
    """batch 4 == 2 micro-batches of 2 (token-weighted), and gradient checkpointing changes no number."""
    kw = dict(method="pissa", max_steps=4)
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "plain", **kw)).run()
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "accum", batch_size=2, grad_accum=2, **kw)).run()
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "ckpt", gradient_checkpointing=True, **kw)).run()
    plain = losses(tmp_path / "plain")
    torch.testing.assert_close(losses(tmp_path / "ckpt"), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses(tmp_path / "accum"), plain, rtol=1e-4, atol=1e-5)


def test_bf16_base_with_fp32_adapters_tracks_fp32(tmp_path, tiny_dir, data_file):
    """--precision bf16: base weights in bf16, adapters kept fp32 (paper), losses close to the fp32 run."""
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "fp32", max_steps=3)).run()
    recipe = SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "bf16", max_steps=3, precision="bf16"))
    recipe.run()
    params = list(recipe.model.named_parameters())
    assert {p.dtype for n, p in params if ".lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params if ".lora_" not in n} == {torch.bfloat16}
    torch.testing.assert_close(losses(tmp_path / "bf16"), losses(tmp_path / "fp32"), rtol=0, atol=0.03)


DDP_SCRIPT = """
import json, sys
from pathlib import Path
from accelerate import PartialState
from pissa.train import SFTRecipe, TrainConfig
out, model, data, batch = sys.argv[1:5]
SFTRecipe(TrainConfig(out=out, model=model, data=data, rank=4, lr=1e-2, max_steps=4, batch_size=int(batch),
                      warmup_ratio=0.0, max_length=128, tensorboard=False, method="pissa")).run()
state = PartialState()  # the process group the run used
if state.is_main_process:
    Path(out, "launch.json").write_text(json.dumps({"processes": state.num_processes, "backend": state.backend}))
"""


def launcher(name: str) -> list[str]:
    """The command prefix that starts 2 local processes: torchrun, or `accelerate launch` with the shipped
    docs/distributed/ddp.yaml (CPU overrides on the command line). accelerate's `--cpu --num_processes 2` starts
    one process (more only through mpirun, with --mpirun_hostfile); the config's MULTI_GPU starts them through
    torch.distributed.run, and with no GPU each process's Trainer (use_cpu) joins a gloo process group."""
    port = str(free_port())
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(TESTS.parent / "docs" / "distributed" / "ddp.yaml"), "--num_processes", "2", "--mixed_precision",
            "no", "--main_process_port", port]


@pytest.mark.integration  # two processes
@pytest.mark.parametrize("launch", ["torchrun", "accelerate"])
def test_ddp_two_processes_match_one(tmp_path, tiny_dir, data_file, launch):
    """2 CPU processes (gloo) at batch 2 each == 1 process at batch 4: same global batches, same losses,
    whether launched by torchrun or `accelerate launch`."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    # HF_HOME: no accelerate config file of the user's (default_config.yaml) changes the launch.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HOME": str(tmp_path / "hf")}
    cmd = [*launcher(launch), str(script), str(tmp_path / "ddp"), str(tiny_dir), str(data_file), "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "launch.json").read_text()) == {"processes": 2, "backend": "gloo"}
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "single", method="pissa", max_steps=4)).run()
    assert len(losses(tmp_path / "ddp")) == 4
    torch.testing.assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "single"), rtol=1e-4, atol=1e-5)


# --- bad input -------------------------------------------------------------------------------------

def test_model_and_init_exactly_one(tmp_path):
    with pytest.raises(PissaError, match="exactly one of --model .* or --init"):
        TrainConfig(out=str(tmp_path / "r"))
    with pytest.raises(PissaError, match="exactly one of --model .* or --init"):
        TrainConfig(out=str(tmp_path / "r"), model="m", init="i")


def test_existing_run_folder_refused_and_config_kept(tmp_path, tiny_dir, data_file):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    # an interrupted run with no checkpoint: both messages name the one flag that works (--overwrite)
    with pytest.raises(PissaError, match="already exists and holds no checkpoint to resume from; pass --overwrite"):
        SFTRecipe(train_config(tmp_path, tiny_dir, data_file)).setup()
    assert (tmp_path / "run" / "keep.txt").exists()  # nothing touched
    with pytest.raises(PissaError, match="no checkpoint .* pass --overwrite instead of --resume"):
        SFTRecipe(train_config(tmp_path, tiny_dir, data_file, resume=True)).setup()
    # with a checkpoint, the plain re-run points at --resume
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "saved", max_steps=2, save_steps=2)).run()
    with pytest.raises(PissaError, match="already exists; pass --resume to continue it from its last checkpoint"):
        SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "saved", max_steps=2, save_steps=2)).setup()


def test_resume_with_changed_options_refused(tmp_path, tiny_dir, data_file):
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, max_steps=2, save_steps=2)).run()
    with pytest.raises(PissaError, match="different options .* lr"):
        SFTRecipe(train_config(tmp_path, tiny_dir, data_file, max_steps=2, save_steps=2, lr=1e-3, resume=True)).setup()


def test_quantized_method_without_bitsandbytes(tmp_path, tiny_dir, data_file, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(PissaError, match="needs bitsandbytes: `pip install"):
        SFTRecipe(train_config(tmp_path, tiny_dir, data_file, method="qpissa")).setup()
    assert not (tmp_path / "run").exists()


def test_bad_data_refused_before_writing(tmp_path, tiny_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"query": "only a query"}) + "\n")
    with pytest.raises(PissaError, match=r"bad\.jsonl line 2: missing field 'response'"):
        SFTRecipe(train_config(tmp_path, tiny_dir, bad)).setup()
    assert not (tmp_path / "run").exists()


def test_init_dir_method_mismatch(tmp_path, tiny_dir, data_file):
    from pissa.init import PissaConfig, run_init

    run_init(str(tiny_dir), PissaConfig(rank=4), tmp_path / "init")
    with pytest.raises(PissaError, match="made with method 'pissa'"):
        SFTRecipe(train_config(tmp_path, tiny_dir, data_file, model=None, init=str(tmp_path / "init"),
                         method="lora")).setup()


# --- config and CLI --------------------------------------------------------------------------------

def test_cli_train_and_saved_command_reproduces_run(tmp_path, tiny_dir, data_file):
    from typer.testing import CliRunner

    from pissa.cli import app

    run = tmp_path / "cli_run"
    args = ["train", "--model", str(tiny_dir), "--data", str(data_file), "--out", str(run), "--rank", "4",
            "--lr", "0.01", "--max-steps", "3", "--max-length", "128", "--warmup-ratio", "0", "--no-tensorboard"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "loss first -> last" in result.output and len(losses(run)) == 3
    text = (run / "train_config.yaml").read_text()
    command = text.splitlines()[0].removeprefix("# ")
    assert yaml.safe_load(text)["lr"] == 0.01
    assert json.loads((run / "summary.json").read_text())["command"] == command
    # The first line of the saved config is a command that repeats the run exactly.
    before = losses(run)
    again = CliRunner().invoke(app, [*shlex.split(command)[1:], "--overwrite"])  # drop "pissa"
    assert again.exit_code == 0, again.output
    torch.testing.assert_close(losses(run), before, rtol=1e-6, atol=1e-7)


def test_cli_bad_input_exit_code(tmp_path):
    from typer.testing import CliRunner

    from pissa.cli import app

    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "exactly one of --model" in result.output


def test_every_config_field_is_a_cli_option():
    """The saved command names every non-default field as --field-name, so the CLI must accept them all."""
    import dataclasses
    import inspect

    from pissa.cli.train import train_command

    params = inspect.signature(train_command).parameters
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(params)
    for name, param in params.items():
        flag = f"--{name.replace('_', '-')}"
        assert any(decl == flag or decl.startswith(flag + "/") for decl in param.default.param_decls), name
