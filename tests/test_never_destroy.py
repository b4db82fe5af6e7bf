"""Nothing the user has is lost (issue 13): outputs that would swallow an input are refused whatever
--overwrite says, a killed run's temporary folders are cleaned up by the next run, and the confusing paths
say which flag works. Every refusal leaves the inputs byte-identical and no output behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import snapshot, train_config
from pissa.cli import app
from pissa.init import PissaConfig, run_init
from pissa.train import SFTRecipe

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def refused(args: list[str], match: str) -> str:
    """Run a command that must be refused: exit 2, one error line matching `match`, no traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert match in result.output, result.output
    return result.output


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_dir, data_file):
    """An init, a trained run from it, a converted LoRA and a run trained from --model, shared by the module."""
    root = tmp_path_factory.mktemp("work")
    run_init(str(tiny_dir), PissaConfig(rank=4), root / "init")
    SFTRecipe(train_config(root, tiny_dir, data_file, "run", model=None, init=str(root / "init"), max_steps=2)).run()
    SFTRecipe(train_config(root, tiny_dir, data_file, "fly", max_steps=2)).run()
    from pissa.convert import convert_to_lora

    convert_to_lora(root / "run" / "adapter", root / "init", root / "lora")
    return root


# --- outputs that would destroy an input are refused, whatever --overwrite says -----------------------

def test_report_into_a_folder_holding_the_runs(work):
    before = snapshot(work / "run", work / "fly")
    refused(["report", work / "run", work / "fly", "--out", work, "--overwrite"], "contains the input")
    refused(["report", work / "run", "--out", work / "run", "--overwrite"], "is the input")
    assert snapshot(work / "run", work / "fly") == before


def test_train_into_its_own_init(work, data_file):
    before = snapshot(work / "init")
    refused(["train", "--init", work / "init", "--out", work / "init", "--overwrite", "--data", data_file,
             "--max-steps", 1], "is the input")
    refused(["train", "--init", work / "init", "--out", work / "init" / "run", "--overwrite", "--data", data_file,
             "--max-steps", 1], "lies inside the input")
    assert snapshot(work / "init") == before


def test_convert_onto_the_trained_adapter(work):
    before = snapshot(work / "run", work / "init")
    refused(["convert", work / "run" / "adapter", "--init", work / "init", "--out", work / "run" / "adapter",
             "--overwrite"], "is the input")
    assert snapshot(work / "run", work / "init") == before


def test_merge_onto_its_base(work, tmp_path, tiny_dir):
    base = tmp_path / "base"
    base.mkdir()
    for f in tiny_dir.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    before = snapshot(base, work / "lora")
    refused(["merge", work / "lora", "--base", base, "--out", base, "--overwrite"], "is the input")
    refused(["merge", work / "lora", "--base", base, "--out", tmp_path, "--overwrite"], "contains the input")
    assert snapshot(base, work / "lora") == before


KILLED_WRITER = """
import os, sys
from pissa.io.atomic import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    os._exit(9)  # killed: no cleanup runs
"""


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(work, tmp_path, tiny_dir):
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True)
    assert done.returncode == 9
    (left,) = tmp_path.glob(".merged.tmp-*")  # what a SIGKILLed merge leaves behind
    result = runner.invoke(app, ["merge", str(work / "lora"), "--base", str(tiny_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not left.exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_an_old_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    from pissa.io.atomic import check_output_dir

    out = tmp_path / "out"
    old = tmp_path / ".out.old-999999"  # the previous output, moved aside by a run killed before its rename
    old.mkdir()
    (old / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        check_output_dir(out, overwrite=False)
    assert (out / "precious.txt").read_text() == "keep" and not old.exists()


# --- confusing paths --------------------------------------------------------------------------------

def test_eval_of_a_run_works_from_another_directory_and_after_a_move(work, tmp_path, monkeypatch):
    from pissa.eval.run import load_target, resolve_target

    moved = tmp_path / "project"
    moved.mkdir()
    for name in ("init", "run"):
        os.rename(work / name, moved / name)
    try:
        monkeypatch.chdir(tmp_path)
        model, _ = load_target(resolve_target(str(moved / "run")))
        ids = torch.tensor([[1, 20, 30, 40]])
        with torch.no_grad():
            got = model(ids).logits
        assert got.shape[-1] == 128  # loaded the run's init residual + its trained adapter
        saved = yaml.safe_load((moved / "run" / "train_config.yaml").read_text())
        assert saved["resolved"] == {"method": "pissa", "ranks": [4],
                                     "run_relative": {"init": "../init", "data": saved["resolved"]["run_relative"]
                                                      ["data"]}}
    finally:
        for name in ("init", "run"):
            os.rename(moved / name, work / name)


def test_merge_with_a_runs_init_points_at_the_run(work, tmp_path):
    refused(["merge", work / "fly" / "adapter", "--base", work / "fly" / "init", "--out", tmp_path / "m"],
            f"pass --base {work / 'fly'}")
    result = runner.invoke(app, ["merge", str(work / "fly" / "adapter"), "--base", str(work / "fly"), "--out",
                                 str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "residual + PiSSA adapter" in result.output


def test_a_pissa_adapter_trained_on_a_runs_residual_is_not_merged_into_the_original(work, tmp_path, tiny_dir):
    refused(["merge", work / "fly" / "adapter", "--base", tiny_dir, "--out", tmp_path / "m"],
            "trained on the PiSSA residual")


@pytest.mark.parametrize("flag, value", [("--rank", "8"), ("--targets", "q_proj"), ("--niter", "2"),
                                         ("--quant-iters", "2")])
def test_options_for_a_new_adapter_are_refused_with_init(work, tmp_path, data_file, flag, value):
    refused(["train", "--init", work / "init", flag, value, "--out", tmp_path / "r", "--data", data_file],
            f"{flag}: options for a new adapter")
    assert not (tmp_path / "r").exists()


def test_rank_pattern_that_matches_nothing(tiny_dir, tmp_path):
    refused(["init", tiny_dir, "--rank-pattern", "zzz=3", "--out", tmp_path / "o"], "--rank-pattern zzz matches none")
    assert not (tmp_path / "o").exists()


def test_a_local_looking_missing_path_is_not_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "h").mkdir()
    refused(["init", "h/nope", "--out", "o"], "model path h/nope does not exist")


def test_ctrl_c_prints_one_line_and_exits_130(tiny_dir, tmp_path, monkeypatch):
    import pissa.init

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pissa.init, "run_init", interrupted)
    result = runner.invoke(app, ["init", str(tiny_dir), "--out", str(tmp_path / "o")])
    assert result.exit_code == 130
    assert "interrupted; re-run the same command to resume" in result.output and "Traceback" not in result.output


def test_help_is_readable_at_80_columns():
    for command in ("init", "train", "eval", "convert", "merge", "export", "report", "analyze", "quant-report",
                    "demo"):
        result = runner.invoke(app, [command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
        assert result.exit_code == 0
        assert "<bool>" not in result.output and "…" not in result.output, command
        assert "--overwrite" in result.output or command == "report", command


# --- damaged inputs: one line naming the file or tensor, never a traceback or a NaN result ----------

@pytest.fixture(scope="module")
def damaged(tmp_path_factory, tiny_dir):
    """A model with one NaN weight, one with a truncated safetensors file, one with no weights at all."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("damaged")
    for name in ("nan", "truncated", "no-weights"):
        (root / name).mkdir()
        for f in tiny_dir.iterdir():
            if not (name == "no-weights" and f.suffix == ".safetensors"):
                (root / name / f.name).write_bytes(f.read_bytes())
    state = load_file(root / "nan" / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(state, root / "nan" / "model.safetensors", metadata={"format": "pt"})
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    return root


@pytest.mark.parametrize("command", [["init"], ["analyze"], ["quant-report", "--ranks", "4", "--iters", "1"],
                                     ["eval", "--limit", "1"]])
def test_nan_weights_are_named(damaged, tmp_path, command):
    before = snapshot(damaged / "nan")
    refused([command[0], damaged / "nan", *command[1:], "--out", tmp_path / "o"],
            "model.layers.0.self_attn.q_proj.weight")
    assert snapshot(damaged / "nan") == before and not (tmp_path / "o").exists()


def test_merge_refuses_nan_in_the_base(work, damaged, tmp_path):
    refused(["merge", work / "lora", "--base", damaged / "nan", "--out", tmp_path / "m"],
            "model.layers.0.self_attn.q_proj.weight in")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", [["init", "--in-memory"], ["quant-report", "--ranks", "4", "--iters", "1"],
                                     ["analyze"]])
def test_truncated_safetensors_is_named(damaged, tmp_path, command):
    refused([command[0], damaged / "truncated", *command[1:], "--out", tmp_path / "o"],
            "model.safetensors is truncated")


def test_merge_names_a_truncated_base(work, damaged, tmp_path):
    refused(["merge", work / "lora", "--base", damaged / "truncated", "--out", tmp_path / "m"],
            "model.safetensors is truncated")


@pytest.mark.parametrize("command", [["init", "--in-memory"], ["analyze"], ["eval"]])
def test_a_model_folder_without_weights_is_named(damaged, tmp_path, command):
    refused([command[0], damaged / "no-weights", *command[1:], "--out", tmp_path / "o"],
            "has a config.json but no weights")


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_non_finite_alpha_writes_nothing(tiny_dir, tmp_path, alpha):
    refused(["init", tiny_dir, "--alpha", alpha, "--out", tmp_path / "o"], "--alpha must be")
    assert not (tmp_path / "o").exists()


def test_eval_refuses_an_adapter_peft_would_recompute_the_base_for(work, tmp_path, tiny_dir):
    import json
    import shutil

    adapter = tmp_path / "peft-adapter"
    shutil.copytree(work / "lora", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    refused(["eval", tiny_dir, "--adapter", adapter, "--limit", "1", "--out", tmp_path / "e"],
            "PEFT would recompute its base")
