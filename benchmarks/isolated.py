"""One row, one fresh process: how every benchmark here times a step and measures its peak memory.

A benchmark row (an implementation at one shape) runs in its own Python process, so that one row's
allocations, caches and allocator state cannot inflate another's peak. The parent calls
:func:`run_in_fresh_process` with the dotted name of a function and its keyword arguments; the child
(``python -m benchmarks.isolated --target module:function --kwargs '{...}'``, started by the parent,
never by hand) calls it and prints the returned dict as JSON on its last line.

Inside the child, the function builds its inputs, then:

- :class:`PeakMemory` measures the peak above what is allocated at :meth:`PeakMemory.start`. On CPU
  it is the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` at the
  start) minus the resident set then; on CUDA ``torch.cuda.max_memory_allocated`` minus the memory
  allocated then (the peak counter reset at the start).
- :func:`time_runs` times warm-up + repeated calls, synchronising the device around each call.
"""

from __future__ import annotations

import importlib
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI

__all__ = [
    "PeakMemory",
    "main",
    "measure_or_skip",
    "median_time",
    "run_in_fresh_process",
    "run_row",
    "synchronize",
    "time_runs",
]

REPOSITORY = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory above a baseline taken at :meth:`start` (see the module docstring).

    Example:
        >>> memory = PeakMemory("cpu")  # doctest: +SKIP
        >>> memory.start(); run(); memory.peak_bytes()  # doctest: +SKIP
    """

    def __init__(self, device: str | torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.base = 0

    def start(self) -> None:
        """Take the baseline and reset the peak counter."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            self.base = _status_kb("VmRSS") * 1024

    def peak_bytes(self) -> int:
        """Peak bytes above the baseline since :meth:`start`."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kb("VmHWM") * 1024 - self.base


def time_runs(
    step: Callable[[], Any], repeats: int, device: str | torch.device, warmup: int = 1
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step`` after ``warmup`` untimed calls."""
    times = []
    for index in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def median_time(
    step: Callable[[], Any], repeats: int, device: str | torch.device, warmup: int = 1
) -> float:
    """Median seconds of :func:`time_runs`."""
    return statistics.median(time_runs(step, repeats, device, warmup))


def run_in_fresh_process(
    target: str, kwargs: dict[str, Any], *, threads: int = 1, timeout: float = 1200.0
) -> dict[str, Any]:
    """Call ``target`` (``"package.module:function"``) with ``kwargs`` in a new Python process.

    Args:
        target: the function, which returns a JSON-serialisable dict.
        kwargs: its keyword arguments (JSON-serialisable).
        threads: torch intra-op threads in the child.
        timeout: seconds before the child is killed.

    Returns:
        The function's dict, or ``{"skipped": why}`` when the child timed out or failed (the last
        line of its error output).
    """
    command = [sys.executable, "-m", "benchmarks.isolated", "--target", target,
               "--kwargs", json.dumps(kwargs), "--threads", str(threads)]  # fmt: skip
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, cwd=REPOSITORY
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"skipped": f"failed: {last[:160]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_row(
    target: str,
    kwargs: dict[str, Any],
    *,
    isolate: bool = True,
    threads: int = 1,
    timeout: float = 1200.0,
) -> dict[str, Any]:
    """:func:`run_in_fresh_process`, or (``isolate=False``) the same call in this process.

    In this process, a failure becomes ``{"skipped": ...}`` too, and the CUDA cache is emptied
    after the row. Only for CUDA rows: ``max_memory_allocated`` counts live tensors exactly, so the
    peak does not depend on what earlier rows left cached (on CPU the resident set would), and one
    process spares a GPU run the start-up of Python, CUDA and the autotuner per row.
    """
    if isolate:
        return run_in_fresh_process(target, kwargs, threads=threads, timeout=timeout)
    module, _, function = target.partition(":")
    try:
        return getattr(importlib.import_module(module), function)(**kwargs)
    except Exception as error:  # a row that cannot run is reported, the others go on
        return {"skipped": f"failed: {type(error).__name__}: {str(error)[:160]}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_or_skip(
    row: dict[str, Any],
    target: str,
    kwargs: dict[str, Any],
    *,
    unusable: str | None = None,
    estimate_bytes: int = 0,
    max_gb: float = float("inf"),
    isolate: bool = True,
    threads: int = 1,
    timeout: float = 1200.0,
) -> dict[str, Any]:
    """Fill a table row: ``unavailable`` (why it cannot run here), ``skipped`` (the memory its
    estimate says it would need, above ``max_gb``), or what :func:`run_row` measured; print a line
    (the row's own fields, then the time and peak or why not).

    Returns:
        ``row``, updated.
    """
    what = " ".join(str(value) for key, value in row.items() if key not in ("baseline", "label"))
    if unusable is not None:
        row["unavailable"] = unusable
    elif estimate_bytes > max_gb * 2**30:
        row["skipped"] = f"would need ~{estimate_bytes / 2**30:.0f} GB"
    else:
        row.update(run_row(target, kwargs, isolate=isolate, threads=threads, timeout=timeout))
    if "time_s" in row:
        outcome = f"{row['time_s'] * 1e3:10.1f} ms {row['peak_bytes'] / 2**20:9.1f} MiB"
    else:
        outcome = row.get("skipped") or f"not run: {row['unavailable']}"
    print(f"{what:<64} {outcome}", flush=True)
    return row


def main(target: str, kwargs: dict[str, Any] | None = None, threads: int = 1) -> None:
    """The child's side of :func:`run_in_fresh_process`: call the target, print its dict as JSON.

    Args:
        target: ``"package.module:function"``.
        kwargs: keyword arguments of the function.
        threads: torch intra-op threads.
    """
    module, _, function = target.partition(":")
    torch.set_num_threads(threads)
    result = getattr(importlib.import_module(module), function)(**(kwargs or {}))
    print(json.dumps(result))


if __name__ == "__main__":
    CLI(main, as_positional=False)
