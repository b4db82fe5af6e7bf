"""The same CLI test at 40, 80 and 200 columns: what a command writes, and what its output says, does not depend on
the terminal's width (the rest of the suite runs at conftest's fixed width)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from helpers import build_tiny_llama, load_auto, outputs, peft_pissa_run, squashed
from pissa.convert.sources import PEFT_INIT
from pissa.layout import CONVERSION_FILE

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """A PiSSA adapter trained with plain PEFT whose config still says init_lora_weights="pissa_niter_4"."""
    root = tmp_path_factory.mktemp("peft")
    trained = peft_pissa_run(build_tiny_llama(), root, "pissa_niter_4", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])
    return root, outputs(trained, TOKENS)


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_convert_says_and_writes_the_same_at_every_width(peft_run, tmp_path, monkeypatch, columns):
    from pissa.cli import app
    from pissa.cli.app import console, err_console

    root, trained_logits = peft_run
    monkeypatch.setenv("COLUMNS", str(columns))  # click reads it at each call; rich when a console is made, so:
    for each in (console, err_console):
        monkeypatch.setattr(each, "width", columns)
    result = CliRunner().invoke(app, ["convert", str(root / "trained"), "--init", str(root / "initial"),
                                      "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "init_lora_weights='pissa_niter_4'" in warning[0]  # one unbroken line
    assert squashed(PEFT_INIT) in squashed(result.output)  # the summary's `init` row, however it wraps
    table = [line for line in result.output.splitlines() if line[:1] in "┌│└"]  # its rules and rows
    assert len(table) >= 9 and all(len(line) <= columns for line in table)  # it fits the terminal
    record = json.loads((tmp_path / "lora" / CONVERSION_FILE).read_text())
    assert record["init_kind"] == PEFT_INIT and record["rank"] is None
    converted = load_auto(root / "original", tmp_path / "lora")
    torch.testing.assert_close(outputs(converted, TOKENS), trained_logits, atol=1e-5, rtol=0)
