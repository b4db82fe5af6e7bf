"""Batched decomposition of same-shape weights (`decompose_batch`, `--batch-same-shape`): each weight
gets the result it gets alone, batches never mix shapes, and methods without a batched form are
untouched.

Batched and one-at-a-time results are compared with a tight tolerance, not bit for bit: batched
kernels (bmm, batched QR/SVD, and on a GPU their cuBLAS/cuSOLVER forms) may sum in another order.
On the project's CPU they were in fact bit-identical; the tolerance only allows rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import tensors
from pissa.decompose import decompose, decompose_batch
from pissa.init import PissaConfig, run_init, shard_job, weights
from pissa.init.plan import make_plan
from pissa.io.reader import CheckpointReader

pytestmark = pytest.mark.usefixtures("one_thread")

TIGHT = dict(atol=1e-6, rtol=1e-5)  # rounding only: the weights are O(0.1)..O(1)


def assert_close_outputs(x: Path, y: Path) -> None:
    for part in ("residual", "adapter"):
        a, b = tensors(x / part), tensors(y / part)
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            torch.testing.assert_close(a[k], b[k], **TIGHT, msg=k)


def assert_equal_outputs(x: Path, y: Path) -> None:
    for part in ("residual", "adapter"):
        a, b = tensors(x / part), tensors(y / part)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def batch_sizes(monkeypatch) -> list[int]:
    """Record the size of every batched call the shard jobs make."""
    sizes, real = [], weights.decompose_batch

    def spy(Ws, *args, **kwargs):
        sizes.append(len(Ws))
        return real(Ws, *args, **kwargs)

    monkeypatch.setattr(weights, "decompose_batch", spy)
    return sizes


@pytest.fixture
def sharded_dir(tmp_path, make_tiny_llama):
    path = tmp_path / "sharded"
    make_tiny_llama(seed=4).save_pretrained(path, max_shard_size="200KB")  # 2-3 shards, mixed shapes in each
    return path


@pytest.mark.parametrize("options", [{}, {"niter": 2}, {"niter": 2, "oversample": 2}],
                         ids=["exact", "randomized", "randomized-oversample2"])
def test_batched_stream_equals_unbatched(sharded_dir, tmp_path, monkeypatch, options):
    config = PissaConfig(rank=4, alpha=8, rank_pattern={"q_proj": 8}, options=options, seed=3)
    sizes = batch_sizes(monkeypatch)
    batched = run_init(str(sharded_dir), config, tmp_path / "b", batch=True)
    assert sizes and max(sizes) > 1  # batches really formed
    calls = len(sizes)
    plain = run_init(str(sharded_dir), config, tmp_path / "p", batch=False)
    assert len(sizes) == calls  # the unbatched run made no batched call
    assert batched.manifest["stream"]["batch_bytes"] > 0 == plain.manifest["stream"]["batch_bytes"]
    assert_close_outputs(tmp_path / "b", tmp_path / "p")
    for name, info in batched.manifest["layers"].items():
        other = plain.manifest["layers"][name]
        assert info["rank"] == other["rank"] and info["svd"] == other["svd"], name
        assert info["recon_max_abs_err"] == pytest.approx(other["recon_max_abs_err"], rel=1e-3, abs=1e-7), name


def test_batched_bf16_single_file_equals_unbatched(tmp_path, make_tiny_llama, monkeypatch):
    src = tmp_path / "bf16"
    make_tiny_llama(seed=5).to(torch.bfloat16).save_pretrained(src)  # one file: both layers' weights in one batch
    config = PissaConfig(rank=4, options={"niter": 2})
    sizes = batch_sizes(monkeypatch)
    run_init(str(src), config, tmp_path / "b", batch=True)
    # one batch per matrix shape over both layers: (q, o), (k, v), (gate, up) x 2 layers, and down x 2
    assert sorted(sizes) == [2, 4, 4, 4]
    run_init(str(src), config, tmp_path / "p")  # default on the CPU: unbatched
    assert_close_outputs(tmp_path / "b", tmp_path / "p")


def test_plan_batches_groups_by_shape_and_respects_the_byte_cap(sharded_dir):
    config = PissaConfig(rank=4, rank_pattern={"q_proj": 8})
    plan = make_plan(sharded_dir, config)
    reader = CheckpointReader(sharded_dir)
    cap = 2 * 128 * 64 * 4  # two of the largest (128x64) matrices in fp32
    for shard in reader.shards:
        entries = reader.entries(shard)
        targets = {e.name: plan.targets[e.name] for e in entries if e.name in plan.targets}
        batches = shard_job.plan_batches(entries, targets, cap)
        assert set(batches) == set(targets)
        order = [e.name for e in entries]
        for name, batch in batches.items():
            assert name in batch and len(batch) >= 1
            assert [order.index(n) for n in batch] == sorted(order.index(n) for n in batch)  # file order
            members = [reader.entry(n) for n in batch]
            assert len({(m.shape, m.dtype) for m in members}) == 1  # never mixes shapes or dtypes
            assert len({targets[n].rank for n in batch}) == 1  # q_proj's rank 8 stays apart
            assert len(batch) * members[0].shape[0] * members[0].shape[1] * 4 <= cap
        unbatched = shard_job.plan_batches(entries, targets, 0)
        assert all(batch == [name] for name, batch in unbatched.items())


@pytest.mark.parametrize("config", [
    PissaConfig(rank=4, method="cur"),
    PissaConfig(rank=4, method="lora-kaiming"),
    PissaConfig(rank=4, method="robust", options={"max_iter": 3}),  # the path is the point, not the fit
    PissaConfig(rank=4, quantize="nf4", quant_iters=1),
], ids=["cur", "lora-kaiming", "robust", "qpissa"])
def test_methods_without_batched_form_are_unchanged(sharded_dir, tmp_path, monkeypatch, config):
    if config.quantize:
        pytest.importorskip("bitsandbytes")
    sizes = batch_sizes(monkeypatch)
    run_init(str(sharded_dir), config, tmp_path / "b", batch=True)
    run_init(str(sharded_dir), config, tmp_path / "p", batch=False)
    assert sizes == []  # they went one by one, through the per-tensor path
    assert_equal_outputs(tmp_path / "b", tmp_path / "p")


@pytest.mark.parametrize("options", [{}, {"niter": 3}, {"components": "random"}, {"components": "minor"}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decompose_batch_equals_one_at_a_time(options, dtype):
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(48, 40, generator=g).to(dtype) for _ in range(3)]
    seeds, names = [7, 8, 9], ["a.weight", "b.weight", "c.weight"]
    batch = decompose_batch(Ws, "pissa", 5, scale=2.0, options=options, seeds=seeds, names=names)
    for W, seed, name, f in zip(Ws, seeds, names, batch, strict=True):
        alone = decompose(W, "pissa", 5, scale=2.0, options=options, seed=seed, name=name)
        for part in ("A", "B", "residual"):
            got, want = getattr(f, part), getattr(alone, part)
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, **TIGHT)
        assert f.info["singular_values"] == pytest.approx(alone.info["singular_values"], rel=1e-5)
    # the seeds are per matrix: the same weight under two seeds in one batch gets two sketches
    twin = decompose_batch([Ws[0], Ws[0]], "pissa", 5, options={"niter": 0}, seeds=[1, 2], names=["x", "y"])
    assert not torch.equal(twin[0].A, twin[1].A)


def test_decompose_batch_refuses_mixed_shapes_naming_them():
    from pissa.decompose import DecompositionError

    Ws = [torch.randn(8, 6), torch.randn(6, 8)]
    with pytest.raises(DecompositionError, match="p.weight, q.weight: a batch needs one shape"):
        decompose_batch(Ws, "pissa", 2, seeds=[0, 1], names=["p.weight", "q.weight"])
