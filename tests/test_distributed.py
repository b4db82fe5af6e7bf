"""pissa train under FSDP2 and DeepSpeed ZeRO-3 / ZeRO-2, launched by `accelerate launch` with the shipped configs
(docs/distributed/fsdp.yaml, zero3.yaml) on 2 CPU processes (gloo); the CPU overrides go on the command line
(--num_processes 2 --mixed_precision no), and helpers.allow_sharded_engines_on_cpu lifts accelerate's one
accelerator-device check (see there). One launch per engine runs every case one after the other
(tests/distributed_launch.py); each is compared with the same run in one process at the same global batch.

- a sharded run equals the single-process run: the losses step by step, and the trained adapter tensor by tensor;
- the parameters really were sharded: each process held half of the residual's and of the adapter's elements;
- RUN/adapter is an ordinary, whole PEFT adapter: stock PEFT in a fresh process, `pissa convert`, `pissa merge`
  and `pissa eval` take it as they take the single-process one;
- a run killed after its checkpoint and resumed equals the uninterrupted run under the same engine;
- --dora (with --model: the init is written to RUN/init first), a MoE init (expert ParamWrapper adapters),
  --stage dpo (the reference is the model before training), QPiSSA (an NF4 residual in bfloat16 storage) and full
  fine-tuning run under both; --train-singular-values runs under ZeRO-2 and is refused under FSDP and ZeRO-3 before
  any work (as is FSDP1 without use_orig_params).

Tolerances (the reference is one process at the same micro-batches, batch 2 with 2 accumulation steps, so the only
difference is where the two micro-batch gradients are summed: by all-reduce / reduce-scatter instead of in place):
an fp32 sum in another order differs by a few units of round-off u = 2^-24 ~ 6e-8 per addition, ~sqrt(n)·u ~ 1e-5
relative for a gradient element summed over n ~ 10^3-10^4 terms here (tokens x features). The losses inherit it
(rtol 1e-4). AdamW's step m/sqrt(v) is scale-free, so the adapter's update carries the same relative error, growing
about linearly over T <= 6 steps: ~1e-4; the bound on ||A_dist - A_one|| / ||A_one - A_0|| (over the whole adapter)
is 1e-3, which leaves 10x for elements whose gradient is near zero, where Adam amplifies the difference. Measured
here: FSDP2 and ZeRO-2 0 to 6e-8 (two fp32 summands add the same in either order), ZeRO-3 5e-7 to 5e-5 (the MoE
at the top).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import build_tiny_moe, char_tokenizer, free_port, losses, tensors
from pissa.errors import PissaError
from pissa.init import PissaConfig, run_init
from pissa.train import TrainConfig, TrainRecipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "docs" / "distributed"
LAUNCHED = Path(__file__).parent / "distributed_launch.py"
UPDATE_RTOL = 1e-3  # derived in the module docstring
ZERO2 = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}  # what `accelerate launch ... --zero_stage 2` sets

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.long, pytest.mark.integration]  # 2 processes


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dir, data_file, prefs_file) -> dict:
    """The init folders the runs train: PiSSA of the tiny Llama, of a tiny Mixtral, and QPiSSA (NF4, bf16 storage)."""
    root = tmp_path_factory.mktemp("inputs")
    moe = root / "moe"
    build_tiny_moe("mixtral").save_pretrained(moe)
    char_tokenizer().save_pretrained(moe)
    found = {"tiny": tiny_dir, "data": data_file, "prefs": prefs_file,
             "init": run_init(str(tiny_dir), PissaConfig(rank=4), root / "init").out,
             "moe_init": run_init(str(moe), PissaConfig(rank=4), root / "moe_init").out}
    if has_bitsandbytes():
        for name, storage in (("qinit", "bfloat16"), ("qinit_uint8", "uint8")):
            config = PissaConfig(rank=4, quantize="nf4", quant_iters=2, quant_storage=storage)
            found[name] = run_init(str(tiny_dir), config, root / name).out
    return found


def has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def cases(inputs: dict, uint8: bool = False) -> dict[str, dict]:
    """name -> TrainConfig fields (without out) of every case a launch runs, at batch 2 per process (with `uint8`,
    also QPiSSA in uint8 storage, which has no reference of its own: it is the same model as in bf16 storage)."""
    base = dict(data=str(inputs["data"]), lr=1e-2, max_steps=3, batch_size=2, warmup_ratio=0.0, max_length=128,
                tensorboard=False)
    init = dict(base, init=str(inputs["init"]))
    found = {
        "pissa": dict(init, max_steps=6, save_steps=3),  # also the run resumed after a kill at step 4
        # on the fly: RUN/init written first; converted to a LoRA on the original model at the end (RUN/lora)
        "dora": dict(base, model=str(inputs["tiny"]), rank=4, dora=True, convert_at_end=True),
        "moe": dict(base, init=str(inputs["moe_init"])),
        "dpo": dict(init, stage="dpo", data=str(inputs["prefs"]), lr=5e-3),
        "sv": dict(init, train_singular_values=True),
        "full": dict(base, model=str(inputs["tiny"]), method="full", lr=1e-3),  # every weight trains, sharded too
    }
    if "qinit" in inputs:
        found["qpissa"] = dict(base, init=str(inputs["qinit"]))
        if uint8:
            found["qpissa-uint8"] = dict(base, init=str(inputs["qinit_uint8"]))
    return found


def launch(config: str, runs: list[dict], work: Path) -> list[dict]:
    """`accelerate launch --config_file docs/distributed/<config>` of tests/distributed_launch.py on 2 CPU
    processes; returns the main process's records (helpers.shard_counts, the distributed type)."""
    spec = work / f"{Path(config).stem}.json"
    spec.write_text(json.dumps([{**run, "cpu": True} for run in runs]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(LAUNCHED), str(spec)]
    # HF_HOME: no accelerate config of the user's; DS_ACCELERATOR: DeepSpeed's CPU accelerator, said outright.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HOME": str(work / "hf"),
           "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(spec.with_suffix(".rank0.json").read_text())


def engine_runs(names: list[str], inputs: dict, out: Path, zero2: tuple[str, ...] = ()) -> list[dict]:
    """The launch's run list: each case into out/<name>, then the kill at step 4 and the resume of "pissa"."""
    all_cases = cases(inputs, uint8=True)
    runs = [{"config": {**all_cases[n.removeprefix("zero2-")], "out": str(out / n)},
             "env": ZERO2 if n in zero2 else None} for n in names]
    resumed = {**all_cases["pissa"], "out": str(out / "resumed")}
    return runs + [{"config": resumed, "crash_at": 4}, {"config": {**resumed, "resume": True}}]


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory) -> dict:
    """name -> (losses, trained adapter, initial adapter) of each case in one process: batch 2, 2 accumulation
    steps, so the same micro-batches and global batch of 4 as 2 processes at batch 2."""
    from pissa.train.recipe import adapter_state

    root, found = tmp_path_factory.mktemp("single"), {}
    for name, config in cases(inputs).items():
        recipe = TrainRecipe(TrainConfig(**config, out=str(root / name), grad_accum=2)).setup()
        initial = adapter_state(recipe.model) if recipe.method.adapter else {
            k: v.detach().clone() for k, v in recipe.model.state_dict().items()}
        recipe.train()
        recipe.save()
        found[name] = {"run": root / name, "losses": losses(root / name), "weights": tensors(trained(root / name)),
                       "initial": initial}
    return found


def trained(run: Path) -> Path:
    """The folder of a run's trained weights: adapter/, or model/ for full fine-tuning."""
    return run / ("adapter" if (run / "adapter").is_dir() else "model")


@pytest.fixture(scope="module")
def fsdp(inputs, tmp_path_factory) -> dict:
    """One FSDP2 launch (docs/distributed/fsdp.yaml, full sharding) of every case but --train-singular-values."""
    out = tmp_path_factory.mktemp("fsdp")
    names = [n for n in cases(inputs, uint8=True) if n != "sv"]
    return {"out": out, "records": launch("fsdp.yaml", engine_runs(names, inputs, out), out)}


@pytest.fixture(scope="module")
def zero(inputs, tmp_path_factory) -> dict:
    """One DeepSpeed launch (docs/distributed/zero3.yaml): every case but --train-singular-values under ZeRO-3,
    then plain PiSSA and --train-singular-values under ZeRO-2."""
    out = tmp_path_factory.mktemp("zero")
    names = [n for n in cases(inputs) if n != "sv"] + ["zero2-pissa", "zero2-sv"]
    runs = engine_runs(names, inputs, out, zero2=("zero2-pissa", "zero2-sv"))
    return {"out": out, "records": launch("zero3.yaml", runs, out)}


def assert_same_weights(weights: dict, reference: dict, initial: dict) -> None:
    """Same tensors (names, dtypes, shapes), within UPDATE_RTOL of the reference's update over all of them."""
    assert {k: (v.dtype, v.shape) for k, v in weights.items()} == {k: (v.dtype, v.shape) for k, v in reference.items()}
    start = {k: initial.get(k, torch.zeros_like(v)) for k, v in reference.items()}
    diff = torch.cat([(weights[k] - reference[k]).flatten() for k in reference]).norm()
    update = torch.cat([(reference[k] - start[k]).flatten() for k in reference]).norm()
    assert diff <= UPDATE_RTOL * update, (diff / update).item()


def assert_equals_single(engine: dict, name: str, single: dict, expected_type: str, case: str | None = None,
                         sharded_frozen: bool = True):
    run = engine["out"] / name
    ref = single[case or name]
    record = next(r for r in engine["records"] if r["out"] == str(run))
    assert record["distributed_type"] == expected_type and record["processes"] == 2
    share = 1 if name.startswith("zero2-") else 2  # FSDP2 and ZeRO-3: each process held half; ZeRO-2: all
    for part in ("trainable", "frozen") if sharded_frozen else ("trainable",):
        assert share * record["shards"][part]["local"] == record["shards"][part]["whole"], (part, record["shards"])
    torch.testing.assert_close(losses(run), ref["losses"], rtol=1e-4, atol=1e-5)
    if (case or name) == "dpo":  # the reference is the model before training: at step 0 the policy is it
        assert losses(run)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_weights(tensors(trained(run)), ref["weights"], ref["initial"])
    if (ref["run"] / "lora").is_dir():  # --convert-at-end: the same rank-2r LoRA (its B0, A0 part is the init's)
        assert_same_weights(tensors(run / "lora"), tensors(ref["run"] / "lora"), {})


# --- FSDP2 -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pissa", "dora", "moe", "dpo", "qpissa", "full"])
def test_fsdp_run_equals_one_process(fsdp, single, name):
    if name not in single:
        pytest.skip("QPiSSA needs bitsandbytes")
    assert_equals_single(fsdp, name, single, "FSDP")


def test_fsdp_keeps_a_uint8_packed_residual_whole_and_warns(fsdp, single, inputs):
    """FSDP2 shards floating-point tensors only: with the 4-bit codes packed in uint8 every process held them all
    (in bfloat16 storage, test_fsdp_run_equals_one_process[qpissa], half), and pissa warns before training. The
    model is the same one: the run equals the bf16-storage reference."""
    if "qpissa" not in single:
        pytest.skip("QPiSSA needs bitsandbytes")
    from pissa.errors import PissaWarning
    from pissa.train.engines import Engine, check_quant_storage

    record = next(r for r in fsdp["records"] if r["out"] == str(fsdp["out"] / "qpissa-uint8"))
    assert 2 * record["shards"]["trainable"]["local"] == record["shards"]["trainable"]["whole"]
    assert 2 * record["shards"]["frozen"]["local"] > record["shards"]["frozen"]["whole"]
    assert_equals_single(fsdp, "qpissa-uint8", single, "FSDP", "qpissa", sharded_frozen=False)
    with pytest.warns(PissaWarning, match="packed in uint8, which FSDP does not shard.*--quant-storage bfloat16"):
        check_quant_storage(Engine("fsdp", 2, fsdp_version=2), str(inputs["qinit_uint8"]))


def test_fsdp_resume_after_kill_equals_uninterrupted(fsdp):
    assert_resumed_equals_uninterrupted(fsdp["out"])


def assert_resumed_equals_uninterrupted(out: Path) -> None:
    from pissa.train.log import read_log

    # killed after step 4, resumed from the checkpoint at 3: the log holds each of the 6 steps once
    assert [r["step"] for r in read_log(out / "resumed")] == list(range(1, 7))
    torch.testing.assert_close(losses(out / "resumed"), losses(out / "pissa"), rtol=1e-6, atol=1e-7)
    a, b = tensors(out / "resumed" / "adapter"), tensors(out / "pissa" / "adapter")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_fsdp_adapter_is_an_ordinary_peft_adapter(fsdp, single, inputs, tmp_path, stock_logits):
    """Stock PEFT (a fresh process, no pissa), `pissa convert`, `pissa merge` and `pissa eval` take the FSDP run's
    adapter as they take the single-process one: the same model, within what the adapters differ by."""
    from typer.testing import CliRunner

    from helpers import load_auto
    from pissa.cli import app

    run, ref, init = fsdp["out"] / "pissa", single["pissa"]["run"], inputs["init"]
    assert adapter_config(run) == adapter_config(ref)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = logits_of(load_auto(init / "residual", ref / "adapter"), ids)
    trained = stock_logits(init / "residual", run / "adapter", ids)
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-4)  # adapters within UPDATE_RTOL of each other
    cli = CliRunner()
    commands = {"lora": ["convert", str(run / "adapter"), "--init", str(init), "--out", str(tmp_path / "lora")],
                "merged": ["merge", str(run / "adapter"), "--base", str(init), "--out", str(tmp_path / "merged")]}
    for name, args in commands.items():
        done = cli.invoke(app, args)
        assert done.exit_code == 0, (name, done.output)
    # the converted rank-2r LoRA on the original model, and the merged model, are the trained model (as in one process)
    torch.testing.assert_close(logits_of(load_auto(inputs["tiny"], tmp_path / "lora"), ids), trained, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_of(load_auto(tmp_path / "merged"), ids), trained, rtol=0, atol=1e-4)
    evaluated = {}
    for name, folder in (("fsdp", run), ("single", ref)):
        args = ["eval", str(folder), "--data", "arith", "--limit", "2", "--max-new-tokens", "4", "--backend",
                "transformers", "--out", str(tmp_path / f"eval-{name}")]
        done = cli.invoke(app, args)
        assert done.exit_code == 0, done.output
        evaluated[name] = json.loads((tmp_path / f"eval-{name}" / "eval.json").read_text())
    assert evaluated["fsdp"]["kind"] == evaluated["single"]["kind"] == "run"
    assert evaluated["fsdp"]["perplexity"] == pytest.approx(evaluated["single"]["perplexity"], rel=1e-4)


def adapter_config(run: Path) -> dict:
    """adapter_config.json but its base path; PEFT keeps the targets in sets, saved in no fixed order."""
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    targets = ("target_modules", "target_parameters")
    return {k: sorted(v) if k in targets and v else v for k, v in config.items() if k != "base_model_name_or_path"}


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --- DeepSpeed ZeRO-3 and ZeRO-2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pissa", "dora", "moe", "dpo", "qpissa", "full", "zero2-pissa", "zero2-sv"])
def test_deepspeed_run_equals_one_process(zero, single, name):
    case = name.removeprefix("zero2-")
    if case not in single:
        pytest.skip("QPiSSA needs bitsandbytes")
    assert_equals_single(zero, name, single, "DEEPSPEED", case)
    if case != "full":
        assert adapter_config(zero["out"] / name) == adapter_config(single[case]["run"])  # the same, whole adapter


def test_deepspeed_zero3_resume_after_kill_equals_uninterrupted(zero):
    assert_resumed_equals_uninterrupted(zero["out"])


# --- refused before any work --------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, match", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "--train-singular-values under FSDP2: PEFT's AdaLoRA"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
     "--train-singular-values under DeepSpeed ZeRO-3: PEFT's AdaLoRA"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "under FSDP1 without use_orig_params, each wrapped block"),
], ids=["sv-fsdp2", "sv-zero3", "fsdp1"])
def test_refused_under_sharding_before_any_work(tmp_path, inputs, monkeypatch, env, match):
    """What a sharding engine cannot train is refused as accelerate launch would start it, before anything is
    loaded or written (the engine is read from the variables accelerate launch sets)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = {**cases(inputs)["sv" if "singular" in match else "pissa"], "out": str(tmp_path / "run")}
    with pytest.raises(PissaError, match=match):
        TrainRecipe(TrainConfig(**config)).setup()
    assert not (tmp_path / "run").exists()


def test_deepspeed_launch_without_deepspeed_says_how_to_install(tmp_path, inputs, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(PissaError, match=r"DeepSpeed is not installed: `pip install 'pissa\[distributed\]'`"):
        TrainRecipe(TrainConfig(**cases(inputs)["pissa"], out=str(tmp_path / "run"))).setup()
    assert not (tmp_path / "run").exists()


# --- QPiSSA: the 4-bit residual in the storage FSDP shards --------------------------------------------------------

def test_qpissa_residual_in_bfloat16_storage_is_the_fitted_one(tmp_path, tiny_dir):
    """`pissa init --quant-storage bfloat16` fits the same adapter as uint8 storage (the packed 4-bit codes are the
    same bytes, viewed as bf16); its residual loads as bnb Linear4bit layers whose packed weight is a bfloat16
    tensor (what FSDP shards with bf16 weights around it), passes the fitted-Q check, and gives the same model."""
    pytest.importorskip("bitsandbytes")
    from pissa.init.load import load_init_dir
    from pissa.quant.loading import loaded_weight

    outs = {storage: run_init(str(tiny_dir), PissaConfig(rank=4, quantize="nf4", quant_iters=2,
                                                         quant_storage=storage), tmp_path / storage).out
            for storage in ("uint8", "bfloat16")}
    assert_same_tensors_of(outs["uint8"] / "adapter", outs["bfloat16"] / "adapter")
    models = {s: load_init_dir(out, "float32", dora=False, device="cpu") for s, out in outs.items()}  # checked at load
    layers = {s: {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
              for s, model in models.items()}
    assert sorted(layers["uint8"]) == sorted(layers["bfloat16"]) and layers["uint8"]
    for name, module in layers["bfloat16"].items():
        assert module.weight.dtype == torch.bfloat16 and layers["uint8"][name].weight.dtype == torch.uint8
        assert torch.equal(loaded_weight(module)[0], loaded_weight(layers["uint8"][name])[0]), name
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(models["bfloat16"].train(), ids), logits_of(models["uint8"].train(), ids),
                               rtol=0, atol=0)


def assert_same_tensors_of(a: Path, b: Path) -> None:
    from helpers import assert_same_tensors

    assert_same_tensors(tensors(a), tensors(b))
