"""QPiSSA: quantization formats against bitsandbytes' own layer path, the QPiSSA/LoftQ/QLoRA loops
against their definitions, error ordering, and the 4-bit round trip of a `pissa init --quantize`
output through stock transformers loading (exact dequantized weights, matching logits)."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from benchmarks._peers import cuda_moves_on_cpu  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pissa.cli import app  # noqa: E402
from pissa.cli.options import expand_lists  # noqa: E402
from pissa.decompose import layer_seed  # noqa: E402
from pissa.decompose.linalg import one_thread  # noqa: E402
from pissa.errors import PissaError  # noqa: E402
from pissa.init import (  # noqa: E402
    PissaConfig,
    init_model,
    linear_modules,
    run_init,  # noqa: E402
)
from pissa.init.load import check_quantized_output  # noqa: E402
from pissa.quant import (  # noqa: E402
    QuantizationError,
    QuantSpec,
    fake_quantize,
    fit_iterates,
    load_kwargs,
    loftq_decompose,
    loftq_iterates,
    nuclear,
    qlora_iterate,
    qpissa_decompose,
    qpissa_iterates,
    read_record,
)
from pissa.report.quant import ReportConfig, layer_type, measure_layer, short_names, summarize  # noqa: E402

runner = CliRunner()


def add_principal_structure_(model, k: int = 8, strength: float = 6.0, seed: int = 0) -> None:
    """Give every linear weight a few dominant singular directions, in place.

    Pretrained weights have them (the premise of PiSSA); a freshly initialised model does not, and
    on its flat spectrum the top-r of W is no better a thing to keep in full precision than the
    top-r of the quantization error.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in linear_modules(model).values():
            W = module.weight  # (out, in)
            out_dim, in_dim = W.shape
            U = torch.linalg.qr(torch.randn(out_dim, k, generator=g)).Q  # (out, k)
            V = torch.linalg.qr(torch.randn(in_dim, k, generator=g)).Q  # (in, k)
            level = W.norm() / min(out_dim, in_dim) ** 0.5 * (out_dim * in_dim) ** 0.25 / 8
            W += (U * (strength * level * torch.linspace(1.0, 0.3, k))) @ V.T  # (out, in)


@pytest.fixture
def structured_llama(make_tiny_llama):
    model = make_tiny_llama()
    add_principal_structure_(model)
    return model


@pytest.fixture
def structured_dir(tmp_path, structured_llama):
    path = tmp_path / "structured-llama"
    structured_llama.save_pretrained(path)
    return path


# --- formats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fake_quantize_is_what_a_bnb_layer_computes_with(quant_type, double_quant, dtype):
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.02  # (out, in)
    spec = QuantSpec(quant_type=quant_type, double_quant=double_quant, dtype=dtype)
    # bitsandbytes' own layer path: a Params4bit quantized on .to(device), as transformers loads it.
    param = bnb.nn.Params4bit(W.to(getattr(torch, dtype)), requires_grad=False, quant_type=quant_type,
                              compress_statistics=double_quant).to("cpu")
    reference = bnb.functional.dequantize_4bit(param.data, param.quant_state).float()
    assert torch.equal(fake_quantize(W, spec), reference)
    assert not torch.equal(reference, W)  # it did quantize


def test_int8_is_rowwise_absmax():
    W = torch.randn(16, 96, generator=torch.Generator().manual_seed(2))  # (out, in)
    absmax = W.abs().amax(dim=1, keepdim=True)  # (out, 1)
    expected = torch.round(W / absmax * 127) * absmax / 127  # (out, in)
    torch.testing.assert_close(fake_quantize(W, QuantSpec(quant_type="int8")), expected, rtol=0, atol=1e-6)


def test_nuclear_norm_is_sum_of_singular_values():
    E = torch.randn(20, 30, generator=torch.Generator().manual_seed(3))
    assert nuclear(E) == pytest.approx(torch.linalg.matrix_norm(E, ord="nuc").item(), rel=1e-5)


# --- fitting loops against their definitions ----------------------------------------------------

def test_qpissa_step_one_is_pissa_then_nf4_of_the_residual():
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(4)) * 0.02
    spec = QuantSpec()
    it = next(qpissa_iterates(W, 8, spec, 1))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    principal = U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]  # (out, in) top-8 of W
    torch.testing.assert_close(it.B @ it.A, principal, rtol=1e-4, atol=1e-6)
    assert torch.equal(it.Q, fake_quantize(W - it.B @ it.A, spec))


def test_later_qpissa_steps_fit_what_the_quantized_residual_misses():
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(5)) * 0.02
    spec = QuantSpec()
    first, second = list(qpissa_iterates(W, 8, spec, 2))
    U, S, Vh = torch.linalg.svd(W - first.Q, full_matrices=False)
    torch.testing.assert_close(second.B @ second.A, U[:, :8] @ torch.diag(S[:8]) @ Vh[:8], rtol=1e-4, atol=1e-6)
    assert torch.equal(second.Q, fake_quantize(W - second.B @ second.A, spec))


def test_loftq_step_one_keeps_the_top_of_the_qlora_error():
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(6)) * 0.02
    spec = QuantSpec()
    it = next(loftq_iterates(W, 8, spec, 1))
    qlora = qlora_iterate(W, 8, spec)
    assert torch.equal(it.Q, qlora.Q) and torch.equal(qlora.B, torch.zeros(64, 8))
    S_err = torch.linalg.svdvals(W - qlora.Q)
    # Eckart-Young: what LoftQ leaves is the tail of the QLoRA error's spectrum (paper eq. 15).
    assert nuclear(it.error(W)) == pytest.approx(S_err[8:].sum().item(), rel=1e-4)


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_agrees_with_peft_loftq_init(monkeypatch, iters):
    from peft.utils.loftq_utils import loftq_init

    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(8)) * 0.02  # (out, in)
    with cuda_moves_on_cpu():
        Q, A, B = loftq_init(W, num_bits=4, reduced_rank=8, num_iter=iters)  # PEFT: A (r, in), B (out, r)
    ours = list(loftq_iterates(W, 8, QuantSpec(), iters))[-1]
    assert torch.equal(ours.Q, Q)
    torch.testing.assert_close(ours.B @ ours.A, B @ A, rtol=0, atol=1e-7)

def test_error_ordering_on_a_tiny_model(structured_llama):
    """Paper table 4 / 8: QPiSSA < LoftQ < QLoRA at equal T, and QPiSSA's T = 5 <= T = 1."""
    spec = QuantSpec()
    totals = {"qlora": 0.0}
    for W in (m.weight.detach() for m in linear_modules(structured_llama).values()):
        qlora = nuclear(qlora_iterate(W, 8, spec).error(W))
        totals["qlora"] += qlora
        errs = {fit: [nuclear(it.error(W)) for it in fit_iterates(fit, W, 8, spec, 5)] for fit in ("loftq", "qpissa")}
        for t in (0, 4):  # T = 1 and T = 5
            assert errs["qpissa"][t] < errs["loftq"][t] < qlora
        assert errs["qpissa"][4] <= errs["qpissa"][0]
        for fit, values in errs.items():
            for t, v in enumerate(values):
                totals[(fit, t + 1)] = totals.get((fit, t + 1), 0.0) + v
    assert totals[("qpissa", 5)] < totals[("qpissa", 1)] < totals[("loftq", 1)] < totals["qlora"]


def test_init_path_gives_the_report_iterate(structured_llama):
    """qpissa_decompose (pissa init) and the report's loop give the same adapter and Q at step T."""
    W = structured_llama.model.layers[0].self_attn.q_proj.weight.detach()
    spec = QuantSpec()
    f = qpissa_decompose(W, 8, spec, 3, seed=7, name="q")
    last = list(qpissa_iterates(W.float(), 8, spec, 3, seed=7))[-1]
    torch.testing.assert_close(f.B @ f.A, last.B @ last.A, rtol=0, atol=1e-6)
    torch.testing.assert_close(fake_quantize(f.residual, spec), last.Q, rtol=0, atol=1e-6)
    torch.testing.assert_close(f.residual + f.B @ f.A, W, rtol=0, atol=1e-6)  # W_res + B @ A = W before quantizing
    assert f.info["quant"]["iter_error_fro"][-1] < f.info["quant"]["qlora_error_fro"]


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1.0), (torch.bfloat16, 2.0)])
def test_loftq_init_stores_w_minus_previous_adapter_and_fits_its_quantization(structured_llama, dtype, scale):
    """LoftQ for pissa init: residual R = W - L_{T-1} as stored, nf4(R) is the loop's Q_T bit for bit, and
    the stored adapter (scaled, cast) is the loop's last L_T = top-r of W - Q_T."""
    W = structured_llama.model.layers[0].self_attn.q_proj.weight.detach().to(dtype)
    spec = QuantSpec(dtype=str(dtype).removeprefix("torch."))
    f = loftq_decompose(W, 8, spec, 3, scale=scale, seed=7, adapter_dtype=dtype, name="q")
    *_, before, last = loftq_iterates(W.float(), 8, spec, 3, seed=7)
    assert f.residual.dtype == dtype
    assert torch.equal(f.residual, (W.float() - before.B @ before.A).to(dtype))
    assert torch.equal(fake_quantize(f.residual, spec), last.Q)
    update = scale * (f.B.float() @ f.A.float())  # (out, in), the adapter as stored
    tol = 1e-6 if dtype == torch.float32 else 2e-4  # bf16 factors: the cast of A and B
    torch.testing.assert_close(update, last.B @ last.A, rtol=0, atol=tol)
    quant = f.info["quant"]
    assert quant["fit"] == "loftq" and len(quant["iter_error_fro"]) == 3
    assert quant["error_fro"] == pytest.approx((W.float() - last.Q - update).norm().item(), rel=1e-6)
    assert quant["error_fro"] < quant["qlora_error_fro"]
    # LoftQ's residual is not W - B @ A (that is QPiSSA's identity): the unquantized recon error is reported.
    assert f.info["recon_max_abs_err"] == pytest.approx((f.residual.float() + update - W.float()).abs().max().item())
    assert f.info["recon_max_abs_err"] > 1e-4


def test_loftq_init_with_one_step_stores_w_itself(structured_llama):
    """T = 1: the base is QLoRA's nf4(W) and the adapter the top-r of its error (LoftQ's first step)."""
    W = structured_llama.model.layers[1].mlp.down_proj.weight.detach()
    f = loftq_decompose(W, 8, QuantSpec(), 1)
    assert torch.equal(f.residual, W)
    it = next(loftq_iterates(W, 8, QuantSpec(), 1))
    torch.testing.assert_close(f.B @ f.A, it.B @ it.A, rtol=0, atol=1e-6)


def test_qpissa_with_scale_and_bf16_adapter_fits_the_stored_factors(structured_llama):
    W = structured_llama.model.layers[0].mlp.up_proj.weight.detach().to(torch.bfloat16)
    spec = QuantSpec(dtype="bfloat16")
    f = qpissa_decompose(W, 8, spec, 2, scale=2.0, adapter_dtype=torch.bfloat16, name="up")
    update = 2.0 * (f.B.float() @ f.A.float())  # (out, in), the adapter as stored
    assert f.residual.dtype == torch.bfloat16
    torch.testing.assert_close(f.residual.float(), (W.float() - update).to(torch.bfloat16).float(), rtol=0, atol=0)
    error = W.float() - fake_quantize(f.residual, spec) - update
    assert f.info["quant"]["error_fro"] == pytest.approx(error.norm().item(), rel=1e-6)


def test_lora_method_with_quantization_is_qlora(structured_llama):
    W = structured_llama.model.layers[0].self_attn.v_proj.weight.detach()
    f = qpissa_decompose(W, 8, QuantSpec(), 5, method="lora-kaiming", name="v")
    assert torch.equal(f.residual, W) and torch.equal(f.B, torch.zeros_like(f.B))
    assert f.info["quant"]["reduction_fro_pct"] == pytest.approx(0.0, abs=1e-9)


# --- pissa init --quantize: 4-bit round trip --------------------------------------------------------

def fitted_reference(structured_dir, out):
    """The model the adapter was fitted against: Q = fake_quantize(stored residual) as fp32 weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "residual", dtype=torch.float32)
    spec = QuantSpec(**{k: read_record(out / "residual")[k] for k in ("quant_type", "double_quant", "dtype")})
    manifest = json.loads((out / "pissa.json").read_text())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in manifest["layers"]:
            modules[name].weight.copy_(fake_quantize(modules[name].weight, spec))
    return PeftModel.from_pretrained(model, out / "adapter")


@pytest.mark.parametrize("fit", ["qpissa", "loftq"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_saved_residual_loads_in_4bit_as_fitted(structured_dir, structured_llama, tmp_path, tokens, double_quant,
                                                 fit):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / fit
    result = run_init(str(structured_dir), PissaConfig(rank=8, quantize="nf4", quant_iters=2, quant_fit=fit,
                                                       double_quant=double_quant), out, stream=False)
    record = read_record(out / "residual")
    assert record == result.manifest["quantization"]
    assert record["fit"] == fit and result.manifest["config"]["quant_fit"] == fit
    assert record["bnb_config"]["bnb_4bit_use_double_quant"] is double_quant and record["blocksize"] == 64
    loaded = AutoModelForCausalLM.from_pretrained(out / "residual", **load_kwargs(out / "residual"))
    assert check_quantized_output(loaded, out)["layers"] == 14

    # Identical dequantized weights, layer by layer, against the stored residual quantized as fitted.
    spec = QuantSpec(double_quant=double_quant)
    from safetensors.torch import load_file

    stored = load_file(out / "residual" / "model.safetensors")
    modules = dict(loaded.named_modules())
    originals = dict(structured_llama.named_modules())
    for name, info in result.manifest["layers"].items():
        w = modules[name].weight
        deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        assert torch.equal(deq, fake_quantize(stored[f"{name}.weight"], spec)), name
        assert info["quant"]["error_fro"] < info["quant"]["qlora_error_fro"]
        if fit == "loftq":  # the loaded base is the LoftQ loop's own Q_T, run on the original weight
            W = originals[name].weight.detach()
            with one_thread():  # as init decomposes on a CPU: LAPACK's bits depend on its thread count
                *_, last = loftq_iterates(W, 8, spec, 2, seed=layer_seed(0, name))
            assert torch.equal(deq, last.Q), name

    # Logits of the 4-bit model + adapter match the fitted reconstruction Q + B @ A. Train mode: that
    # is how QPiSSA runs, and bitsandbytes' CPU inference path would round absmax to bf16.
    quantized = PeftModel.from_pretrained(loaded, out / "adapter").train()
    reference = fitted_reference(structured_dir, out).train()
    with torch.no_grad():
        torch.testing.assert_close(quantized(tokens).logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)


def test_loaded_residual_stays_the_fit_and_passes_gradients_after_an_eval_pass(structured_dir, tmp_path, tokens,
                                                                              monkeypatch):
    """pissa's 4-bit loader keeps every forward on dequantize + matmul: bitsandbytes' bf16 CPU kernel (AVX512-BF16
    machines) would repack the weights at the first eval pass, then leave the fit and cut the input gradient.
    Every Linear4bit is made to believe it runs on such a CPU (the repacking itself is torch code), so that the
    test fails without the fix on any machine."""
    import bitsandbytes.nn.modules
    from peft import PeftModel

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)

    from pissa.init.load import load_quantized_residual

    out = tmp_path / "qpissa"
    run_init(str(structured_dir), PissaConfig(rank=8, quantize="nf4", quant_iters=2), out, stream=False)
    quantized = PeftModel.from_pretrained(load_quantized_residual(out, "cpu"), out / "adapter", is_trainable=True)
    reference = fitted_reference(structured_dir, out)
    for name, param in reference.named_parameters():
        param.requires_grad_("lora_" in name)
    with torch.no_grad():
        torch.testing.assert_close(quantized.eval()(tokens).logits, reference.eval()(tokens).logits,
                                   rtol=1e-5, atol=1e-5)
    grads = []
    for model in (quantized, reference):
        model.train()
        model(tokens).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_A" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 14
    for name, grad in grads[0].items():  # layer 0's adapters get theirs through layer 1's 4-bit weights
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_loftq_init_agrees_with_peft_loftq_config(structured_dir, tmp_path, monkeypatch):
    """pissa init --quant-fit loftq == PEFT's LoraConfig(init_lora_weights="loftq"): PEFT keeps the dequantized
    Q as the base weight, ours is the stored residual quantized at load; same Q bit for bit, same A and B
    (both split sqrt(S) evenly between the factors; alpha = r so no scale) up to the sign of each component."""
    from peft import LoftQConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path / "loftq"
    run_init(str(structured_dir), PissaConfig(rank=8, quantize="nf4", quant_fit="loftq", quant_iters=3), out,
             stream=False)
    ours = AutoModelForCausalLM.from_pretrained(out / "residual", **load_kwargs(out / "residual"))
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")

    base = AutoModelForCausalLM.from_pretrained(structured_dir, dtype=torch.float32)
    targets = sorted({n.rsplit(".", 1)[-1] for n in linear_modules(base)})
    config = LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=3))
    with cuda_moves_on_cpu(), one_thread():  # as init decomposes on a CPU: LAPACK's bits depend on its threads
        peft = get_peft_model(base, config)
    peft_modules, our_modules = dict(peft.base_model.model.named_modules()), dict(ours.named_modules())
    names = list(json.loads((out / "pissa.json").read_text())["layers"])
    assert len(names) == 14
    for name in names:
        layer, w = peft_modules[name], our_modules[name].weight
        assert torch.equal(bnb.functional.dequantize_4bit(w.data, w.quant_state).float(),
                           layer.get_base_layer().weight), name
        A_peft, B_peft = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
        A, B = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
        signs = torch.sign((A * A_peft).sum(dim=1))  # (r,) the SVD's sign choice per component
        torch.testing.assert_close(A * signs[:, None], A_peft, rtol=0, atol=1e-5)
        torch.testing.assert_close(B * signs, B_peft, rtol=0, atol=1e-5)


def test_loftq_streams_like_in_memory(structured_dir, tmp_path):
    from safetensors.torch import load_file

    config = PissaConfig(rank=8, quantize="nf4", quant_fit="loftq", quant_iters=2)
    streamed = run_init(str(structured_dir), config, tmp_path / "s")
    memory = run_init(str(structured_dir), config, tmp_path / "m", stream=False)
    assert "stream" in streamed.manifest and "stream" not in memory.manifest
    assert streamed.manifest["quantization"] == memory.manifest["quantization"]
    assert streamed.manifest["quantization"]["fit"] == "loftq"
    for part, file in (("residual", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        a, b = load_file(tmp_path / "s" / part / file), load_file(tmp_path / "m" / part / file)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), part


def test_converting_a_loftq_run_is_off_by_the_inits_fitted_error(structured_dir, structured_llama, tmp_path):
    """pissa convert of an adapter trained on a LoftQ init: original + converted LoRA differs from the trained
    Q + B'A' by exactly the init's W - Q - BA (what the convert note says), not by anything else."""
    from pissa.convert import convert_to_lora
    from pissa.io.adapter_files import read_adapter, write_adapter

    out = tmp_path / "loftq"
    result = run_init(str(structured_dir), PissaConfig(rank=8, quantize="nf4", quant_fit="loftq", quant_iters=2), out,
                      stream=False)
    config, state = read_adapter(out / "adapter")
    g = torch.Generator().manual_seed(0)
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}  # "training" moved A, B
    write_adapter(tmp_path / "trained", config, trained)
    converted = convert_to_lora(tmp_path / "trained", out, tmp_path / "lora")
    assert len(converted.notes) == 1 and "the init is LoftQ" in converted.notes[0]
    _, lora = read_adapter(tmp_path / "lora")
    from safetensors.torch import load_file

    stored = load_file(out / "residual" / "model.safetensors")
    name = "model.layers.1.mlp.up_proj"
    key = f"base_model.model.{name}.lora_"
    W = dict(structured_llama.named_modules())[name].weight.detach()  # (out, in)
    Q = fake_quantize(stored[f"{name}.weight"], QuantSpec())  # (out, in) the trained base
    on_original = W + lora[key + "B.weight"] @ lora[key + "A.weight"]  # alpha = 2r over rank 2r: scale 1
    trained_model = Q + trained[key + "B.weight"] @ trained[key + "A.weight"]
    fitted_error = W - Q - state[key + "B.weight"] @ state[key + "A.weight"]
    torch.testing.assert_close(on_original - trained_model, fitted_error, rtol=0, atol=1e-6)
    assert fitted_error.norm().item() == pytest.approx(result.manifest["layers"][name]["quant"]["error_fro"], rel=1e-4)


def test_mismatched_loading_config_is_detected(structured_dir, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "qpissa"
    run_init(str(structured_dir), PissaConfig(rank=8, quantize="nf4", quant_iters=1), out, stream=False)
    residual = out / "residual"
    # The reference implementation's drift: fitted without double quant, loaded with it.
    kwargs = load_kwargs(residual)
    kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True)
    drifted = AutoModelForCausalLM.from_pretrained(residual, **kwargs)
    with pytest.raises(QuantizationError, match="double_quant=True"):
        check_quantized_output(drifted, out)
    # Another dtype: transformers casts the stored residual before quantizing it.
    bf16 = AutoModelForCausalLM.from_pretrained(residual, **{**load_kwargs(residual), "dtype": torch.bfloat16})
    with pytest.raises(QuantizationError, match="dtype=bfloat16"):
        check_quantized_output(bf16, out)
    fp4 = AutoModelForCausalLM.from_pretrained(
        residual, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"))
    with pytest.raises(QuantizationError, match="quant_type=fp4"):
        check_quantized_output(fp4, out)
    plain = AutoModelForCausalLM.from_pretrained(residual)
    with pytest.raises(QuantizationError, match="not a 4-bit layer"):
        check_quantized_output(plain, out)
    # Same settings, other values (a residual edited after the fit) are caught by the recorded sha256.
    same = AutoModelForCausalLM.from_pretrained(residual, **load_kwargs(residual))
    with torch.no_grad():
        w = same.model.layers[1].mlp.down_proj.weight
        w.data[0, 0] ^= 1  # flip one packed code
    with pytest.raises(QuantizationError, match="mlp.down_proj: the loaded 4-bit weight differs"):
        check_quantized_output(same, out)


# --- bad input -------------------------------------------------------------------------------------

def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(QuantizationError, match=r"pip install 'pissa\[quant\]'"):
        PissaConfig(quantize="nf4")
    with pytest.raises(QuantizationError, match="bitsandbytes"):
        fake_quantize(torch.ones(4, 64), QuantSpec())


@pytest.mark.parametrize("kwargs, message", [
    ({"quantize": "nf3"}, "'nf3' is not supported; choose one of: nf4, fp4"),
    ({"quantize": "int8"}, "int8 is measured by `pissa quant-report`"),
    ({"quantize": "nf4", "quant_iters": 0}, "--quant-iters must be >= 1"),
    ({"quantize": "nf4", "quant_storage": "int4"}, "quant storage must be one of"),
    ({"quant_fit": "loftq"}, "--quant-fit loftq fits the adapter against a quantized base; add --quantize nf4"),
    ({"quantize": "nf4", "quant_fit": "svd"}, "unknown --quant-fit 'svd'; choose one of: qpissa, loftq"),
    ({"quant_fit": "qlora"}, "unknown --quant-fit 'qlora'; choose one of: qpissa, loftq"),
    ({"quantize": "nf4", "quant_fit": "loftq", "method": "lora-kaiming"}, "drop --method lora-kaiming, or use"),
])
def test_bad_quant_settings_are_refused(kwargs, message):
    with pytest.raises(PissaError, match=message.replace("[", r"\[")):
        PissaConfig(**kwargs)


def test_unsupported_quant_type_in_spec():
    with pytest.raises(QuantizationError, match="unsupported quant type 'q2'; choose one of: nf4, fp4, int8"):
        QuantSpec(quant_type="q2")


def test_already_quantized_model_is_refused(structured_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        structured_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    with pytest.raises(PissaError, match="already quantized"):
        init_model(model, PissaConfig(rank=8, quantize="nf4"))


def test_cli_init_quantize_and_bad_iters(structured_dir, tmp_path):
    bad = runner.invoke(app, ["init", str(structured_dir), "--quantize", "nf4", "--quant-iters", "0",
                              "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--quant-iters must be >= 1" in bad.output
    assert not (tmp_path / "bad").exists()
    ok = runner.invoke(app, ["init", str(structured_dir), "--rank", "8", "--quantize", "nf4", "--quant-iters", "2",
                             "--double-quant", "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert "quant error vs QLoRA" in ok.output
    manifest = json.loads((tmp_path / "ok" / "pissa.json").read_text())
    assert manifest["quantization"]["double_quant"] is True and manifest["config"]["quant_iters"] == 2
    assert manifest["layers"]["model.layers.0.self_attn.q_proj"]["quant"]["iters"] == 2


def test_cli_init_quant_fit_loftq_and_its_bad_input(structured_dir, tmp_path):
    no_quantize = runner.invoke(app, ["init", str(structured_dir), "--quant-fit", "loftq",
                                      "--out", str(tmp_path / "a")])
    assert no_quantize.exit_code == 2 and "add --quantize nf4" in no_quantize.output
    unknown = runner.invoke(app, ["init", str(structured_dir), "--quantize", "nf4", "--quant-fit", "gptq",
                                  "--out", str(tmp_path / "b")])
    assert unknown.exit_code == 2 and "unknown --quant-fit 'gptq'; choose one of: qpissa, loftq" in unknown.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    ok = runner.invoke(app, ["init", str(structured_dir), "--rank", "8", "--quantize", "nf4", "--quant-fit", "loftq",
                             "--quant-iters", "2", "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert "max |residual + BA - W|" in ok.output and "loftq" in ok.output  # (the table wraps long cells)
    manifest = json.loads((tmp_path / "ok" / "pissa.json").read_text())
    assert manifest["config"]["quant_fit"] == manifest["quantization"]["fit"] == "loftq"
    assert {info["quant"]["fit"] for info in manifest["layers"].values()} == {"loftq"}


# --- quant-report ----------------------------------------------------------------------------------

def test_expand_greedy_list_options():
    lists = {"--ranks": True, "--iters": True, "--targets": False}
    assert expand_lists(["m", "--ranks", "16", "64", "--iters", "1", "5", "--out", "x"], lists) == [
        "m", "--ranks", "16", "--ranks", "64", "--iters", "1", "--iters", "5", "--out", "x"]
    assert expand_lists(["--ranks", "8", "model"], lists) == ["--ranks", "8", "model"]
    assert expand_lists(["--targets", "q_proj", "v_proj", "--out", "x"], lists) == [
        "--targets", "q_proj", "--targets", "v_proj", "--out", "x"]


def test_layer_types_and_short_names():
    assert layer_type("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
    assert layer_type("pooler.dense") == "pooler.dense"
    types = ["attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert short_names(types) == {"attention.self.query": "query", "attention.output.dense": "attention.output.dense",
                                  "intermediate.dense": "intermediate.dense", "output.dense": "output.dense"}


def test_quant_report_cli_matches_direct_measurement(structured_dir, structured_llama, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["quant-report", str(structured_dir), "--ranks", "4", "8", "--iters", "1", "2",
                                 "--targets", "q_proj", "--targets", "down_proj", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "QPiSSA" in result.output and "q_proj" in result.output
    assert {p.name for p in out.iterdir()} == {"layers.csv", "summary.csv", "summary.md", "chart.png"}
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import csv

    rows = list(csv.DictReader(open(out / "layers.csv")))
    assert len(rows) == 4 * (1 + 2 * 2 * 2)  # 4 layers x (QLoRA + 2 ranks x 2 fits x 2 T)
    # Reference: one layer measured directly.
    W = structured_llama.model.layers[1].self_attn.q_proj.weight.detach()
    direct = measure_layer(W, "model.layers.1.self_attn.q_proj", ReportConfig(ranks=[4, 8], iters=[1, 2]))
    got = [r for r in rows if r["layer"] == "model.layers.1.self_attn.q_proj"]
    for d, g in zip(direct, got, strict=True):
        assert (d["fit"], str(d["rank"]), str(d["iters"])) == (g["fit"], g["rank"], g["iters"])
        assert float(g["reduction_nuclear_pct"]) == pytest.approx(d["reduction_nuclear_pct"], rel=1e-6)
    types, table = summarize(direct)
    assert next(r for r in table if r["fit"] == "qlora")["AVG"] == 0.0
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["fit"], r["rank"], r["iters"]) for r in summary} >= {("qpissa", "8", "2"), ("loftq", "4", "1")}


def test_quant_report_refuses_bad_settings(structured_dir, tmp_path):
    result = runner.invoke(app, ["quant-report", str(structured_dir), "--iters", "0", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--iters must be >= 1" in result.output
    result = runner.invoke(app, ["quant-report", str(structured_dir), "--quant-type", "q3",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unsupported quant type 'q3'" in result.output
    assert not (tmp_path / "r").exists()


# --- real weights ----------------------------------------------------------------------------------

@pytest.mark.integration
def test_qpissa_beats_loftq_on_smollm2_layers(smollm2_dir):
    """Real pretrained weights (no synthetic structure): paper's ordering on a few SmolLM2 layers."""
    from safetensors import safe_open

    spec = QuantSpec()
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        names = [n for n in f.keys() if n.startswith("model.layers.0.") and n.endswith(("q_proj.weight",
                                                                                        "k_proj.weight"))]
        weights = {n: f.get_tensor(n) for n in names}
    assert len(weights) == 2
    for name, W in weights.items():
        qlora = nuclear(qlora_iterate(W, 16, spec).error(W))
        loftq = nuclear(next(loftq_iterates(W.float(), 16, spec, 1)).error(W.float()))
        qpissa = nuclear(next(qpissa_iterates(W.float(), 16, spec, 1)).error(W.float()))
        assert qpissa < loftq < qlora, name

