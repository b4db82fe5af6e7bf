"""The report's variants (CURA, Robust PiSSA) and PiSSA on Conv2d / Embedding layers: the same
identities as the foundation methods (reconstruction, unchanged outputs) plus each method's own
reference (CUR formula, l1 never worse than the SVD, the report's eq. 8 example)."""

import warnings

import pytest
import torch
from torch import nn

from pissa.decompose import DecompositionError, decompose
from pissa.decompose.cur import CUROptions, cur
from pissa.errors import PissaError
from pissa.init import PissaConfig, init_model

FAST_ROBUST = {"max_iter": 5}  # keeps model-level tests quick; the l1 tests use the defaults
FAST_HUBER = {"solver": "huber-gd", "max_iter": 100}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def l1(t: torch.Tensor) -> float:
    return t.abs().sum().item()


def outlier_matrix(seed: int, out: int = 48, inp: int = 40, rank: int = 3) -> torch.Tensor:
    """A rank-`rank` matrix plus sparse large outliers: where l1 and Frobenius fits differ."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)  # (out, in)
    mask = torch.rand(out, inp, generator=g) < 0.05
    return low + mask * torch.randn(out, inp, generator=g) * 20


# ---------------------------------------------------------------- CURA


def test_cur_is_the_cur_formula_and_reconstructs():
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    f = decompose(W, "cur", 6, scale=2.0, seed=3)
    torch.testing.assert_close(f.residual + 2.0 * f.B @ f.A, W, atol=1e-5, rtol=0)
    I, J = f.info["rows"], f.info["cols"]  # rank 6 <= 8, so these are all the sampled indices
    reference = W[:, J] @ torch.linalg.pinv(W[I][:, J]) @ W[I, :]  # C U R, report section 4
    torch.testing.assert_close(2.0 * f.B @ f.A, reference, atol=1e-4, rtol=1e-4)
    # A = the sampled rows of W themselves (the report's A = C, in PEFT orientation), up to sqrt(scale)
    torch.testing.assert_close(f.A * 2.0**0.5, W[I, :])


@pytest.mark.parametrize("core", ["intersection", "projection"])
def test_cur_recovers_an_exactly_low_rank_matrix(core):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(50, 5, generator=g) @ torch.randn(5, 35, generator=g)  # rank 5
    f = decompose(W, "cur", 5, options={"core": core}, seed=0)
    assert f.residual.abs().max() < 1e-3 * W.abs().max()


def test_cur_samples_rows_proportionally_to_squared_norms():
    norms = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])  # squared norms 16, 4, 1, 1, 0 -> p = 16/22, ...
    W = norms[:, None] * torch.eye(5, 6)[:, :6]  # (5, 6), row i has norm norms[i]
    counts = torch.zeros(5)
    for seed in range(1500):
        counts[decompose(W, "cur", 1, seed=seed).info["rows"][0]] += 1
    expected = norms.pow(2) / norms.pow(2).sum()
    assert counts[4] == 0  # a zero row is never drawn while nonzero rows remain
    torch.testing.assert_close(counts / counts.sum(), expected, atol=0.04, rtol=0)


def test_cur_without_replacement_and_seeded():
    W = torch.randn(30, 20, generator=torch.Generator().manual_seed(2))
    W[5:] = 0  # only 5 nonzero rows: rank 8 still needs 8 distinct rows
    f = decompose(W, "cur", 8, seed=7)
    assert len(set(f.info["rows"])) == 8 and len(set(f.info["cols"])) == 8
    assert set(range(5)) <= set(f.info["rows"])  # every nonzero row comes before any zero row
    again = decompose(W, "cur", 8, seed=7)
    assert torch.equal(f.A, again.A) and torch.equal(f.B, again.B)
    assert decompose(W, "cur", 8, seed=8).info["cols"] != f.info["cols"]


def test_cur_balance_keeps_the_product():
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    plain = decompose(W, "cur", 6, seed=1)
    bal = decompose(W, "cur", 6, seed=1, options={"balance": True})
    torch.testing.assert_close(bal.B @ bal.A, plain.B @ plain.A, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bal.B.T @ bal.B, bal.A @ bal.A.T, atol=1e-4, rtol=1e-4)  # equal norms


def test_cur_rank_beyond_rows_or_columns_is_refused():
    W = torch.randn(10, 4)
    with pytest.raises(DecompositionError, match="rank 5 exceeds min"):
        decompose(W, "cur", 5, name="layer.weight")
    with pytest.raises(DecompositionError, match="distinct rows and columns.*lower --rank"):
        cur(W, 5, CUROptions(), torch.Generator())
    with pytest.raises(DecompositionError, match="core"):
        decompose(W, "cur", 2, options={"core": "svd"})


# ---------------------------------------------------------------- Robust PiSSA

REPORT_EQ8 = torch.tensor([[3.0, 0, 0], [0, 1, 1], [0, 1, 1]])


@pytest.mark.parametrize("solver", ["irls", "huber-gd"])
def test_robust_on_the_reports_example(solver):
    svd = decompose(REPORT_EQ8, "pissa", 1)
    assert l1(svd.residual) == pytest.approx(4.0, abs=1e-5)  # the report's ||A - A^F||_1 = 4
    f = decompose(REPORT_EQ8, "robust", 1, options={"solver": solver})
    assert l1(f.residual) <= 3.0 + 1e-5  # the report's l1-better rank-1 fit B has error 3
    torch.testing.assert_close(f.residual + f.B @ f.A, REPORT_EQ8, atol=1e-6, rtol=0)
    assert torch.linalg.matrix_rank(f.B @ f.A) == 1


def test_robust_default_solver_gets_exactly_three_and_svd_start_alone_is_stuck():
    assert l1(decompose(REPORT_EQ8, "robust", 1).residual) <= 3.0
    stuck = decompose(REPORT_EQ8, "robust", 1, options={"shifted_starts": 0, "clip": 0})
    assert "no start improved" in stuck.info["fallback"]  # the SVD is a stationary point of l1 here
    assert l1(stuck.residual) == pytest.approx(4.0, abs=1e-5)


@pytest.mark.parametrize("options", [{"solver": "irls"}, FAST_HUBER], ids=["irls", "huber-gd"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_l1_never_worse_than_svd(options, seed):
    W = outlier_matrix(seed)
    svd = decompose(W, "pissa", 3)
    f = decompose(W, "robust", 3, scale=0.5, options=options)
    assert l1(f.residual) <= l1(svd.residual) * (1 + 1e-6)
    assert f.info["l1"] <= f.info["svd_l1"]
    torch.testing.assert_close(f.residual + 0.5 * f.B @ f.A, W, atol=1e-4, rtol=0)


@pytest.mark.parametrize("solver", ["irls", "huber-gd"])
def test_robust_sees_through_outliers(solver):
    """On low rank + sparse outliers the l1 fit recovers the low-rank part; the SVD chases the outliers."""
    g = torch.Generator().manual_seed(4)
    low = torch.randn(60, 3, generator=g) @ torch.randn(3, 50, generator=g)  # (60, 50), rank 3
    outliers = (torch.rand(60, 50, generator=g) < 0.03) * torch.randn(60, 50, generator=g) * 30
    W = low + outliers
    svd = decompose(W, "pissa", 3)
    f = decompose(W, "robust", 3, options={"solver": solver})
    err_robust = (f.B @ f.A - low).norm() / low.norm()
    err_svd = (svd.B @ svd.A - low).norm() / low.norm()
    assert err_svd > 1.0 and err_robust < 1e-2  # the SVD's top triplets are outliers, the l1 fit's are not
    assert l1(f.residual) <= 1.01 * l1(outliers)  # l1 error ~ the outliers' own mass: the optimum


def test_robust_l1_never_worse_than_svd_on_model_layers(tiny_llama):
    for name, p in tiny_llama.named_parameters():
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            W = p.detach()
            svd, f = decompose(W, "pissa", 4), decompose(W, "robust", 4, options={"max_iter": 30})
            assert l1(f.residual) <= l1(svd.residual) * (1 + 1e-6), name


def test_robust_divergence_falls_back_to_svd_and_says_so():
    W = outlier_matrix(5)
    svd = decompose(W, "pissa", 3)
    with pytest.warns(UserWarning, match="diverged.*fell back to the truncated SVD"):
        f = decompose(W, "robust", 3, options={"solver": "huber-gd", "lr": 1e4, "max_iter": 20, "clip": 0})
    assert "diverged" in f.info["fallback"] and f.info["diverged_starts"]
    torch.testing.assert_close(f.B @ f.A, svd.B @ svd.A, atol=1e-5, rtol=0)


def test_robust_stopping_rule():
    W = outlier_matrix(6)
    one_start = {"solver": "irls", "shifted_starts": 0, "clip": 0}
    f = decompose(W, "robust", 3, options={"max_iter": 2, **one_start})
    assert f.info["iterations"] <= 2
    loose = decompose(W, "robust", 3, options={"tol": 0.5, **one_start})
    assert loose.info["iterations"] < 30  # a 50% tolerance stops before max_iter


def test_robust_options_are_typed_and_checked():
    with pytest.raises(DecompositionError, match="solver"):
        decompose(REPORT_EQ8, "robust", 1, options={"solver": "sketch"})
    with pytest.raises(DecompositionError, match="max_iter"):
        decompose(REPORT_EQ8, "robust", 1, options={"max_iter": 0})
    with pytest.raises(DecompositionError, match="no option"):
        decompose(REPORT_EQ8, "robust", 1, options={"niter": 4})


def test_robust_is_deterministic():
    W = outlier_matrix(7)
    a, b = decompose(W, "robust", 3, options=FAST_HUBER), decompose(W, "robust", 3, options=FAST_HUBER)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


# ---------------------------------------------------------------- on a model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("method,options", [("cur", {}), ("cur", {"core": "projection", "balance": True}),
                                            ("robust", FAST_ROBUST), ("robust", {**FAST_ROBUST, "solver": "huber-gd"})])
def test_new_methods_leave_logits_unchanged(method, options, tiny_llama, tokens):
    before = logits(tiny_llama, tokens)
    original = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    peft_model, report = init_model(tiny_llama, PissaConfig(rank=4, alpha=8, method=method, options=options))
    assert len(report) == 14
    torch.testing.assert_close(logits(peft_model, tokens), before, atol=2e-5, rtol=0)
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            B, A = module.lora_B["default"].weight, module.lora_A["default"].weight
            assert B.abs().max() > 0 and A.abs().max() > 0  # the adapter holds part of W
            rebuilt = module.get_base_layer().weight + module.scaling["default"] * B @ A
            torch.testing.assert_close(rebuilt, original[f"{name}.weight"], atol=1e-5, rtol=0)


def test_cli_init_with_cur_and_robust(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from pissa.cli import app

    for method, extra in (("cur", ["--option", "core=projection"]), ("robust", ["--option", "max_iter=3"])):
        out = tmp_path / method
        result = CliRunner().invoke(app, ["init", str(tiny_llama_dir), "--rank", "4", "--method", method,
                                          "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert (out / "adapter").is_dir() and (out / "residual").is_dir()
    bad = CliRunner().invoke(app, ["init", str(tiny_llama_dir), "--rank", "4", "--method", "robust",
                                   "--option", "solver=sketch", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "solver" in bad.output
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- Conv2d and Embedding


class SmallCNN(nn.Module):
    def __init__(self, groups: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, (3, 5), stride=2, padding=(1, 2), groups=groups, dilation=dilation)
        self.conv3 = nn.Conv2d(16, 12, 1)  # 1x1: PEFT's special case
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(self.conv3(h)).flatten(1))


@pytest.mark.parametrize("method", ["pissa", "cur", "robust"])
def test_conv2d_init_leaves_outputs_unchanged(method):
    torch.manual_seed(0)
    cnn = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    kernels = {n: cnn.get_submodule(n).weight.detach().clone() for n in ("conv1", "conv2", "conv3")}
    with torch.no_grad():
        before = cnn(x)
    options = FAST_ROBUST if method == "robust" else {}
    peft_model, report = init_model(cnn, PissaConfig(rank=4, alpha=8, method=method, options=options,
                                                     targets=["conv1", "conv2", "conv3", "fc"]))
    assert set(report) == {"conv1", "conv2", "conv3", "fc"}
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), before, atol=1e-5, rtol=0)
        layer = peft_model.base_model.model.conv2
        with peft_model.disable_adapter():  # the residual alone is a different network
            assert (peft_model(x) - before).abs().max() > 1e-3
        # PEFT's own delta (its conv merge path) + residual == the original kernel
        rebuilt = layer.get_base_layer().weight + layer.get_delta_weight("default")
        torch.testing.assert_close(rebuilt, kernels["conv2"], atol=1e-5, rtol=0)
    assert layer.lora_A["default"].weight.shape == (4, 8, 3, 5)
    assert layer.lora_B["default"].weight.shape == (16, 4, 1, 1)


def test_conv2d_pissa_adapter_is_the_top_svd_of_the_unfolded_kernel():
    torch.manual_seed(1)
    cnn = SmallCNN().eval()
    W = cnn.conv2.weight.detach().flatten(1).clone()  # (16, 8*3*5)
    peft_model, _ = init_model(cnn, PissaConfig(rank=4, targets=["conv2"]))
    layer = peft_model.base_model.model.conv2
    BA = layer.lora_B["default"].weight.flatten(1) @ layer.lora_A["default"].weight.flatten(1)  # (16, 120)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(BA, (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,flag", [({"groups": 2}, "groups=2"), ({"dilation": 2}, "dilation")])
def test_unsupported_conv2d_is_refused(kwargs, flag):
    cnn = SmallCNN(**kwargs)
    with pytest.raises(PissaError, match=f"conv2: Conv2d with {flag}.*leave this layer out"):
        init_model(cnn, PissaConfig(rank=4, targets=["conv2"]))
    assert not any("lora" in n for n, _ in cnn.named_modules())  # refused before wrapping


@pytest.mark.parametrize("method", ["pissa", "cur", "robust"])
def test_embedding_init_leaves_logits_unchanged(method, tiny_llama, tokens):
    W = tiny_llama.model.embed_tokens.weight.detach().clone()  # (256, 64)
    before = logits(tiny_llama, tokens)
    options = FAST_ROBUST if method == "robust" else {}
    peft_model, report = init_model(tiny_llama, PissaConfig(rank=8, method=method, options=options,
                                                            targets=["embed_tokens", "q_proj"]))
    assert "model.embed_tokens" in report
    torch.testing.assert_close(logits(peft_model, tokens), before, atol=1e-5, rtol=0)
    emb = peft_model.base_model.model.model.embed_tokens
    assert emb.lora_embedding_A["default"].shape == (8, 256) and emb.lora_embedding_B["default"].shape == (64, 8)
    torch.testing.assert_close(emb.get_base_layer().weight + emb.get_delta_weight("default"), W, atol=1e-5, rtol=0)
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(tokens).logits - before).abs().max() > 1e-3
    if method == "pissa":  # the adapter is the top-8 SVD of W (num, dim)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(emb.get_delta_weight("default"), (U[:, :8] * S[:8]) @ Vh[:8], atol=1e-5, rtol=0)


def test_tied_embedding_is_refused(make_tiny_llama):
    model = make_tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(PissaError, match="embed_tokens.*tied to the output head"):
        init_model(model, PissaConfig(rank=4, targets=["embed_tokens"]))


def test_no_warnings_from_a_converging_robust_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decompose(outlier_matrix(8), "robust", 3)


def test_conv2d_pissa_converts_to_lora_on_the_original_cnn(tmp_path):
    """After real AdamW steps, original CNN + converted 2r conv LoRA == residual CNN + trained PiSSA adapter."""
    import copy

    from peft import PeftModel

    from pissa.convert import convert_to_lora
    from pissa.io.manifest import build_manifest, write_manifest

    torch.manual_seed(0)
    original = SmallCNN().eval()
    config = PissaConfig(rank=4, alpha=8, targets=["conv1", "conv2", "conv3", "fc"])
    peft_model, report = init_model(copy.deepcopy(original), config)  # the copy's kernels become the residual
    peft_model.save_pretrained(tmp_path / "init" / "adapter")  # the initial A, B, as `pissa init` writes them
    write_manifest(tmp_path / "init", build_manifest(source="SmallCNN", config=config.to_dict(), layers=report))
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 10)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        torch.nn.functional.mse_loss(peft_model(x), target).backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(tmp_path / "trained")
    convert_to_lora(tmp_path / "trained", tmp_path / "init", tmp_path / "lora")
    convert_to_lora(tmp_path / "trained", tmp_path / "init", tmp_path / "lora3", rank=3)
    compressed = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "lora3").eval()
    converted = PeftModel.from_pretrained(original, tmp_path / "lora").eval()
    assert converted.base_model.model.conv2.lora_A["default"].weight.shape == (8, 8, 3, 5)  # rank 2r
    with torch.no_grad():
        expected = peft_model.eval()(x)
        torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=0)
        with converted.disable_adapter():
            assert (converted(x) - expected).abs().max() > 1e-3
        # --rank 3: each kernel's ΔW is the best rank-3 approximation of the exact one (unfolded SVD)
        for name in ("conv1", "conv2", "conv3"):
            exact = converted.base_model.model.get_submodule(name).get_delta_weight("default").flatten(1).double()
            U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
            best = (U[:, :3] * S[:3]) @ Vh[:3]
            got = compressed.base_model.model.get_submodule(name).get_delta_weight("default").flatten(1).double()
            torch.testing.assert_close(got, best, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- conversion to LoRA (pissa.convert)


@pytest.mark.parametrize("method,options,targets", [
    ("cur", {}, None),
    ("robust", FAST_ROBUST, None),
    ("pissa", {}, ["embed_tokens", "q_proj", "v_proj"]),
], ids=["cur", "robust", "embedding"])
def test_new_methods_convert_to_lora(method, options, targets, tmp_path, tiny_llama_dir, tokens):
    """After real training steps, original model + converted 2r LoRA == residual + trained adapter."""
    from pissa.convert import convert_to_lora
    from test_convert import load_with_adapter, make_init, train_pissa

    init = make_init(tiny_llama_dir, tmp_path / "init", rank=4, method=method, options=options, targets=targets)
    trained = train_pissa(init, tmp_path / "trained")
    convert_to_lora(tmp_path / "trained", init, tmp_path / "lora")
    converted = load_with_adapter(tiny_llama_dir, tmp_path / "lora")
    torch.testing.assert_close(logits(converted, tokens), logits(trained, tokens), atol=1e-5, rtol=0)
    with torch.no_grad(), converted.disable_adapter():
        assert (converted(tokens).logits - logits(trained, tokens)).abs().max() > 1e-2
