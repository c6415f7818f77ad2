"""The self-check of ``backend="auto"`` (gcrf.loss.selfcheck).

On a GPU machine the tensors are CUDA tensors. Without one, Triton's interpreter stands in:
``backends._on_cuda`` is patched so that "auto" treats the CPU tensors as CUDA tensors. The Triton
backend is made to disagree or fail by patching ``gcrf.kernels.gated_crf``. A correct Triton path must be kept, a wrong one replaced by the torch
backend for that key (one warning, a cached verdict, reported by ``available_backends``), and an
explicit ``backend="triton"`` must never be redirected.
"""

from __future__ import annotations

import logging

import pytest
import torch

from gcrf.kernels import gated_crf
from gcrf.loss import (
    available_backends,
    backends,
    choose_backend,
    gated_crf_loss,
    selfcheck,
    verify_triton,
)

KERNELS = [{"weight": 1.0, "xy": 3.0, "rgb": 0.3}]
DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    monkeypatch.delenv(selfcheck.SELF_CHECK_ENV, raising=False)
    if not {s.name: s for s in available_backends()}["triton"].usable:
        pytest.skip("the Triton backend cannot run here")


@pytest.fixture
def cpu_as_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU, "auto" treats the (interpreted) CPU tensors as CUDA tensors."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(backends, "_on_cuda", lambda tensor: True)


def _probs(dtype=torch.float32, *spatial: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 3, *(spatial or (5, 6)), generator=g), 1)
    return probs.to(DEVICE, dtype)


def _count_checks(monkeypatch) -> list:
    calls = []
    original = selfcheck.verify_triton

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(selfcheck, "verify_triton", counted)
    return calls


@pytest.mark.parametrize(("dtype", "rank"), [(torch.float32, 2), (torch.bfloat16, 2),
                                             (torch.float64, 3)])  # fmt: skip
def test_a_correct_triton_path_is_kept(cpu_as_cuda, dtype, rank):
    probs = _probs(dtype, *((5, 6) if rank == 2 else (3, 4, 5)))
    assert choose_backend("auto", probs, rank) == "triton"
    verdict = selfcheck.cached_verdict(probs.device, dtype, rank)
    assert verdict.ok and verdict.seconds > 0
    assert {s.name: s for s in available_backends(probs, rank)}["triton"].usable


def _wrong_message(window, field):
    return gated_crf_message(window, field) * 1.01


gated_crf_message = gated_crf.window_message


def test_a_disagreeing_kernel_falls_back_once_with_one_warning(cpu_as_cuda, monkeypatch, caplog):
    monkeypatch.setattr(gated_crf, "window_message", _wrong_message)
    calls = _count_checks(monkeypatch)
    probs = _probs()
    with caplog.at_level(logging.WARNING, logger="gcrf"):
        assert choose_backend("auto", probs, 2) == "torch"
        assert choose_backend("auto", probs, 2) == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and len(calls) == 1  # checked once, warned once
    message = warnings[0].getMessage()
    assert "'message, source gate'" in message and "differs from the float64 reference" in message
    status = {s.name: s for s in available_backends(probs, 2)}["triton"]
    assert not status.usable and "message, source gate" in status.reason
    # An explicit request is never redirected, and the loss still computes correctly via "auto".
    assert choose_backend("triton", probs, 2) == "triton"
    features = {"rgb": torch.rand(1, 3, 5, 6, device=DEVICE)}
    expected = gated_crf_loss(probs, features, KERNELS, 2, backend="torch")
    assert torch.equal(gated_crf_loss(probs, features, KERNELS, 2, backend="auto"), expected)


def test_a_raising_kernel_falls_back(cpu_as_cuda, monkeypatch):
    def broken(inputs):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(gated_crf, "gated_crf_pairwise_sum", broken)
    probs = _probs()
    assert choose_backend("auto", probs, 2) == "torch"
    verdict = selfcheck.cached_verdict(probs.device, probs.dtype, 2)
    assert not verdict.ok and verdict.case == "Potts, both gates"
    assert verdict.error == "RuntimeError: out of resources"


def test_one_check_per_device_dtype_and_rank(cpu_as_cuda, monkeypatch):
    calls = _count_checks(monkeypatch)
    for dtype, spatial in [(torch.float32, (5, 6)), (torch.float32, (7, 4)),
                           (torch.float64, (5, 6)), (torch.float32, (2, 3, 4))]:  # fmt: skip
        probs = _probs(dtype, *spatial)
        assert choose_backend("auto", probs, len(spatial)) == "triton"
    assert [(c[1], c[2]) for c in calls] == [(torch.float32, 2), (torch.float64, 2),
                                             (torch.float32, 3)]  # fmt: skip


def test_the_environment_variable_turns_it_off(cpu_as_cuda, monkeypatch):
    monkeypatch.setenv(selfcheck.SELF_CHECK_ENV, "0")
    monkeypatch.setattr(gated_crf, "window_message", _wrong_message)
    assert choose_backend("auto", _probs(), 2) == "triton"
    assert selfcheck.cached_verdict(DEVICE, torch.float32, 2) is None


def test_verify_triton_compares_the_given_backends():
    reference = backends.get_backend("torch")
    assert verify_triton(DEVICE, torch.float32, 2, triton=reference).ok
    wrong = backends.Backend(
        reference.pairwise_sum,
        reference.window_affinity,
        lambda window, field: reference.window_message(window, field) + 1e-3,
    )
    selfcheck._VERDICTS.clear()
    verdict = verify_triton(DEVICE, torch.float32, 2, triton=wrong)
    assert not verdict.ok and verdict.case == "message, source gate"
    assert verify_triton(DEVICE, torch.float32, 2) is verdict  # cached, not run again


def test_a_compiled_trace_never_runs_the_check(cpu_as_cuda, monkeypatch):
    # No verdict yet: the trace uses the torch backend (a wrong Triton kernel is never traced in).
    monkeypatch.setattr(gated_crf, "gated_crf_pairwise_sum", lambda inputs: torch.tensor(-1.0))
    features = {"rgb": torch.rand(1, 3, 5, 6, device=DEVICE)}

    def loss(p):
        return gated_crf_loss(p, features, KERNELS, 2, backend="auto")

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    probs = _probs()
    value = compiled(probs)
    assert selfcheck.cached_verdict(DEVICE, torch.float32, 2) is None  # nothing ran in the trace
    torch.testing.assert_close(value, gated_crf_loss(probs, features, KERNELS, 2, backend="torch"))
