"""PiSSA -> LoRA conversion: after real training steps, original model + converted adapter gives the
trained model's logits (plain, alpha != r, rsLoRA, rank patterns); agreement with PEFT's own
conversion; compression equals the best rank-k approximation of the dense ΔW; several converted
adapters on one untouched base; stock PEFT in a process without pissa; bad input; the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from helpers import assert_nothing_written, load_with_adapter, logits, make_init, train_pissa
from pissa.convert import convert_to_lora
from pissa.convert.inputs import layer_scale
from pissa.errors import PissaError
from pissa.io.adapter_files import lora_pairs, read_adapter, write_adapter

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.long]  # conftest: tiny models, one thread


# --- helpers shared with test_merge.py ------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny Llama, its PiSSA init (r=4, alpha=8) and a trained adapter, shared by the module."""
    from helpers import build_tiny_llama

    root = tmp_path_factory.mktemp("convert")
    build_tiny_llama(seed=0).save_pretrained(root / "original")
    init = make_init(root / "original", root / "init", rank=4, alpha=8)
    model = train_pissa(init, root / "trained")
    return root, model


# --- equivalence ---------------------------------------------------------------------------------

CASES = {
    "alpha=r": dict(rank=4),
    "alpha!=r": dict(rank=4, alpha=12),
    "rslora": dict(rank=4, use_rslora=True),
    "rslora,alpha!=r": dict(rank=4, alpha=3, use_rslora=True),
    "rank_pattern": dict(rank=4, rank_pattern={"q_proj": 2, "down_proj": 6}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_on_original_equals_trained_pissa(case, tmp_path, tiny_llama_dir, tokens):
    init = make_init(tiny_llama_dir, tmp_path / "init", **CASES[case])
    trained = train_pissa(init, tmp_path / "trained")
    result = convert_to_lora(tmp_path / "trained", init, tmp_path / "lora")

    converted = load_with_adapter(tiny_llama_dir, tmp_path / "lora")
    torch.testing.assert_close(logits(converted, tokens), logits(trained, tokens), atol=1e-5, rtol=0)
    # the training really moved the factors, so ΔW is far from zero
    with converted.disable_adapter():
        assert logits(trained, tokens).sub(logits(converted, tokens)).abs().max() > 1e-2
    assert min(info["delta_fro"] for info in result.layers.values()) > 0
    # every layer doubled its rank, the adapter is on the original model
    config, state = read_adapter(tmp_path / "lora")
    ranks = {m: A.shape[0] for m, (A, _) in lora_pairs(state).items()}
    trained_ranks = {m: A.shape[0] for m, (A, _) in lora_pairs(read_adapter(tmp_path / "trained")[1]).items()}
    assert ranks == {m: 2 * r for m, r in trained_ranks.items()}
    assert config["base_model_name_or_path"] == str(tiny_llama_dir.resolve())


def test_output_is_a_plain_lora_config(run):
    root, _ = run
    convert_to_lora(root / "trained", root / "init", root / "plain")
    config = json.loads((root / "plain" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert not [k for k in config if "pissa" in k.lower()]
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    from peft import LoraConfig

    assert LoraConfig.from_pretrained(root / "plain").r == 8


def test_plain_lora_factors_are_copied_bit_for_bit(run):
    """alpha doubled with the rank keeps alpha/r, so A = [A'; A0] and B = [B' | -B0] exactly."""
    root, _ = run
    convert_to_lora(root / "trained", root / "init", root / "bits")
    new = lora_pairs(read_adapter(root / "bits")[1])
    trained = lora_pairs(read_adapter(root / "trained")[1])
    init = lora_pairs(read_adapter(root / "init" / "adapter")[1])
    for m, (A, B) in new.items():
        assert torch.equal(A, torch.cat([trained[m][0], init[m][0]]))
        assert torch.equal(B, torch.cat([trained[m][1], -init[m][1]], dim=1))


def test_bf16_trained_adapter_keeps_both_halves_exact(run, tmp_path):
    """A bf16 trained adapter with an fp32 init is written in fp32, so neither half is rounded."""
    root, _ = run
    config, state = read_adapter(root / "trained")
    write_adapter(tmp_path / "bf16", config, {k: v.bfloat16() for k, v in state.items()})
    convert_to_lora(tmp_path / "bf16", root / "init", tmp_path / "lora")
    new, trained = lora_pairs(read_adapter(tmp_path / "lora")[1]), lora_pairs(read_adapter(tmp_path / "bf16")[1])
    init = lora_pairs(read_adapter(root / "init" / "adapter")[1])
    for m, (A, B) in new.items():
        assert A.dtype == B.dtype == torch.float32
        assert torch.equal(A, torch.cat([trained[m][0].float(), init[m][0]]))
        assert torch.equal(B, torch.cat([trained[m][1].float(), -init[m][1]], dim=1))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_agrees_with_peft_own_conversion(use_rslora, tmp_path, tiny_llama_dir):
    """PEFT converts inside a live model (save_pretrained(path_initial_model_for_weight_conversion=));
    we convert files. Same update per layer, and the same tensors and config: both keep the factors bit for
    bit (alpha x2, or x sqrt(2) under rsLoRA)."""
    init = make_init(tiny_llama_dir, tmp_path / "init", rank=4, alpha=6, use_rslora=use_rslora)
    shutil.copytree(init / "adapter", tmp_path / "scratch" / "initial")  # PEFT rewrites this folder's config
    trained = train_pissa(init, tmp_path / "trained")
    trained.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "scratch" /
                                                                                            "initial"))
    convert_to_lora(tmp_path / "trained", init, tmp_path / "ours")
    (c_ours, s_ours), (c_peft, s_peft) = read_adapter(tmp_path / "ours"), read_adapter(tmp_path / "peft")
    ours, peft = lora_pairs(s_ours), lora_pairs(s_peft)
    assert ours.keys() == peft.keys()
    for m in ours:
        d_ours = layer_scale(c_ours, m) * ours[m][1] @ ours[m][0]  # (out, in)
        d_peft = layer_scale(c_peft, m) * peft[m][1] @ peft[m][0]  # (out, in)
        torch.testing.assert_close(d_ours, d_peft, atol=1e-6, rtol=0)
        assert torch.equal(ours[m][0], peft[m][0]) and torch.equal(ours[m][1], peft[m][1])
    assert (c_ours["r"], c_ours["lora_alpha"]) == (c_peft["r"], c_peft["lora_alpha"])


def test_modules_to_save_are_copied_through(tmp_path, tiny_llama_dir, tokens):
    """A fully trained module (not decomposed) applies to the original model unchanged."""
    from safetensors.torch import load_file

    init = make_init(tiny_llama_dir, tmp_path / "init", rank=4, targets=["q_proj", "v_proj"])
    train_pissa(init, tmp_path / "trained")
    config, state = read_adapter(tmp_path / "trained")
    head = load_file(tiny_llama_dir / "model.safetensors")["lm_head.weight"]
    state["base_model.model.lm_head.weight"] = head * 1.5  # what PEFT saves for modules_to_save=["lm_head"]
    write_adapter(tmp_path / "trained-head", {**config, "modules_to_save": ["lm_head"]}, state)
    trained = load_with_adapter(init / "residual", tmp_path / "trained-head")
    convert_to_lora(tmp_path / "trained-head", init, tmp_path / "lora")
    converted = load_with_adapter(tiny_llama_dir, tmp_path / "lora")
    torch.testing.assert_close(logits(converted, tokens), logits(trained, tokens), atol=1e-5, rtol=0)
    with converted.disable_adapter():
        assert logits(converted, tokens).sub(logits(trained, tokens)).abs().max() > 1e-2


def test_qpissa_init_is_converted_with_a_note(run, tmp_path, tiny_llama_dir):
    """With a quantized residual, ΔW is still exact but W + ΔW is not the trained Q(W_res) + B'A': say so."""
    pytest.importorskip("bitsandbytes")
    root, _ = run
    init = make_init(tiny_llama_dir, tmp_path / "qinit", rank=4, quantize="nf4", quant_iters=1)
    shutil.copytree(init / "adapter", tmp_path / "untrained")  # (the init's own adapter/ is refused as trained)
    result = convert_to_lora(tmp_path / "untrained", init, tmp_path / "lora")  # untrained: ΔW = 0
    assert len(result.notes) == 1 and "quantized (QPiSSA)" in result.notes[0]
    assert max(info["delta_fro"] for info in result.layers.values()) < 1e-9
    assert convert_to_lora(root / "trained", root / "init", tmp_path / "plain").notes == []


# --- compression ---------------------------------------------------------------------------------

def dense_delta(root, trained="trained"):
    """Module -> dense ΔW = s_t·B'A' - s_i·BA in float64, straight from the two adapter files."""
    (c1, s1), (c0, s0) = read_adapter(root / trained), read_adapter(root / "init" / "adapter")
    p1, p0 = lora_pairs(s1), lora_pairs(s0)
    return {m: layer_scale(c1, m) * p1[m][1].double() @ p1[m][0].double()
            - layer_scale(c0, m) * p0[m][1].double() @ p0[m][0].double() for m in p1}


def best_rank_k(delta, k):
    U, S, Vh = torch.linalg.svd(delta)
    return (U[:, :k] * S[:k]) @ Vh[:k], float(S[k:].square().sum().sqrt())


@pytest.mark.parametrize("k", [1, 3, 8])
def test_compression_is_the_best_rank_k_approximation(k, run):
    root, _ = run
    out = root / f"compressed-{k}"
    result = convert_to_lora(root / "trained", root / "init", out, rank=k)
    config, state = read_adapter(out)
    assert config["r"] == k and not config["rank_pattern"]
    deltas = dense_delta(root)
    for m, (A, B) in lora_pairs(state).items():
        assert A.shape[0] == k
        ours = layer_scale(config, m) * B.double() @ A.double()  # (out, in)
        reference, err = best_rank_k(deltas[m], k)
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
        assert result.layers[m]["err_fro"] == pytest.approx(err, rel=1e-6, abs=1e-9)
        assert result.layers[m]["err_fro"] == pytest.approx(float((deltas[m] - ours).norm()), abs=1e-6)
    if k == 8:  # 2r: nothing is cut
        assert result.max_rel_err < 1e-6
    else:
        assert result.max_rel_err > 0


def test_compressed_adapter_is_read_by_peft_as_written(run, tiny_llama_dir):
    """PEFT's own delta weight of the loaded compressed adapter is the truncated ΔW (scale handled)."""
    root, _ = run
    convert_to_lora(root / "trained", root / "init", root / "c2", rank=2)
    model = load_with_adapter(tiny_llama_dir, root / "c2")
    deltas = dense_delta(root)
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if name in deltas:
            reference, _ = best_rank_k(deltas[name], 2)
            torch.testing.assert_close(module.get_delta_weight("default").double(), reference, atol=1e-6, rtol=0)
            checked += 1
    assert checked == len(deltas) == 14


def test_compression_with_rslora_and_rank_pattern(tmp_path, tiny_llama_dir):
    init = make_init(tiny_llama_dir, tmp_path / "init", rank=4, alpha=6, use_rslora=True, rank_pattern={"q_proj": 2})
    train_pissa(init, tmp_path / "trained")
    convert_to_lora(tmp_path / "trained", init, tmp_path / "c3", rank=3)
    config, state = read_adapter(tmp_path / "c3")
    deltas = dense_delta(tmp_path)
    for m, (A, B) in lora_pairs(state).items():
        reference, _ = best_rank_k(deltas[m], 3)
        torch.testing.assert_close(layer_scale(config, m) * B.double() @ A.double(), reference, atol=1e-6, rtol=0)


# --- multi-adapter and stock PEFT ----------------------------------------------------------------

def test_several_converted_adapters_on_one_untouched_base(tmp_path, tiny_llama_dir, tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = {}
    for name, config in {"a": dict(rank=4), "b": dict(rank=2, alpha=8, use_rslora=True),
                         "c": dict(rank=3, targets=["q_proj", "v_proj"])}.items():
        init = make_init(tiny_llama_dir, tmp_path / f"init-{name}", **config)
        trained[name] = logits(train_pissa(init, tmp_path / f"trained-{name}", seed=ord(name)), tokens)
        convert_to_lora(tmp_path / f"trained-{name}", init, tmp_path / f"lora-{name}")

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    before = logits(base, tokens)
    model = PeftModel.from_pretrained(base, tmp_path / "lora-a", adapter_name="a")
    for name in "bc":
        model.load_adapter(tmp_path / f"lora-{name}", adapter_name=name)
    for name in "abca":
        model.set_adapter(name)
        torch.testing.assert_close(logits(model, tokens), trained[name], atol=1e-5, rtol=0)
    with model.disable_adapter():
        assert torch.equal(logits(model, tokens), before)
    now = {k.replace(".base_layer.", "."): v for k, v in model.get_base_model().state_dict().items()
           if ".lora_" not in k}
    assert now.keys() == original.keys()
    assert all(torch.equal(now[k], original[k]) for k in original)
    assert not torch.allclose(trained["a"], trained["b"], atol=1e-3)  # three different models


@pytest.mark.integration  # a fresh process
def test_stock_peft_loads_converted_adapter_without_pissa(run, tiny_llama_dir, tokens):
    root, trained = run
    convert_to_lora(root / "trained", root / "init", root / "stock")
    torch.save(tokens, root / "tokens.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r})
        model = PeftModel.from_pretrained(base, {str(root / "stock")!r}).eval()
        tokens = torch.load({str(root / "tokens.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(tokens).logits, {str(root / "stock-logits.pt")!r})
        assert "pissa" not in sys.modules, "pissa was imported"
        assert not [m for m in sys.modules if m.startswith("pissa")]
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.load(root / "stock-logits.pt", weights_only=True)
    torch.testing.assert_close(theirs, logits(trained, tokens), atol=1e-5, rtol=0)


# --- bad input: a clear error and nothing written -------------------------------------------------

def test_refuses_init_with_a_different_rank(run, tmp_path):
    root, _ = run
    init8 = make_init(root / "original", tmp_path / "init8", rank=8)
    with pytest.raises(PissaError, match=r"different rank or model.*--init"):
        convert_to_lora(root / "trained", init8, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_refuses_init_with_different_targets(run, tmp_path):
    root, _ = run
    init_qv = make_init(root / "original", tmp_path / "init-qv", rank=4, alpha=8, targets=["q_proj", "v_proj"])
    with pytest.raises(PissaError, match=r"targets differ.*only in the trained adapter"):
        convert_to_lora(root / "trained", init_qv, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_refuses_init_of_a_different_model(run, tmp_path):
    from helpers import build_tiny_llama

    root, _ = run
    build_tiny_llama(seed=0, intermediate_size=96).save_pretrained(tmp_path / "wide")
    make_init(tmp_path / "wide", tmp_path / "init-wide", rank=4, alpha=8)
    with pytest.raises(PissaError, match=r"layer model\.layers\.0\.mlp\..*different rank or model"):
        convert_to_lora(root / "trained", tmp_path / "init-wide", tmp_path / "out")
    # same architecture, other weights: the shapes agree, but the adapter names the residual it was trained on
    build_tiny_llama(seed=7).save_pretrained(tmp_path / "other")
    make_init(tmp_path / "other", tmp_path / "init-other", rank=4, alpha=8)
    with pytest.raises(PissaError, match=r"was trained on .*/init/residual, whose init folder .* differs from --init"):
        convert_to_lora(root / "trained", tmp_path / "init-other", tmp_path / "out")
    # ... and without that record (trained elsewhere), the factors themselves do not match
    config, state = read_adapter(root / "trained")
    write_adapter(tmp_path / "moved", {**config, "base_model_name_or_path": "/elsewhere/init/residual"}, state)
    with pytest.raises(PissaError, match=r"does not look trained from .*init-other.*median cosine"):
        convert_to_lora(tmp_path / "moved", tmp_path / "init-other", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")
    # a copy of the right init folder is accepted
    shutil.copytree(root / "init", tmp_path / "init-copy")
    convert_to_lora(root / "trained", tmp_path / "init-copy", tmp_path / "from-copy")


def test_refuses_a_plain_lora_adapter(run, tmp_path):
    """A LoRA adapter trained from noise-and-zero has the right shapes but did not start from PiSSA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, _ = run
    config = LoraConfig.from_pretrained(root / "init" / "adapter")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "original"),
                          LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(PissaError, match=r"does not look trained from .*a plain LoRA adapter needs no conversion"):
        convert_to_lora(tmp_path / "lora", root / "init", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")
    # the escape hatch converts it anyway (and the result is still exact arithmetic)
    convert_to_lora(tmp_path / "lora", root / "init", tmp_path / "forced", check_init=False)
    assert (tmp_path / "forced" / "adapter_model.safetensors").exists()


def test_refuses_missing_adapter_files(run, tmp_path):
    root, _ = run
    shutil.copytree(root / "trained", tmp_path / "no-weights")
    (tmp_path / "no-weights" / "adapter_model.safetensors").unlink()
    with pytest.raises(PissaError, match=r"adapter_model\.safetensors not found"):
        convert_to_lora(tmp_path / "no-weights", root / "init", tmp_path / "out")
    with pytest.raises(PissaError, match=r"does not exist"):
        convert_to_lora(tmp_path / "nowhere", root / "init", tmp_path / "out")
    shutil.copytree(root / "init", tmp_path / "init-broken")
    (tmp_path / "init-broken" / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(PissaError, match=r"init-broken/adapter/adapter_model\.safetensors not found"):
        convert_to_lora(root / "trained", tmp_path / "init-broken", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_refuses_the_trained_adapter_as_its_own_init(run, tmp_path):
    """A folder with adapter_config.json is a PEFT initial adapter to --init, but not the trained one itself;
    a folder that is none of the three kinds is named as such."""
    root, _ = run
    with pytest.raises(PissaError, match=r"trained is the initial adapter of --init .* itself"):
        convert_to_lora(root / "trained", root / "trained", tmp_path / "out")
    with pytest.raises(PissaError, match=r"init/adapter is the initial adapter of --init .* itself"):
        convert_to_lora(root / "init" / "adapter", root / "init", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PissaError, match=r"not a `pissa init` folder \(pissa\.json\), a PEFT initial adapter"):
        convert_to_lora(root / "trained", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(PissaError, match=r"is a `pissa init` folder, not an adapter"):
        convert_to_lora(root / "init", root / "init", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("k", [9, 0])
def test_refuses_compression_rank_beyond_2r(k, run, tmp_path):
    root, _ = run
    with pytest.raises(PissaError, match=r"--rank"):
        convert_to_lora(root / "trained", root / "init", tmp_path / "out", rank=k)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_refuses_existing_output(run, tmp_path):
    root, _ = run
    (tmp_path / "out").mkdir()
    with pytest.raises(PissaError, match=r"already exists.*--overwrite"):
        convert_to_lora(root / "trained", root / "init", tmp_path / "out")
    convert_to_lora(root / "trained", root / "init", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "adapter_config.json").exists()


# --- CLI -----------------------------------------------------------------------------------------

def test_cli_convert_and_compress(run, tmp_path, tiny_llama_dir, tokens):
    from pissa.cli import app

    root, trained = run
    result = CliRunner().invoke(app, ["convert", str(root / "trained"), "--init", str(root / "init"),
                                      "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    assert "rank 2r" in result.output and "lora" in result.output
    converted = load_with_adapter(tiny_llama_dir, tmp_path / "lora")
    torch.testing.assert_close(logits(converted, tokens), logits(trained, tokens), atol=1e-5, rtol=0)

    result = CliRunner().invoke(app, ["convert", str(root / "trained"), "--init", str(root / "init"),
                                      "--out", str(tmp_path / "small"), "--rank", "2"])
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output
    recorded = json.loads((tmp_path / "small" / "conversion.json").read_text())
    assert recorded["rank"] == 2 and len(recorded["layers"]) == 14


def test_cli_convert_error_is_one_line(run, tmp_path):
    from pissa.cli import app

    root, _ = run
    result = CliRunner().invoke(app, ["convert", str(root / "trained"), "--init", str(root / "init"),
                                      "--out", str(tmp_path / "out"), "--rank", "50"])
    assert result.exit_code == 2
    assert "error:" in result.output and "--rank 50" in result.output
    assert_nothing_written(tmp_path, tmp_path / "out")


# --- SmolLM2 ---------------------------------------------------------------------------------------

@pytest.mark.integration
def test_smollm2_converted_equals_trained(tmp_path, smollm2_dir, smollm2_tokenizer):
    """Compared in float64: the fp32 evaluation noise of SmolLM2 alone is ~7e-5 on these logits (the
    step-0 init vs the original model differ that much), which would leave 1e-4 no margin."""
    init = make_init(smollm2_dir, tmp_path / "init", rank=8, alpha=16, targets=["q_proj", "v_proj"],
                     options={"niter": 2})
    trained = train_pissa(init, tmp_path / "trained", steps=2, lr=1e-3, length=12)
    result = convert_to_lora(tmp_path / "trained", init, tmp_path / "lora")
    assert len(result.layers) == 60
    tokens = smollm2_tokenizer("Question: what is 12 + 7? Answer:", return_tensors="pt").input_ids
    expected = logits(trained.double(), tokens)
    del trained
    converted = load_with_adapter(smollm2_dir, tmp_path / "lora").double()
    got = logits(converted, tokens)
    with converted.disable_adapter():
        assert got.sub(logits(converted, tokens)).abs().max() > 1e-2  # training changed the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
