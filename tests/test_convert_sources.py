"""`pissa convert` of PiSSA adapters made by PEFT and LLaMA-Factory: after real optimizer steps with plain PEFT,
the same ΔW as PEFT's own conversion where PEFT is right (plain, alpha != r, rsLoRA, rank and alpha patterns,
GPT-2 Conv1D, MiniLM/BERT; exact and randomized inits), the trained model's outputs where PEFT is wrong (DoRA,
modules_to_save, biases, rsLoRA with patterns, embeddings); LLaMA-Factory's two layouts; the warning on configs
that make PEFT recompute the base; and `pissa train --convert-at-end` checking convertibility up front."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from helpers import (
    build_tiny_bert,
    build_tiny_gpt2,
    build_tiny_llama,
    load_auto,
    outputs,
    peft_convert,
    peft_pissa_run,
)
from pissa.convert import convert_to_lora, merge_adapter
from pissa.convert.inputs import layer_scale
from pissa.convert.sources import LLAMA_FACTORY, PEFT_INIT
from pissa.errors import PissaError, PissaWarning
from pissa.io.adapter_files import lora_pairs, read_adapter
from pissa.layout import CONVERSION_FILE

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

QV = ["q_proj", "v_proj"]
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def deltas(folder) -> dict[str, torch.Tensor]:
    """module -> scale·B@A in float64, from an adapter folder's files (scale as PEFT resolves it)."""
    config, state = read_adapter(folder)
    return {m: layer_scale(config, m) * B.double().flatten(1) @ A.double().flatten(1)
            for m, (A, B) in lora_pairs(state).items()}


def dense_delta(root) -> dict[str, torch.Tensor]:
    """ΔW = s_t·B'A' - s_i·B0A0 of every layer, straight from the trained and initial adapter files."""
    trained, initial = deltas(root / "trained"), deltas(root / "initial")
    return {m: trained[m] - initial[m] for m in trained}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_reproduces(original, adapter, trained, tokens=TOKENS):
    """original + adapter gives the trained model's outputs, and the training really changed them."""
    converted = load_auto(original, adapter)
    expected = outputs(trained, tokens)
    torch.testing.assert_close(outputs(converted, tokens), expected, atol=1e-5, rtol=0)
    assert outputs(load_auto(original), tokens).sub(expected).abs().max() > 1e-2


# --- where PEFT is right: the same ΔW -------------------------------------------------------------

CASES = {
    "plain": (build_tiny_llama, dict(r=4, lora_alpha=4, target_modules=QV), "pissa"),
    "plain,niter": (build_tiny_llama, dict(r=4, lora_alpha=4, target_modules=QV), "pissa_niter_4"),
    "alpha!=r": (build_tiny_llama, dict(r=4, lora_alpha=16, target_modules=QV), "pissa_niter_4"),
    "rslora": (build_tiny_llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=QV), "pissa"),
    "rank,alpha patterns": (build_tiny_llama, dict(r=4, lora_alpha=8, target_modules=QV, rank_pattern={"v_proj": 2},
                                                   alpha_pattern={"v_proj": 6}), "pissa_niter_4"),
    "gpt2 conv1d": (build_tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]), "pissa"),
    "minilm": (build_tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"]), "pissa_niter_4"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_made_init_converts_to_peft_own_result(case, tmp_path):
    build, lora_kwargs, init = CASES[case]
    trained = peft_pissa_run(build(), tmp_path, init, **lora_kwargs)
    result = convert_to_lora(tmp_path / "trained", tmp_path / "initial", tmp_path / "ours")
    assert result.init_kind == PEFT_INIT
    peft = deltas(peft_convert(trained, tmp_path))
    ours, reference = deltas(tmp_path / "ours"), dense_delta(tmp_path)
    assert ours.keys() == peft.keys() == reference.keys()
    for m in ours:
        assert rel_diff(ours[m], peft[m]) <= 1e-6, m
        assert rel_diff(ours[m], reference[m]) <= 1e-6, m
    assert_reproduces(tmp_path / "original", tmp_path / "ours", trained)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert config["base_model_name_or_path"] == json.loads(
        (tmp_path / "initial" / "adapter_config.json").read_text())["base_model_name_or_path"]


# --- where PEFT is wrong: the trained model's outputs --------------------------------------------

def test_dora_converts_to_a_2r_dora_adapter_that_keeps_its_magnitudes(tmp_path):
    """PEFT drops lora_magnitude_vector (its result is off by ~0.1); ours keeps it, and `pissa merge` merges it
    as PEFT's merge_and_unload does."""
    trained = peft_pissa_run(build_tiny_llama(), tmp_path, "pissa", r=4, lora_alpha=8, use_dora=True,
                             target_modules=QV)
    convert_to_lora(tmp_path / "trained", tmp_path / "initial", tmp_path / "ours")
    config, state = read_adapter(tmp_path / "ours")
    assert config["use_dora"] and config["r"] == 8
    trained_state = read_adapter(tmp_path / "trained")[1]
    magnitudes = [k for k in trained_state if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 4 and all(torch.equal(state[k], trained_state[k]) for k in magnitudes)
    assert_reproduces(tmp_path / "original", tmp_path / "ours", trained)

    peft = load_auto(tmp_path / "original", peft_convert(trained, tmp_path))
    assert outputs(peft, TOKENS).sub(outputs(trained, TOKENS)).abs().max() > 1e-3  # PEFT's own: wrong

    merge_adapter(tmp_path / "ours", tmp_path / "original", tmp_path / "merged")
    torch.testing.assert_close(outputs(load_auto(tmp_path / "merged"), TOKENS), outputs(trained, TOKENS),
                               atol=1e-5, rtol=0)
    reference = load_auto(tmp_path / "original", tmp_path / "ours").merge_and_unload().state_dict()
    ours = load_auto(tmp_path / "merged").state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama lm_head", "bert classifier"])
def test_modules_to_save_are_carried(family, tmp_path):
    """PEFT's conversion drops modules_to_save weights and its result fails to load (KeyError)."""
    if family == "llama lm_head":
        trained = peft_pissa_run(build_tiny_llama(), tmp_path, "pissa", r=4, lora_alpha=8, target_modules=QV,
                                 modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    else:  # task SEQ_CLS: PEFT adds modules_to_save ["classifier", "score"] itself
        trained = peft_pissa_run(build_tiny_bert(num_labels=3), tmp_path, "pissa_niter_4", r=4, lora_alpha=8,
                                 target_modules=["query", "value"], task_type="SEQ_CLS")
    convert_to_lora(tmp_path / "trained", tmp_path / "initial", tmp_path / "ours")
    assert_reproduces(tmp_path / "original", tmp_path / "ours", trained)
    saved = [k for k in read_adapter(tmp_path / "ours")[1] if ".lora_" not in k]
    assert saved and json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"]
    with pytest.raises(KeyError):
        load_auto(tmp_path / "original", peft_convert(trained, tmp_path))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_are_carried(bias, tmp_path):
    """PEFT's conversion fails behind "Adapter ... does not exist" (it cannot load a second adapter with a bias)."""
    trained = peft_pissa_run(build_tiny_llama(attention_bias=True), tmp_path, "pissa", r=4, lora_alpha=8,
                             target_modules=QV, bias=bias)
    convert_to_lora(tmp_path / "trained", tmp_path / "initial", tmp_path / "ours")
    assert_reproduces(tmp_path / "original", tmp_path / "ours", trained)
    biases = [k for k in read_adapter(tmp_path / "ours")[1] if k.endswith(".bias")]
    assert len(biases) == (4 if bias == "lora_only" else 8)  # all: k_proj, o_proj too
    with pytest.raises(ValueError, match="does not exist"):
        peft_convert(trained, tmp_path)
    merge_adapter(tmp_path / "ours", tmp_path / "original", tmp_path / "merged")  # biases replace the base's
    torch.testing.assert_close(outputs(load_auto(tmp_path / "merged"), TOKENS), outputs(trained, TOKENS),
                               atol=1e-5, rtol=0)


def test_rslora_with_rank_and_alpha_patterns_converts(tmp_path):
    """PEFT refuses it, at save time: after the training has been paid for."""
    trained = peft_pissa_run(build_tiny_llama(), tmp_path, "pissa_niter_4", r=4, lora_alpha=8, use_rslora=True,
                             target_modules=QV, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    convert_to_lora(tmp_path / "trained", tmp_path / "initial", tmp_path / "ours")
    ours, reference = deltas(tmp_path / "ours"), dense_delta(tmp_path)
    assert all(rel_diff(ours[m], reference[m]) <= 1e-6 for m in ours)
    assert_reproduces(tmp_path / "original", tmp_path / "ours", trained)
    with pytest.raises(ValueError, match="not supported when using `rank_pattern` or `alpha_pattern`"):
        peft_convert(trained, tmp_path)


def test_embedding_targets_convert(tmp_path):
    """PEFT's conversion drops lora_embedding_A/B (no "lora_A" in their names): off by ~0.8 on this model."""
    trained = peft_pissa_run(build_tiny_llama(), tmp_path, "pissa", r=4, lora_alpha=8,
                             target_modules=[*QV, "embed_tokens"])
    convert_to_lora(tmp_path / "trained", tmp_path / "initial", tmp_path / "ours")
    assert_reproduces(tmp_path / "original", tmp_path / "ours", trained)
    peft = load_auto(tmp_path / "original", peft_convert(trained, tmp_path))
    assert outputs(peft, TOKENS).sub(outputs(trained, TOKENS)).abs().max() > 1e-2


def test_niter_config_warns_and_the_converted_adapter_never_recomputes(tmp_path):
    """The trained adapter still says init_lora_weights="pissa_niter_4": every pissa command that reads it warns
    (PEFT would draw a new residual on every load); the converted one loads the same way every time."""
    from pissa.cli import app

    trained = peft_pissa_run(build_tiny_llama(), tmp_path, "pissa_niter_4", r=4, lora_alpha=8, target_modules=QV)
    with pytest.warns(PissaWarning, match=r"init_lora_weights='pissa_niter_4'.*new random draw"):
        convert_to_lora(tmp_path / "trained", tmp_path / "initial", tmp_path / "ours")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "trained"), "--init", str(tmp_path / "initial"),
                                      "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "pissa_niter_4" in result.output
    assert json.loads((tmp_path / "cli" / CONVERSION_FILE).read_text())["init_kind"] == PEFT_INIT
    with pytest.warns(PissaWarning), pytest.raises(PissaError, match=r"Convert it first with `pissa convert"):
        merge_adapter(tmp_path / "trained", tmp_path / "original", tmp_path / "merged")  # PEFT's residual: wrong
    assert not (tmp_path / "merged").exists()
    first, second = load_auto(tmp_path / "original", tmp_path / "ours"), load_auto(tmp_path / "original",
                                                                                   tmp_path / "ours")
    assert torch.equal(outputs(first, TOKENS), outputs(second, TOKENS))
    torch.testing.assert_close(outputs(first, TOKENS), outputs(trained, TOKENS), atol=1e-5, rtol=0)


def test_trailing_slashes_and_a_peft_converted_init(tmp_path):
    """PEFT's own conversion fails on "init/" (adapter name ''); a converted adapter given as --init is named."""
    trained = peft_pissa_run(build_tiny_llama(), tmp_path, "pissa", r=4, lora_alpha=8, target_modules=QV)
    convert_to_lora(f"{tmp_path / 'trained'}/", f"{tmp_path / 'initial'}/", tmp_path / "ours")
    assert_reproduces(tmp_path / "original", tmp_path / "ours", trained)
    with pytest.raises(PissaError, match=r"--init holds rank 2r: an already converted adapter"):
        convert_to_lora(tmp_path / "trained", tmp_path / "ours", tmp_path / "out")


def test_refuses_a_peft_init_the_adapter_did_not_start_from(tmp_path):
    peft_pissa_run(build_tiny_llama(), tmp_path / "a", "pissa", r=4, lora_alpha=8, target_modules=QV)
    peft_pissa_run(build_tiny_llama(seed=3), tmp_path / "b", "pissa", r=4, lora_alpha=8, target_modules=QV)
    with pytest.raises(PissaError, match=r"does not look trained from .*b/initial.*median cosine"):
        convert_to_lora(tmp_path / "a" / "trained", tmp_path / "b" / "initial", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- LLaMA-Factory ----------------------------------------------------------------------------------

def test_llama_factory_training_output_converts(tmp_path):
    """pissa_init + pissa_convert: PissaConvertCallback saves pissa_init/ before the first step, pissa_backup/ and
    PEFT's pissa_converted/ after the last (which rewrites pissa_init's config), then the trained adapter at the
    root with init_lora_weights "pissa_niter_16"."""
    root = tmp_path / "saves"
    trained = peft_pissa_run(build_tiny_llama(), tmp_path, "pissa_niter_16", r=4, lora_alpha=8,
                             target_modules=QV, task_type="CAUSAL_LM")
    shutil.copytree(tmp_path / "initial", root / "pissa_init")
    trained.peft_config["default"].init_lora_weights = True
    trained.save_pretrained(root / "pissa_backup")
    trained.peft_config["default"].init_lora_weights = "pissa_niter_16"
    trained.save_pretrained(root / "pissa_converted", path_initial_model_for_weight_conversion=str(root / "pissa_init"))
    trained.save_pretrained(root)
    assert json.loads((root / "pissa_init" / "adapter_config.json").read_text())["inference_mode"] is False

    result = convert_to_lora(root, root, tmp_path / "ours")
    assert result.init_kind == LLAMA_FACTORY
    assert any("inference_mode false" in note for note in result.notes)
    assert_reproduces(tmp_path / "original", tmp_path / "ours", trained)
    convert_to_lora(root / "pissa_backup", root / "pissa_init", tmp_path / "from-backup")
    a, b = read_adapter(tmp_path / "ours")[1], read_adapter(tmp_path / "from-backup")[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_llama_factory_pissa_init_script_folder_converts_with_base(tmp_path):
    """scripts/pissa_init.py writes the residual model with pissa_init/ inside it, and training loads both: the
    original model is recorded nowhere, so --base names it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    folder = tmp_path / "llama-pissa"
    original = build_tiny_llama()
    original.save_pretrained(tmp_path / "original")
    peft_model = get_peft_model(original, LoraConfig(r=4, lora_alpha=8, target_modules=QV,
                                                     init_lora_weights="pissa_niter_16", task_type="CAUSAL_LM"))
    peft_model.peft_config["default"].base_model_name_or_path = str(folder.resolve())
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(folder / "pissa_init")
    peft_model.unload().save_pretrained(folder)  # the residual
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder), folder / "pissa_init",
                                      is_trainable=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        model(input_ids=data, labels=data).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(tmp_path / "trained")

    with pytest.raises(PissaError, match=r"original model of --init .* is unknown .*scripts/pissa_init\.py.*--base"):
        convert_to_lora(tmp_path / "trained", folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = convert_to_lora(tmp_path / "trained", folder, tmp_path / "ours", base=str(tmp_path / "original"))
    assert result.config["base_model_name_or_path"] == str(tmp_path / "original")
    assert_reproduces(tmp_path / "original", tmp_path / "ours", model)


# --- pissa train --convert-at-end -------------------------------------------------------------------

def test_convert_at_end_with_dora_is_exact(tmp_path, tiny_dir, data_file):
    """--dora --convert-at-end: RUN/lora (a rank-2r DoRA adapter on the original model) equals the trained run."""
    from helpers import load_with_adapter, logits, train_config
    from pissa.train import SFTRecipe

    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, method="pissa", dora=True, convert_at_end=True,
                           max_steps=3, targets=QV)).run()
    run = tmp_path / "run"
    assert json.loads((run / "lora" / "adapter_config.json").read_text())["use_dora"]
    trained = load_with_adapter(run / "residual", run / "adapter")
    converted = load_with_adapter(tiny_dir, run / "lora")
    torch.testing.assert_close(logits(converted, TOKENS % 100), logits(trained, TOKENS % 100), atol=1e-5, rtol=0)


def test_convert_at_end_refuses_before_the_first_step(tmp_path, tiny_dir, data_file):
    """An init folder whose pissa.json no longer matches its adapter trains fine but cannot be converted: with
    --convert-at-end that is refused at setup, and the run folder is removed (no step was taken)."""
    from helpers import make_init, train_config
    from pissa.train import SFTRecipe

    init = make_init(tiny_dir, tmp_path / "init", rank=4, targets=QV)
    manifest = json.loads((init / "pissa.json").read_text())
    manifest["layers"].pop(sorted(manifest["layers"])[0])
    (init / "pissa.json").write_text(json.dumps(manifest))
    config = train_config(tmp_path, tiny_dir, data_file, model=None, init=str(init), convert_at_end=True,
                          max_steps=2)
    with pytest.raises(PissaError, match=r"disagree about layer"):
        SFTRecipe(config).run()
    assert not (tmp_path / "run").exists()
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, model=None, init=str(init), max_steps=1)).run()
    assert (tmp_path / "run" / "adapter").is_dir()  # without --convert-at-end the same init trains
