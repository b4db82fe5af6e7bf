"""In-memory init of a live model through PEFT: unchanged logits, agreement with PEFT's own
PiSSA init, targets and ranks, and bad input."""

import pytest
import torch

from pissa.decompose import METHODS
from pissa.errors import PissaError
from pissa.init import PissaConfig, init_model, residual_state_dict

LINEAR_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# Robust PiSSA's default runs its l1 fit for hundreds of iterations; the identity holds after any number.
QUICK_OPTIONS = {"robust": {"max_iter": 3}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_logits_unchanged_after_init_for_every_method(method, tiny_llama, tokens):
    before = logits(tiny_llama, tokens)
    config = PissaConfig(rank=8, method=method, seed=1, options=QUICK_OPTIONS.get(method, {}))
    peft_model, report = init_model(tiny_llama, config)
    assert len(report) == 14  # 7 linear layers x 2 blocks, lm_head excluded
    torch.testing.assert_close(logits(peft_model, tokens), before, atol=1e-5, rtol=0)
    assert max(info["recon_max_abs_err"] for info in report.values()) <= 1e-5


def test_each_layer_reconstructs_w(make_tiny_llama):
    original = {n: p.clone() for n, p in make_tiny_llama().named_parameters()}
    peft_model, _ = init_model(make_tiny_llama(), PissaConfig(rank=4, alpha=8))
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            W = original[f"{name}.weight"]
            B, A = module.lora_B["default"].weight, module.lora_A["default"].weight
            rebuilt = module.get_base_layer().weight + module.scaling["default"] * B @ A
            torch.testing.assert_close(rebuilt, W, atol=1e-5, rtol=0)
            assert module.scaling["default"] == 2.0


def test_residual_matches_peft_pissa_init(make_tiny_llama):
    from peft import LoraConfig, get_peft_model

    ours, _ = init_model(make_tiny_llama(), PissaConfig(rank=8, alpha=16))
    theirs = get_peft_model(
        make_tiny_llama(),
        LoraConfig(r=8, lora_alpha=16, target_modules=sorted(LINEAR_LEAVES), init_lora_weights="pissa"),
    )
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    checked = 0
    for key, value in theirs_sd.items():
        if key.endswith("base_layer.weight"):
            torch.testing.assert_close(ours_sd[key], value, atol=1e-5, rtol=0)
            prefix = key.removesuffix("base_layer.weight")
            ours_update = ours_sd[prefix + "lora_B.default.weight"] @ ours_sd[prefix + "lora_A.default.weight"]
            theirs_update = theirs_sd[prefix + "lora_B.default.weight"] @ theirs_sd[prefix + "lora_A.default.weight"]
            torch.testing.assert_close(ours_update, theirs_update, atol=1e-5, rtol=0)
            checked += 1
    assert checked == 14


def test_default_targets_exclude_the_output_head(tiny_llama):
    peft_model, report = init_model(tiny_llama, PissaConfig(rank=4))
    assert {name.rsplit(".", 1)[-1] for name in report} == LINEAR_LEAVES
    assert set(peft_model.peft_config["default"].target_modules) == LINEAR_LEAVES


def test_targets_by_name_and_by_regex(make_tiny_llama):
    _, by_name = init_model(make_tiny_llama(), PissaConfig(rank=4, targets=["q_proj", "v_proj"]))
    assert sorted(by_name) == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))
    _, by_regex = init_model(make_tiny_llama(), PissaConfig(rank=4, targets=r".*layers\.1\.mlp\..*_proj"))
    assert sorted(by_regex) == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]


def test_rank_pattern_overrides_and_keeps_scale_one(make_tiny_llama, tokens):
    model = make_tiny_llama()
    before = logits(model, tokens)
    pattern = {"down_proj": 2, r"layers\.0\.self_attn\.q_proj": 5}
    peft_model, report = init_model(model, PissaConfig(rank=8, rank_pattern=pattern))
    assert report["model.layers.0.mlp.down_proj"]["rank"] == 2
    assert report["model.layers.0.self_attn.q_proj"]["rank"] == 5
    assert report["model.layers.1.self_attn.q_proj"]["rank"] == 8
    assert {info["scale"] for info in report.values()} == {1.0}
    torch.testing.assert_close(logits(peft_model, tokens), before, atol=1e-5, rtol=0)


def test_rslora_and_alpha_keep_logits(make_tiny_llama, tokens):
    model = make_tiny_llama()
    before = logits(model, tokens)
    peft_model, report = init_model(model, PissaConfig(rank=4, alpha=32, use_rslora=True))
    assert {info["scale"] for info in report.values()} == {16.0}
    torch.testing.assert_close(logits(peft_model, tokens), before, atol=1e-5, rtol=0)


def test_gpt2_conv1d_weights_are_handled_transposed(tokens):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    before = logits(model, tokens)
    peft_model, report = init_model(model, PissaConfig(rank=4))
    assert "transformer.h.0.attn.c_attn" in report and report["transformer.h.0.attn.c_attn"]["shape"] == [192, 64]
    torch.testing.assert_close(logits(peft_model, tokens), before, atol=1e-5, rtol=0)


def test_residual_state_dict_has_original_names(tiny_llama):
    names = set(tiny_llama.state_dict())
    peft_model, _ = init_model(tiny_llama, PissaConfig(rank=4))
    assert set(residual_state_dict(peft_model)) == names


def test_no_matching_target_lists_the_real_names(tiny_llama):
    with pytest.raises(PissaError, match=r"no module matches targets \['query'\].*q_proj"):
        init_model(tiny_llama, PissaConfig(rank=4, targets=["query"]))


def test_non_linear_target_is_refused(tiny_llama):
    with pytest.raises(PissaError, match="not linear layers"):
        init_model(tiny_llama, PissaConfig(rank=4, targets=["input_layernorm"]))


def test_rank_too_large_names_the_layer(tiny_llama):
    with pytest.raises(PissaError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: rank 40 exceeds min"):
        init_model(tiny_llama, PissaConfig(rank=40))


def test_nan_weight_is_refused_before_the_model_is_touched(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(PissaError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: contains 1 NaN/Inf"):
        init_model(tiny_llama, PissaConfig(rank=4))
    assert not hasattr(tiny_llama, "peft_config")  # nothing was wrapped


def test_quantized_model_is_refused(tiny_llama):
    tiny_llama.config.quantization_config = {"load_in_4bit": True}
    with pytest.raises(PissaError, match="already quantized"):
        init_model(tiny_llama, PissaConfig(rank=4))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "--rank must be > 0"),
        (dict(method="svd++"), "unknown method"),
        (dict(options={"power_iters": 3}), "no option power_iters"),
        (dict(alpha=-1.0), "--alpha must be > 0"),
        (dict(adapter_dtype="float8"), "unknown dtype"),
        (dict(rank_pattern={"q_proj": 0}), "rank pattern ranks must be > 0"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(PissaError, match=match):
        PissaConfig(**kwargs)
