"""Shared fixtures: tiny models built from a config (no download), and the embedded SmolLM2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import PREFS, RECORDS, build_tiny_llama, char_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# One terminal for every test, wherever the suite runs: the CLI's tables and help wrap at the terminal's width
# (rich reads COLUMNS, else the size of whatever terminal stdin is), and a CI's FORCE_COLOR would put escape
# codes into captured output. PISSA_TEST_COLUMNS=40 runs the suite at another width, to find an assertion that
# still depends on it (tests/test_cli_width.py runs one CLI test at 40, 80 and 200 columns on every run).
os.environ["COLUMNS"] = os.environ.get("PISSA_TEST_COLUMNS", "100")
os.environ["LINES"] = "50"
os.environ["NO_COLOR"] = "1"
os.environ["PYTHONUTF8"] = "1"  # subprocesses print the same characters under any locale
for forcing in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE"):
    os.environ.pop(forcing, None)

# `make test` runs the suite in two pytest-xdist workers, one per core: each computes on one thread (and so do the
# processes its tests start), because two workers with two OpenMP threads each wait at every barrier for a thread
# the other worker holds (a robust-PiSSA test took 230 s instead of 4 s). Results do not depend on it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: tiny matmuls gain nothing from threads, and on
    busy cores OpenMP spin-waiting makes them up to ~100x slower. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama (vocab 128) + the character-level tokenizer saved as an HF folder."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_llama(seed=0, vocab_size=128).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """The memorisable sums set (helpers.RECORDS) as JSONL."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.fixture
def make_tiny_llama():
    """Factory fixture: make_tiny_llama(seed=0, **config_overrides)."""
    return build_tiny_llama


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_llama):
    """The tiny Llama saved as a safetensors HF folder."""
    path = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(path)
    return path


@pytest.fixture
def tokens():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct as a cached safetensors folder (converted on first use)."""
    from pissa.models import resolve_embedded

    return resolve_embedded("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    """SmolLM2's real tokenizer (with chat template), for tests that need real text handling."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


# A fresh process that loads folders with stock transformers + PEFT, never pissa, one request per line on stdin:
# [base, adapter or "-", tokens.pt, out.pt]. It starts once per session (importing transformers and peft costs
# ~5 s) and checks at every request that pissa is still not imported; each model is loaded anew from its files.
STOCK_SERVER = r"""
import json, sys, traceback, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
for line in sys.stdin:
    model = None
    try:
        base, adapter, tokens_path, out_path = json.loads(line)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if adapter != "-":
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        with torch.no_grad():
            logits = model(torch.load(tokens_path, weights_only=True)).logits
        assert "pissa" not in sys.modules, "stock loading imported pissa"
        torch.save(logits, out_path)
        reply = "ok"
    except Exception:
        reply = traceback.format_exc()
    del model
    print(json.dumps(reply), flush=True)
"""


@pytest.fixture(scope="session")
def stock_process(tmp_path_factory):
    import subprocess
    import sys

    cwd = tmp_path_factory.mktemp("stock")
    proc = subprocess.Popen([sys.executable, "-c", STOCK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=cwd)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture
def stock_logits(tmp_path, stock_process):
    """stock_logits(base_dir, adapter_dir_or_None, tokens): logits computed in a separate process that loads the
    folders with stock transformers + PEFT only (it asserts pissa was never imported there)."""

    def run(base, adapter, tokens):
        tokens_path, out_path = tmp_path / "stock_tokens.pt", tmp_path / "stock_logits.pt"
        torch.save(tokens, tokens_path)
        request = [str(base), str(adapter or "-"), str(tokens_path), str(out_path)]
        stock_process.stdin.write(json.dumps(request) + "\n")
        stock_process.stdin.flush()
        reply = stock_process.stdout.readline()
        assert reply, f"the stock-loading process died (exit {stock_process.poll()})"
        assert json.loads(reply) == "ok", json.loads(reply)
        return torch.load(out_path, weights_only=True)

    return run


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory):
    """helpers.PREFS (the sums set as DPO preferences) as JSONL."""
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PREFS))
    return path
