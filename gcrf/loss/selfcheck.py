"""The Triton backend proves itself before ``backend="auto"`` trusts it with a model.

The first time ``backend="auto"`` would send a CUDA call to Triton for a (device, dtype, spatial
rank), :func:`verify_triton` runs both backends on a few tiny random cases of that dtype and rank
(odd sizes; both gates and none; Potts and μ̂; the message op of the CRF) and compares values and
gradients with a float64 reference at the tolerances of the test suite (:func:`verify_triton` says
exactly what is compared). A mismatch or an exception logs one warning naming the case and the
error, and ``"auto"`` uses the torch backend for that key for the rest of the process
(``gcrf.loss.available_backends(probs, rank)`` says why; ``available_backends()`` lists every
failed key). An explicit ``backend="triton"`` skips nothing and raises as before. Setting
``GCRF_TRITON_SELF_CHECK`` to ``0``, ``false``, ``no`` or ``off`` (any case) turns the check off.

The check runs in a context of its own, whatever the first call's: autograd on (also under
``torch.no_grad()`` or ``torch.inference_mode()``), autocast off for every device type, and float32
matmuls in full precision (no TF32 or bf16 passes); the caller's matmul precision is restored
afterwards. It runs once per key even when several threads reach it at once (a lock; the others
wait for its verdict).

The cases run untuned (the fixed config of :mod:`gcrf.kernels.autotune`), so the check compiles
each kernel variant it needs once instead of autotuning tiny shapes: it verifies the code paths
(gates, μ̂, message, dtype, rank, out-of-image neighbours at odd sizes), not every autotune
configuration (the CUDA tests and ``python -m benchmarks.device`` compare those at real shapes).
Under ``torch.compile`` the check never runs: a trace reads the cached verdict, and without one uses
the torch backend; call :func:`verify_triton` (or run one eager step) before compiling. Under DDP
each process checks its own device (the key holds the device index).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from gcrf.kernels.window import GatedWindow, PairwiseInputs

logger = logging.getLogger(__name__)

__all__ = [
    "SELF_CHECK_ENV",
    "Verdict",
    "cached_verdict",
    "failed_verdicts",
    "self_check_enabled",
    "verify_triton",
]

#: Set to "0", "false", "no" or "off" (any case) to trust the Triton backend without the self-check.
SELF_CHECK_ENV = "GCRF_TRITON_SELF_CHECK"
_FALSE = frozenset({"0", "false", "no", "off"})

Key = tuple[str, torch.dtype, int]


@dataclass(frozen=True)
class Verdict:
    """The outcome of the self-check for one (device, dtype, spatial rank)."""

    ok: bool
    case: str = ""  # the first case that failed
    error: str = ""  # what went wrong there
    seconds: float = 0.0  # how long the whole check took

    def reason(self, key: Key) -> str:
        """One line saying where and how the check failed (``key``: the checked key)."""
        device, dtype, rank = key
        return (
            f"the Triton self-check failed on {device} for {dtype} rank {rank} in case "
            f"'{self.case}': {self.error}"
        )


_VERDICTS: dict[Key, Verdict] = {}
# Held while a check runs: a second thread reaching the same key waits and reads the verdict (one
# check, one warning). Reentrant, so that a stand-in backend calling "auto" cannot deadlock.
_LOCK = threading.RLock()


def self_check_enabled() -> bool:
    """Whether ``backend="auto"`` checks Triton before it uses it.

    Returns:
        False when ``GCRF_TRITON_SELF_CHECK`` is ``0``, ``false``, ``no`` or ``off`` (any case,
        surrounding spaces ignored); True when it is unset or anything else.
    """
    return os.environ.get(SELF_CHECK_ENV, "1").strip().lower() not in _FALSE


def _key(device: torch.device | str, dtype: torch.dtype, spatial_rank: int) -> Key:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return (str(device), dtype, int(spatial_rank))


def cached_verdict(device: torch.device | str, dtype: torch.dtype, rank: int) -> Verdict | None:
    """The verdict of an earlier check for this key, or None."""
    return _VERDICTS.get(_key(device, dtype, rank))


def failed_verdicts(
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    rank: int | None = None,
) -> dict[Key, Verdict]:
    """The keys whose check failed in this process (``"auto"`` uses torch there), with verdicts.

    Args:
        device, dtype, rank: keep only the keys with this device, dtype or spatial rank (None: any).

    Returns:
        ``{(device, dtype, rank): verdict}`` in the order the checks ran.
    """
    device = None if device is None else _key(device, torch.float32, 0)[0]
    return {
        key: verdict
        for key, verdict in list(_VERDICTS.items())
        if not verdict.ok
        and device in (None, key[0])
        and dtype in (None, key[1])
        and rank in (None, key[2])
    }


# (rtol, atol) of the test suite for (dtype, message op?), applied elementwise as
# torch.testing.assert_close does: |ours − reference| ≤ atol + rtol·|reference|. The pairwise sum
# and its gradient: tests/test_backend_contract.py assert_pairwise_sum_matches (fp32) and
# test_pairwise_sum_in_float64; the message and its gradient: test_window_message_matches_reference
# (fp32, the same window as the check's message case) and test_window_message_dtypes (fp64).
_TOLERANCE: dict[tuple[torch.dtype, bool], tuple[float, float]] = {
    (torch.float32, False): (2e-5, 1e-6),
    (torch.float32, True): (1e-5, 1e-6),
    (torch.float64, False): (1e-12, 1e-12),
    (torch.float64, True): (1e-12, 1e-12),
}


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


def _compare(dtype: torch.dtype, message: bool, ours, same_dtype, reference) -> str:
    """'' if the Triton result passes, else what differs (the rule: :func:`verify_triton`)."""
    for what, a, b, r in zip(("value", "gradient"), ours, same_dtype, reference, strict=True):
        if not bool(torch.isfinite(a).all()):
            return f"the {what} is not finite"
        error = (a - r).abs()
        if (dtype, message) in _TOLERANCE:
            rtol, atol = _TOLERANCE[dtype, message]
            limit = atol + rtol * r.abs()
            worst = int(torch.argmax(error - limit))
            error, limit = error.flatten()[worst].item(), limit.flatten()[worst].item()
            rule = f"atol {atol:g} + rtol {rtol:g}·|reference| there"
        else:
            error = error.max().item()
            limit = 2 * (b - r).abs().max().item() + 1e-6 * r.abs().max().item()
            rule = "twice the torch backend's own error in this dtype"
        if error > limit:
            return (
                f"the {what} differs from the float64 reference by {error:.3g} "
                f"(limit {limit:.3g}: {rule})"
            )
    return ""


# Autocast is switched off for each of these device types that this torch knows.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu")


def _fp32_matmul_modules() -> list[object]:
    """The per-backend float32 matmul settings (``torch.backends.<x>.matmul.fp32_precision``)."""
    modules = (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
    return [m for m in modules if m is not None and hasattr(m, "fp32_precision")]


@contextlib.contextmanager
def _full_precision_matmuls() -> Iterator[None]:
    """Float32 matmuls in full precision inside the block; the caller's settings restored after.

    Uses the API the caller used: ``torch.set_float32_matmul_precision`` (which also sets
    ``torch.backends.cuda.matmul.allow_tf32``), or, where torch refuses to summarise the precision
    because the per-backend ``fp32_precision`` settings were used, those settings (mixing the two
    APIs makes torch raise). Convolution settings (``torch.backends.cudnn``) are left alone: the
    check runs no convolution.
    """
    modules = _fp32_matmul_modules()
    per_backend = [m.fp32_precision for m in modules]
    try:
        precision: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # "mix of the legacy and new APIs": the per-backend settings rule
        precision = None
    if precision == "highest":
        yield
        return
    try:
        if precision is None:
            for module in modules:
                module.fp32_precision = "ieee"
        else:
            torch.set_float32_matmul_precision("highest")
        yield
    finally:
        if precision is not None:
            torch.set_float32_matmul_precision(precision)
        for module, saved in zip(modules, per_backend, strict=True):
            if module.fp32_precision != saved:  # the legacy setter fills in per-backend values
                module.fp32_precision = saved


@contextlib.contextmanager
def _clean_context() -> Iterator[None]:
    """The context the check runs in, whatever the caller's (see the module's docstring)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device_type in _AUTOCAST_DEVICE_TYPES:
            try:
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            except (RuntimeError, AssertionError):  # a device type this build does not support
                continue
        stack.enter_context(_full_precision_matmuls())
        yield


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
    returns the cached verdict without running anything, and concurrent calls for one key run the
    check once (the others wait for its verdict). The check runs with autograd enabled (also inside
    ``torch.no_grad()`` / ``torch.inference_mode()``), autocast disabled for every device type and
    float32 matmuls at full precision (``"highest"``, no TF32); the caller's settings apply again
    when it returns.

    What is compared, for each case: the value (S, or the message M) and the gradient w.r.t. the
    field, from the Triton backend, against the torch backend run on the same inputs upcast to
    float64. For fp32 and fp64 every element must satisfy ``|triton − reference| ≤ atol + rtol ·
    |reference|`` (``torch.testing.assert_close``'s rule) with the tolerances of the test suite:
    fp32 pairwise sum ``rtol 2e-5, atol 1e-6``, fp32 message ``rtol 1e-5, atol 1e-6``, fp64
    ``rtol 1e-12, atol 1e-12``. For fp16/bf16 the largest absolute error over the elements may be
    at most twice the torch backend's own largest error in that dtype (on the same inputs), plus
    ``1e-6 ×`` the largest ``|reference|``: the rounding of the field and the gradient to 8 or 11
    mantissa bits dominates there, and the torch backend measures it. Non-finite results fail.

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
    verdict = _VERDICTS.get(key)
    if verdict is not None:
        return verdict
    with _LOCK:
        verdict = _VERDICTS.get(key)  # another thread may have checked it while this one waited
        if verdict is not None:
            return verdict
        try:
            with _clean_context():
                verdict = _check(key, triton, reference)
        except Exception as error:  # the context itself (a torch setting refused): a failed check
            verdict = Verdict(False, "setting up the check", f"{type(error).__name__}: {error}")
        _VERDICTS[key] = verdict
    if verdict.ok:
        logger.info("Triton self-check passed on %s for %s rank %d (%.2f s)", *key, verdict.seconds)
    else:
        logger.warning("%s; backend 'auto' uses 'torch' there for the rest of the process",
                       verdict.reason(key))  # fmt: skip
    return verdict


def _check(key: Key, triton: object | None, reference: object | None) -> Verdict:
    """Run the cases for ``key`` in the current context and return the verdict."""
    from gcrf.kernels import gated_crf
    from gcrf.loss.backends import get_backend

    dtype, spatial_rank = key[1], key[2]
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
            problem = _compare(dtype, case.message, ours, same, exact)
        except Exception as error:  # a kernel that cannot compile or launch is a failed check
            problem = f"{type(error).__name__}: {error}"
        if problem:
            verdict = Verdict(False, case.name, problem)
            break
    return Verdict(verdict.ok, verdict.case, verdict.error, time.perf_counter() - start)


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
