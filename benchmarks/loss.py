"""Benchmark of the Gated CRF loss: fwd+bwd time and peak memory per backend vs the published unfold.

Run from the repository root::

    python -m benchmarks.loss                      # all cases, all backends usable here
    python -m benchmarks.loss --cases 8x64 --repeats 5 --backend torch --backend unfold
    python -m benchmarks.loss --write-results      # also update this device's table in RESULTS.md

Setting (the published training default): C = 21 classes, radius 5, one kernel
``{"weight": 1, "xy": 6, "rgb": 0.1}``, ``mask_src`` given, features at the prediction resolution
(so the table measures the loss itself, not the area resize of the image, which both do alike).
Case ``wsl4mis`` is the loss step of WSL4MIS's training: N = 12, C = 4, 256×256 full-resolution
probabilities, the 1-channel slice as the ``rgb`` modality, no gate.

Honest measurement: every (implementation, case) runs in a fresh subprocess. On CPU the peak is the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs after the inputs are built)
minus the resident set at that point; on CUDA it is ``torch.cuda.max_memory_allocated`` minus the
memory allocated after setup. The time is the median of ``--repeats`` fwd+bwd runs after one
warm-up run. The published formulation is skipped ("would need X GB") where its estimated peak
exceeds ``--max-gb``.

To add rows (e.g. GPU backends), add an :class:`Implementation` to ``IMPLEMENTATIONS``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gcrf.loss import DEFAULT_KERNELS

KERNELS = list(DEFAULT_KERNELS)
RADIUS = 5
CLASSES = 21
RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass(frozen=True)
class Case:
    """One benchmark shape: batch N, prediction size h×w, classes C, image channels, gates."""

    batch: int
    height: int
    width: int
    classes: int = CLASSES
    channels: int = 3  #: channels of the image modality ("rgb": 3, an MR slice: 1)
    gated: bool = True  #: ``mask_src`` given (the published training) or not (WSL4MIS)

    @property
    def label(self) -> str:
        gate = "" if self.gated else ", no gate"
        return f"{self.batch}×{self.height}×{self.width}, C={self.classes}{gate}"


CASES: dict[str, Case] = {
    "8x64": Case(8, 64, 64),
    "2x256": Case(2, 256, 256),
    "8x512": Case(8, 512, 512),
    # The WSL4MIS loss step: UNet probabilities at full resolution, the 1-channel slice in [0, 1].
    "wsl4mis": Case(12, 256, 256, classes=4, channels=1, gated=False),
}


def _gcrf(backend: str) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    def loss(probs: Tensor, rgb: Tensor, mask: Tensor | None) -> Tensor:
        from gcrf.loss import gated_crf_loss

        return gated_crf_loss(probs, {"rgb": rgb}, KERNELS, RADIUS, mask_src=mask, backend=backend)

    return loss


def _unfold(probs: Tensor, rgb: Tensor, mask: Tensor | None) -> Tensor:
    from benchmarks.unfold_reference import unfold_gated_crf_loss

    return unfold_gated_crf_loss(probs, KERNELS, RADIUS, {"rgb": rgb}, mask_src=mask)


def _unfold_estimate(case: Case) -> int:
    from benchmarks.unfold_reference import unfold_peak_bytes_estimate

    return unfold_peak_bytes_estimate(case.batch, case.classes, case.height, case.width, RADIUS)


def _triton_unusable(device: str) -> str | None:
    from gcrf.loss import available_backends

    if device != "cuda":
        return "needs --device cuda"
    status = {s.name: s for s in available_backends(None, 2)}["triton"]
    return None if status.usable else status.reason


@dataclass(frozen=True)
class Implementation:
    """A row source of the table.

    Attributes:
        label: shown in the table.
        loss: ``(probs, rgb, mask) -> scalar``.
        baseline: the published formulation the ratios are relative to.
        peak_estimate: bytes it would need for a case (to skip it up front), or None.
        unusable: given the device, returns why it cannot run there, or None.
    """

    label: str
    loss: Callable[[Tensor, Tensor, Tensor], Tensor]
    baseline: bool = False
    peak_estimate: Callable[[Case], int] | None = None
    unusable: Callable[[str], str | None] = lambda device: None


IMPLEMENTATIONS: dict[str, Implementation] = {
    "unfold": Implementation(
        "published unfold", _unfold, baseline=True, peak_estimate=_unfold_estimate
    ),
    "torch": Implementation("gcrf torch", _gcrf("torch")),
    "triton": Implementation("gcrf triton", _gcrf("triton"), unusable=_triton_unusable),
}


# ----------------------------------------------------------------------------- worker (subprocess)


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _worker(name: str, case_name: str, repeats: int, device: str) -> dict:
    """Build inputs, reset the peak counter, run warm-up + repeats; return time and peak."""
    case = CASES[case_name]
    implementation = IMPLEMENTATIONS[name]
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.classes, case.height, case.width)
    # Probabilities normalised in place: no transient copy that would inflate the baseline.
    probs = torch.rand(shape, generator=generator, device=device).add_(0.05)
    probs.div_(probs.sum(dim=1, keepdim=True))
    rgb = torch.rand(
        (case.batch, case.channels, case.height, case.width), generator=generator, device=device
    )
    mask = None
    if case.gated:
        mask = torch.ones((case.batch, 1, case.height, case.width), device=device)
        mask[:, :, :, -case.width // 8 :] = 0  # padding from augmentation, as in training

    def step() -> float:
        leaf = probs.detach().requires_grad_(True)
        loss = implementation.loss(leaf, rgb, mask)
        loss.backward()
        return float(loss)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS") * 1024
    times = []
    value = float("nan")
    for index in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index > 0:  # the first run is the warm-up
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kb("VmHWM") * 1024 - base
    return {"time_s": statistics.median(times), "peak_bytes": peak, "loss": value}


# ----------------------------------------------------------------------------- parent (table)


def _run_one(
    name: str, case_name: str, repeats: int, device: str, threads: int, timeout: float
) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.loss",
        "--worker",
        name,
        case_name,
        "--repeats",
        str(repeats),
        "--device",
        device,
        "--threads",
        str(threads),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"failed: {last[:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _format_table(rows: list[dict]) -> str:
    lines = [
        f"| case (N×h×w, classes, r={RADIUS}) | implementation | fwd+bwd | peak extra memory "
        "| speed-up vs unfold | memory vs unfold |",
        "|---|---|---:|---:|---:|---:|",
    ]
    baselines = {r["case"]: r for r in rows if r["baseline"] and "time_s" in r}
    not_run = sorted({f"{r['label']} ({r['unavailable']})" for r in rows if "unavailable" in r})
    for row in rows:
        if "unavailable" in row:
            continue
        label = CASES[row["case"]].label
        if "time_s" not in row:
            lines.append(f"| {label} | {row['label']} | {row['skipped']} | | | |")
            continue
        base = baselines.get(row["case"])
        speed = memory = ""
        if base is not None and not row["baseline"]:
            speed = f"{base['time_s'] / row['time_s']:.1f}×"
            memory = f"1/{base['peak_bytes'] / max(row['peak_bytes'], 1):.0f}"
        lines.append(
            f"| {label} | {row['label']} | {row['time_s'] * 1e3:.0f} ms "
            f"| {row['peak_bytes'] / 2**20:.0f} MiB | {speed} | {memory} |"
        )
    if not_run:
        lines.append("")
        lines.append("Not run here: " + "; ".join(not_run) + ".")
    return "\n".join(lines)


def _write_results(table: str, device: str, header: str) -> None:
    start, end = f"<!-- {device}-table:start -->", f"<!-- {device}-table:end -->"
    block = f"{start}\n{header}\n\n{table}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {device.upper()}\n\n{block}\n"
    RESULTS.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loss", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=sorted(IMPLEMENTATIONS),
        help="implementation(s) to run (repeatable; default: all usable)",
    )
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), default=list(CASES), help="shapes to run"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in each worker (default 1: stable numbers on a shared CPU)",
    )
    parser.add_argument("--max-gb", type=float, default=6.0, help="skip estimated peaks above this")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per subprocess")
    parser.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(_worker(args.worker[0], args.worker[1], args.repeats, args.device)))
        return

    names = args.backend or list(IMPLEMENTATIONS)
    rows = []
    for case_name in args.cases:
        case = CASES[case_name]
        for name in names:
            implementation = IMPLEMENTATIONS[name]
            row = {
                "case": case_name,
                "label": implementation.label,
                "baseline": implementation.baseline,
            }
            why = implementation.unusable(args.device)
            estimate = implementation.peak_estimate(case) if implementation.peak_estimate else 0
            if why is not None:
                row["unavailable"] = why
            elif estimate > args.max_gb * 2**30:
                row["skipped"] = f"would need ~{estimate / 2**30:.0f} GB"
            else:
                row.update(
                    _run_one(name, case_name, args.repeats, args.device, args.threads, args.timeout)
                )
            rows.append(row)
            print(
                f"{case_name:>6} {implementation.label:<18} "
                + (
                    f"{row['time_s'] * 1e3:9.1f} ms {row['peak_bytes'] / 2**20:9.1f} MiB"
                    if "time_s" in row
                    else row.get("skipped") or f"not run: {row['unavailable']}"
                ),
                flush=True,
            )
    table = _format_table(rows)
    print()
    print(table)
    if args.write_results:
        header = (
            f"{args.device.upper()}: {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{args.threads} thread(s) per worker, median of {args.repeats} runs after a warm-up, "
            f"load average {os.getloadavg()[0]:.1f} when the table was written."
        )
        _write_results(table, args.device, header)


if __name__ == "__main__":
    main()
