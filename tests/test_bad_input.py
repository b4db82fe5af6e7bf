"""Fuzz-style: every command, a table of bad values per option. Each run must exit non-zero with a one-line
message (no traceback), leave every input byte-identical, and leave no output (not even a temporary
folder)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from helpers import snapshot
from pissa.cli import app
from pissa.init import PissaConfig, run_init

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

# {command: (base arguments, [(option, bad value), ...])}; "{model}", "{data}", "{init}", "{adapter}" and "{out}"
# are filled in by the fixture. A value of None means the option is a bare flag appended as is.
CASES = {
    "init": (["{model}", "--out", "{out}"], [
        ("--rank", "0"), ("--rank", "-3"), ("--rank", "x"), ("--rank", "100000"), ("--alpha", "nan"),
        ("--alpha", "inf"), ("--alpha", "0"), ("--dropout", "1"), ("--dropout", "nan"), ("--method", "bogus"),
        ("--niter", "-1"), ("--oversample", "-2"), ("--components", "bogus"), ("--option", "nosuch=1"),
        ("--option", "no-equals"), ("--target-regex", "(["), ("--targets", "no_such_proj"),
        ("--rank-pattern", "zzz=3"), ("--rank-pattern", "q_proj=0"), ("--rank-pattern", "([=3"),
        ("--adapter-dtype", "int8"), ("--quantize", "int8"), ("--quantize", "bogus"), ("--quant-fit", "bogus"),
        ("--quant-iters", "0"), ("--dtype", "bogus"), ("--workers", "0"), ("--device", "bogus"),
    ]),
    "train": (["--model", "{model}", "--data", "{data}", "--out", "{out}", "--max-steps", "1"], [
        ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1"), ("--lr", "inf"), ("--scheduler", "bogus"),
        ("--warmup-ratio", "1"), ("--warmup-ratio", "nan"), ("--weight-decay", "-1"), ("--epochs", "nan"),
        ("--max-steps", "0"), ("--batch-size", "0"), ("--grad-accum", "0"), ("--max-grad-norm", "nan"),
        ("--max-grad-norm", "-1"), ("--precision", "fp8"), ("--limit", "-5"), ("--limit", "0"),
        ("--max-length", "1"), ("--rank", "0"), ("--alpha", "nan"), ("--method", "bogus"),
        ("--orth-reg-weight", "nan"), ("--save-steps", "-1"), ("--data", "missing.jsonl"), ("--model", "./nope"),
        ("--init", "{init}"), ("--resume", None), ("--task", "bogus"), ("--task", "classify"),
    ]),
    "eval": (["{model}", "--data", "{data}", "--out", "{out}"], [
        ("--task", "bogus"), ("--max-new-tokens", "0"), ("--batch-size", "0"), ("--limit", "-1"),
        ("--max-length", "0"), ("--backend", "bogus"), ("--data", "missing.jsonl"), ("--adapter", "./nope"),
        ("--dtype", "bogus"),
    ]),
    "convert": (["{adapter}", "--init", "{init}", "--out", "{out}"], [
        ("--rank", "0"), ("--rank", "100000"), ("--init", "./nope"), ("--init", "{adapter}"),
    ]),
    "merge": (["{adapter}", "--base", "{init}", "--out", "{out}"], [
        ("--base", "./nope"), ("--base", "{adapter}"),
    ]),
    "report": (["{run}", "--out", "{out}"], [("--title", None)]),
    "export": (["{adapter}", "--for", "vllm", "--base", "{model}", "--out", "{out}"], [
        ("--for", "bogus"), ("--rank", "24"), ("--rank", "0"), ("--base", "./nope"), ("--init", "./nope"),
    ]),
    "analyze": (["{model}", "--out", "{out}"], [
        ("--rank", "0"), ("--seeds", "1"), ("--max-length", "0"), ("--layer", "("), ("--layer", "no.such.layer"),
        ("--method", "bogus"),
    ]),
    "quant-report": (["{model}", "--out", "{out}", "--ranks", "4", "--iters", "1"], [
        ("--ranks", "0"), ("--ranks", "1000"), ("--iters", "0"), ("--quant-type", "bogus"),
        ("--niter", "-1"), ("--targets", "no_such_proj"), ("--targets", "(["),
    ]),
    "demo": (["--out", "{out}", "--tiny"], [
        ("--lr", "nan"), ("--steps", "0"), ("--test-examples", "100000"), ("--rank", "0"),
        ("--max-new-tokens", "0"),
    ]),
}
FLAT = [(command, option, value) for command, (_, bad) in CASES.items() for option, value in bad]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dir, data_file):
    root = tmp_path_factory.mktemp("inputs")
    run_init(str(tiny_dir), PissaConfig(rank=4), root / "init")
    run = root / "run"
    (run / "eval" / "x").mkdir(parents=True)
    (run / "eval" / "x" / "eval.json").write_text('{"accuracy": 0.5, "correct": 1, "total": 2}')
    return {"model": str(tiny_dir), "data": str(data_file), "init": str(root / "init"),
            "adapter": str(root / "init" / "adapter"), "run": str(run)}


@pytest.mark.parametrize("command, option, value", FLAT, ids=[f"{c} {o} {v}" for c, o, v in FLAT])
def test_bad_value_is_refused_cleanly(inputs, tmp_path, command, option, value):
    out = tmp_path / "out"
    fill = {**inputs, "out": str(out)}
    base, _ = CASES[command]
    args = [a.format(**fill) for a in base]
    bad = [option] + ([] if value is None else [value.format(**fill)])
    if command == "report" and option == "--title":  # the report's bad input: a run folder that holds nothing
        empty = tmp_path / "empty"
        empty.mkdir()
        args, bad = [str(empty), "--out", str(out)], []
    before = {k: snapshot(v) for k, v in inputs.items()}
    result = runner.invoke(app, [command, *args, *bad])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    assert {k: snapshot(v) for k, v in inputs.items()} == before
    assert not out.exists() and not list(tmp_path.glob(".out.*")), sorted(p.name for p in tmp_path.iterdir())
