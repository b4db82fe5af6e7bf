"""`pissa export`: the exported adapter, loaded by stock PEFT with its config read the way the engine reads it
(the global r and lora_alpha only), reproduces the merged model's logits; a PEFT-made rsLoRA + pattern adapter
exported at a rank from the allowed set keeps its outputs; vLLM's rank set is respected (padding exact,
compression = the best rank-k); what engines refuse or ignore is refused (DoRA, differing modules_to_save or
biases, TGI embeddings), what equals the base is left out; every adapter pissa writes loads without PEFT
recomputing anything; the CLI prints the serving command."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from helpers import assert_nothing_written, build_tiny_llama, load_auto, make_init, outputs, peft_pissa_run, train_pissa
from pissa.convert import ExportConfig, convert_to_lora, export_adapter, merge_adapter
from pissa.convert.engines import EXPORT_FIELDS, VLLM_RANKS
from pissa.convert.inputs import layer_scale
from pissa.errors import PissaError
from pissa.io.adapter_files import base_changing_init, lora_pairs, read_adapter, write_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

TOKENS = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained PiSSA adapter with rsLoRA, alpha != r and a rank pattern, converted: layers at rank 8 and 4,
    each with its own scale; and that adapter merged into the original model."""
    root = tmp_path_factory.mktemp("export")
    build_tiny_llama(seed=0).save_pretrained(root / "original")
    init = make_init(root / "original", root / "init", rank=4, alpha=6, use_rslora=True, rank_pattern={"q_proj": 2})
    trained = train_pissa(init, root / "trained")
    convert_to_lora(root / "trained", init, root / "lora")
    merge_adapter(root / "lora", root / "original", root / "merged")
    return root, trained


def engine_view(folder, out, fields=("peft_type", "r", "lora_alpha", "target_modules")):
    """A copy of an adapter folder whose config holds only what an engine reads: the global r and lora_alpha."""
    config = json.loads((folder / "adapter_config.json").read_text())
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({k: config[k] for k in fields}))
    shutil.copy(folder / "adapter_model.safetensors", out)
    return out


def deltas(folder) -> dict[str, torch.Tensor]:
    config, state = read_adapter(folder)
    return {m: layer_scale(config, m) * B.double() @ A.double() for m, (A, B) in lora_pairs(state).items()}


# --- the exported adapter, read as the engine reads it ---------------------------------------------

def test_vllm_export_in_a_process_without_pissa_reproduces_the_merged_model(source, tmp_path, stock_logits):
    root, _ = source
    result = export_adapter(root / "lora", tmp_path / "vllm", ExportConfig("vllm"))
    assert result.rank == 8 and {i["action"] for i in result.layers.values()} == {"kept", "padded"}
    assert result.parity["max_abs_logit_diff"] < 1e-5 < result.parity["max_abs_adapter_effect"]
    merged = stock_logits(root / "merged", None, TOKENS)
    served = stock_logits(root / "original", engine_view(tmp_path / "vllm", tmp_path / "view"), TOKENS)
    torch.testing.assert_close(served, merged, atol=1e-5, rtol=0)
    # the source itself is not: engines scale every layer by the global alpha / sqrt(r), not by its pattern's
    config, state = read_adapter(root / "lora")
    global_scale = config["lora_alpha"] / config["r"] ** 0.5
    wrong = [m for m in lora_pairs(state) if abs(layer_scale(config, m) - global_scale) > 1e-3 * global_scale]
    assert len(wrong) == 2 and all(m.endswith("q_proj") for m in wrong)


@pytest.mark.parametrize("engine", ["vllm", "sglang", "tgi"])
def test_export_is_one_uniform_rank_with_the_scale_in_b(engine, source, tmp_path):
    root, _ = source
    export_adapter(root / "lora", tmp_path / engine, ExportConfig(engine))
    config, state = read_adapter(tmp_path / engine)
    assert set(config) <= set(EXPORT_FIELDS) and config["init_lora_weights"] is True
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 8, False)
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    assert {A.shape[0] for A, _ in lora_pairs(state).values()} == {8}
    ours, reference = deltas(tmp_path / engine), deltas(root / "lora")
    for m in reference:  # padding is exact: the same update in every layer
        torch.testing.assert_close(ours[m], reference[m], atol=1e-6, rtol=0)
    served = load_auto(root / "original", engine_view(tmp_path / engine, tmp_path / "view"))
    torch.testing.assert_close(outputs(served, TOKENS), outputs(load_auto(root / "merged"), TOKENS), atol=1e-5,
                               rtol=0)
    from peft import LoraConfig

    assert LoraConfig.from_pretrained(tmp_path / engine).r == 8


def test_peft_rslora_pattern_adapter_exported_at_an_allowed_rank_keeps_its_outputs(tmp_path):
    """A PEFT-made rsLoRA + rank/alpha-pattern PiSSA adapter (which PEFT cannot convert), exported straight from
    the trained adapter and its initial one: converted in memory, then padded to vLLM's rank 8."""
    trained = peft_pissa_run(build_tiny_llama(), tmp_path, "pissa_niter_4", r=4, lora_alpha=8, use_rslora=True,
                             target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                             alpha_pattern={"q_proj": 3})
    result = export_adapter(tmp_path / "trained", tmp_path / "vllm",
                            ExportConfig("vllm", init=str(tmp_path / "initial")))
    assert result.rank == 8 and result.rank in VLLM_RANKS
    assert sorted(i["rank_in"] for i in result.layers.values()) == [4, 4, 8, 8]  # v_proj 2r = 4: padded
    served = load_auto(tmp_path / "original", engine_view(tmp_path / "vllm", tmp_path / "view"))
    expected = outputs(trained, TOKENS)
    torch.testing.assert_close(outputs(served, TOKENS), expected, atol=1e-5, rtol=0)
    assert outputs(load_auto(tmp_path / "original"), TOKENS).sub(expected).abs().max() > 1e-2
    assert "--max-lora-rank 8" in result.command
    with pytest.raises(PissaError, match=r"init_lora_weights='pissa_niter_4'.*Pass --init INITIAL_ADAPTER"):
        export_adapter(tmp_path / "trained", tmp_path / "out", ExportConfig("vllm"))  # no --init: refused
    assert_nothing_written(tmp_path, tmp_path / "out")


# --- ranks ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A converted adapter whose layers are at rank 20 (init rank 10): not a rank vLLM serves."""
    root = tmp_path_factory.mktemp("wide")
    build_tiny_llama(seed=1).save_pretrained(root / "original")
    init = make_init(root / "original", root / "init", rank=10, targets=["q_proj", "v_proj"])
    train_pissa(init, root / "trained")
    convert_to_lora(root / "trained", init, root / "lora")
    return root


def test_vllm_rank_set_is_respected(wide, tmp_path):
    vllm = export_adapter(wide / "lora", tmp_path / "vllm", ExportConfig("vllm", parity=False))
    sglang = export_adapter(wide / "lora", tmp_path / "sglang", ExportConfig("sglang", parity=False))
    assert (vllm.rank, sglang.rank) == (32, 20)  # the smallest allowed rank >= 20; any rank for SGLang
    assert {A.shape[0] for A, _ in lora_pairs(read_adapter(tmp_path / "vllm")[1]).values()} == {32}
    assert "--max-lora-rank 32" in vllm.command and "--max-lora-rank 20" in sglang.command
    with pytest.raises(PissaError, match=r"--rank 24 is not a rank vLLM accepts \(1, 8, 16, 32"):
        ExportConfig("vllm", rank=24)
    assert ExportConfig("sglang", rank=24).rank == 24


def test_a_lower_rank_keeps_each_layers_best_approximation(wide, tmp_path):
    result = export_adapter(wide / "lora", tmp_path / "r16", ExportConfig("vllm", rank=16))
    assert {i["action"] for i in result.layers.values()} == {"compressed"} and result.max_rel_err > 0
    ours, reference = deltas(tmp_path / "r16"), deltas(wide / "lora")
    for m, delta in reference.items():
        U, S, Vh = torch.linalg.svd(delta)
        torch.testing.assert_close(ours[m], (U[:, :16] * S[:16]) @ Vh[:16], atol=1e-6, rtol=0)
        assert result.layers[m]["rel_err"] == pytest.approx(float(S[16:].norm() / S.norm()), rel=1e-6)
    assert result.parity["max_abs_logit_diff"] > 0  # reported, not refused: the user asked for rank 16


def test_a_layer_above_512_needs_an_explicit_rank(wide, tmp_path):
    config, state = read_adapter(wide / "lora")
    pairs = lora_pairs(state)
    big = {}
    for m, (A, B) in pairs.items():  # the same update, spread over 520 rank-one terms
        big[f"base_model.model.{m}.lora_A.weight"] = torch.cat([A] * 26) / 26 ** 0.5  # (520, in)
        big[f"base_model.model.{m}.lora_B.weight"] = torch.cat([B] * 26, dim=1) / 26 ** 0.5  # (out, 520)
    write_adapter(tmp_path / "big", {**config, "r": 520, "lora_alpha": config["lora_alpha"] * 26}, big)
    with pytest.raises(PissaError, match=r"rank 520, above the largest rank vLLM serves \(512\); pass --rank 512"):
        export_adapter(tmp_path / "big", tmp_path / "out", ExportConfig("vllm"))
    assert_nothing_written(tmp_path, tmp_path / "out")
    result = export_adapter(tmp_path / "big", tmp_path / "out", ExportConfig("vllm", rank=512))
    assert result.max_rel_err < 1e-5  # the update has rank 20: nothing is lost


# --- what the engines refuse or ignore ----------------------------------------------------------------

def test_embedding_adapters(tmp_path):
    """vLLM serves embed_tokens adapters over the base vocabulary; TGI never applies them: refused."""
    build_tiny_llama(seed=0).save_pretrained(tmp_path / "original")
    init = make_init(tmp_path / "original", tmp_path / "init", rank=4, targets=["embed_tokens", "q_proj"])
    trained = train_pissa(init, tmp_path / "trained")
    result = export_adapter(tmp_path / "trained", tmp_path / "vllm", ExportConfig("vllm", init=str(init)))
    assert result.parity["max_abs_logit_diff"] < 1e-5
    state = read_adapter(tmp_path / "vllm")[1]
    assert state["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (8, 256)
    served = load_auto(tmp_path / "original", engine_view(tmp_path / "vllm", tmp_path / "view"))
    torch.testing.assert_close(outputs(served, TOKENS), outputs(trained, TOKENS), atol=1e-5, rtol=0)
    with pytest.raises(PissaError, match=r"TGI does not apply adapters to layer model\.embed_tokens"):
        export_adapter(tmp_path / "trained", tmp_path / "tgi", ExportConfig("tgi", init=str(init)))
    assert_nothing_written(tmp_path, tmp_path / "tgi")


def test_full_tensors_equal_to_the_base_are_left_out_others_refused(source, tmp_path):
    from safetensors.torch import load_file

    root, _ = source
    config, state = read_adapter(root / "lora")
    head = load_file(root / "original" / "model.safetensors")["lm_head.weight"]
    write_adapter(tmp_path / "same", {**config, "modules_to_save": ["lm_head"]},
                  {**state, "base_model.model.lm_head.weight": head.clone()})
    result = export_adapter(tmp_path / "same", tmp_path / "out", ExportConfig("vllm"))
    assert result.dropped == ["base_model.model.lm_head.weight"] and result.parity["max_abs_logit_diff"] < 1e-5
    assert "lm_head.weight" not in read_adapter(tmp_path / "out")[1]
    write_adapter(tmp_path / "trained-head", {**config, "modules_to_save": ["lm_head"]},
                  {**state, "base_model.model.lm_head.weight": head * 1.5})
    with pytest.raises(PissaError, match=r"holds base_model\.model\.lm_head\.weight, a trained full tensor .*"
                                         r"`pissa merge`"):
        export_adapter(tmp_path / "trained-head", tmp_path / "refused", ExportConfig("sglang"))
    assert_nothing_written(tmp_path, tmp_path / "refused")


def test_refuses_dora_a_trained_pissa_adapter_and_a_residual_base(source, tmp_path):
    root, _ = source
    config, state = read_adapter(root / "lora")
    magnitudes = {k.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(B.shape[0])
                  for k, (_, B) in zip([k for k in state if k.endswith("lora_A.weight")],
                                       lora_pairs(state).values(), strict=True)}
    write_adapter(tmp_path / "dora", {**config, "use_dora": True}, {**state, **magnitudes})
    with pytest.raises(PissaError, match=r"DoRA adapter: vLLM serves LoRA only.*pissa merge"):
        export_adapter(tmp_path / "dora", tmp_path / "out", ExportConfig("vllm"))
    with pytest.raises(PissaError, match=r"trained PiSSA-style adapter \(trained on the residual .*Pass --init .*init"):
        export_adapter(root / "trained", tmp_path / "out", ExportConfig("vllm"))
    with pytest.raises(PissaError, match=r"--base .* is a PiSSA init or residual model"):
        export_adapter(root / "lora", tmp_path / "out", ExportConfig("vllm", base=str(root / "init")))
    assert_nothing_written(tmp_path, tmp_path / "out")


# --- adapters pissa writes -----------------------------------------------------------------------------

def test_every_adapter_pissa_writes_loads_without_peft_recomputing_anything(source, tmp_path, tiny_dir, data_file):
    """init, train (--model and --init, --convert-at-end), convert and export: every adapter_config.json says
    init_lora_weights true; and pissa refuses to write one that does not."""
    from helpers import train_config
    from pissa.train import SFTRecipe

    root, _ = source
    init = make_init(tiny_dir, tmp_path / "init", rank=4, options={"niter": 2})
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "fly", convert_at_end=True, max_steps=1,
                           niter=2)).run()
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "from-init", model=None, init=str(init),
                           convert_at_end=True, max_steps=1)).run()
    convert_to_lora(tmp_path / "from-init" / "adapter", init, tmp_path / "lora")
    export_adapter(tmp_path / "lora", tmp_path / "vllm", ExportConfig("vllm", parity=False))
    configs = sorted(tmp_path.rglob("adapter_config.json"))
    assert {str(p.parent.relative_to(tmp_path)) for p in configs} == {
        "init/adapter", "fly/adapter", "fly/init/adapter", "fly/lora", "from-init/adapter", "from-init/lora", "lora",
        "vllm"}
    for path in configs:
        config = json.loads(path.read_text())
        assert config["init_lora_weights"] is True and base_changing_init(config) is None, path
    config, state = read_adapter(root / "lora")
    with pytest.raises(PissaError, match=r"refusing to write .* init_lora_weights='pissa_niter_4'"):
        write_adapter(tmp_path / "bad", {**config, "init_lora_weights": "pissa_niter_4"}, state)


# --- CLI ---------------------------------------------------------------------------------------------------

def test_cli_export_prints_the_serving_command(source, tmp_path):
    from pissa.cli import app

    root, _ = source
    result = CliRunner().invoke(app, ["export", str(root / "trained"), "--init", str(root / "init"), "--for",
                                      "vllm", "--out", str(tmp_path / "smol-vllm"), "--name", "smol"])
    assert result.exit_code == 0, result.output
    command = f"vllm serve {(root / 'original').resolve()} --enable-lora --lora-modules smol=" \
              f"{(tmp_path / 'smol-vllm').resolve()} --max-lora-rank 8"
    assert command in result.output.replace("\n", " ").replace("  ", " ") or command in result.output
    assert "parity vs merged model" in result.output
    recorded = json.loads((tmp_path / "smol-vllm" / "export.json").read_text())
    assert recorded["command"] == command and recorded["parity"]["max_abs_logit_diff"] < 1e-5
    result = CliRunner().invoke(app, ["export", str(root / "lora"), "--for", "vllm", "--rank", "24", "--out",
                                      str(tmp_path / "bad")])
    assert result.exit_code == 2 and "error:" in result.output and "--rank 24" in result.output
    assert_nothing_written(tmp_path, tmp_path / "bad")


# --- SmolLM2 ---------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_smollm2_vllm_export_matches_the_merged_model(tmp_path, smollm2_dir):
    """A real model: a trained PiSSA adapter exported for vLLM straight from its init (converted in memory)."""
    init = make_init(smollm2_dir, tmp_path / "init", rank=8, alpha=16, targets=["q_proj", "v_proj"],
                     options={"niter": 2})
    train_pissa(init, tmp_path / "trained", steps=2, lr=1e-3, length=12)
    result = export_adapter(tmp_path / "trained", tmp_path / "vllm", ExportConfig("vllm", init=str(init),
                                                                                  sequences=2, length=16))
    assert result.rank == 16 and len(result.layers) == 60
    parity = result.parity
    assert parity["max_abs_logit_diff"] < 1e-4 * parity["max_abs_logit"] < parity["max_abs_adapter_effect"]
