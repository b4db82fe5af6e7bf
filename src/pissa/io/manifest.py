"""`pissa.json`: what an init output holds and how it was made, so it can be checked and repeated."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..layout import MANIFEST_FILE
from .jsonfile import read_json, write_json

FORMAT_VERSION = 1
VERSIONED = ("torch", "transformers", "peft", "safetensors")


def versions() -> dict[str, str]:
    """The versions a result depends on (read from package metadata: nothing is imported)."""
    from .. import __version__

    found = {"pissa": __version__}
    for package in VERSIONED:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return {**found, "python": platform.python_version()}


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
    return write_json(Path(folder) / MANIFEST_FILE, manifest)


def read_manifest(folder: str | Path) -> dict:
    return read_json(Path(folder) / MANIFEST_FILE, f"{folder} is not a `pissa init` output folder",
                     "re-run `pissa init`")
