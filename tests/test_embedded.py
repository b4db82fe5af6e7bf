"""Integration: PiSSA init on the embedded real models (SmolLM2-135M-Instruct, MiniLM-L6)."""

import pytest
import torch
from typer.testing import CliRunner

from pissa.cli import app
from pissa.init import PissaConfig, init_model
from pissa.models import load_model

pytestmark = pytest.mark.integration


def test_smollm2_init_reload_logits_unchanged(smollm2_dir, smollm2_tokenizer, tmp_path, stock_logits):
    out = tmp_path / "smol"
    result = CliRunner().invoke(app, ["init", "smollm2-135m", "--rank", "16", "--niter", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    tokens = smollm2_tokenizer(["The answer is: 42. PiSSA adapts the principal singular values."],
                               return_tensors="pt").input_ids
    model, _, _ = load_model(smollm2_dir)
    with torch.no_grad():
        expected = model(tokens).logits
    got = stock_logits(out / "residual", out / "adapter", tokens)
    # fp32 rounding through 30 blocks grows with the logits' size (|logit| ~ 31 here): bound it relative to them
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert (out / "residual" / "tokenizer.json").exists()


def test_minilm_init_keeps_hidden_states():
    model, tokenizer, _ = load_model("minilm-l6")
    model.eval()
    batch = tokenizer(["principal singular values", "a frozen residual"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    peft_model, report = init_model(model, PissaConfig(rank=16))
    assert len(report) == 6 * 6 + 1  # q, k, v, attn-out, intermediate, out per block + pooler
    with torch.no_grad():
        got = peft_model(**batch).last_hidden_state
    assert (got - expected).abs().max().item() <= 1e-4
