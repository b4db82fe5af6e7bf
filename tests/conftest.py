"""Shared fixtures: tiny models built from a config (no download), and the embedded SmolLM2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import PREFS, RECORDS, build_tiny_llama, char_tokenizer
from pissa.decompose import linalg

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


def pytest_collection_modifyitems(items):
    """The modules marked `long` first, each in its own order: `make test` hands modules to its two workers in
    collection order (--no-loadscope-reorder), so the long ones start early and the short ones even out the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: tiny matmuls gain nothing from threads, and on
    busy cores OpenMP spin-waiting makes them up to ~100x slower. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; results do not depend on it."""
    with linalg.one_thread():
        yield


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


# A separate process that loads folders with stock transformers + PEFT, never pissa, one request per line on stdin:
# [Auto class, [[base, adapter or "-"], ...], inputs.pt, out.pt], inputs being token ids or a dict of model inputs.
# It starts once per session (importing transformers and peft costs ~5 s), checks at every request that pissa is
# still not imported, and loads every model anew from its files.
STOCK_SERVER = r"""
import json, sys, traceback, torch, transformers
from peft import PeftModel
for line in sys.stdin:
    model = None
    try:
        auto, pairs, inputs_path, out_path = json.loads(line)
        inputs, out = torch.load(inputs_path, weights_only=True), []
        for base, adapter in pairs:
            model = getattr(transformers, auto).from_pretrained(base, dtype=torch.float32)
            if adapter != "-":
                model = PeftModel.from_pretrained(model, adapter)
            with torch.no_grad():
                out.append((model.eval()(**inputs) if isinstance(inputs, dict) else model.eval()(inputs)).logits)
        assert "pissa" not in sys.modules, "stock loading imported pissa"
        torch.save(out, out_path)
        reply = "ok"
    except Exception:
        reply = traceback.format_exc()
    del model
    print(json.dumps(reply), flush=True)
"""


@pytest.fixture(scope="session")
def stock_outputs(tmp_path_factory):
    """stock_outputs(auto_class, [(base, adapter_or_None), ...], inputs) -> the logits of each pair on `inputs`,
    computed in a separate process that loads the folders with stock transformers + PEFT only (it asserts pissa
    was never imported there). One process serves the whole session."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("stock")
    proc = subprocess.Popen([sys.executable, "-c", STOCK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=folder)

    def run(auto: str, pairs, inputs):
        inputs_path, out_path = folder / "inputs.pt", folder / "logits.pt"
        torch.save(inputs, inputs_path)
        request = [auto, [[str(base), str(adapter or "-")] for base, adapter in pairs], str(inputs_path),
                   str(out_path)]
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        reply = proc.stdout.readline()
        assert reply, f"the stock-loading process died (exit {proc.poll()})"
        assert json.loads(reply) == "ok", json.loads(reply)
        return torch.load(out_path, weights_only=True)

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture
def stock_logits(stock_outputs):
    """stock_logits(base_dir, adapter_dir_or_None, tokens): a causal LM's logits from the stock-loading process."""
    return lambda base, adapter, tokens: stock_outputs("AutoModelForCausalLM", [(base, adapter)], tokens)[0]


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory):
    """helpers.PREFS (the sums set as DPO preferences) as JSONL."""
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PREFS))
    return path
