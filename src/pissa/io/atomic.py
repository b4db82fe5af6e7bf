"""Atomic output folders: everything is written into a temporary sibling that is renamed into
place only when complete, so a failed run never leaves a half-written result behind; the temporary
folders of a killed run are removed by the next run into the same output. And the output guard: an
output that equals, contains or lies inside one of the command's inputs is refused whatever
--overwrite says, so no command can delete what it reads."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import PissaError


class OutputExistsError(PissaError, FileExistsError):
    """The output folder exists and the caller did not ask to overwrite it."""


class OutputOverlapsInputError(PissaError, ValueError):
    """The output folder would replace, contain or sit inside one of the command's inputs."""


def check_output_dir(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse an output that overlaps an input (always) or exists (unless `overwrite`); returns it as a Path.

    `inputs` are the files and folders the command reads; names that are not local paths (hub ids) and
    None are skipped.
    """
    out = Path(out)
    check_not_overlapping(out, inputs)
    if out.parent.is_dir():
        remove_stale_temps(out)  # a killed run's leftovers (an old output moved aside is put back first)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    return out


def check_not_overlapping(out: Path, inputs: Iterable[str | Path | None]) -> None:
    target = out.expanduser().resolve()
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        source = Path(given).expanduser().resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise OutputOverlapsInputError(
            f"--out {out} {relation} the input {given}: writing there could destroy what the command reads; "
            "choose an --out outside every input (nothing was written)")


def temp_dir_for(out: Path) -> Path:
    """The temporary sibling folder that becomes `out` on success."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def stale(folder: Path) -> bool:
    """A `.NAME.tmp-PID` / `.NAME.old-PID` folder whose process is gone."""
    pid = folder.name.rsplit("-", 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid))


def remove_stale_temps(out: Path) -> list[Path]:
    """Clean up after a run into `out` that was killed: its temporary folders are deleted; an old `out` it
    had moved aside but not yet replaced is put back (never deleted while `out` is missing). A live run's
    folders are left alone. Returns the folders removed."""
    removed = []
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if stale(old):
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
            else:
                old.rename(out)
    for tmp in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        if stale(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


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


@contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) until the block ends: processes that write
    the same shared output (the embedded-model cache) take turns instead of interleaving their renames."""
    import fcntl  # POSIX; the lock is released when the file closes, also when the process dies

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def dir_size(path: str | Path) -> int:
    """Total bytes of the files under `path`."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
