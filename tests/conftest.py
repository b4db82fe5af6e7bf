"""Shared fixtures: tiny models built from a config (no download), and the embedded SmolLM2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import RECORDS, build_tiny_llama, char_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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


STOCK_SCRIPT = r"""
import sys, torch
from transformers import AutoModelForCausalLM
base, adapter, tokens_path, out_path = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
if adapter != "-":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter)
model.eval()
with torch.no_grad():
    logits = model(torch.load(tokens_path, weights_only=True)).logits
assert "pissa" not in sys.modules, "stock loading imported pissa"
torch.save(logits, out_path)
"""


@pytest.fixture
def stock_logits(tmp_path):
    """stock_logits(base_dir, adapter_dir_or_None, tokens): logits computed in a fresh process that
    loads the folders with stock transformers + PEFT only (it asserts pissa was never imported)."""
    import subprocess
    import sys

    def run(base, adapter, tokens):
        tokens_path, out_path = tmp_path / "stock_tokens.pt", tmp_path / "stock_logits.pt"
        torch.save(tokens, tokens_path)
        cmd = [sys.executable, "-c", STOCK_SCRIPT, str(base), str(adapter or "-"), str(tokens_path), str(out_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(out_path, weights_only=True)

    return run
