"""PiSSA on the fused 3-D expert tensors of transformers 5 MoE models (Qwen3-MoE, Mixtral, Qwen2-MoE with a
shared expert), built tiny from configs: the output is unchanged at init, each expert's adapter is its own
top-r SVD part, stock PEFT loads the pair, streaming equals the in-memory path, and convert, merge, eval and
analyze reproduce what PEFT itself computes."""

from __future__ import annotations

import json
import re

import pytest
import torch

from helpers import MOE_FAMILIES, build_tiny_moe, load_with_adapter, logits, tensors, train_pissa, without_timing
from pissa.convert import convert_to_lora, merge_adapter
from pissa.errors import PissaError
from pissa.init import PissaConfig, init_model, run_init
from pissa.layout import ExpertLayout

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = PissaConfig(rank=4, alpha=8, seed=3)


@pytest.fixture
def moe_tokens():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """family -> a saved tiny MoE folder (per-expert checkpoint tensors, as save_pretrained writes them)."""
    root = tmp_path_factory.mktemp("moe")
    dirs = {}
    for family in MOE_FAMILIES:
        build_tiny_moe(family).save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


def expert_wrappers(peft_model):
    from peft.tuners.lora.layer import ParamWrapper

    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, ParamWrapper)}


# --- in memory ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_logits_unchanged_and_every_expert_adapted(family, moe_tokens):
    model = build_tiny_moe(family)
    expected = logits(model, moe_tokens)
    peft_model, report = init_model(model, CONFIG)
    torch.testing.assert_close(logits(peft_model, moe_tokens), expected, atol=2e-5, rtol=0)
    wrappers = expert_wrappers(peft_model)
    assert {w.parameter_name for w in wrappers.values()} == {"gate_up_proj", "down_proj"} and len(wrappers) == 4
    for name, w in wrappers.items():  # gate and up at rank 4 each: the fused adapter has rank 8 per expert
        assert w.r["default"] == (8 if w.parameter_name == "gate_up_proj" else 4) and w.scaling["default"] == 2.0
        assert report[name]["kind"] == "experts" and report[name]["num_experts"] == 4
    routers = [n for n, m in peft_model.base_model.model.named_modules() if n.endswith(("mlp.gate", "expert_gate"))]
    assert routers and not any(hasattr(peft_model.base_model.model.get_submodule(n), "lora_A") for n in routers)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_each_expert_update_is_its_own_top_r_svd_part(family):
    model = build_tiny_moe(family)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 3}
    peft_model, _ = init_model(model, CONFIG)
    for name, w in expert_wrappers(peft_model).items():
        W0, E, k = original[f"{re.sub(r'(.base_layer)+$', '', name)}.{w.parameter_name}"], w.num_experts, 4
        A, B = ExpertLayout.unpack(w.lora_A["default"].weight, w.lora_B["default"].weight, E)  # (E, R, in), (E, out, R)
        parts = 2 if w.parameter_name == "gate_up_proj" else 1
        size = W0.shape[1] // parts
        for e in range(E):
            for p in range(parts):
                rows, cols = slice(p * size, (p + 1) * size), slice(p * k, (p + 1) * k)
                U, S, Vh = torch.linalg.svd(W0[e, rows].double(), full_matrices=False)
                top = U[:, :k] * S[:k] @ Vh[:k]  # (out/parts, in): this expert's own top-k part
                delta = w.scaling["default"] * B[e, rows, cols].double() @ A[e, cols].double()
                torch.testing.assert_close(delta, top, atol=1e-5, rtol=0)
                torch.testing.assert_close(w.get_param()[e, rows].double(), W0[e, rows].double() - top, atol=1e-5,
                                           rtol=0)
                other = slice(0, p * k) if p else slice(k * parts, None)  # B is block-diagonal: gate rows, up cols
                assert not B[e, rows, other].any()


def test_rank_pattern_and_rslora_keep_each_matrix_rank_and_scale(moe_tokens):
    model = build_tiny_moe("qwen3_moe")
    expected = logits(model, moe_tokens)
    config = PissaConfig(rank=4, alpha=16, use_rslora=True, rank_pattern={"gate_up_proj": 2, "q_proj": 8})
    peft_model, _ = init_model(model, config)
    torch.testing.assert_close(logits(peft_model, moe_tokens), expected, atol=2e-5, rtol=0)
    for w in expert_wrappers(peft_model).values():
        rank = 2 if w.parameter_name == "gate_up_proj" else 4
        assert w.r["default"] == rank * (2 if w.parameter_name == "gate_up_proj" else 1)
        assert w.scaling["default"] == pytest.approx(16 / rank ** 0.5)  # what a dense layer of rank `rank` gets
    with pytest.raises(PissaError, match="gate_up_proj a pattern of its own"):
        init_model(build_tiny_moe("qwen3_moe"), PissaConfig(rank=4, rank_pattern={r"layers\.1\..*": 2}))


# --- stock artefacts and streaming --------------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_stock_peft_loads_the_streamed_pair(family, moe_dirs, tmp_path, moe_tokens, stock_logits):
    out = run_init(str(moe_dirs[family]), CONFIG, tmp_path / "out").out
    expected = logits(build_tiny_moe(family), moe_tokens)
    torch.testing.assert_close(stock_logits(out / "residual", out / "adapter", moe_tokens), expected, atol=2e-5,
                               rtol=0)
    assert (stock_logits(out / "residual", None, moe_tokens) - expected).abs().max() > 1e-3
    residual, source = tensors(out / "residual"), tensors(moe_dirs[family])
    assert sorted(residual) == sorted(source)  # the checkpoint's own per-expert keys
    expert_keys = [k for k in source if ".experts.0." in k]
    assert expert_keys and all(not torch.equal(residual[k], source[k]) for k in expert_keys)
    gates = [k for k in source if k.endswith(("mlp.gate.weight", "moe.gate.weight", "expert_gate.weight"))]
    assert gates and all(torch.equal(residual[k], source[k]) for k in gates)  # routers untouched


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_equals_in_memory(family, tmp_path):
    src = tmp_path / "src"
    experts = {"qwen3_moe": {"num_experts": 12}, "mixtral": {"num_local_experts": 12}}.get(family, {})
    build_tiny_moe(family, **experts).save_pretrained(src, max_shard_size="60KB")  # experts 10, 11: numeric order
    assert len(list(src.glob("*.safetensors"))) > 2
    config = PissaConfig(rank=4, alpha=8, options={"niter": 2}, seed=5)
    streamed = run_init(str(src), config, tmp_path / "s")
    memory = run_init(str(src), config, tmp_path / "m", stream=False)
    assert "stream" in streamed.manifest and "stream" not in memory.manifest
    for part in ("residual", "adapter"):
        a, b = tensors(tmp_path / "s" / part), tensors(tmp_path / "m" / part)
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert without_timing(streamed.manifest["layers"]) == without_timing(memory.manifest["layers"])
    assert streamed.manifest["coverage"] == memory.manifest["coverage"]
    assert streamed.trainable_params == memory.trainable_params
    configs = [json.loads((tmp_path / d / "adapter/adapter_config.json").read_text()) for d in "sm"]
    for c in configs:
        c.pop("base_model_name_or_path")
        c["target_modules"], c["target_parameters"] = sorted(c["target_modules"]), sorted(c["target_parameters"])
    assert configs[0] == configs[1]


def test_fused_checkpoint_streams_one_expert_at_a_time(tmp_path, moe_tokens, stock_logits):
    model = build_tiny_moe("qwen3_moe")
    model.save_pretrained(tmp_path / "fused", save_original_format=False)  # the live (E, 2I, H) tensors on disk
    model.save_pretrained(tmp_path / "per-expert")
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors(tmp_path / "fused")
    run_init(str(tmp_path / "fused"), CONFIG, tmp_path / "a")
    run_init(str(tmp_path / "per-expert"), CONFIG, tmp_path / "b")
    a, b = tensors(tmp_path / "a/adapter"), tensors(tmp_path / "b/adapter")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors(tmp_path / "a/residual")  # kept fused, as given
    torch.testing.assert_close(stock_logits(tmp_path / "a/residual", tmp_path / "a/adapter", moe_tokens),
                               logits(model, moe_tokens), atol=2e-5, rtol=0)


# --- coverage and refusals -------------------------------------------------------------------------------

def test_coverage_counts_matrix_weights_and_warns(moe_dirs, tmp_path):
    full = run_init(str(moe_dirs["qwen2_moe"]), CONFIG, tmp_path / "full").manifest["coverage"]
    model = build_tiny_moe("qwen2_moe")
    total = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    routers = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("mlp.gate.weight", "gate.weight")))
    embeds = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert full["matrix_params"] == total and full["adapted_params"] == total - routers - embeds
    assert full["warning"] is None and "gate (router)" in full["untouched"]
    assert {why for why in full["left_out"].values()} == {"router (never a default target)"}
    attention = run_init(str(moe_dirs["qwen2_moe"]), PissaConfig(rank=4, targets=["q_proj", "v_proj"]),
                         tmp_path / "attn").manifest["coverage"]
    assert attention["share"] < 0.5 and "experts.gate_up_proj" in attention["warning"]


def test_peft_rewritten_dense_mlp_is_left_out_by_default_and_refused_when_named(tmp_path, moe_tokens):
    model = build_tiny_moe("qwen3_moe", mlp_only_layers=[0])  # layer 0 has a dense gate/up/down_proj MLP
    model.save_pretrained(tmp_path / "src")
    result = run_init(str(tmp_path / "src"), CONFIG, tmp_path / "out")
    left_out = result.manifest["coverage"]["left_out"]
    assert {"gate_proj", "up_proj", "down_proj"} <= set(left_out) and "peft#3711" in left_out["gate_proj"]
    assert "gate_proj" in result.manifest["coverage"]["untouched"]
    reloaded = load_with_adapter(tmp_path / "out/residual", tmp_path / "out/adapter")
    torch.testing.assert_close(logits(reloaded, moe_tokens), logits(model, moe_tokens), atol=2e-5, rtol=0)
    with pytest.raises(PissaError, match="peft#3711"):
        run_init(str(tmp_path / "src"), PissaConfig(rank=4, targets=["q_proj", "gate_proj", "up_proj"]),
                 tmp_path / "named")
    assert not (tmp_path / "named").exists()


@pytest.mark.parametrize("config, match", [
    (PissaConfig(rank=4, quantize="nf4"), "does not quantize fused expert tensors"),
    (PissaConfig(rank=4, dropout=0.1), "dropout"),
    (PissaConfig(rank=4, targets=["experts"]), "container"),
    (PissaConfig(rank=4, rank_pattern={"down_proj": 25}), "rank 25 exceeds min\\(out, in\\) = 24 of each expert"),
])
def test_refused_before_any_output(config, match, moe_dirs, tmp_path):
    for stream in (None, False):
        with pytest.raises(PissaError, match=match):
            run_init(str(moe_dirs["mixtral"]), config, tmp_path / "out", stream=stream)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_named_expert_tensors_and_regex(moe_dirs, tmp_path, moe_tokens):
    only_down = run_init(str(moe_dirs["mixtral"]), PissaConfig(rank=4, targets=["experts.down_proj"]),
                         tmp_path / "down")
    assert [i["parameter"] for i in only_down.manifest["layers"].values()] == \
        ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    regex = run_init(str(moe_dirs["mixtral"]), PissaConfig(rank=4, targets=r".*layers\.1\..*(experts.*|q_proj)"),
                     tmp_path / "regex")
    assert sorted(regex.manifest["layers"]) == ["model.layers.1.mlp.experts", "model.layers.1.mlp.experts.base_layer",
                                                "model.layers.1.self_attn.q_proj"]
    for out in ("down", "regex"):
        reloaded = load_with_adapter(tmp_path / out / "residual", tmp_path / out / "adapter")
        torch.testing.assert_close(logits(reloaded, moe_tokens), logits(build_tiny_moe("mixtral"), moe_tokens),
                                   atol=2e-5, rtol=0)


# --- convert, merge ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_runs(moe_dirs, tmp_path_factory):
    """family -> (init folder, trained adapter, trained model) after real AdamW steps on residual + adapter."""
    runs = {}
    for family in ("qwen3_moe", "mixtral"):
        root = tmp_path_factory.mktemp(f"trained-{family}")
        run_init(str(moe_dirs[family]), PissaConfig(rank=4, alpha=8), root / "init")
        runs[family] = (root / "init", root / "trained", train_pissa(root / "init", root / "trained", steps=4))
    return runs


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_converted_lora_on_the_original_equals_the_trained_model(family, trained_runs, moe_dirs, tmp_path,
                                                                  moe_tokens):
    init, trained_dir, trained = trained_runs[family]
    expected = logits(trained, moe_tokens)
    assert (expected - logits(build_tiny_moe(family), moe_tokens)).abs().max() > 1e-2  # training moved it
    result = convert_to_lora(trained_dir, init, tmp_path / "lora")
    config = json.loads((tmp_path / "lora/adapter_config.json").read_text())
    assert config["rank_pattern"] == {"gate_up_proj": 16} and config["r"] == 8  # 2r per matrix, 4r for gate+up
    torch.testing.assert_close(logits(load_with_adapter(moe_dirs[family], tmp_path / "lora"), moe_tokens), expected,
                               atol=3e-5, rtol=0)
    experts = [m for m in result.layers if m.endswith("experts") or m.endswith("base_layer")]
    assert experts and all(result.layers[m]["rank_out"] == 2 * result.layers[m]["rank_in"] for m in experts)


def test_compression_truncates_each_expert_to_its_best_rank_k(trained_runs, moe_dirs, tmp_path, moe_tokens):
    init, trained_dir, trained = trained_runs["qwen3_moe"]
    exact = convert_to_lora(trained_dir, init, tmp_path / "exact")
    compressed = convert_to_lora(trained_dir, init, tmp_path / "k3", rank=3)
    config = json.loads((tmp_path / "k3/adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] == {"gate_up_proj": 6}  # gate and up: 3 each
    full, small = tensors(tmp_path / "exact"), tensors(tmp_path / "k3")
    module = "base_model.model.model.layers.0.mlp.experts.base_layer"  # gate_up_proj
    s_exact = exact.config["lora_alpha"] / exact.config["r"]  # gate_up: 4r and alpha 2·(2·alpha), same scale
    A2, B2 = ExpertLayout.unpack(full[f"{module}.lora_A.weight"], full[f"{module}.lora_B.weight"], 4)
    A, B = ExpertLayout.unpack(small[f"{module}.lora_A.weight"], small[f"{module}.lora_B.weight"], 4)
    for e in range(4):
        delta = s_exact * B2[e].double() @ A2[e].double()
        U, S, Vh = torch.linalg.svd(delta)
        torch.testing.assert_close(B[e].double() @ A[e].double(), U[:, :6] * S[:6] @ Vh[:6], atol=1e-5, rtol=0)
    assert 0 < compressed.layers["model.layers.0.mlp.experts.base_layer"]["rel_err"] < 1
    reloaded = logits(load_with_adapter(moe_dirs["qwen3_moe"], tmp_path / "k3"), moe_tokens)
    assert (reloaded - logits(trained, moe_tokens)).abs().max() < (
        logits(build_tiny_moe("qwen3_moe"), moe_tokens) - logits(trained, moe_tokens)).abs().max()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_merge_equals_peft_merge_and_unload(family, trained_runs, moe_dirs, tmp_path, moe_tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    init, trained_dir, trained = trained_runs[family]
    convert_to_lora(trained_dir, init, tmp_path / "lora")
    merge_adapter(tmp_path / "lora", moe_dirs[family], tmp_path / "merged")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_dirs[family]),
                                    tmp_path / "lora").merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ours, theirs = merged.state_dict(), ref.state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0)
    assert sorted(tensors(tmp_path / "merged")) == sorted(tensors(moe_dirs[family]))  # per-expert keys kept
    merge_adapter(trained_dir, init, tmp_path / "merged-residual")  # the residual + the trained PiSSA adapter
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged-residual"), moe_tokens),
                               logits(trained, moe_tokens), atol=3e-5, rtol=0)


# --- train, eval, analyze ---------------------------------------------------------------------------------

def test_train_on_the_fly_converts_at_end(tmp_path, data_file, moe_tokens):
    from helpers import char_tokenizer, train_config
    from pissa.eval.run import check_adapter_fits, load_target, resolve_target
    from pissa.train import SFTRecipe

    src = tmp_path / "model"
    build_tiny_moe("qwen2_moe").save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    config = train_config(tmp_path, src, data_file, rank=4, max_steps=3, lr=1e-2, convert_at_end=True)
    summary = SFTRecipe(config).run()
    run = tmp_path / "run"
    assert summary["steps"] == 3 and (run / "lora").is_dir() and (run / "init/pissa.json").exists()
    trained, _ = load_target(resolve_target(str(run)))  # pissa eval's loader: residual + trained adapter
    original = logits(build_tiny_moe("qwen2_moe"), moe_tokens)
    assert (logits(trained, moe_tokens) - original).abs().max() > 1e-3
    torch.testing.assert_close(logits(load_with_adapter(src, run / "lora"), moe_tokens), logits(trained, moe_tokens),
                               atol=3e-5, rtol=0)
    other = build_tiny_moe("qwen2_moe", moe_intermediate_size=16)  # same names, other expert shapes
    with pytest.raises(PissaError, match="do not fit"):
        check_adapter_fits(other, run / "lora", "other")


def test_analyze_an_expert_matrix():
    from pissa.report.analyze import AnalyzeConfig, analyze_model

    layer = "model.layers.0.mlp.experts.1.up_proj"
    model = build_tiny_moe("qwen3_moe")
    up = model.model.layers[0].mlp.experts.gate_up_proj[1, 24:].detach()  # expert 1's up rows (I = 24)
    analysis = analyze_model(model, None, AnalyzeConfig(rank=4, layers=[layer], seeds=2, max_experts=2))
    assert analysis.gradient_layer == layer and set(analysis.spectra) == {layer}
    torch.testing.assert_close(analysis.spectra[layer]["s"], torch.linalg.svdvals(up))
    torch.testing.assert_close(analysis.spectra[layer]["s_res"][:20], torch.linalg.svdvals(up)[4:], atol=1e-5,
                               rtol=0)
    assert {"experts.gate_proj", "experts.up_proj", "experts.down_proj", "q_proj"} <= set(analysis.distributions)
    lora, pissa = analysis.gradients["LoRA"], analysis.gradients["PiSSA"]
    assert lora["A"]["max_abs"] == 0.0 and pissa["A"]["max_diff_vs_seed0"] == 0.0 and min(pissa["A"]["norms"]) > 0


def test_batched_experts_equal_one_at_a_time(monkeypatch, moe_dirs, tmp_path, moe_tokens):
    """The batched paths (in memory on a GPU; streaming with --batch-same-shape or --device cuda), run on the CPU."""
    from pissa.init import expert_layers

    config = PissaConfig(rank=4, options={"niter": 2}, seed=1)
    single, _ = init_model(build_tiny_moe("mixtral"), config)
    monkeypatch.setattr(expert_layers, "batched", lambda device: True)
    batch, _ = init_model(build_tiny_moe("mixtral"), config)
    for (name, a), (_, b) in zip(single.named_parameters(), batch.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    run_init(str(moe_dirs["mixtral"]), config, tmp_path / "one")
    run_init(str(moe_dirs["mixtral"]), config, tmp_path / "batched", batch=True)
    a, b = tensors(tmp_path / "one/adapter"), tensors(tmp_path / "batched/adapter")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


def test_cli_init_summary_tells_experts_coverage_and_routers(moe_dirs, tmp_path):
    from typer.testing import CliRunner

    from pissa.cli import app

    result = CliRunner().invoke(app, ["init", str(moe_dirs["qwen2_moe"]), "--rank", "4", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    for label in ("expert tensors", "coverage", "not targeted"):  # row labels (values wrap with the terminal)
        assert label in result.output
    assert "WARNING" not in result.output
    narrow = CliRunner().invoke(app, ["init", str(moe_dirs["qwen2_moe"]), "--targets", "q_proj", "--out",
                                      str(tmp_path / "q")])
    assert narrow.exit_code == 0 and "WARNING" in narrow.output and "expert tensors" not in narrow.output


def test_train_from_an_moe_init(moe_dirs, tmp_path, data_file):
    from helpers import char_tokenizer, train_config
    from pissa.train import SFTRecipe

    src = tmp_path / "model"
    build_tiny_moe("mixtral").save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    run_init(str(src), PissaConfig(rank=4), tmp_path / "init")
    with pytest.raises(PissaError, match="no DoRA for them"):
        SFTRecipe(train_config(tmp_path, src, data_file, name="dora", model=None, init=str(tmp_path / "init"),
                               dora=True, max_steps=1)).run()
    summary = SFTRecipe(train_config(tmp_path, src, data_file, model=None, init=str(tmp_path / "init"),
                                     max_steps=2)).run()
    adapter = tensors(tmp_path / "run/adapter")
    initial = tensors(tmp_path / "init/adapter")
    assert summary["steps"] == 2 and sorted(adapter) == sorted(initial)
    moved = [k for k in adapter if "experts" in k and not torch.equal(adapter[k], initial[k])]
    assert moved  # PEFT trained the expert adapters


def test_non_finite_expert_is_refused_before_anything_changes(tmp_path):
    model = build_tiny_moe("qwen3_moe")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 3, 4] = float("nan")
    with pytest.raises(PissaError, match=r"layers\.1\.mlp\.experts\.down_proj.*NaN"):
        init_model(model, CONFIG)
    assert type(model.model.layers[1].mlp.experts).__name__ == "Qwen3MoeExperts"  # not wrapped by PEFT
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(PissaError, match=r"layers\.1\.mlp\.experts\.down_proj\.2.*NaN"):
        run_init(str(tmp_path / "src"), CONFIG, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
