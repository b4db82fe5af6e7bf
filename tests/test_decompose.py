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
    f = decompose(W, "pissa", rank, options={"niter": 4, "oversample": rank})
    excess = f.residual.norm() / exact - 1
    assert 0 <= excess < 0.01, excess


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
