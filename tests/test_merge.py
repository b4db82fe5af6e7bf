"""`pissa merge`: the merged model's logits equal the adapter model's (original + converted, and
residual + trained PiSSA), streamed sharded output equals PEFT's in-memory merge_and_unload, the
stored dtype is kept, GPT-2 Conv1D layers, bad pairings, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import assert_nothing_written, load_with_adapter, logits, make_init, train_pissa
from pissa.convert import convert_to_lora, merge_adapter
from pissa.errors import PissaError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def folder_tensors(folder):
    """Every tensor of a safetensors model folder, shard by shard."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Original tiny Llama (also saved in 3+ shards), PiSSA init, trained adapter, converted adapter."""
    from helpers import build_tiny_llama

    root = tmp_path_factory.mktemp("merge")
    original = build_tiny_llama(seed=0)
    original.save_pretrained(root / "original")
    original.save_pretrained(root / "sharded", max_shard_size="100KB")
    init = make_init(root / "original", root / "init", rank=4, alpha=8, use_rslora=True)
    trained = train_pissa(init, root / "trained")
    convert_to_lora(root / "trained", init, root / "lora")
    return root, trained


def test_original_plus_converted_equals_adapter_model(run, tokens):
    root, trained = run
    result = merge_adapter(root / "lora", root / "original", root / "merged-original")
    assert result.mode == "base + LoRA adapter" and result.layers == 14
    merged = logits(load(root / "merged-original"), tokens)
    adapter_model = load_with_adapter(root / "original", root / "lora")
    torch.testing.assert_close(merged, logits(adapter_model, tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, logits(trained, tokens), atol=1e-5, rtol=0)


def test_residual_plus_trained_pissa_equals_adapter_model(run, tokens):
    root, trained = run
    result = merge_adapter(root / "trained", root / "init", root / "merged-residual")
    assert result.mode == "residual + PiSSA adapter"
    assert result.base == root / "init" / "residual"
    torch.testing.assert_close(logits(load(root / "merged-residual"), tokens), logits(trained, tokens),
                               atol=1e-5, rtol=0)
    # --base INIT/residual is the same thing, tensor for tensor
    merge_adapter(root / "trained", root / "init" / "residual", root / "merged-residual-2")
    a, b = folder_tensors(root / "merged-residual"), folder_tensors(root / "merged-residual-2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_sharded_merge_equals_peft_merge_and_unload(run):
    root, _ = run
    result = merge_adapter(root / "lora", root / "sharded", root / "merged-sharded")
    assert result.shards >= 3
    reference = load_with_adapter(root / "sharded", root / "lora").merge_and_unload().state_dict()
    ours = folder_tensors(root / "merged-sharded")
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)
    # same shards, a rebuilt index, the small files copied; untouched tensors are bit-identical
    base_index = json.loads((root / "sharded" / "model.safetensors.index.json").read_text())
    index = json.loads((root / "merged-sharded" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    assert (root / "merged-sharded" / "config.json").read_text() == (root / "sharded" / "config.json").read_text()
    base = folder_tensors(root / "sharded")
    untouched = [k for k in base if "layers" not in k or "norm" in k]
    assert untouched and all(torch.equal(ours[k], base[k]) for k in untouched)


def test_merge_keeps_the_stored_dtype(run, tmp_path):
    root, _ = run
    load(root / "original").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    merge_adapter(root / "lora", tmp_path / "bf16", tmp_path / "merged")
    ours, base = folder_tensors(tmp_path / "merged"), folder_tensors(tmp_path / "bf16")
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    reference = load_with_adapter(root / "original", root / "lora").merge_and_unload().state_dict()  # fp32
    changed = 0
    for key, value in ours.items():
        if torch.equal(value, base[key]):
            continue
        changed += 1
        # two bf16 roundings away from the fp32 merge: of W (half an ulp of W), then of W + ΔW
        bound = 2**-8 * (base[key].float().abs() + reference[key].abs()) + 1e-12
        assert (value.float() - reference[key]).abs().le(bound).all(), key
    assert changed == 14


def test_gpt2_conv1d_layers(tmp_path):
    """GPT-2 stores Conv1D weights as (in, out): the update is merged transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    init = make_init(tmp_path / "gpt2", tmp_path / "init", rank=4, targets=["c_attn", "c_fc"])
    trained = train_pissa(init, tmp_path / "trained")
    convert_to_lora(tmp_path / "trained", init, tmp_path / "lora")
    merge_adapter(tmp_path / "lora", tmp_path / "gpt2", tmp_path / "merged")
    merge_adapter(tmp_path / "trained", init, tmp_path / "merged-residual")
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = logits(trained, tokens)
    torch.testing.assert_close(logits(load_with_adapter(tmp_path / "gpt2", tmp_path / "lora"), tokens), expected,
                               atol=1e-5, rtol=0)
    for folder in ("merged", "merged-residual"):
        torch.testing.assert_close(logits(load(tmp_path / folder), tokens), expected, atol=1e-5, rtol=0)


def test_embedding_layers(tmp_path, tiny_llama_dir, tokens):
    """An Embedding weight is stored (num, dim) while its factors give (dim, num): merged transposed, into
    the residual (trained PiSSA) and into the original (converted LoRA), equal to PEFT's merge_and_unload."""
    init = make_init(tiny_llama_dir, tmp_path / "init", rank=4, targets=["embed_tokens", "q_proj"])
    trained = train_pissa(init, tmp_path / "trained")
    convert_to_lora(tmp_path / "trained", init, tmp_path / "lora")
    assert merge_adapter(tmp_path / "trained", init, tmp_path / "merged-residual").layers == 3
    merge_adapter(tmp_path / "lora", tiny_llama_dir, tmp_path / "merged")
    expected = logits(trained, tokens)
    for folder in ("merged", "merged-residual"):
        torch.testing.assert_close(logits(load(tmp_path / folder), tokens), expected, atol=1e-5, rtol=0)
    reference = load_with_adapter(tiny_llama_dir, tmp_path / "lora").merge_and_unload().state_dict()
    ours = folder_tensors(tmp_path / "merged")
    key = "model.embed_tokens.weight"
    torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=0)
    assert not torch.equal(ours[key], load(tiny_llama_dir).state_dict()[key])  # the update really landed


def test_conv2d_update_is_merged_in_the_kernel_layout():
    """merged() on a Conv2d kernel (out, in, kh, kw) == PEFT's own conv delta added to it."""
    from peft import LoraConfig, get_peft_model

    from pissa.convert.merge import Update, merged
    from pissa.layout import CONV2D

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 10, (3, 5)))
    peft_model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    layer = peft_model.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (4, 6, 3, 5), (10, 4, 1, 1)
    W = layer.get_base_layer().weight.detach()
    with torch.no_grad():
        expected = W + layer.get_delta_weight("default")
    torch.testing.assert_close(merged(W, Update(A.detach(), B.detach(), layer.scaling["default"], CONV2D)), expected,
                               atol=1e-6, rtol=0)


# --- bad pairings: a clear error and nothing written ------------------------------------------------

def test_refuses_trained_pissa_adapter_on_the_original(run, tmp_path):
    root, _ = run
    with pytest.raises(PissaError, match=r"trained on the PiSSA residual.*pissa convert"):
        merge_adapter(root / "trained", root / "original", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_refuses_converted_adapter_on_the_residual(run, tmp_path):
    root, _ = run
    with pytest.raises(PissaError, match=r"converted LoRA adapter for the original model"):
        merge_adapter(root / "lora", root / "init", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_refuses_a_base_of_another_shape(run, tmp_path):
    from helpers import build_tiny_llama

    root, _ = run
    build_tiny_llama(seed=0, intermediate_size=96).save_pretrained(tmp_path / "wide")
    with pytest.raises(PissaError, match=r"adapter layer model\.layers\.0\.mlp\.\w+ needs a weight of shape"):
        merge_adapter(root / "lora", tmp_path / "wide", tmp_path / "out")
    build_tiny_llama(seed=0, num_hidden_layers=1).save_pretrained(tmp_path / "short")
    with pytest.raises(PissaError, match=r"no weight for adapter layer model\.layers\.1\."):
        merge_adapter(root / "lora", tmp_path / "short", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_refuses_non_safetensors_base_and_missing_adapter(run, tmp_path):
    root, _ = run
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((root / "original" / "config.json").read_text())
    torch.save(load(root / "original").state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(PissaError, match=r"safetensors only.*pytorch_model\.bin"):
        merge_adapter(root / "lora", tmp_path / "bin", tmp_path / "out")
    with pytest.raises(PissaError, match=r"does not exist"):
        merge_adapter(tmp_path / "nowhere", root / "original", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


# --- CLI -----------------------------------------------------------------------------------------

def test_cli_merge(run, tmp_path, tokens):
    from pissa.cli import app

    root, trained = run
    result = CliRunner().invoke(app, ["merge", str(root / "trained"), "--base", str(root / "init"),
                                      "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "residual + PiSSA adapter" in result.output
    torch.testing.assert_close(logits(load(tmp_path / "merged"), tokens), logits(trained, tokens), atol=1e-5, rtol=0)
    result = CliRunner().invoke(app, ["merge", str(root / "trained"), "--base", str(root / "original"),
                                      "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "error:" in result.output
    assert_nothing_written(tmp_path, tmp_path / "bad")
