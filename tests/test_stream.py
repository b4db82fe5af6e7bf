"""Streaming init (pissa.checkpoint.stream) against the in-memory init, tensor for tensor, plus
workers, torch.distributed ranks, resume after a crash, and every bad input it must refuse."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_same_output, tensors, without_timing
from pissa.errors import PissaError
from pissa.init import PissaConfig, parallel, run_init, shard_job
from pissa.init.stream import work_dir_for
from pissa.io.reader import CheckpointError
from pissa.io.writer import DiskFullError, ShardWriter
from pissa.layout import INDEX_FILE

pytestmark = pytest.mark.long

CONFIG = PissaConfig(rank=4, alpha=8, rank_pattern={"q_proj": 8}, options={"niter": 2}, seed=3)


def save_sharded(model, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size="100KB")  # the tiny Llama: 5 shards
    return path


@pytest.fixture
def sharded_dir(tmp_path, tiny_llama):
    return save_sharded(tiny_llama, tmp_path / "sharded")


def test_streamed_equals_in_memory(sharded_dir, tmp_path):
    streamed = run_init(str(sharded_dir), CONFIG, tmp_path / "s")
    memory = run_init(str(sharded_dir), CONFIG, tmp_path / "m", stream=False)
    assert "stream" in streamed.manifest and "stream" not in memory.manifest
    assert_same_output(tmp_path / "s", tmp_path / "m")
    # the residual keeps the input's sharding: same files, same index
    src_index = json.loads((sharded_dir / INDEX_FILE).read_text())
    out_index = json.loads((tmp_path / "s/residual" / INDEX_FILE).read_text())
    assert out_index["weight_map"] == src_index["weight_map"]
    assert out_index["metadata"]["total_size"] == src_index["metadata"]["total_size"]
    for shard in set(src_index["weight_map"].values()):
        assert (tmp_path / "s/residual" / shard).exists()
    # non-targeted tensors (embeddings, norms, head) are copied verbatim; targeted ones changed
    source, residual = tensors(sharded_dir), tensors(tmp_path / "s/residual")
    targeted = {f"{name}.weight" for name in streamed.manifest["layers"]}
    assert len(targeted) == 14 and "lm_head.weight" not in targeted
    for k in source:
        assert torch.equal(source[k], residual[k]) == (k not in targeted), k
    # adapter_config equal to PEFT's own save (only the residual's path differs)
    cfg_s = json.loads((tmp_path / "s/adapter/adapter_config.json").read_text())
    cfg_m = json.loads((tmp_path / "m/adapter/adapter_config.json").read_text())
    assert cfg_s.pop("base_model_name_or_path") == str((tmp_path / "s/residual").resolve())
    cfg_m.pop("base_model_name_or_path")
    assert {k: sorted(v) if isinstance(v, list) else v for k, v in cfg_s.items()} == \
           {k: sorted(v) if isinstance(v, list) else v for k, v in cfg_m.items()}
    # the manifest reports the same layers, errors and counts
    assert without_timing(streamed.manifest["layers"]) == without_timing(memory.manifest["layers"])
    for key in ("summary", "residual_dtype", "trainable_params", "method", "options", "seed", "config"):
        assert streamed.manifest[key] == memory.manifest[key], key
    assert streamed.manifest["layers"]["model.layers.0.self_attn.q_proj"]["rank"] == 8


def test_output_loads_with_stock_transformers_and_peft(sharded_dir, tmp_path, tiny_llama, tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_init(str(sharded_dir), CONFIG, tmp_path / "s")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "s/residual").eval()
    with torch.no_grad():
        expected = tiny_llama(tokens).logits
        residual_only = base(tokens).logits
        model = PeftModel.from_pretrained(base, tmp_path / "s/adapter").eval()  # wraps `base` in place
        got = model(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the residual alone is not the original: the principal part really moved into the adapter
    assert (residual_only - expected).abs().max() > 1e-3


def test_bf16_checkpoint_round_trip(tmp_path, make_tiny_llama):
    src = save_sharded(make_tiny_llama(seed=1).to(torch.bfloat16), tmp_path / "bf16")
    streamed = run_init(str(src), CONFIG, tmp_path / "s")
    run_init(str(src), CONFIG, tmp_path / "m", stream=False)
    assert_same_output(tmp_path / "s", tmp_path / "m")
    residual, adapter, original = tensors(tmp_path / "s/residual"), tensors(tmp_path / "s/adapter"), tensors(src)
    assert {t.dtype for t in residual.values()} == {torch.bfloat16}
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    assert streamed.manifest["residual_dtype"] == "bfloat16"
    # the manifest's error is the one after bf16 rounding: recompute it from the files
    name = "model.layers.1.mlp.down_proj"
    A = adapter[f"base_model.model.{name}.lora_A.weight"]  # (r, in)
    B = adapter[f"base_model.model.{name}.lora_B.weight"]  # (out, r)
    info = streamed.manifest["layers"][name]
    rebuilt = residual[f"{name}.weight"].float() + info["scale"] * (B @ A)  # (out, in)
    err = (rebuilt - original[f"{name}.weight"].float()).abs().max().item()
    assert info["recon_max_abs_err"] == pytest.approx(err, rel=1e-6)
    assert err > 0  # bf16 storage of the residual costs something, and it is reported


@pytest.mark.integration  # worker processes
def test_workers_equal_single_process(sharded_dir, tmp_path):
    one = run_init(str(sharded_dir), CONFIG, tmp_path / "one")
    two = run_init(str(sharded_dir), CONFIG, tmp_path / "two", workers=2)
    assert two.manifest["stream"]["workers"] == 2
    assert_same_output(tmp_path / "one", tmp_path / "two")
    assert without_timing(one.manifest["layers"]) == without_timing(two.manifest["layers"])


DIST_SCRIPT = """
import sys
from pissa.init import PissaConfig
from pissa.init import run_init
run_init(sys.argv[1], PissaConfig(**{config}), sys.argv[2])
"""


@pytest.mark.integration  # two processes
def test_gloo_two_ranks_equal_single_process(sharded_dir, tmp_path):
    config = dict(rank=4, alpha=8, rank_pattern={"q_proj": 8}, options={"niter": 2}, seed=3)
    script = tmp_path / "launch.py"
    script.write_text(DIST_SCRIPT.format(config=config))
    # torchrun sets OMP_NUM_THREADS=1; LAPACK's bits depend on the thread count, so match ours
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(sharded_dir), str(tmp_path / "dist")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_init(str(sharded_dir), CONFIG, tmp_path / "one")
    manifest = json.loads((tmp_path / "dist/pissa.json").read_text())
    assert manifest["stream"]["world_size"] == 2
    assert_same_output(tmp_path / "one", tmp_path / "dist")


def crash_after_first_shard(monkeypatch):
    """Make the run die (as a kill would) when it starts its second shard."""
    real, started = parallel.run_shard, []

    def run(job, progress=None):
        if started:
            raise RuntimeError("injected crash")
        started.append(job.shard)
        return real(job, progress)

    monkeypatch.setattr(parallel, "run_shard", run)


def count_shards(monkeypatch) -> list[str]:
    real, ran = parallel.run_shard, []

    def run(job, progress=None):
        ran.append(job.shard)
        return real(job, progress)

    monkeypatch.setattr(parallel, "run_shard", run)
    return ran


def test_resume_after_crash_equals_uninterrupted(sharded_dir, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        crash_after_first_shard(m)
        with pytest.raises(RuntimeError, match="injected crash"):
            run_init(str(sharded_dir), CONFIG, out)
    assert not out.exists()
    assert len(list((work_dir_for(out) / shard_job.STATE_DIR / "done").glob("*.json"))) == 1
    with monkeypatch.context() as m:
        ran = count_shards(m)
        result = run_init(str(sharded_dir), CONFIG, out)  # the same command again
    assert len(ran) == 4 and result.manifest["stream"]["resumed_shards"] == 1  # 5 shards, 1 was done
    assert not work_dir_for(out).exists()
    run_init(str(sharded_dir), CONFIG, tmp_path / "straight")
    assert_same_output(out, tmp_path / "straight")
    for f in sorted((out / "residual").glob("*.safetensors")):  # byte for byte, headers included
        assert f.read_bytes() == (tmp_path / "straight/residual" / f.name).read_bytes()


def test_resume_with_other_settings_starts_over(sharded_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        crash_after_first_shard(m)
        with pytest.raises(RuntimeError):
            run_init(str(sharded_dir), CONFIG, out)
    other = PissaConfig(rank=2)
    with monkeypatch.context() as m:
        ran = count_shards(m)
        result = run_init(str(sharded_dir), other, out)
    assert len(ran) == 5 and result.manifest["stream"]["resumed_shards"] == 0
    run_init(str(sharded_dir), other, tmp_path / "fresh")
    assert_same_output(out, tmp_path / "fresh")


def test_disk_full_leaves_no_output_and_resumes(sharded_dir, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real, writes = ShardWriter.write, []

    class FullDisk:
        """The shard's open file, on a disk that has just filled up."""

        def __init__(self, f):
            self.f, self.closed = f, False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()
            self.closed = True

    def write(self, name, tensor):
        writes.append(name)
        if len(writes) == 12:
            self._file = FullDisk(self._file)
        return real(self, name, tensor)

    with monkeypatch.context() as m:
        m.setattr(ShardWriter, "write", write)
        with pytest.raises(DiskFullError, match="disk full while writing .*model-0000"):
            run_init(str(sharded_dir), CONFIG, out)
    assert not out.exists()
    assert not list(work_dir_for(out).rglob("*.partial"))  # the torn shard was removed
    run_init(str(sharded_dir), CONFIG, out)  # space freed: the same command finishes the run
    run_init(str(sharded_dir), CONFIG, tmp_path / "straight")
    assert_same_output(out, tmp_path / "straight")


def assert_refused(src: Path, out: Path, match: str, config: PissaConfig = CONFIG) -> None:
    with pytest.raises(PissaError, match=match):
        run_init(str(src), config, out)
    assert not out.exists() and not work_dir_for(out).exists()


def test_truncated_shard_refused(sharded_dir, tmp_path):
    shard = sharded_dir / "model-00002-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_refused(sharded_dir, tmp_path / "o", r"model-00002-of-00005.safetensors is truncated")


def test_corrupted_header_refused(sharded_dir, tmp_path):
    shard = sharded_dir / "model-00003-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage where the JSON header starts
    shard.write_bytes(bytes(data))
    assert_refused(sharded_dir, tmp_path / "o", r"model-00003-of-00005.safetensors has a corrupted header")


def test_index_naming_missing_file_refused(sharded_dir, tmp_path):
    index = json.loads((sharded_dir / INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (sharded_dir / INDEX_FILE).write_text(json.dumps(index))
    assert_refused(sharded_dir, tmp_path / "o", r"model-00099-of-00099.safetensors.*does not exist")


def test_index_naming_missing_tensor_refused(sharded_dir, tmp_path):
    index = json.loads((sharded_dir / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00005.safetensors"
    (sharded_dir / INDEX_FILE).write_text(json.dumps(index))
    assert_refused(sharded_dir, tmp_path / "o", r"model-00001-of-00005.safetensors holds model.layers.9.mlp.up_proj")


def test_target_matching_nothing_refused(sharded_dir, tmp_path):
    assert_refused(sharded_dir, tmp_path / "o", "no module matches targets", PissaConfig(targets=["nope_proj"]))


def test_integer_weight_refused(tmp_path, tiny_llama):
    src = tmp_path / "int8"
    tiny_llama.save_pretrained(src)
    state = load_file(src / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = state[name].to(torch.int8)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    assert_refused(src, tmp_path / "o", rf"{name} is stored as I8")


def test_missing_weight_files_refused(tmp_path, tiny_llama):
    src = tmp_path / "empty"
    tiny_llama.config.save_pretrained(src)
    with pytest.raises(CheckpointError, match=f"{src} has neither"):
        run_init(str(src), CONFIG, tmp_path / "o", stream=True)


def test_tied_embeddings_stay_tied(tmp_path, make_tiny_llama, tokens):
    from transformers import AutoModelForCausalLM

    original = make_tiny_llama(seed=2, tie_word_embeddings=True)
    src = tmp_path / "tied"
    original.save_pretrained(src)  # one model.safetensors, no lm_head tensor
    run_init(str(src), CONFIG, tmp_path / "s")
    run_init(str(src), CONFIG, tmp_path / "m", stream=False)
    assert_same_output(tmp_path / "s", tmp_path / "m")
    assert not (tmp_path / "s/residual" / INDEX_FILE).exists()
    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "s/residual")
    assert residual.lm_head.weight.data_ptr() == residual.model.embed_tokens.weight.data_ptr()
    assert torch.equal(residual.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert_refused(src, tmp_path / "head", "tied to the input embeddings", PissaConfig(targets=["lm_head"]))


def test_embedding_target_equals_in_memory(sharded_dir, tmp_path):
    config = PissaConfig(rank=4, targets=["embed_tokens", "v_proj"])
    run_init(str(sharded_dir), config, tmp_path / "s")
    run_init(str(sharded_dir), config, tmp_path / "m", stream=False)
    assert_same_output(tmp_path / "s", tmp_path / "m")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in tensors(tmp_path / "s/adapter")


def test_gpt2_conv1d_streams_like_in_memory(tmp_path, tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    src = tmp_path / "gpt2"
    gpt2.save_pretrained(src, max_shard_size="150KB")
    config = PissaConfig(rank=4)
    run_init(str(src), config, tmp_path / "s")
    run_init(str(src), config, tmp_path / "m", stream=False)
    assert_same_output(tmp_path / "s", tmp_path / "m")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "s/residual"),
                                      tmp_path / "s/adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, gpt2(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal when no GPU is visible")
def test_cuda_device_without_gpu_refused(sharded_dir, tmp_path):
    with pytest.raises(PissaError, match="no CUDA GPU"):
        run_init(str(sharded_dir), CONFIG, tmp_path / "o", device="cuda")
    assert not (tmp_path / "o").exists() and not work_dir_for(tmp_path / "o").exists()


def test_cli_streams_by_default_and_in_memory_on_request(sharded_dir, tmp_path):
    from typer.testing import CliRunner

    from pissa.cli import app

    runner = CliRunner()
    args = ["init", str(sharded_dir), "--rank", "4", "--niter", "2", "--seed", "3"]
    streamed = runner.invoke(app, [*args, "--out", str(tmp_path / "s"), "--workers", "1"])
    assert streamed.exit_code == 0, streamed.output
    assert "streamed: 5 shard(s)" in streamed.output
    memory = runner.invoke(app, [*args, "--out", str(tmp_path / "m"), "--in-memory"])
    assert memory.exit_code == 0, memory.output
    assert "in memory" in memory.output
    assert_same_output(tmp_path / "s", tmp_path / "m")
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--in-memory", "--workers", "2"])
    assert refused.exit_code == 2 and "--workers, --device and --batch-same-shape apply to streaming" in refused.output
    assert not (tmp_path / "x").exists()


def test_qpissa_streams_like_in_memory(sharded_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    config = PissaConfig(rank=4, quantize="nf4", quant_iters=2)
    streamed = run_init(str(sharded_dir), config, tmp_path / "s")
    memory = run_init(str(sharded_dir), config, tmp_path / "m", stream=False)
    assert_same_output(tmp_path / "s", tmp_path / "m")
    assert streamed.manifest["quantization"] == memory.manifest["quantization"] is not None
    from pissa.quant.loading import read_record

    assert read_record(tmp_path / "s/residual") == read_record(tmp_path / "m/residual") == streamed.manifest[
        "quantization"]


@pytest.mark.integration
def test_smollm2_streamed_equals_in_memory(smollm2_dir, tmp_path):
    """The embedded SmolLM2-135M (tied embeddings, real tokenizer files) through both paths."""
    config = PissaConfig(rank=8, options={"niter": 2}, targets=["q_proj", "down_proj"])
    streamed = run_init("smollm2-135m", config, tmp_path / "s")
    run_init("smollm2-135m", config, tmp_path / "m", stream=False)
    assert streamed.manifest["stream"]["shards"] == 1 and streamed.manifest["summary"]["layers"] == 30 * 2
    assert_same_output(tmp_path / "s", tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "s/residual" / name).read_bytes() == (Path(smollm2_dir) / name).read_bytes()
        assert (tmp_path / "s/adapter" / name).exists()


def test_decomposition_bits_do_not_depend_on_memory_alignment():
    """Streaming reads weights into fresh buffers, transformers into mmap'd files: MKL's bits depend on
    the address alignment, so decompose_weight must not (else streamed != in-memory in the last bits)."""
    from pissa.init import decompose_weight

    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))  # (out, in)
    config = PissaConfig(rank=4, options={"niter": 2})
    ref = decompose_weight(W, "w", config, 4, 1.0)
    for offset in range(1, 16):  # 4..60-byte misalignment
        shifted = torch.empty(W.numel() + offset)[offset:].view(64, 128)
        shifted.copy_(W)
        f = decompose_weight(shifted, "w", config, 4, 1.0)
        assert torch.equal(f.A, ref.A) and torch.equal(f.B, ref.B) and torch.equal(f.residual, ref.residual)


def test_nan_weight_mid_run_refused_and_cleaned_up(sharded_dir, tmp_path):
    shard = sharded_dir / "model-00004-of-00005.safetensors"
    state = load_file(shard)
    name = next(k for k in state if k.endswith("proj.weight"))
    state[name][1, 2] = float("nan")
    save_file(state, shard, metadata={"format": "pt"})
    assert_refused(sharded_dir, tmp_path / "o", rf"{name}: contains 1 NaN/Inf")
