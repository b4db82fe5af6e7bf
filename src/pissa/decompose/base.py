"""The decomposition registry: named methods with typed options, one entry point.

Orientation is PEFT's (pissa.layout states it): W (out, in), lora_A (r, in), lora_B (out, r), and
the update is scale * B @ A with scale = alpha / r (alpha / sqrt(r) with rsLoRA; see `lora_scale`).

A method returns the unscaled low-rank part it extracts from W as (B, A) with B @ A ~ part of W.
`decompose` divides both factors by sqrt(scale), so `scale * B @ A` is still that part, then
sets residual = W - scale * B @ A. Math runs in fp32; factors and residual are then cast to
their storage dtypes, and the reconstruction error is measured after that cast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import typing
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import PissaError
from .linalg import one_thread


class DecompositionError(PissaError, ValueError):
    """A weight, rank or option that a decomposition method cannot handle."""


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends only on the global seed and the layer's name, so results do
    not depend on the order, worker count or process that decomposes the layer."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@dataclass
class Factors:
    """The result of decomposing one weight W (out, in)."""

    A: torch.Tensor  # (r, in)   -> lora_A.weight
    B: torch.Tensor  # (out, r)  -> lora_B.weight
    residual: torch.Tensor  # (out, in) -> frozen base weight
    info: dict = field(default_factory=dict)


@dataclass
class NoOptions:
    """This method takes no options."""


# A method maps (W fp32 (out, in), rank, options, generator) -> (B (out, r), A (r, in), info).
MethodFn = Callable[[torch.Tensor, int, typing.Any, torch.Generator], tuple[torch.Tensor, torch.Tensor, dict]]
# Its optional batched form: (W fp32 (b, out, in), rank, options, one generator per matrix)
# -> (B (b, out, r), A (b, r, in), [info per matrix]).
BatchFn = Callable[[torch.Tensor, int, typing.Any, list], tuple[torch.Tensor, torch.Tensor, list]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    options: type
    help: str
    # False for LoRA-style inits that add a zero update instead of extracting part of W.
    extracts: bool = True
    # Decomposes a stack of same-shape matrices in one call (None: `decompose_batch` goes one by one).
    batch: BatchFn | None = None


METHODS: dict[str, Method] = {}


def register(name: str, options: type = NoOptions, help: str = "", extracts: bool = True, batch: BatchFn | None = None):
    """Decorator: add a decomposition method to the registry under `name` (`batch`: its batched form)."""

    def wrap(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"decomposition method {name!r} is registered twice")
        METHODS[name] = Method(name, fn, options, help or (fn.__doc__ or "").strip().splitlines()[0], extracts, batch)
        return fn

    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise DecompositionError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_options(method: str, options: dict | None = None):
    """Build the typed options dataclass of `method`, refusing unknown option names."""
    m = get_method(method)
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(m.options)}
    unknown = sorted(set(options) - known)
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise DecompositionError(f"method {method!r} has no option {', '.join(unknown)}; its options are: {valid}")
    return m.options(**options)


def check_weight(W: torch.Tensor, rank: int, name: str = "weight") -> None:
    """Refuse a weight that no method can decompose at this rank; names the tensor."""
    if W.ndim != 2:
        raise DecompositionError(f"{name}: expected a 2-D weight, got shape {tuple(W.shape)}")
    if not (W.is_floating_point()):
        raise DecompositionError(
            f"{name}: dtype {W.dtype} is not a float weight (already quantized?); "
            "give the unquantized fp32/bf16/fp16 checkpoint"
        )
    if rank <= 0:
        raise DecompositionError(f"{name}: rank must be > 0, got {rank}")
    if rank > min(W.shape):
        raise DecompositionError(
            f"{name}: rank {rank} exceeds min(out, in) = {min(W.shape)} for shape {tuple(W.shape)}; "
            "lower --rank or override it for this layer with a rank pattern"
        )
    # A finite sum proves every entry finite (NaN and Inf propagate); only then is the slower count skipped.
    if not torch.isfinite(W.sum()) and not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise DecompositionError(f"{name}: contains {bad} NaN/Inf values; fix or re-export the checkpoint")


def decompose(
    W: torch.Tensor,
    method: str = "pissa",
    rank: int = 16,
    *,
    scale: float = 1.0,
    options: dict | None = None,
    seed: int = 0,
    adapter_dtype: torch.dtype = torch.float32,
    residual_dtype: torch.dtype | None = None,
    name: str = "weight",
) -> Factors:
    """Split W (out, in) into adapter factors and a frozen residual with `method`.

    `scale` is the PEFT scaling the adapter will run with (see `lora_scale`). The residual keeps
    W's dtype unless `residual_dtype` is given. Raises DecompositionError naming `name`.
    """
    m, opts = checked(method, options, [W], rank, scale, [name])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    W32 = as_float32(W.detach())  # (out, in)
    B, A, info = m.fn(W32, rank, opts, generator)  # (out, r), (r, in)
    return finish(m, W32[None], B[None], A[None], [info], rank, scale, adapter_dtype, residual_dtype or W.dtype)[0]


def decompose_batch(
    Ws: Sequence[torch.Tensor],
    method: str = "pissa",
    rank: int = 16,
    *,
    scale: float = 1.0,
    options: dict | None = None,
    seeds: Sequence[int],
    adapter_dtype: torch.dtype = torch.float32,
    residual_dtype: torch.dtype | None = None,
    names: Sequence[str],
) -> list[Factors]:
    """`decompose` of several same-shape weights (out, in) in one batched call, where the method has
    a batched form (else one by one). Each weight keeps its own seed, so it gets the factors it gets
    alone, up to the summation order of batched kernels (see tests/test_batched.py)."""
    m, opts = checked(method, options, Ws, rank, scale, names)
    if m.batch is None or len(Ws) == 1:
        return [decompose(W, method, rank, scale=scale, options=options, seed=s, adapter_dtype=adapter_dtype,
                          residual_dtype=residual_dtype, name=n) for W, s, n in zip(Ws, seeds, names, strict=True)]
    first = Ws[0]
    if any(W.shape != first.shape or W.dtype != first.dtype or W.device != first.device for W in Ws):
        raise DecompositionError(f"{', '.join(names)}: a batch needs one shape, dtype and device")
    W32 = torch.empty((len(Ws), *first.shape), dtype=torch.float32, device=first.device)  # (b, out, in)
    for i, W in enumerate(Ws):
        W32[i].copy_(W.detach())
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    B, A, infos = m.batch(W32, rank, opts, generators)  # (b, out, r), (b, r, in)
    return finish(m, W32, B, A, infos, rank, scale, adapter_dtype, residual_dtype or first.dtype)


def checked(method: str, options: dict | None, Ws: Sequence[torch.Tensor], rank: int, scale: float,
            names: Sequence[str]):
    """The method and its typed options, after refusing any weight, rank or scale it cannot take."""
    m = get_method(method)
    opts = make_options(method, options)
    for W, name in zip(Ws, names, strict=True):
        check_weight(W, rank, name)
    if scale <= 0:
        raise DecompositionError(f"{names[0]}: scale must be > 0, got {scale}")
    return m, opts


# Rows of W that `finish` handles at once: about this many fp32 bytes, so the residual, its stored copy
# and the error of a chunk stay in cache (a whole-matrix pass costs a trip to memory and, for a fresh
# tensor, page faults: 11008x4096 took ~0.5 ms per MB to fault in). One chunk on a GPU.
CHUNK_BYTES = 1 << 20


def finish(m: Method, W32: torch.Tensor, B: torch.Tensor, A: torch.Tensor, infos: list[dict], rank: int,
           scale: float, adapter_dtype: torch.dtype, residual_dtype: torch.dtype) -> list[Factors]:
    """Scale and cast the factors of W32 (b, out, in), take the residual and measure the error.

    The residual is taken against the factors as stored, so the cast of A and B costs nothing, and the
    error is the one a user gets: the residual after its storage cast, plus the update, against W. Both
    are built chunk by chunk of rows (`residual_chunks_`), which reads W once and writes the residual once.
    """
    if m.extracts:
        root = math.sqrt(scale)
        B, A = B / root, A / root  # scale * B @ A is unchanged
    A = A.to(adapter_dtype).contiguous()  # (b, r, in)
    B = B.to(adapter_dtype).contiguous()  # (b, out, r)
    residual = torch.empty(W32.shape, dtype=residual_dtype, device=W32.device)  # (b, out, in)
    with one_thread():  # short memory-bound ops: a second thread only waits at their barriers (`one_thread`)
        stats = [residual_chunks_(residual[i], W32[i], B[i].to(torch.float32), A[i].to(torch.float32), scale)
                 for i in range(W32.shape[0])]
    return [Factors(A=A[i], B=B[i], residual=residual[i], info={
        "method": m.name,
        "rank": rank,
        "scale": scale,
        "shape": list(W32.shape[1:]),
        "recon_max_abs_err": max_err,
        "recon_rel_fro_err": rel_err,
        "residual_fro": res_fro,
        **info,
    }) for i, ((max_err, rel_err, res_fro), info) in enumerate(zip(stats, infos, strict=True))]


_SCRATCH = threading.local()


def scratch(numel: int, device: torch.device, slot: str = "chunk") -> torch.Tensor:
    """A reused fp32 CPU buffer of `numel` entries for this thread and `slot` (a fresh tensor on other devices,
    whose allocators cache): a freshly allocated chunk buffer cost more in page faults than the chunk's work."""
    if device.type != "cpu":
        return torch.empty(numel, device=device)
    buffer = getattr(_SCRATCH, slot, None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(max(numel, CHUNK_BYTES // 4))
        setattr(_SCRATCH, slot, buffer)
    return buffer[:numel]


_REUSING = threading.Event()  # set inside `reused_fp32_copies`, for every thread (the buffers are per thread)


@contextlib.contextmanager
def reused_fp32_copies() -> Iterator[None]:
    """Within the block, `decompose` copies each non-fp32 W into one reused fp32 buffer per thread instead of a
    fresh tensor: a streaming init decomposes hundreds of weights one after another, and each fresh fp32 copy costs
    the kernel a page fault and a zeroed page per 4 KB of it (a 4 GB bf16 checkpoint: 8 GB of fresh pages). The copy
    starts at the buffer's start, so its alignment, and with it every bit, is unchanged. On exit this thread's
    buffer is freed; a worker thread's goes with the thread."""
    _REUSING.set()
    try:
        yield
    finally:
        _REUSING.clear()
        _SCRATCH.matrix = None


def as_float32(W: torch.Tensor) -> torch.Tensor:
    """W in fp32: W itself if it is fp32, else a copy (into the reused buffer inside `reused_fp32_copies`)."""
    if W.dtype == torch.float32:
        return W
    if not _REUSING.is_set() or W.device.type != "cpu":
        return W.to(torch.float32)
    return scratch(W.numel(), W.device, "matrix").view(W.shape).copy_(W)  # never outlives the decompose call


def residual_chunks_(residual: torch.Tensor, W: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                     scale: float) -> tuple[float, float, float]:
    """Fill `residual` (out, in) with W - scale * B @ A in its dtype, chunk by chunk of rows; returns
    (max |error|, ||error||_F / ||W||_F, ||residual||_F), error = residual (as stored) + scale * B @ A - W.

    Norms are summed over chunks in float64: one fp32 reduction over 45M entries was 0.3 % off.
    """
    rows = W.shape[0] if W.device.type != "cpu" else max(1, CHUNK_BYTES // (4 * W.shape[1]))
    work = scratch(min(rows, W.shape[0]) * W.shape[1], W.device).view(-1, W.shape[1])  # (rows, in) fp32
    norms = []  # per chunk: ||W||, ||residual||, ||error||, max |error|
    for start in range(0, W.shape[0], rows):
        w, b, res = W[start:start + rows], B[start:start + rows], residual[start:start + rows]  # (c, in), (c, r)
        chunk = work[:len(w)]  # (c, in)
        if residual.dtype == torch.float32:
            torch.addmm(w, b, A, alpha=-scale, out=res)  # W - s B A, stored as is
            res_fro = torch.linalg.vector_norm(res)
            error = torch.addmm(res, b, A, alpha=scale, out=chunk)  # (c, in)
        else:
            res.copy_(torch.addmm(w, b, A, alpha=-scale, out=chunk))  # cast to the storage dtype
            res_fro = torch.linalg.vector_norm(chunk.copy_(res))  # the residual as stored, back in fp32
            error = chunk.addmm_(b, A, alpha=scale)  # (c, in)
        error.sub_(w)
        # max |error| as max(-min, max): vector_norm(ord=inf) took 24x and abs().max() 4x as long
        norms.append(torch.stack([torch.linalg.vector_norm(w), res_fro, torch.linalg.vector_norm(error),
                                  torch.maximum(error.amax(), error.amin().neg())]))
    table = torch.stack(norms)  # (chunks, 4)
    w_fro, res_fro, err_fro = table[:, :3].double().square().sum(0).sqrt().tolist()
    return table[:, 3].max().item(), err_fro / max(w_fro, 1e-30), res_fro
