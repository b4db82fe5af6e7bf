"""`pissa.json`: what an init output holds and how it was made, so it can be checked and repeated."""

from __future__ import annotations

import json
import platform
from pathlib import Path

MANIFEST = "pissa.json"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import peft
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {
        "pissa": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def build_manifest(source: str, config: dict, layers: dict[str, dict], **extra) -> dict:
    """The manifest of an init output; `layers` maps layer name -> decomposition info."""
    errors = [info["recon_max_abs_err"] for info in layers.values()]
    return {
        "format_version": FORMAT_VERSION,
        "kind": "pissa-init",
        "source_model": source,
        "method": config["method"],
        "options": config["options"],
        "seed": config["seed"],
        "config": config,
        "versions": versions(),
        "summary": {
            "layers": len(layers),
            "ranks": sorted({info["rank"] for info in layers.values()}),
            "max_recon_abs_err": max(errors) if errors else 0.0,
        },
        **extra,
        "layers": layers,
    }


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(folder: str | Path) -> dict:
    from .jsonfile import read_json

    return read_json(Path(folder) / MANIFEST, f"{folder} is not a `pissa init` output folder", "re-run `pissa init`")
