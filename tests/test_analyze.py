"""`pissa analyze`: spectra against torch.linalg.svdvals, Gaussian fits against direct moments,
and the initial-gradient identities of appendix M (LoRA: grad A == 0; PiSSA: seed-independent)."""

import json

import pytest
import torch

from pissa.errors import PissaError
from pissa.init import linear_modules
from pissa.layout import kind_of
from pissa.report.analyze import (
    AnalyzeConfig,
    cosine_matrix,
    distributions,
    gaussian_fit,
    initial_gradients,
    select_layers,
    spectra,
)

LAYER = "model.layers.0.self_attn.q_proj"


def test_spectra_are_the_svd_and_the_residual_keeps_the_tail(tiny_llama):
    W = tiny_llama.get_submodule(LAYER).weight.detach()
    s = spectra({LAYER: W}, AnalyzeConfig(rank=8))[LAYER]
    ref = torch.linalg.svdvals(W)
    torch.testing.assert_close(s["s"], ref)
    # W_res = W minus its top-8 triplets: its spectrum is the tail of W's, then zeros
    torch.testing.assert_close(s["s_res"][: ref.numel() - 8], ref[8:], atol=1e-5, rtol=1e-4)
    assert s["s_res"][ref.numel() - 8:].abs().max() < 1e-4
    assert s["top_r_energy"] == pytest.approx((ref[:8].pow(2).sum() / ref.pow(2).sum()).item(), rel=1e-5)


def test_gaussian_fit_matches_moments():
    g = torch.Generator().manual_seed(0)
    normal = 0.5 + 2.0 * torch.randn(400_000, generator=g)
    fit = gaussian_fit(normal)
    assert fit["mu"] == pytest.approx(0.5, abs=0.02) and fit["sigma"] == pytest.approx(2.0, rel=0.01)
    assert abs(fit["excess_kurtosis"]) < 0.05
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((400_000,))
    assert gaussian_fit(laplace)["excess_kurtosis"] == pytest.approx(3.0, abs=0.2)  # Laplace: 3


def test_distributions_pool_each_layer_type(tiny_llama):
    weights = {n: kind_of(m).to_matrix(m.weight) for n, m in linear_modules(tiny_llama).items()}
    dist = distributions(weights, AnalyzeConfig(rank=8))
    assert set(dist) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # the tiny layers are below the sampling cap, so the fit is over every value of that type
    q = torch.cat([w.detach().flatten() for n, w in weights.items() if n.endswith("q_proj")]).double()
    assert dist["q_proj"]["W"]["mu"] == pytest.approx(q.mean().item(), abs=1e-9)
    assert dist["q_proj"]["W"]["sigma"] == pytest.approx(q.std().item(), rel=1e-6)
    for kind, d in dist.items():  # removing the principal part narrows the distribution (paper sec. 4)
        assert d["W_res"]["sigma"] < d["W"]["sigma"], kind


def test_cosine_matrix():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(cosine_matrix([a, b, -a, torch.zeros(2)]), torch.tensor(
        [[1.0, 0, -1, 0], [0, 1, 0, 0], [-1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float64))


def test_initial_gradients_lora_a_is_zero_and_pissa_is_seed_independent(tiny_llama):
    before = {n: p.clone() for n, p in tiny_llama.state_dict().items()}
    g = initial_gradients(tiny_llama, None, LAYER, AnalyzeConfig(rank=4, seeds=3, max_length=16))
    lora, pissa = g["LoRA"], g["PiSSA"]
    assert lora["A"]["max_abs"] == 0.0  # B = 0 at init, so dL/dA = B^T (...) = 0 exactly
    assert min(lora["B"]["norms"]) > 0
    assert lora["B"]["mean_cosine"] < 0.9  # B's gradient direction follows A's random init
    assert pissa["A"]["max_diff_vs_seed0"] == 0.0 and pissa["B"]["max_diff_vs_seed0"] == 0.0
    assert min(pissa["A"]["norms"]) > 0 and pissa["B"]["mean_cosine"] == pytest.approx(1.0)
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # the model itself is untouched


def test_select_layers():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    assert select_layers(names, ["layers.0.self_attn.q_proj"]) == names[:1]
    assert select_layers(names, [r".*\.q_proj"]) == names[:2]
    with pytest.raises(PissaError, match="--layer 'nope' matches no linear layer"):
        select_layers(names, ["nope"])


def test_cli_analyze(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from pissa.cli import app

    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["analyze", str(tiny_llama_dir), "--out", str(out), "--rank", "4",
                                      "--seeds", "2", "--layer", "layers.0.self_attn.q_proj",
                                      "--layer", "layers.1.mlp.down_proj"])
    assert result.exit_code == 0, result.output
    for name in ("spectra.png", "distributions.png", "analysis.md", "analysis.json"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "analysis.json").read_text())
    assert list(data["spectra"]) == [LAYER, "model.layers.1.mlp.down_proj"]
    assert data["gradients"]["LoRA"]["A"]["max_abs"] == 0.0
    assert "| q_proj |" in (out / "analysis.md").read_text()
    again = CliRunner().invoke(app, ["analyze", str(tiny_llama_dir), "--out", str(out)])
    assert again.exit_code == 2  # refuses to overwrite
    bad = CliRunner().invoke(app, ["analyze", str(tiny_llama_dir), "--out", str(tmp_path / "bad"), "--layer", "nope"])
    assert bad.exit_code == 2 and "matches no linear layer" in bad.output
    assert not (tmp_path / "bad").exists()
