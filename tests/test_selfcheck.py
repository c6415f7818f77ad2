"""The self-check of ``backend="auto"`` (gcrf.loss.selfcheck).

On a GPU machine the tensors are CUDA tensors. Without one, Triton's interpreter stands in:
``backends._on_cuda`` is patched so that "auto" treats the CPU tensors as CUDA tensors. The Triton
backend is made to disagree or fail by patching ``gcrf.kernels.gated_crf``. A correct Triton path must be kept, a wrong one replaced by the torch
backend for that key (one warning, a cached verdict, reported by ``available_backends``), and an
explicit ``backend="triton"`` must never be redirected. The check must run in its own context
(autograd on, autocast off, full-precision float32 matmuls) whatever the caller's, once per key
across threads, at the tolerances of the test suite.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from gcrf.crf import mean_field_crf
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


@pytest.mark.parametrize("value", ["0", "Off"])
def test_the_environment_variable_turns_it_off(cpu_as_cuda, monkeypatch, value):
    monkeypatch.setenv(selfcheck.SELF_CHECK_ENV, value)
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


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("0", False), ("false", False), ("False", False), ("NO", False), (" off ", False),
     ("1", True), ("true", True), ("yes", True), ("", True)],
)  # fmt: skip
def test_the_environment_variable_accepts_the_usual_false_spellings(monkeypatch, value, enabled):
    monkeypatch.setenv(selfcheck.SELF_CHECK_ENV, value)
    assert selfcheck.self_check_enabled() is enabled


# --------------------------------------------------------------------------------------------------
# The context the check runs in
# --------------------------------------------------------------------------------------------------


# The per-backend float32 matmul settings of torch >= 2.9 (CUDA's cuBLAS, CPU's oneDNN).
MATMUL_MODULES = [
    module
    for module in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
    if hasattr(module, "fp32_precision")
]


def _matmul_state() -> tuple:
    """The legacy float32 matmul precision (None where torch refuses it) and the per-backend ones."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    return (legacy, *(m.fp32_precision for m in MATMUL_MODULES))


@pytest.fixture
def restore_matmul_precision():
    """Put the process-wide matmul settings back as they were (the tests change them)."""
    legacy, *per_backend = _matmul_state()
    yield
    torch.set_float32_matmul_precision(legacy or "highest")
    for module, saved in zip(MATMUL_MODULES, per_backend, strict=True):
        module.fp32_precision = saved
    assert _matmul_state() == (legacy, *per_backend)


class _Spy:
    """The torch backend as a Triton stand-in that records the context of each of its calls."""

    def __init__(self) -> None:
        self.core = backends.get_backend("torch")
        self.seen: list[dict] = []

    def _record(self) -> None:
        self.seen.append({
            "grad": torch.is_grad_enabled(),
            "inference": torch.is_inference_mode_enabled(),
            "autocast": any(torch.is_autocast_enabled(t) for t in ("cpu", "cuda")),
            "matmul": _matmul_state(),
        })  # fmt: skip

    def pairwise_sum(self, inputs):
        self._record()
        return self.core.pairwise_sum(inputs)

    def window_affinity(self, window):
        return self.core.window_affinity(window)

    def window_message(self, window, field):
        self._record()
        return self.core.window_message(window, field)


def _autocast_bf16(device_type: str):
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16)


CALLER_CONTEXTS = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "autocast cpu bf16": _autocast_bf16("cpu"),
    **({"autocast cuda bf16": _autocast_bf16("cuda")} if torch.cuda.is_available() else {}),
}


@pytest.mark.parametrize("context", CALLER_CONTEXTS)
def test_the_check_runs_in_its_own_context(context):
    # Under no_grad / inference_mode the backward of the check used to raise ("element 0 of tensors
    # does not require grad"), under bf16 autocast the μ̂ einsum ran in bf16: a failed verdict.
    spy = _Spy()
    with CALLER_CONTEXTS[context]():
        before = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        verdict = verify_triton(DEVICE, torch.float32, 2, triton=spy)
        after = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    assert verdict.ok, verdict.error
    assert before == after  # the caller's context is untouched
    assert len(spy.seen) == len(selfcheck._CASES)
    for seen in spy.seen:
        assert seen["grad"] and not seen["inference"] and not seen["autocast"]


def test_the_check_runs_at_full_matmul_precision_and_restores_the_callers(restore_matmul_precision):
    torch.set_float32_matmul_precision("medium")  # TF32 on CUDA, bf16 passes in oneDNN on CPUs
    outside = _matmul_state()
    spy = _Spy()
    assert verify_triton(DEVICE, torch.float32, 2, triton=spy).ok
    assert {seen["matmul"][0] for seen in spy.seen} == {"highest"}
    assert _matmul_state() == outside and outside[0] == "medium"


def test_the_per_backend_matmul_precision_is_honoured_and_restored(restore_matmul_precision):
    # The per-backend API (torch >= 2.9) set on its own: torch then refuses the legacy getter, so
    # the check switches the per-backend settings, and puts them back.
    if not MATMUL_MODULES:
        pytest.skip("this torch has no per-backend fp32_precision")
    for module in MATMUL_MODULES:
        module.fp32_precision = "tf32"
    outside = _matmul_state()
    spy = _Spy()
    assert verify_triton(DEVICE, torch.float32, 2, triton=spy).ok
    for seen in spy.seen:
        assert seen["matmul"][0] in (None, "highest") and set(seen["matmul"][1:]) == {"ieee"}
    assert _matmul_state() == outside


def test_a_failing_stand_in_leaves_the_callers_settings(restore_matmul_precision):
    def broken(inputs):
        raise RuntimeError("out of resources")

    reference = backends.get_backend("torch")
    torch.set_float32_matmul_precision("high")
    with torch.no_grad():
        verdict = verify_triton(DEVICE, torch.float32, 2,
                                triton=backends.Backend(broken, *reference[1:]))  # fmt: skip
        assert not torch.is_grad_enabled()
    assert not verdict.ok and verdict.error == "RuntimeError: out of resources"
    assert torch.get_float32_matmul_precision() == "high"


@pytest.mark.parametrize("context", ["inference_mode", "autocast cpu bf16"])
def test_auto_under_a_callers_context_keeps_a_correct_triton_path(cpu_as_cuda, context):
    # End to end: the first "auto" call of a process under Lightning's validation sanity check
    # (inference_mode) or bf16-mixed (autocast) must not disable Triton for that key.
    logits = 3 * torch.randn(1, 3, 7, 9, generator=torch.Generator().manual_seed(1))
    rgb = torch.rand(1, 3, 7, 9, generator=torch.Generator().manual_seed(2))
    logits, rgb = logits.to(DEVICE), rgb.to(DEVICE)
    kernels = [{"weight": 1.0, "xy": 2.0, "rgb": 0.3}]
    with CALLER_CONTEXTS[context]():
        refined = mean_field_crf(logits, {"rgb": rgb}, kernels, 2, iterations=2, backend="auto")
        expected = mean_field_crf(logits, {"rgb": rgb}, kernels, 2, iterations=2, backend="torch")
    verdict = selfcheck.cached_verdict(logits.device, torch.float32, 2)
    assert verdict is not None and verdict.ok, verdict
    assert {s.name: s for s in available_backends()}["triton"].failed_checks == ()
    torch.testing.assert_close(refined, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Threads, the report of failed keys, the tolerances
# --------------------------------------------------------------------------------------------------


def test_two_threads_run_one_check_and_warn_once(caplog):
    reference = backends.get_backend("torch")
    calls = []

    def slow_pairwise_sum(inputs):  # long enough for the other thread to arrive meanwhile
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return reference.pairwise_sum(inputs)

    wrong = backends.Backend(
        slow_pairwise_sum,
        reference.window_affinity,
        lambda window, field: reference.window_message(window, field) + 1e-3,
    )
    barrier = threading.Barrier(2)
    verdicts = []

    def worker():
        barrier.wait()
        verdicts.append(verify_triton(DEVICE, torch.float32, 2, triton=wrong))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="gcrf"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(calls) == 2  # the two pairwise cases of one check, not of two
    assert len(warnings) == 1
    assert len(verdicts) == 2 and verdicts[0] is verdicts[1] and not verdicts[0].ok


def test_available_backends_lists_the_failed_keys():
    reference = backends.get_backend("torch")
    wrong = backends.Backend(
        reference.pairwise_sum,
        reference.window_affinity,
        lambda window, field: reference.window_message(window, field) * 1.01,
    )
    assert not verify_triton(DEVICE, torch.float32, 2, triton=wrong).ok
    assert verify_triton(DEVICE, torch.float64, 3, triton=reference).ok
    statuses = {s.name: s for s in available_backends()}
    triton = statuses["triton"]
    assert triton.usable  # usable in general: only "auto" for that key avoids it
    assert len(triton.failed_checks) == 1
    assert "torch.float32 rank 2" in triton.failed_checks[0]
    assert "'message, source gate'" in triton.failed_checks[0]
    assert statuses["torch"].failed_checks == ()
    # Narrowed to what is asked about: another rank or dtype has no failure, this key is unusable.
    assert {s.name: s for s in available_backends(None, 3)}["triton"].failed_checks == ()
    probs64 = _probs(torch.float64)
    assert {s.name: s for s in available_backends(probs64, 2)}["triton"].failed_checks == ()
    status = {s.name: s for s in available_backends(_probs(), 2)}["triton"]
    assert not status.usable and status.failed_checks == triton.failed_checks
    assert "message, source gate" in status.reason
    # Still a (name, usable, reason, ...) tuple for callers that index or compare it.
    assert statuses["torch"][:3] == ("torch", True, "")


def _one_element_off(delta: float):
    """The torch backend, with one element of the message (and of nothing else) off by ``delta``."""
    reference = backends.get_backend("torch")

    def message(window, field):
        out = reference.window_message(window, field)
        off = torch.zeros_like(out)
        off.view(-1)[int(torch.argmin(out.detach().abs()))] = delta  # the smallest |M|
        return out + off

    return backends.Backend(reference.pairwise_sum, reference.window_affinity, message)


@pytest.mark.parametrize(
    ("dtype", "delta", "ok"),
    [(torch.float32, 1e-4, False), (torch.float32, 5e-7, True),
     (torch.float64, 5e-11, False), (torch.float64, 5e-13, True)],
)  # fmt: skip
def test_the_tolerances_are_the_test_suites_elementwise(dtype, delta, ok):
    # An error of 1e-4 on one small element passes "atol + rtol·max|reference|" (1.2e-4 for this
    # message) but not the suite's elementwise rtol 1e-5, atol 1e-6; in fp64 5e-11 passed the old
    # 1e-10 and fails the suite's 1e-12.
    verdict = verify_triton(DEVICE, dtype, 2, triton=_one_element_off(delta))
    assert verdict.ok is ok, verdict.error
    if not ok:
        assert verdict.case == "message, source gate" and "rtol" in verdict.error
