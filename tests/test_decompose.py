"""The decomposition engine: reconstruction identities, agreement with torch.linalg.svd, component
selection, randomized-SVD quality and determinism, and bad input."""

import pytest
import torch

from pissa.decompose import METHODS, DecompositionError, decompose, lora_scale, randomized_svd


def decaying_matrix(out=96, inp=64, decay=0.85, seed=0):
    """A matrix with singular values decay**i, like a pretrained weight's spectrum."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, out, generator=g)).Q
    V = torch.linalg.qr(torch.randn(inp, inp, generator=g)).Q
    k = min(out, inp)
    S = 10 * decay ** torch.arange(k, dtype=torch.float32)
    return (U[:, :k] * S) @ V[:, :k].T  # (out, in)


def truncated_residual_norm(W, r):
    S = torch.linalg.svdvals(W)
    return S[r:].square().sum().sqrt()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.25])
def test_every_method_reconstructs_w(method, scale):
    W = torch.randn(48, 40, generator=torch.Generator().manual_seed(1))
    f = decompose(W, method, 8, scale=scale, seed=3)
    assert f.A.shape == (8, 40) and f.B.shape == (48, 8) and f.residual.shape == W.shape
    torch.testing.assert_close(f.residual + scale * f.B @ f.A, W, atol=1e-5, rtol=0)
    assert f.info["recon_max_abs_err"] <= 1e-5


def test_pissa_matches_torch_svd():
    W = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    f = decompose(W, "pissa", 6)
    principal = (U[:, :6] * S[:6]) @ Vh[:6]  # (out, in)
    torch.testing.assert_close(f.B @ f.A, principal, atol=1e-5, rtol=0)
    # B = U sqrt(S), A = sqrt(S) Vh: both factors carry half of each singular value.
    torch.testing.assert_close(f.B.norm(dim=0), S[:6].sqrt(), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.A.norm(dim=1), S[:6].sqrt(), atol=1e-5, rtol=0)


def test_alpha_scaling_keeps_the_principal_part():
    W = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    scale = lora_scale(alpha=32, rank=8)  # 4.0
    base = decompose(W, "pissa", 8)
    scaled = decompose(W, "pissa", 8, scale=scale)
    torch.testing.assert_close(scale * scaled.B @ scaled.A, base.B @ base.A, atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled.residual, base.residual, atol=1e-5, rtol=0)


def test_rslora_scale():
    assert lora_scale(16, 16, use_rslora=True) == pytest.approx(4.0)
    assert lora_scale(16, 16) == 1.0


@pytest.mark.parametrize(
    "components,expected",
    [("principal", slice(0, 5)), ("minor", slice(27, 32)), ("medium", slice(13, 18))],
)
def test_component_selection_picks_the_right_singular_values(components, expected):
    W = decaying_matrix(48, 32)
    S = torch.linalg.svdvals(W)
    f = decompose(W, "pissa", 5, options={"components": components})
    got = torch.linalg.svdvals(f.B @ f.A)[:5]
    torch.testing.assert_close(got, S[expected], rtol=1e-4, atol=1e-6)


def test_random_components_are_seeded_and_exact_triplets():
    W = decaying_matrix(48, 32)
    S = torch.linalg.svdvals(W)
    a = decompose(W, "pissa", 5, options={"components": "random"}, seed=1)
    b = decompose(W, "pissa", 5, options={"components": "random"}, seed=1)
    c = decompose(W, "pissa", 5, options={"components": "random"}, seed=2)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert not torch.equal(a.A, c.A)
    chosen = torch.linalg.svdvals(a.B @ a.A)[:5]
    # every chosen value is one of W's singular values
    assert all((S - s).abs().min() < 1e-4 for s in chosen)


@pytest.mark.parametrize("rank", [4, 16])
def test_randomized_svd_is_within_one_percent_of_exact(rank):
    W = decaying_matrix(256, 192, decay=0.97)
    exact = truncated_residual_norm(W, rank)
    f = decompose(W, "pissa", rank, options={"niter": 2, "oversample": rank // 2})
    assert f.info["svd"] == "randomized"
    excess = f.residual.norm() / exact - 1
    assert -1e-6 <= excess < 0.01, excess  # no rank-r matrix beats the truncated SVD (up to rounding)


def test_randomized_svd_same_seed_bit_identical():
    W = decaying_matrix(128, 96)
    a = decompose(W, "pissa", 8, options={"niter": 2}, seed=5)
    b = decompose(W, "pissa", 8, options={"niter": 2}, seed=5)
    c = decompose(W, "pissa", 8, options={"niter": 2}, seed=6)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.residual, b.residual)
    assert not torch.equal(a.A, c.A)


def test_randomized_svd_values_agree_with_exact():
    W = decaying_matrix(128, 96, decay=0.8)
    U, S, Vh = randomized_svd(W, 6, niter=4, oversample=6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[:6], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(U.T @ U, torch.eye(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora-kaiming", "lora-gaussian"])
def test_lora_baselines_leave_w_untouched(method):
    W = torch.randn(32, 24).to(torch.bfloat16)
    f = decompose(W, method, 4, scale=2.0)
    assert torch.equal(f.residual, W)
    assert torch.count_nonzero(f.B) == 0 and torch.count_nonzero(f.A) > 0


def test_bf16_weight_math_in_fp32_and_error_after_cast():
    W32 = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    W = W32.to(torch.bfloat16)
    f = decompose(W, "pissa", 8)
    assert f.residual.dtype == torch.bfloat16 and f.A.dtype == torch.float32
    # The reported error is the one a user gets: bf16 residual + fp32 factors vs the bf16 weight.
    actual = (f.residual.float() + f.B @ f.A - W.float()).abs().max().item()
    assert f.info["recon_max_abs_err"] == pytest.approx(actual, rel=1e-4, abs=1e-7)
    assert 0 < actual < 2e-2  # bf16 rounding of the residual, nothing worse


def test_adapter_dtype_cast_is_absorbed_by_the_residual():
    W = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    f = decompose(W, "pissa", 4, adapter_dtype=torch.bfloat16)
    assert f.A.dtype == torch.bfloat16
    torch.testing.assert_close(f.residual + f.B.float() @ f.A.float(), W, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank must be > 0"),
        (dict(rank=40), "exceeds min"),
        (dict(method="nope"), "unknown method 'nope'"),
        (dict(options={"n_iter": 4}), "no option n_iter"),
        (dict(options={"niter": 2, "components": "minor"}), "only principal"),
        (dict(options={"components": "largest"}), "components must be"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(kwargs, match):
    W = torch.randn(32, 24)
    args = dict(method="pissa", rank=4) | kwargs
    with pytest.raises(DecompositionError, match=match):
        decompose(W, args.pop("method"), args.pop("rank"), name="layers.0.q_proj.weight", **args)


def test_nan_weight_names_the_tensor():
    W = torch.randn(16, 16)
    W[3, 4] = float("nan")
    with pytest.raises(DecompositionError, match=r"layers\.0\.q_proj\.weight: contains 1 NaN/Inf"):
        decompose(W, "pissa", 4, name="layers.0.q_proj.weight")


def test_non_float_and_non_matrix_weights_are_refused():
    with pytest.raises(DecompositionError, match="not a float weight"):
        decompose(torch.zeros(8, 8, dtype=torch.uint8), "pissa", 2)
    with pytest.raises(DecompositionError, match="expected a 2-D weight"):
        decompose(torch.zeros(8), "pissa", 2)


def test_randomized_request_falls_back_to_exact_when_the_sketch_costs_more():
    W = decaying_matrix(96, 64)
    # sketch 2 * 24 = 48 columns of a 64-wide matrix with 4 power iterations: the exact SVD is cheaper
    big = decompose(W, "pissa", 24, options={"niter": 4})
    exact = decompose(W, "pissa", 24)
    assert big.info["svd"] == "exact" and torch.equal(big.A, exact.A) and torch.equal(big.B, exact.B)
    assert decompose(W, "pissa", 4, options={"niter": 4}).info["svd"] == "randomized"


def flat_spectrum(out=300, inp=200, seed=0):
    """U diag(s) Vᵀ with s_i = (1 + i/8)^-0.4: the slow decay of trained LLM weights (a hard case for sketches)."""
    g = torch.Generator().manual_seed(seed)
    k = min(out, inp)
    U = torch.linalg.qr(torch.randn(out, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(inp, k, generator=g)).Q
    return (U * (1 + torch.arange(k) / 8) ** -0.4) @ V.T  # (out, in)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
@pytest.mark.parametrize("niter", [1, 2, 4])
def test_block_krylov_beats_peft_power_iterations_at_equal_passes(shape, niter):
    """2 niter + 2 passes over W either way; keeping every Krylov block gives a lower residual than PEFT's
    `torch.svd_lowrank(W, q=r, niter)`, which keeps only the last, and never beats the exact SVD."""
    W, rank = flat_spectrum(*shape), 8
    exact = truncated_residual_norm(W, rank)
    torch.manual_seed(0)  # svd_lowrank draws from the global generator
    U, S, V = torch.svd_lowrank(W, q=rank, niter=niter)
    theirs = (W - (U * S) @ V.T).norm() / exact - 1
    f = decompose(W, "pissa", rank, options={"niter": niter, "oversample": 0}, seed=0)
    ours = f.residual.norm() / exact - 1
    assert f.info["svd"] == "randomized"
    assert -1e-6 <= ours < theirs, (ours, theirs)


def test_block_krylov_singular_triplets_agree_with_torch_svd():
    W = flat_spectrum(256, 160, seed=3)
    U, S, Vh = randomized_svd(W, 12, niter=6, oversample=0, generator=torch.Generator().manual_seed(1))
    Ue, Se, Vhe = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(S, Se[:12], rtol=2e-4, atol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(12), atol=2e-6, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(12), atol=2e-6, rtol=0)
    # the leading singular vectors, up to sign (the spectrum's gaps are small further down)
    torch.testing.assert_close((U[:, :4] * Ue[:, :4]).sum(0).abs(), torch.ones(4), atol=2e-3, rtol=0)
    torch.testing.assert_close((Vh[:4] * Vhe[:4]).sum(1).abs(), torch.ones(4), atol=2e-3, rtol=0)


@pytest.mark.parametrize("shape", [(100, 80), (80, 100)])
@pytest.mark.parametrize("niter", [1, 3, 6])
def test_block_krylov_survives_rank_deficient_and_zero_weights(shape, niter):
    """A Krylov space that holds W's whole range early (rank < its size) stays orthonormal (without the
    deflation in `orthonormal`, a rank-3 W lost 58 % of its range at niter 6), and a zero weight
    decomposes to zero factors: no NaN, and the residual identity holds."""
    g = torch.Generator().manual_seed(0)
    low = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)  # rank 3
    f = decompose(low, "pissa", 8, options={"niter": niter}, seed=1)
    assert f.info["svd"] == "randomized"
    assert f.residual.norm() / low.norm() < 1e-5  # rank 3 < r: all of W moves into the adapter
    U = f.B[:, :3] / f.B[:, :3].norm(dim=0)  # the 3 real directions
    torch.testing.assert_close(U.T @ U, torch.eye(3), atol=1e-5, rtol=0)
    zero = decompose(torch.zeros(shape), "pissa", 8, options={"niter": niter}, seed=1)
    assert torch.equal(zero.residual, torch.zeros(shape)) and not zero.A.any() and not zero.B.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_and_error_built_in_chunks_match_one_pass(monkeypatch, dtype):
    """`finish` builds the residual and its error chunk by chunk of rows; the chunking changes no bits of the
    residual, and the statistics are those of the whole matrix."""
    from pissa.decompose import base

    W = torch.randn(70, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole = decompose(W, "pissa", 4, scale=2.0, options={"niter": 1}, seed=0)
    monkeypatch.setattr(base, "CHUNK_BYTES", 4 * 40 * 8)  # 8 rows a chunk, the last one short
    base._SCRATCH.buffer = None
    chunked = decompose(W, "pissa", 4, scale=2.0, options={"niter": 1}, seed=0)
    assert torch.equal(chunked.residual, whole.residual)
    assert torch.equal(chunked.A, whole.A) and torch.equal(chunked.B, whole.B)
    W32 = W.float()
    error = (chunked.residual.float() + 2.0 * chunked.B @ chunked.A - W32).double()  # (out, in)
    assert chunked.info["recon_max_abs_err"] == pytest.approx(error.abs().max().item(), rel=1e-4, abs=1e-7)
    assert chunked.info["recon_rel_fro_err"] == pytest.approx((error.norm() / W32.double().norm()).item(),
                                                              rel=1e-3, abs=1e-9)
    assert chunked.info["residual_fro"] == pytest.approx(chunked.residual.double().norm().item(), rel=1e-6)
    for key in ("recon_max_abs_err", "recon_rel_fro_err", "residual_fro"):
        assert chunked.info[key] == pytest.approx(whole.info[key], rel=1e-6, abs=1e-9)


def test_one_thread_restores_the_thread_count_and_skinny_matmul_is_a_product():
    from pissa.decompose.linalg import one_thread, skinny_matmul

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(50, 30, generator=g), torch.randn(50, 4, generator=g)
    torch.testing.assert_close(skinny_matmul(W.mT, X), W.T.contiguous() @ X, atol=1e-5, rtol=0)
    torch.testing.assert_close(skinny_matmul(W, X[:30]), W @ X[:30], atol=0, rtol=0)


@pytest.mark.integration
def test_the_costs_pissa_methods_prints_are_what_decompose_gives(smollm2_dir):
    """`pissa methods` quotes each --niter's residual excess on SmolLM2's layers (r = 16): recompute it."""
    import math

    from pissa.cli.methods import DEPTHS
    from pissa.io.reader import CheckpointReader

    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj")
    names = [f"model.layers.{b}.{p}.weight" for b in (0, 10, 20, 29) for p in projections]
    Ws = {n: W.float() for n, W in CheckpointReader(smollm2_dir).read(names).items()}
    floor = math.sqrt(sum(truncated_residual_norm(W.double(), 16).item() ** 2 for W in Ws.values()))
    for setting, _, quoted, *_ in DEPTHS[:3]:
        niter = int(setting.split()[-1])
        total = math.sqrt(sum(decompose(W, "pissa", 16, options={"niter": niter}, seed=0).residual.double().norm()
                              .item() ** 2 for W in Ws.values()))
        assert (total / floor - 1) * 100 == pytest.approx(quoted, rel=2e-2, abs=2e-4), setting
