"""Streaming that uses the machine: reads ahead and writes behind in threads without changing a bit, within
a byte budget, failing cleanly from either thread; and `--dtype` casting each tensor as it streams, equal to
the in-memory path that loads the model in that dtype, resumable, and said in the summary's mode row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_same_output, squashed, tensors
from pissa.errors import PissaError
from pissa.init import PissaConfig, parallel, pipeline, run_init, shard_job, stream
from pissa.init.stream import work_dir_for
from pissa.io.reader import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = PissaConfig(rank=4, alpha=8, rank_pattern={"q_proj": 8}, options={"niter": 2}, seed=3)


@pytest.fixture
def sharded_dir(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")  # 5 shards
    return tmp_path / "sharded"


def assert_same_files(x: Path, y: Path) -> None:
    """Byte-identical residual shards (headers included) and adapter weights."""
    for f in sorted((x / "residual").glob("*.safetensors")) + [x / "adapter/adapter_model.safetensors"]:
        assert f.read_bytes() == (y / f.relative_to(x)).read_bytes(), f.name


def reader_threads(monkeypatch) -> set[str]:
    """The names of the threads that read tensors from shards."""
    import threading

    real, names = pipeline.read_tensor, set()

    def read(*args):
        names.add(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(pipeline, "read_tensor", read)
    return names


def test_overlap_changes_no_bits(sharded_dir, tmp_path, monkeypatch):
    import threading

    readers = reader_threads(monkeypatch)
    overlapped = run_init(str(sharded_dir), CONFIG, tmp_path / "overlap")
    assert readers and threading.main_thread().name not in readers  # the reads ran in the reader thread
    monkeypatch.setattr(stream, "OVERLAP", False)
    readers.clear()
    sequential = run_init(str(sharded_dir), CONFIG, tmp_path / "sequential")
    assert readers == {threading.main_thread().name}
    assert_same_files(tmp_path / "overlap", tmp_path / "sequential")
    drop = ("seconds",)
    assert {k: {f: v for f, v in i.items() if f not in drop} for k, i in overlapped.manifest["layers"].items()} == \
           {k: {f: v for f, v in i.items() if f not in drop} for k, i in sequential.manifest["layers"].items()}


@pytest.mark.parametrize("method, options", [("pissa", {"niter": 2}), ("pissa", {}), ("robust", {"max_iter": 3})],
                         ids=["randomized", "exact", "robust"])
def test_several_weights_at_once_change_no_bits(sharded_dir, tmp_path, monkeypatch, method, options):
    """With two torch threads, two weights decompose at once (one thread each) in decompose worker threads; the
    files equal a run on one thread byte for byte, and the in-memory path on two threads gives the same tensors."""
    import threading

    from pissa.decompose import base

    config = PissaConfig(rank=4, method=method, options=options, seed=3)
    real, workers = base.decompose, set()

    def decompose(*args, **kwargs):
        workers.add((threading.current_thread().name, torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(base, "decompose", decompose)
    monkeypatch.setattr("pissa.init.weights.decompose", decompose)
    torch.set_num_threads(2)  # the module runs on one thread (one_thread fixture), which restores it
    run_init(str(sharded_dir), config, tmp_path / "two")
    assert {name.split("_")[0] for name, _ in workers} == {"decompose"} and {n for _, n in workers} == {1}
    memory = run_init(str(sharded_dir), config, tmp_path / "memory", stream=False)
    torch.set_num_threads(1)
    run_init(str(sharded_dir), config, tmp_path / "one")
    assert_same_files(tmp_path / "two", tmp_path / "one")
    assert_same_output(tmp_path / "two", tmp_path / "memory")
    assert memory.manifest["layers"].keys() == json.loads((tmp_path / "two/pissa.json").read_text())["layers"].keys()


def test_a_budget_smaller_than_any_tensor_reads_one_at_a_time_and_changes_nothing(sharded_dir, tmp_path,
                                                                                 monkeypatch):
    """The reader never holds more than the budget in flight, except one tensor alone when it is larger."""
    run_init(str(sharded_dir), CONFIG, tmp_path / "normal")
    real_order, real_acquire, seen = shard_job.read_order, pipeline.ByteBudget.acquire, []

    def tiny_budget(*args):
        order, _ = real_order(*args)
        return order, 1  # 1 byte: every tensor is "too large"

    def acquire(self, n):
        ok = real_acquire(self, n)
        seen.append((self.used, n))
        return ok

    monkeypatch.setattr(shard_job, "read_order", tiny_budget)
    monkeypatch.setattr(pipeline.ByteBudget, "acquire", acquire)
    run_init(str(sharded_dir), CONFIG, tmp_path / "tiny")
    assert seen and all(used == n for used, n in seen)  # each tensor was read with nothing else in flight
    assert_same_files(tmp_path / "normal", tmp_path / "tiny")


def test_a_read_error_in_the_reader_thread_is_raised_and_leaves_nothing(sharded_dir, tmp_path, monkeypatch):
    real, reads = pipeline.read_tensor, []

    def failing(f, header, entry):
        reads.append(entry.name)
        if len(reads) == 7:
            raise OSError(5, "Input/output error")
        return real(f, header, entry)

    monkeypatch.setattr(pipeline, "read_tensor", failing)
    with pytest.raises(CheckpointError, match="could not be read .*Input/output error"):
        run_init(str(sharded_dir), CONFIG, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not work_dir_for(tmp_path / "o").exists()


def test_an_error_while_decomposing_stops_both_threads(sharded_dir, tmp_path, monkeypatch):
    real, calls = shard_job.decompose_targets, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise PissaError("injected: bad weight")
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_job, "decompose_targets", failing)
    with pytest.raises(PissaError, match="injected"):
        run_init(str(sharded_dir), CONFIG, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert not list(work_dir_for(tmp_path / "o").rglob("*.partial"))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_dtype_streams_casting_each_tensor_like_the_in_memory_path(sharded_dir, tmp_path, dtype):
    streamed = run_init(str(sharded_dir), CONFIG, tmp_path / "s", dtype=dtype)
    memory = run_init(str(sharded_dir), CONFIG, tmp_path / "m", dtype=dtype, stream=False)
    assert streamed.manifest["stream"]["cast"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert memory.manifest["in_memory"]["why"] == "asked for (--in-memory)"
    assert_same_output(tmp_path / "s", tmp_path / "m")
    residual = tensors(tmp_path / "s/residual")
    assert {t.dtype for t in residual.values()} == {getattr(torch, streamed.manifest["stream"]["cast"])}
    assert streamed.manifest["residual_dtype"] == memory.manifest["residual_dtype"]
    for key in ("summary", "trainable_params"):
        assert streamed.manifest[key] == memory.manifest[key], key
    configs = [json.loads((tmp_path / p / "residual/config.json").read_text()) for p in ("s", "m")]
    assert configs[0]["dtype"] == configs[1]["dtype"] == streamed.manifest["stream"]["cast"]
    index = json.loads((tmp_path / "s/residual/model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in residual.values())


def test_dtype_of_the_stored_dtype_casts_nothing_and_still_streams(tmp_path, make_tiny_llama):
    src = tmp_path / "bf16"
    make_tiny_llama(seed=1).to(torch.bfloat16).save_pretrained(src, max_shard_size="100KB")
    cast = run_init(str(src), CONFIG, tmp_path / "cast", dtype="bf16")
    plain = run_init(str(src), CONFIG, tmp_path / "plain")
    assert cast.manifest["stream"]["shards"] > 1 and cast.manifest["stream"]["cast"] == "bfloat16"
    assert plain.manifest["stream"]["cast"] is None
    assert_same_files(tmp_path / "cast", tmp_path / "plain")


def test_resume_with_dtype_equals_uninterrupted_and_another_dtype_starts_over(sharded_dir, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real, started = parallel.run_shard, []

    def crash_second(job, progress=None):
        if started:
            raise RuntimeError("injected crash")
        started.append(job.shard)
        return real(job, progress)

    with monkeypatch.context() as m:
        m.setattr(parallel, "run_shard", crash_second)
        with pytest.raises(RuntimeError, match="injected crash"):
            run_init(str(sharded_dir), CONFIG, out, dtype="bf16")
    resumed = run_init(str(sharded_dir), CONFIG, out, dtype="bf16")
    assert resumed.manifest["stream"]["resumed_shards"] == 1
    run_init(str(sharded_dir), CONFIG, tmp_path / "straight", dtype="bf16")
    assert_same_files(out, tmp_path / "straight")
    with monkeypatch.context() as m:  # crash again, then resume with another dtype: nothing is reused
        started.clear()
        m.setattr(parallel, "run_shard", crash_second)
        with pytest.raises(RuntimeError):
            run_init(str(sharded_dir), CONFIG, tmp_path / "other", dtype="bf16")
    other = run_init(str(sharded_dir), CONFIG, tmp_path / "other", dtype="fp16")
    assert other.manifest["stream"]["resumed_shards"] == 0 and other.manifest["stream"]["cast"] == "float16"


def test_cli_dtype_streams_and_the_mode_row_says_so(sharded_dir, tmp_path):
    from typer.testing import CliRunner

    from pissa.cli import app

    runner = CliRunner()
    args = ["init", str(sharded_dir), "--rank", "4", "--niter", "2", "--dtype", "bf16"]
    streamed = runner.invoke(app, [*args, "--out", str(tmp_path / "s")])
    assert streamed.exit_code == 0, streamed.output
    assert squashed("streamed: 5 shard(s)") in squashed(streamed.output)
    assert squashed("cast to bfloat16") in squashed(streamed.output)
    memory = runner.invoke(app, [*args, "--out", str(tmp_path / "m"), "--in-memory"])
    assert memory.exit_code == 0, memory.output
    assert squashed("in memory (asked for (--in-memory))") in squashed(memory.output)
    assert_same_output(tmp_path / "s", tmp_path / "m")


def test_a_written_tensor_is_freed_before_its_bytes_count_as_free(tmp_path):
    """The budget bounds memory only if the writer drops every reference before releasing the bytes (a
    generator holding the last item kept an embedding alive while the next one was read)."""
    import time
    import weakref

    from safetensors.torch import save_file

    from pissa.io.reader import read_header
    from pissa.io.writer import ShardWriter, layout

    save_file({"a": torch.zeros(1000), "b": torch.ones(1000)}, tmp_path / "in.safetensors")
    header = read_header(tmp_path / "in.safetensors")
    out = layout([(t.name, t.dtype, t.shape) for t in header.tensors])
    with open(tmp_path / "in.safetensors", "rb") as f, ShardWriter(tmp_path / "out.safetensors", out) as w, \
            pipeline.ShardIO(f, header, list(header.tensors), w, budget=10**9) as io:
        a = io.get("a")
        ref = weakref.ref(a)
        io.put("a", a)
        del a
        deadline = time.monotonic() + 10
        while "a" in io.held and time.monotonic() < deadline:  # until the writer released a's bytes
            time.sleep(0.01)
        assert "a" not in io.held and ref() is None
        io.put("b", io.get("b"))
        io.close()
    assert torch.equal(load_file(tmp_path / "out.safetensors")["b"], torch.ones(1000))
