"""`pissa init` end to end through the CLI: stock round trip, manifest, and every bad input
(each with a clear error and no partial output)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pissa.cli import app

runner = CliRunner()


def run_init(*args):
    return runner.invoke(app, ["init", *map(str, args)])


def leftovers(parent):
    """Temporary folders a failed run might have left behind."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_init_round_trips_through_stock_transformers_and_peft(
    tiny_llama, tiny_llama_dir, tmp_path, tokens, stock_logits
):
    out = tmp_path / "out"
    result = run_init(tiny_llama_dir, "--rank", 8, "--niter", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"residual", "adapter", "pissa.json"}
    with torch.no_grad():
        expected = tiny_llama(tokens).logits
    torch.testing.assert_close(stock_logits(out / "residual", out / "adapter", tokens), expected, atol=1e-5, rtol=0)
    # the residual alone is a different model: the principal part was moved into the adapter
    assert (stock_logits(out / "residual", None, tokens) - expected).abs().max() > 1e-3
    assert "layers" in result.output and "14" in result.output and "max reconstruction error" in result.output


HUB_KERNEL_NOTICE = "kernels-community"  # bitsandbytes >= 0.50 logs it at import on AVX512-BF16 CPUs without `kernels`


@pytest.mark.integration  # fresh processes
def test_a_command_that_does_not_quantize_prints_no_bitsandbytes_notice(tiny_llama_dir, tmp_path):
    """A fresh `pissa init` process, as a user runs it: peft imports bitsandbytes, whose hub-kernel notice is noise."""
    import importlib.util
    import subprocess
    import sys

    bnb = pytest.importorskip("bitsandbytes")
    cmd = [sys.executable, "-m", "pissa.cli", "init", str(tiny_llama_dir), "--rank", "2", "--out", str(tmp_path / "o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "o" / "pissa.json").exists()
    assert HUB_KERNEL_NOTICE not in done.stderr + done.stdout
    if bnb.functional.has_avx512bf16() and importlib.util.find_spec("kernels") is None:  # the notice is real here
        plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True)
        assert HUB_KERNEL_NOTICE in plain.stderr


def test_manifest_records_method_options_seed_versions_and_errors(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert run_init(tiny_llama_dir, "--rank", 4, "--components", "minor", "--seed", 7, "--out", out).exit_code == 0
    manifest = json.loads((out / "pissa.json").read_text())
    assert manifest["method"] == "pissa" and manifest["options"] == {"components": "minor"} and manifest["seed"] == 7
    assert set(manifest["versions"]) >= {"pissa", "torch", "transformers", "peft"}
    assert len(manifest["layers"]) == 14
    layer = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["shape"] == [64, 128] and layer["rank"] == 4 and 0 <= layer["recon_max_abs_err"] <= 1e-5
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["peft_type"] == "LORA"


def test_bf16_checkpoint_keeps_its_dtype(make_tiny_llama, tmp_path):
    src = tmp_path / "bf16"
    make_tiny_llama().to(torch.bfloat16).save_pretrained(src)
    out = tmp_path / "out"
    assert run_init(src, "--rank", 4, "--out", out).exit_code == 0
    residual = load_file(out / "residual" / "model.safetensors")
    assert residual["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}


def test_existing_output_is_refused_then_replaced_with_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_init(tiny_llama_dir, "--rank", 4, "--out", out)
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    assert run_init(tiny_llama_dir, "--rank", 4, "--out", out, "--overwrite").exit_code == 0
    assert (out / "pissa.json").exists() and not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == []


def nan_checkpoint(tiny_llama_dir):
    path = tiny_llama_dir / "model.safetensors"
    state = load_file(path)
    state["model.layers.1.self_attn.v_proj.weight"][2, 3] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    return tiny_llama_dir


def quantized_checkpoint(tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tiny_llama_dir / "config.json").write_text(json.dumps(config))
    return tiny_llama_dir


@pytest.mark.parametrize(
    "args,message",
    [
        (["--rank", "0"], "--rank must be > 0"),
        (["--rank", "100"], "model.layers.0.self_attn.q_proj.weight: rank 100 exceeds min"),
        (["--targets", "query"], "no module matches targets"),
        (["--method", "svd++"], "unknown method 'svd++'"),
        (["--option", "power=3"], "has no option power"),
        (["--targets", "q_proj", "--target-regex", ".*"], "not both"),
    ],
)
def test_bad_arguments_fail_clearly_and_write_nothing(tiny_llama_dir, tmp_path, args, message):
    out = tmp_path / "out"
    result = run_init(tiny_llama_dir, *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "make_input,message",
    [
        (lambda d: d.parent / "missing-model", "does not exist"),
        (nan_checkpoint, "model.layers.1.self_attn.v_proj.weight: contains 1 NaN/Inf"),
        (quantized_checkpoint, "already quantized"),
    ],
)
def test_bad_models_fail_clearly_and_write_nothing(tiny_llama_dir, tmp_path, make_input, message):
    out = tmp_path / "out"
    result = run_init(make_input(tiny_llama_dir), "--rank", 4, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists() and leftovers(tmp_path) == []


def test_methods_lists_the_registry():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("pissa", "lora-kaiming", "lora-gaussian", "niter", "passes", "pissa_niter_4"):
        assert name in result.output
