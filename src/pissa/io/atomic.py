"""Atomic output folders: everything is written into a temporary sibling that is renamed into
place only when complete, so a failed run never leaves a half-written result behind."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import PissaError


class OutputExistsError(PissaError, FileExistsError):
    """The output folder exists and the caller did not ask to overwrite it."""


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless `overwrite`; returns it as a Path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    return out


def temp_dir_for(out: Path) -> Path:
    """The temporary sibling folder that becomes `out` on success."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, keep_temp: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success rename it to `out`, on failure delete it.

    `keep_temp=True` leaves a failed temporary folder in place (for resumable writers).
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    if tmp.exists() and not keep_temp:
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if not keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(src: Path, out: Path) -> None:
    """Move `src` to `out`, replacing an old `out` only after the new one is complete."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        src.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(out)


def dir_size(path: str | Path) -> int:
    """Total bytes of the files under `path`."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
