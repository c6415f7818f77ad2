"""Benchmark of the Gated CRF loss: fwd+bwd time and peak memory per backend vs the published unfold.

Run from the repository root::

    python -m benchmarks.loss                                  # all cases, every backend usable here
    python -m benchmarks.loss --cases [8x64] --repeats 5 --backends [torch,unfold]
    python -m benchmarks.loss --write_results true             # also update RESULTS.md's table
    python -m benchmarks.loss --device cuda --cases [voc,8x512] --dtypes [fp32,bf16] --isolate false

Setting (the published training default): C = 21 classes, radius 5, one kernel
``{"weight": 1, "xy": 6, "rgb": 0.1}``, ``mask_src`` given, features at the prediction resolution
(so the table measures the loss itself, not the area resize of the image, which both do alike).
Case ``voc`` is the published VOC training's loss step (batch 48, probabilities at 64×64); case
``wsl4mis`` is the loss step of WSL4MIS's training: N = 12, C = 4, 256×256 full-resolution
probabilities, the 1-channel slice as the ``rgb`` modality, no gate.

Honest measurement: every (implementation, case, dtype) runs in a fresh process
(``benchmarks/isolated.py``: peak resident set on CPU, ``torch.cuda.max_memory_allocated`` on CUDA,
above what the inputs hold; on CUDA ``--isolate false`` runs the rows in one process, as exact
there and without a start-up per row). The time is the median of ``--repeats`` fwd+bwd runs after one
warm-up run. With ``--bitwise`` (default on CUDA) two more runs are compared bit for bit with the
first (value and gradient). The published formulation is skipped ("would need X GB") where its
estimated peak exceeds ``--max_gb``.

To add rows, add an :class:`Implementation` to ``IMPLEMENTATIONS``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import CLI
from torch import Tensor

from benchmarks.isolated import PeakMemory, measure_or_skip, median_time
from benchmarks.roofline import Peaks, Work, pairwise_sum_work, roofline_fraction
from benchmarks.tables import ResultTable, machine_header, update_results
from gcrf.loss import DEFAULT_KERNELS

__all__ = ["CASES", "DTYPES", "IMPLEMENTATIONS", "Case", "case_work", "loss_table", "main"]

KERNELS = list(DEFAULT_KERNELS)
RADIUS = 5
CLASSES = 21
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    "voc": Case(48, 64, 64),  # the published VOC training: batch 48, loss at 64×64
    "8x64": Case(8, 64, 64),
    "2x256": Case(2, 256, 256),
    "8x512": Case(8, 512, 512),
    # The WSL4MIS loss step: UNet probabilities at full resolution, the 1-channel slice in [0, 1].
    "wsl4mis": Case(12, 256, 256, classes=4, channels=1, gated=False),
}


def case_work(case: Case, dtype: str) -> Work:
    """The work model of one fwd+bwd of a case: one sweep with the gradient (roofline.py)."""
    return pairwise_sum_work(
        case.batch, case.classes, (case.height, case.width), RADIUS, case.channels,
        num_kernels=len(KERNELS), gates=int(case.gated), grad=True,
        probs_bytes=DTYPES[dtype].itemsize,
    )  # fmt: skip


def _gcrf(backend: str) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    def loss(probs: Tensor, rgb: Tensor, mask: Tensor | None) -> Tensor:
        from gcrf.loss import gated_crf_loss

        return gated_crf_loss(probs, {"rgb": rgb}, KERNELS, RADIUS, mask_src=mask, backend=backend)

    return loss


def _unfold(probs: Tensor, rgb: Tensor, mask: Tensor | None) -> Tensor:
    from benchmarks.unfold_reference import unfold_gated_crf_loss

    return unfold_gated_crf_loss(probs, KERNELS, RADIUS, {"rgb": rgb}, mask_src=mask)


def _unfold_estimate(case: Case, dtype: str) -> int:
    from benchmarks.unfold_reference import unfold_peak_bytes_estimate

    element = DTYPES[dtype].itemsize
    fp32 = unfold_peak_bytes_estimate(case.batch, case.classes, case.height, case.width, RADIUS)
    return fp32 * element // 4


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
        peak_estimate: bytes it would need for a case and dtype (to skip it up front), or None.
        unusable: given the device, returns why it cannot run there, or None.
    """

    label: str
    loss: Callable[[Tensor, Tensor, Tensor], Tensor]
    baseline: bool = False
    peak_estimate: Callable[[Case, str], int] | None = None
    unusable: Callable[[str], str | None] = lambda device: None


IMPLEMENTATIONS: dict[str, Implementation] = {
    "unfold": Implementation(
        "published unfold", _unfold, baseline=True, peak_estimate=_unfold_estimate
    ),
    "torch": Implementation("gcrf torch", _gcrf("torch")),
    "triton": Implementation("gcrf triton", _gcrf("triton"), unusable=_triton_unusable),
}


def measure_row(
    implementation: str, case: str, dtype: str, repeats: int, device: str, bitwise: bool
) -> dict[str, Any]:
    """One row, in a fresh process: build the inputs, then time fwd+bwd and measure the peak."""
    shape = CASES[case]
    loss_fn = IMPLEMENTATIONS[implementation].loss
    generator = torch.Generator(device=device).manual_seed(0)
    size = (shape.batch, shape.classes, shape.height, shape.width)
    # Probabilities normalised in place: no transient copy that would inflate the baseline.
    probs = torch.rand(size, generator=generator, device=device).add_(0.05)
    probs = probs.div_(probs.sum(dim=1, keepdim=True)).to(DTYPES[dtype])
    rgb = torch.rand(
        (shape.batch, shape.channels, shape.height, shape.width), generator=generator, device=device
    )
    mask = None
    if shape.gated:
        mask = torch.ones((shape.batch, 1, shape.height, shape.width), device=device)
        mask[:, :, :, -shape.width // 8 :] = 0  # padding from augmentation, as in training

    last: list[Tensor] = []

    def step() -> list[Tensor]:
        leaf = probs.detach().requires_grad_(True)
        value = loss_fn(leaf, rgb, mask)
        value.backward()
        last[:] = [value.detach(), leaf.grad]
        return last

    memory = PeakMemory(device)
    memory.start()
    seconds = median_time(step, repeats, device)
    row: dict[str, Any] = {
        "time_s": seconds,
        "peak_bytes": memory.peak_bytes(),
        "loss": float(last[0]),
    }
    if bitwise:
        first = [t.clone() for t in last]
        row["bitwise"] = all(
            torch.equal(a, b) for _ in range(2) for a, b in zip(step(), first, strict=True)
        )
    return row


def loss_table(rows: list[dict[str, Any]], peaks: Peaks | None = None) -> ResultTable:
    """The table of measured rows; with ``peaks``, the model's TFLOP/s and the roofline fraction."""
    columns = ["case", "dtype", "implementation", "fwd+bwd", "peak extra memory",
               "speed-up vs unfold", "memory vs unfold"]  # fmt: skip
    with_bitwise = any("bitwise" in row for row in rows)
    if with_bitwise:
        columns.append("bitwise")
    if peaks is not None:
        columns += ["TFLOP/s (model)", "of roofline"]
    table = ResultTable("Gated CRF loss, forward + backward", columns, left=3)
    baselines = {(r["case"], r["dtype"]): r for r in rows if r["baseline"] and "time_s" in r}
    not_run = sorted({f"{r['label']} ({r['unavailable']})" for r in rows if "unavailable" in r})
    for row in rows:
        if "unavailable" in row:
            continue
        cells = [CASES[row["case"]].label, row["dtype"], row["label"]]
        if "time_s" not in row:
            table.add_row(*cells, row["skipped"], *[""] * (len(columns) - 4))
            continue
        base = baselines.get((row["case"], row["dtype"]))
        speed = memory = ""
        if base is not None and not row["baseline"]:
            speed = f"{base['time_s'] / row['time_s']:.1f}×"
            memory = f"1/{base['peak_bytes'] / max(row['peak_bytes'], 1):.0f}"
        cells += [f"{row['time_s'] * 1e3:.1f} ms", f"{row['peak_bytes'] / 2**20:.0f} MiB",
                  speed, memory]  # fmt: skip
        if with_bitwise:
            cells.append({True: "yes", False: "no"}.get(row.get("bitwise"), ""))
        if peaks is not None:
            work = case_work(CASES[row["case"]], row["dtype"])
            cells += [f"{work.flops / row['time_s'] / 1e12:.2f}",
                      f"{100 * roofline_fraction(work, row['time_s'], peaks):.1f} %"]  # fmt: skip
        table.add_row(*cells)
    if not_run:
        table.notes.append("Not run here: " + "; ".join(not_run) + ".")
    return table


def main(
    backends: list[Literal["unfold", "torch", "triton"]] | None = None,
    cases: list[str] | None = None,
    dtypes: list[Literal["fp32", "bf16"]] | None = None,
    repeats: int | None = None,
    device: Literal["cpu", "cuda"] | None = None,
    isolate: bool = True,
    threads: int = 1,
    max_gb: float | None = None,
    timeout: float = 1200.0,
    bitwise: bool | None = None,
    write_results: bool = False,
    json_path: str | None = None,
) -> list[dict[str, Any]]:
    """Measure every (case, dtype, implementation) in a fresh process; print the table.

    Args:
        backends: implementations to run (default: all usable on the device).
        cases: names of ``CASES`` (default: all).
        dtypes: probability dtypes (default: fp32).
        repeats: timed runs per row, median reported (default: 3 on CPU, 10 on CUDA).
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        isolate: run every row in a fresh process (``false``: all in this one, for CUDA
            rows only; see ``benchmarks/isolated.py``).
        threads: torch intra-op threads per worker (default 1: stable numbers on a shared CPU).
        max_gb: skip rows whose estimated peak exceeds this (default: 6 on CPU, 80 % of the GPU).
        timeout: seconds per worker process.
        bitwise: compare two more runs bit for bit with the first (default: on CUDA only).
        write_results: update this device's table in ``benchmarks/RESULTS.md``.
        json_path: also write the rows as JSON there.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device == "cuda"
    names = cases or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"cases must be among {sorted(CASES)}, got {unknown}")
    repeats = repeats or (10 if on_cuda else 3)
    bitwise = on_cuda if bitwise is None else bitwise
    if max_gb is None:
        max_gb = 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30 if on_cuda else 6.0
    rows = []
    for case_name in names:
        for dtype in dtypes or ["fp32"]:
            for name in backends or list(IMPLEMENTATIONS):
                implementation = IMPLEMENTATIONS[name]
                row: dict[str, Any] = {"case": case_name, "dtype": dtype, "implementation": name,
                                       "label": implementation.label,
                                       "baseline": implementation.baseline}  # fmt: skip
                kwargs = {"implementation": name, "case": case_name, "dtype": dtype,
                          "repeats": repeats, "device": device, "bitwise": bitwise}  # fmt: skip
                estimate = implementation.peak_estimate
                rows.append(
                    measure_or_skip(
                        row,
                        "benchmarks.loss:measure_row",
                        kwargs,
                        unusable=implementation.unusable(device),
                        estimate_bytes=estimate(CASES[case_name], dtype) if estimate else 0,
                        max_gb=max_gb,
                        isolate=isolate,
                        threads=threads,
                        timeout=timeout,
                    )
                )
    table = loss_table(rows)
    table.print()
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    if write_results:
        header = machine_header(device, threads, f"median of {repeats} runs after a warm-up")
        update_results(f"{device}-table", f"{header}\n\n{table.markdown()}", device.upper())
    return rows


if __name__ == "__main__":
    CLI(main)
