"""The `pissa` command line: one verb per module, all registered on one typer app."""

import gc
import logging
import os

# Transparent huge pages for torch's CPU tensors of 2 MB and more (torch reads this once, at its first
# allocation, so before the imports below). A fresh W-sized tensor otherwise costs ~0.5 ms per MB in 4 KB
# page faults, as much as the rest of a layer's init: a streaming init used 15% less CPU time with it.
# Only the command line sets it; a program that imports pissa keeps its own allocator settings.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# Fewer cyclic garbage collections: importing torch, transformers and peft creates some million long-lived objects,
# and the default thresholds (700, 10, 10) walk all of them again and again while they arrive, which cost a fifth
# of a command's start-up (4.5 s of CPU for the imports `pissa init` needs, 3.8 s with these). Collection still
# runs; only the command line sets it.
gc.set_threshold(100_000, 50, 100)


class _WithoutHubKernelNotice(logging.Filter):
    """bitsandbytes >= 0.50 logs, at import (and peft imports it), that it could not fetch a faster CPU 4-bit
    kernel from the Hugging Face hub. pissa never uses that kernel (`quant.keep_exact_cpu_forward_` turns the
    bf16 CPU path off, and says so, on every 4-bit model it loads), so the line is noise on every command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_WithoutHubKernelNotice())

from . import (  # noqa: E402, F401  (each module registers its command)
    analyze,
    convert,
    demo,
    eval,
    export,
    init,
    merge,
    methods,
    quant_report,
    report,
    train,
)
from .app import app  # noqa: E402
from .options import set_metavars  # noqa: E402

set_metavars(app)


def main() -> None:
    try:
        app()
    finally:
        # The interpreter's shutdown runs full garbage collections over the millions of objects torch, transformers
        # and peft created: a second of waiting after the command is done. Frozen objects are not collected (the
        # process is ending; atexit handlers and finalizers still run).
        gc.freeze()
