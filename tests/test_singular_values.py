"""PiSSA with trainable singular values (paper appendix A): the B·diag(S)·A form keeps the model's outputs,
holds W's own singular values and orthonormal vectors, trains with the orthogonality regulariser, is a stock
PEFT AdaLoRA adapter, and converts/merges to the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import losses, train_config
from pissa.errors import PissaError
from pissa.init import PissaConfig, init_model
from pissa.io.adapter_files import RANKNUM_EPS
from pissa.train import SFTRecipe
from pissa.train.singular_values import lora_layers, to_singular_value_adapters

pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 4


def adalora_layers(model) -> dict:
    from peft.tuners.adalora import AdaLoraLayer

    return {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, AdaLoraLayer)}


def test_singular_value_form_keeps_logits_and_holds_the_svd_of_w(tiny_llama, tokens):
    weights = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        before = tiny_llama(tokens).logits
    pissa, _ = init_model(tiny_llama, PissaConfig(rank=RANK))
    model = to_singular_value_adapters(pissa, orth_reg_weight=0.1, total_steps=10)
    layers = adalora_layers(model)
    assert layers and sorted(layers) == sorted(n for n in weights if n != "lm_head")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=1e-5, atol=1e-5)
    eye = torch.eye(RANK)
    for name, layer in layers.items():
        A, B, E = layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]
        torch.testing.assert_close(A @ A.T, eye, atol=1e-5, rtol=0)  # V_rᵀ: orthonormal rows
        torch.testing.assert_close(B.T @ B, eye, atol=1e-5, rtol=0)  # U_r: orthonormal columns
        S = torch.linalg.svd(weights[name].double())[1][:RANK]  # alpha = r: E = S · (r + eps) / r
        torch.testing.assert_close(E.squeeze(1).double(), S * (RANK + RANKNUM_EPS) / RANK, rtol=1e-5, atol=1e-6)
        assert E.requires_grad and A.requires_grad and B.requires_grad


def test_orthogonality_regulariser_is_added_to_the_loss(tiny_llama, tokens):
    """loss(w) - loss(0) = w · mean over factors of ‖AAᵀ−I‖_F, ‖BᵀB−I‖_F, once the factors leave orthonormality."""
    pissa, _ = init_model(tiny_llama, PissaConfig(rank=RANK))
    model = to_singular_value_adapters(pissa, orth_reg_weight=0.3, total_steps=10)
    layers = adalora_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A["default"].mul_(1.1)  # 1.21·I - I
    expected = (1.1**2 - 1) * RANK**0.5 / 2  # per layer ‖0.21·I‖_F for A and 0 for B, averaged over both
    with torch.no_grad():
        regularised = model(input_ids=tokens, labels=tokens).loss
        model.peft_config["default"].orth_reg_weight = 0.0
        plain = model(input_ids=tokens, labels=tokens).loss
    assert float(regularised - plain) == pytest.approx(0.3 * expected, rel=1e-4)


def test_train_singular_values_end_to_end(tmp_path, tiny_dir, data_file, stock_logits):
    """Trains (loss falls, S moves), saves a stock AdaLoRA adapter, and converts/merges to the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pissa.convert import merge_adapter

    recipe = SFTRecipe(train_config(tmp_path, tiny_dir, data_file, limit=4, lr=1e-2, train_singular_values=True,
                              convert_at_end=True))
    summary = recipe.run()
    run = tmp_path / "run"
    log = losses(run)
    assert log[-1] < log[0] - 0.3, log
    assert summary["method"] == "pissa+singular-values"
    layers = adalora_layers(recipe.trainer.model)
    hidden, inter = 64, 128  # tiny Llama: per layer q,k,v,o,gate,up,down; k/v project to 2 kv heads of 16
    shapes = [(hidden, hidden), (hidden, 32), (hidden, 32), (hidden, hidden), (hidden, inter), (hidden, inter),
              (inter, hidden)]
    assert summary["trainable_params"] == 2 * sum(RANK * (i + o + 1) for i, o in shapes)
    moved = [float((layers[n].lora_E["default"].squeeze(1).double() - e).abs().max())
             for n, e in initial_singular_values(run).items()]
    assert min(moved) > 0, "every layer's singular values must train"

    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "ADALORA" and adapter_config["orth_reg_weight"] == 0.1
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    trained = recipe.trainer.model.eval()
    with torch.no_grad():
        expected = trained(ids).logits
    # stock transformers + PEFT, pissa not imported: the residual + AdaLoRA adapter is the trained model
    torch.testing.assert_close(stock_logits(run / "residual", run / "adapter", ids), expected, rtol=1e-5, atol=1e-5)
    # pissa eval RUN: the AdaLoRA adapter on its residual
    from helpers import build_tiny_llama
    from pissa.eval.run import check_adapter_fits, load_target, resolve_target

    evaluated, _ = load_target(resolve_target(str(run)))
    with torch.no_grad():
        torch.testing.assert_close(evaluated(ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(PissaError, match="is 64x128 but model other has 48x96"):
        check_adapter_fits(build_tiny_llama(hidden_size=48, intermediate_size=96), run / "adapter", "other")
    # --convert-at-end: a plain rank-2r LoRA on the original model
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), run / "lora").eval()
    assert lora.peft_config["default"].peft_type == "LORA" and lora.peft_config["default"].r == 2 * RANK
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, expected, rtol=1e-4, atol=1e-4)
    # pissa merge: the adapter folded into its residual
    merge_adapter(run / "adapter", run / "residual", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


def initial_singular_values(run: Path) -> dict[str, torch.Tensor]:
    """Each layer's initial S from RUN/init (the PiSSA LoRA pairs before re-expression), as E would hold it."""
    from pissa.decompose import factored_svd
    from pissa.io.adapter_files import lora_pairs, read_adapter

    adapter_config, state = read_adapter(run / "init" / "adapter")
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    return {m: factored_svd((B * scale).double(), A.double())[1] * (RANK + RANKNUM_EPS) / adapter_config["lora_alpha"]
            for m, (A, B) in lora_pairs(state).items()}


def test_init_dir_equals_on_the_fly(tmp_path, tiny_dir, data_file):
    from pissa.init import run_init

    run_init(str(tiny_dir), PissaConfig(rank=RANK), tmp_path / "init")
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "fly", max_steps=4, train_singular_values=True)).run()
    SFTRecipe(train_config(tmp_path, tiny_dir, data_file, "dir", model=None, init=str(tmp_path / "init"), max_steps=4,
                     train_singular_values=True)).run()
    torch.testing.assert_close(losses(tmp_path / "dir"), losses(tmp_path / "fly"), rtol=1e-5, atol=1e-6)


# --- bad input -------------------------------------------------------------------------------------

def test_refused_with_dora_and_for_lora(tmp_path, tiny_dir, data_file):
    with pytest.raises(PissaError, match="--train-singular-values and --dora cannot be combined"):
        train_config(tmp_path, tiny_dir, data_file, dora=True, train_singular_values=True)
    with pytest.raises(PissaError, match="applies to --method pissa, not lora"):
        SFTRecipe(train_config(tmp_path, tiny_dir, data_file, method="lora", train_singular_values=True)).setup()
    assert not (tmp_path / "run").exists()
    with pytest.raises(PissaError, match="--orth-reg-weight must be >= 0"):
        train_config(tmp_path, tiny_dir, data_file, orth_reg_weight=-1.0)


def test_rank_pattern_and_embeddings_refused(tiny_llama):
    pissa, _ = init_model(tiny_llama, PissaConfig(rank=RANK, rank_pattern={"q_proj": 2}))
    with pytest.raises(PissaError, match=r"one rank for every layer, the adapter has ranks \[2, 4\]"):
        to_singular_value_adapters(pissa, 0.1, 10)


def test_embedding_target_refused(make_tiny_llama):
    pissa, _ = init_model(make_tiny_llama(), PissaConfig(rank=RANK, targets=["embed_tokens", "q_proj"]))
    assert "model.embed_tokens" in lora_layers(pissa)
    with pytest.raises(PissaError, match=r"linear layers only; model.embed_tokens \(Embedding\) is not one"):
        to_singular_value_adapters(pissa, 0.1, 10)
