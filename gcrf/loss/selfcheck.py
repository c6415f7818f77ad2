"""The Triton backend proves itself before ``backend="auto"`` trusts it with a model.

The first time ``backend="auto"`` would send a CUDA call to Triton for a (device, dtype, spatial
rank), :func:`verify_triton` runs both backends on a few tiny random cases of that dtype and rank
(odd sizes; both gates and none; Potts and μ̂; the message op of the CRF) and compares values and
gradients with a float64 reference at the tolerances of the test suite. A mismatch or an exception
logs one warning naming the case and the error, and ``"auto"`` uses the torch backend for that key
for the rest of the process (``gcrf.loss.available_backends(probs)`` says why). An explicit
``backend="triton"`` skips nothing and raises as before. ``GCRF_TRITON_SELF_CHECK=0`` turns the
check off.

The cases run untuned (the fixed config of :mod:`gcrf.kernels.autotune`), so the check compiles
each kernel variant it needs once instead of autotuning tiny shapes: it verifies the code paths
(gates, μ̂, message, dtype, rank, out-of-image neighbours at odd sizes), not every autotune
configuration (the CUDA tests and ``python -m benchmarks.device`` compare those at real shapes).
Under ``torch.compile`` the check never runs: a trace reads the cached verdict, and without one uses
the torch backend; call :func:`verify_triton` (or run one eager step) before compiling. Under DDP
each process checks its own device (the key holds the device index).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from gcrf.kernels.window import GatedWindow, PairwiseInputs

logger = logging.getLogger(__name__)

__all__ = ["SELF_CHECK_ENV", "Verdict", "cached_verdict", "self_check_enabled", "verify_triton"]

#: Set to "0" to trust the Triton backend without the self-check.
SELF_CHECK_ENV = "GCRF_TRITON_SELF_CHECK"

Key = tuple[str, torch.dtype, int]


@dataclass(frozen=True)
class Verdict:
    """The outcome of the self-check for one (device, dtype, spatial rank)."""

    ok: bool
    case: str = ""  # the first case that failed
    error: str = ""  # what went wrong there
    seconds: float = 0.0  # how long the whole check took

    def reason(self, key: Key) -> str:
        device, dtype, rank = key
        return (
            f"the Triton self-check failed on {device} for {dtype} rank {rank} in case "
            f"'{self.case}': {self.error}"
        )


_VERDICTS: dict[Key, Verdict] = {}


def self_check_enabled() -> bool:
    """False when ``GCRF_TRITON_SELF_CHECK=0``."""
    return os.environ.get(SELF_CHECK_ENV, "1") != "0"


def _key(device: torch.device | str, dtype: torch.dtype, spatial_rank: int) -> Key:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return (str(device), dtype, int(spatial_rank))


def cached_verdict(device: torch.device | str, dtype: torch.dtype, rank: int) -> Verdict | None:
    """The verdict of an earlier check for this key, or None."""
    return _VERDICTS.get(_key(device, dtype, rank))


# Tolerances of tests/test_backend_contract.py: fp64 and fp32 against the float64 reference; for
# fp16/bf16 the error may be at most twice the torch backend's own error in that dtype.
_TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-6)}


@dataclass(frozen=True)
class _Case:
    name: str
    masks: tuple[bool, bool]  # mask_src, mask_dst
    compat: bool
    message: bool


_CASES = (
    _Case("Potts, both gates", (True, True), compat=False, message=False),
    _Case("compatibility μ̂, no gate", (False, False), compat=True, message=False),
    _Case("message, source gate", (True, False), compat=False, message=True),
)


def _inputs(case: _Case, dtype: torch.dtype, rank: int, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    spatial = (7, 9) if rank == 2 else (3, 4, 5)
    n, c = 2, 3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    features = (0.7 * torch.randn(n, 3, *spatial, generator=gen)).to(device, acc)
    masks = [
        (torch.rand(n, 1, *spatial, generator=gen) > 0.3).float().to(device) if on else None
        for on in case.masks
    ]
    window = GatedWindow(
        features,
        ((0, 3), (3, 3)),  # a colour term with a position term, and a position-only term
        (1.0, 0.5),
        (tuple(0.3 + 0.1 * a for a in range(rank)), (0.4,) * rank),
        2 if rank == 2 else 1,
        *masks,
    )
    field = torch.softmax(3 * torch.randn(n, c, *spatial, generator=gen), 1).to(device, dtype)
    compatibility = None
    if case.compat:
        mu = torch.rand(c, c, generator=gen)
        mu.fill_diagonal_(0)
        compatibility = ((c - 1) * mu / mu.sum(1, keepdim=True)).to(device, acc)
    upstream = torch.randn(field.shape, generator=gen).to(device)
    return window, field, compatibility, upstream


def _run(backend, case: _Case, window, field, compatibility, upstream) -> tuple[Tensor, Tensor]:
    """Value (S or M) and the gradient w.r.t. the field, in float64."""
    field = field.detach().clone().requires_grad_(True)
    if case.message:
        value = backend.window_message(window, field)
        (grad,) = torch.autograd.grad(value, field, upstream.to(value.dtype))
    else:
        value = backend.pairwise_sum(PairwiseInputs(field, window, compatibility))
        (grad,) = torch.autograd.grad(value, field, torch.tensor(0.37, device=value.device))
    return value.detach().double(), grad.double()


def _upcast(window: GatedWindow) -> GatedWindow:
    masks = [None if m is None else m.double() for m in (window.mask_src, window.mask_dst)]
    return GatedWindow(
        window.features.double(), window.kernel_slices, window.kernel_weights,
        window.kernel_pos_scales, window.radius, *masks,
    )  # fmt: skip


def _compare(dtype: torch.dtype, ours, same_dtype, reference) -> str:
    """'' if the Triton result passes, else what differs."""
    for what, a, b, r in zip(("value", "gradient"), ours, same_dtype, reference, strict=True):
        if not bool(torch.isfinite(a).all()):
            return f"the {what} is not finite"
        error = (a - r).abs().max().item()
        scale = r.abs().max().item()
        if dtype in _TOLERANCE:
            rtol, atol = _TOLERANCE[dtype]
            limit = atol + rtol * scale
        else:
            limit = 2 * (b - r).abs().max().item() + 1e-6 * scale
        if error > limit:
            return (
                f"the {what} differs from the float64 reference by {error:.3g} (limit {limit:.3g})"
            )
    return ""


def verify_triton(
    device: torch.device | str,
    dtype: torch.dtype,
    spatial_rank: int,
    *,
    triton: object | None = None,
    reference: object | None = None,
) -> Verdict:
    """Check the Triton backend on ``device`` for ``dtype`` and rank, cache and return the verdict.

    Runs eagerly (never inside a ``torch.compile`` trace); calling it again for a checked key
    returns the cached verdict without running anything.

    Args:
        device: a CUDA device (or a CPU device under ``TRITON_INTERPRET=1``, for tests).
        dtype: the dtype of the probabilities / fields that will be passed.
        spatial_rank: 2 (images) or 3 (volumes).
        triton, reference: the backends to compare (default: ``get_backend("triton")`` and
            ``get_backend("torch")``); tests pass stand-ins.

    Returns:
        The :class:`Verdict`; on failure one warning has been logged.

    Example:
        >>> verify_triton("cuda", torch.bfloat16, 2).ok  # before torch.compile(model)
        True
    """
    key = _key(device, dtype, spatial_rank)
    if key in _VERDICTS:
        return _VERDICTS[key]
    from gcrf.kernels import gated_crf
    from gcrf.loss.backends import get_backend

    triton = triton or get_backend("triton")
    reference = reference or get_backend("torch")
    start = time.perf_counter()
    verdict = Verdict(True)
    for seed, case in enumerate(_CASES):
        try:
            window, field, compatibility, upstream = _inputs(
                case, dtype, spatial_rank, torch.device(key[0]), seed
            )
            with gated_crf.untuned():
                ours = _run(triton, case, window, field, compatibility, upstream)
            same = _run(reference, case, window, field, compatibility, upstream)
            exact = _run(reference, case, _upcast(window), field.double(),
                         None if compatibility is None else compatibility.double(),
                         upstream.double())  # fmt: skip
            problem = _compare(dtype, ours, same, exact)
        except Exception as error:  # a kernel that cannot compile or launch is a failed check
            problem = f"{type(error).__name__}: {error}"
        if problem:
            verdict = Verdict(False, case.name, problem)
            break
    verdict = Verdict(verdict.ok, verdict.case, verdict.error, time.perf_counter() - start)
    _VERDICTS[key] = verdict
    if verdict.ok:
        logger.info("Triton self-check passed on %s for %s rank %d (%.2f s)", *key, verdict.seconds)
    else:
        logger.warning("%s; backend 'auto' uses 'torch' there for the rest of the process",
                       verdict.reason(key))  # fmt: skip
    return verdict


def auto_may_use_triton(tensor: Tensor, spatial_rank: int) -> bool:
    """Whether ``backend="auto"`` may send this call to Triton (already known to be usable).

    Eagerly: the cached verdict, or a check run now. Inside a ``torch.compile`` trace: the cached
    verdict, and False without one (the trace then uses the torch backend).
    """
    if not self_check_enabled():
        return True
    verdict = cached_verdict(tensor.device, tensor.dtype, spatial_rank)
    if verdict is None:
        if torch.compiler.is_compiling():
            return False
        verdict = verify_triton(tensor.device, tensor.dtype, spatial_rank)
    return verdict.ok
