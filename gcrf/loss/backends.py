"""Backend selection for the Gated CRF core (NATTEN style).

Two backends implement docs/CONTRACTS.md §1:

- ``"torch"``: :mod:`gcrf.loss.torch_backend`, any device, spatial rank 2 and 3, always available.
- ``"triton"``: ``gcrf.kernels.gated_crf`` (fused kernels), needs CUDA (or ``TRITON_INTERPRET=1``,
  Triton's CPU interpreter, which is for tests only) and a spatial rank in its
  ``SUPPORTED_SPATIAL_RANKS``.

``backend="auto"`` picks ``"triton"`` for CUDA tensors when it can run and has passed its
self-check for that device, dtype and rank (:mod:`gcrf.loss.selfcheck`), and falls back to
``"torch"`` otherwise, logging the reason (a failed self-check as a warning, once; every failed key
is listed by :func:`available_backends`). An explicitly requested backend that cannot run raises
``ValueError`` with the reason: nothing falls back silently when asked for by name, and
``backend="triton"`` skips the self-check.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from gcrf.loss import selfcheck, torch_backend

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendStatus",
    "available_backends",
    "check_backend_name",
    "choose_backend",
    "get_backend",
]

#: Backend names in order of preference for ``backend="auto"``.
BACKENDS: tuple[str, ...] = ("triton", "torch")
_TORCH_RANKS: tuple[int, ...] = (2, 3)


def check_backend_name(backend: object) -> str:
    """``backend`` if it names a backend choice (``"auto"``, ``"triton"``, ``"torch"``), else
    ``ValueError`` showing what was received."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of 'auto', 'triton', 'torch'; got {backend!r}")
    return str(backend)


class BackendStatus(NamedTuple):
    """Whether a backend can run, and why not when it cannot.

    ``failed_checks`` holds, for Triton, one line per (device, dtype, spatial rank) whose self-check
    failed in this process (:mod:`gcrf.loss.selfcheck`): ``backend="auto"`` uses the torch backend
    there even when Triton is ``usable`` in general. Empty for the torch backend.
    """

    name: str
    usable: bool
    reason: str
    failed_checks: tuple[str, ...] = ()


# Result of the lazy import, kept so that later calls (and torch.compile traces, which cannot run
# importlib) only read a dict.
_TRITON_IMPORT: dict[str, tuple[ModuleType | None, str]] = {}


def _import_triton_backend() -> tuple[ModuleType | None, str]:
    """Import ``gcrf.kernels.gated_crf`` lazily; return (module, '') or (None, why it failed)."""
    if "result" not in _TRITON_IMPORT:
        try:
            module = importlib.import_module("gcrf.kernels.gated_crf")
        except Exception as error:  # ImportError, but also a broken Triton install raising
            why = f"cannot import gcrf.kernels.gated_crf ({type(error).__name__}: {error})"
            _TRITON_IMPORT["result"] = (None, why)
        else:
            _TRITON_IMPORT["result"] = (module, "")
    return _TRITON_IMPORT["result"]


def _debug(message: str, *args: object) -> None:
    # Logging is a side effect torch.compile cannot trace; the choice is the same either way.
    if not torch.compiler.is_compiling():
        logger.debug(message, *args)


def _triton_status(probs: Tensor | None, spatial_rank: int | None) -> BackendStatus:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if probs is not None and not probs.is_cuda and not interpreted:
        return BackendStatus(
            "triton",
            False,
            f"tensors are on {probs.device}; the Triton backend needs CUDA tensors "
            "(or TRITON_INTERPRET=1, Triton's CPU interpreter, for testing)",
        )
    if probs is None and not torch.cuda.is_available() and not interpreted:
        return BackendStatus("triton", False, "no CUDA device (and TRITON_INTERPRET is not 1)")
    module, why = _import_triton_backend()
    if module is None:
        return BackendStatus("triton", False, why)
    ranks = tuple(getattr(module, "SUPPORTED_SPATIAL_RANKS", ()))
    if spatial_rank is not None and spatial_rank not in ranks:
        return BackendStatus(
            "triton", False, f"spatial rank {spatial_rank} is not supported (supports {ranks})"
        )
    return BackendStatus("triton", True, "")


def _torch_status(spatial_rank: int | None) -> BackendStatus:
    if spatial_rank is not None and spatial_rank not in _TORCH_RANKS:
        return BackendStatus(
            "torch",
            False,
            f"spatial rank {spatial_rank} is not supported (supports {_TORCH_RANKS})",
        )
    return BackendStatus("torch", True, "")


def available_backends(
    probs: Tensor | None = None, spatial_rank: int | None = None
) -> list[BackendStatus]:
    """Say for every backend whether it can run, and why not.

    Args:
        probs: the probabilities the loss would run on (their device matters), or None to ask about
            this machine in general.
        spatial_rank: 2 (images) or 3 (volumes), or None for any.

    Returns:
        One :class:`BackendStatus` per backend, in order of preference. With ``probs`` and
        ``spatial_rank`` given, Triton is reported unusable for ``backend="auto"`` where its
        self-check failed on that device, dtype and rank (an explicit ``backend="triton"`` still
        runs it). Triton's ``failed_checks`` lists every failed self-check of this process that
        matches what was given (``probs``' device and dtype, ``spatial_rank``; all of them for
        ``available_backends()``), one :meth:`gcrf.loss.selfcheck.Verdict.reason` each.

    Example:
        >>> [s.name for s in available_backends() if s.usable]
        ['torch']
    """
    triton = _triton_status(probs, spatial_rank)
    failed = selfcheck.failed_verdicts(
        None if probs is None else probs.device,
        None if probs is None else probs.dtype,
        spatial_rank,
    )
    reasons = tuple(verdict.reason(key) for key, verdict in failed.items())
    if triton.usable and failed and probs is not None and spatial_rank is not None:
        triton = BackendStatus("triton", False, reasons[0], reasons)  # this very key failed
    else:
        triton = triton._replace(failed_checks=reasons)
    return [triton, _torch_status(spatial_rank)]


def _on_cuda(tensor: Tensor) -> bool:
    """Whether ``backend="auto"`` treats the tensor as a GPU tensor (tests stand a CPU in)."""
    return tensor.is_cuda


def choose_backend(backend: str, probs: Tensor, spatial_rank: int) -> str:
    """Resolve ``backend`` ("auto", "triton" or "torch") to a backend that can run on ``probs``.

    Args:
        backend: the requested backend.
        probs: the class probabilities (device decides).
        spatial_rank: 2 or 3.

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: unknown name, or an explicitly requested backend that cannot run (with why).

    Example:
        >>> choose_backend("auto", torch.rand(1, 2, 4, 4), 2)
        'torch'
    """
    check_backend_name(backend)
    if backend == "auto":
        # "auto" only picks Triton for CUDA tensors: the interpreter is far too slow for real work.
        if not _on_cuda(probs):
            _debug("backend 'auto': using 'torch' (probs are on %s, not CUDA)", probs.device)
            return "torch"
        status = _triton_status(probs, spatial_rank)
        if status.usable:
            if selfcheck.auto_may_use_triton(probs, spatial_rank):
                return "triton"
            _debug("backend 'auto': using 'torch' (Triton not verified or failed its self-check)")
            return "torch"
        _debug("backend 'auto': using 'torch' (triton unusable: %s)", status.reason)
        if status.reason.startswith("cannot import") and not torch.compiler.is_compiling():
            # A broken or too old Triton on a CUDA machine: say so once, loudly, not only in debug.
            _warn_once(f"backend 'auto' falls back to 'torch' on CUDA: {status.reason}")
        return "torch"
    status = (
        _triton_status(probs, spatial_rank) if backend == "triton" else _torch_status(spatial_rank)
    )
    if not status.usable:
        raise ValueError(f"backend={backend!r} cannot run: {status.reason}")
    return backend


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def preload_backends() -> None:
    """Import the Triton backend now when CUDA is present (so compiled code only reads a cache)."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        _import_triton_backend()


class Backend(NamedTuple):
    """The three functions of a backend (docs/CONTRACTS.md §1)."""

    pairwise_sum: Callable[..., Tensor]  # gated_crf_pairwise_sum(PairwiseInputs) -> S
    window_affinity: Callable[..., Tensor]  # window_affinity(GatedWindow) -> N×(2r+1)^q×*Ω
    window_message: Callable[..., Tensor]  # window_message(GatedWindow, field) -> M


def _backend_of(module: ModuleType) -> Backend:
    return Backend(module.gated_crf_pairwise_sum, module.window_affinity, module.window_message)


def get_backend(name: str) -> Backend:
    """The functions of a resolved backend name (``"triton"`` or ``"torch"``)."""
    if name == "triton":
        module, why = _import_triton_backend()
        if module is None:
            raise ValueError(f"backend='triton' cannot run: {why}")
        return _backend_of(module)
    if name == "torch":
        return _backend_of(torch_backend)
    raise ValueError(f"backend must be 'triton' or 'torch'; got {name!r}")
