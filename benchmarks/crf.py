"""Benchmark of mean-field CRF refinement: gcrf (torch, Triton) vs the unfold formulation vs pydensecrf2.

Run from the repository root::

    python -m benchmarks.crf                                   # every case, all usable here
    python -m benchmarks.crf --cases [voc_stride4] --iterations [5] --repeats 3
    python -m benchmarks.crf --write_results true              # also update RESULTS.md's table
    python -m benchmarks.crf --cases [voc_stride1] --flush_denormal true
    python -m benchmarks.crf --device cuda --implementations [gcrf_triton,gcrf_torch,unfold] \
        --isolate false

Cases (one image or volume, N = 1):

- ``voc_stride1``: a VOC-size 500×375 image, 21 classes, logits at the image's resolution, r = 5;
- ``voc_stride4``: the same image, logits at stride 4 (125×94: 375/4 rounded up), r = 5;
- ``acdc``: an ACDC-size volume (10×256×216 voxels, the most common size of the WSL4MIS volumes),
  4 classes, r = 2 (a 5×5×5 window), positions in voxels.

Every implementation gets the same CRF: pydensecrf's usual pair of terms, a Gaussian (sxy 3,
compat 3) and a bilateral one (sxy 80, srgb 13, compat 10), σ in image pixels and 0–255 units —
for gcrf through ``gcrf.crf.kernels_from_pydensecrf`` (positions in logit pixels: σ / stride;
``"xyz"`` for the volume), for pydensecrf on the logits' grid with σ / stride —, Potts
compatibility, 5 and 10 iterations, features at the logits' resolution (the image area-resized
once, outside the timing), no gates. Rows:

- ``gcrf_torch`` / ``gcrf_triton``: ``gcrf.crf.mean_field_crf(..., backend="torch" / "triton")``
  (Triton needs CUDA);
- ``unfold``: the same windowed CRF in ConvCRF's formulation
  (``benchmarks.unfold_reference.unfold_mean_field_crf``: the kernel and, every iteration, the
  probabilities unfolded over the window);
- ``pydensecrf``: pydensecrf2's fully connected CRF on a permutohedral lattice (CPU; unnormalised
  kernels, the same σ and weights), where it is importable: it is no dependency of gcrf, as it
  builds with a C++ compiler: ``pip install pydensecrf2``. Its time includes building the lattice.

``grad`` rows time forward + backward w.r.t. the logits (the trainable layer); pydensecrf has no
gradient. Every row runs in a fresh process (``benchmarks/isolated.py``: peak resident set on CPU,
``torch.cuda.max_memory_allocated`` on CUDA, above the inputs; on CUDA ``--isolate false`` runs
the rows in one process, as exact there); the time is the median of
``--repeats`` runs after ``--warmup`` runs. The unfold rows whose estimated peak exceeds
``--max_gb`` are not run and say how much they would need.

Goals on CPU (printed as pass / short for every gcrf torch row): at least 10× less peak memory than
the unfold formulation and no slower; with the gradient, faster and at least 5× less memory.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jsonargparse import CLI
from torch import Tensor

from benchmarks.isolated import PeakMemory, measure_or_skip, median_time
from benchmarks.roofline import Peaks, Work, mean_field_work, roofline_fraction
from benchmarks.tables import ResultTable, machine_header, update_results
from gcrf.crf import kernels_from_pydensecrf

__all__ = [
    "CASES",
    "IMPLEMENTATIONS",
    "CRFCase",
    "case_work",
    "crf_goals",
    "crf_table",
    "main",
    "measure_row",
]

#: pydensecrf's usual pair of terms (its README, DeepLab): ``addPairwiseGaussian(sxy, compat)`` and
#: ``addPairwiseBilateral(sxy, srgb, compat)``, σ in image pixels and 0–255 units.
GAUSSIAN = ((3.0, 3.0),)
BILATERAL = ((80.0, 13.0, 10.0),)


@dataclass(frozen=True)
class CRFCase:
    """One refinement: the image (or volume) size, the logits' stride, classes and radius."""

    label: str
    image: tuple[int, ...]  #: (H, W) or (D, H, W)
    stride: int
    classes: int
    radius: int

    @property
    def logits(self) -> tuple[int, ...]:
        """Spatial size of the logits: the image size over the stride, rounded up (depth kept)."""
        if len(self.image) == 3:
            return (self.image[0], *(math.ceil(s / self.stride) for s in self.image[1:]))
        return tuple(math.ceil(s / self.stride) for s in self.image)

    @property
    def kernels(self) -> list[dict[str, float]]:
        """gcrf's kernels for the pydensecrf terms (positions in logit pixels, 0–255 image)."""
        kernels = kernels_from_pydensecrf(GAUSSIAN, BILATERAL, self.stride, image_scale=255.0)
        if len(self.image) == 2:
            return kernels
        return [{"xyz" if k == "xy" else k: v for k, v in kernel.items()} for kernel in kernels]


CASES: dict[str, CRFCase] = {
    "voc_stride1": CRFCase("VOC 500×375, stride 1, C=21, r=5", (375, 500), 1, 21, 5),
    "voc_stride4": CRFCase("VOC 500×375, stride 4, C=21, r=5", (375, 500), 4, 21, 5),
    "acdc": CRFCase("ACDC 10×256×216, C=4, r=2 (3D)", (10, 256, 216), 1, 4, 2),
}


def _inputs(case: CRFCase, device: str) -> tuple[Tensor, Tensor]:
    """Logits and the image at the logits' resolution: smooth random regions with noise, 0–255."""
    generator = torch.Generator().manual_seed(0)
    channels = 3 if len(case.image) == 2 else 1
    coarse = torch.rand(1, channels, *[max(2, s // 16) for s in case.image], generator=generator)
    mode = "bilinear" if len(case.image) == 2 else "trilinear"
    image = F.interpolate(coarse, size=case.image, mode=mode, align_corners=False) * 255
    image = (image + 8 * torch.randn(image.shape, generator=generator)).clamp(0, 255)
    pool = F.adaptive_avg_pool2d if len(case.image) == 2 else F.adaptive_avg_pool3d
    features = pool(image, case.logits)
    logits = 3 * torch.randn(1, case.classes, *case.logits, generator=generator)
    return logits.to(device), features.to(device)


def _gcrf(backend: str):
    def refine(case: CRFCase, logits: Tensor, features: Tensor, iterations: int) -> Tensor:
        from gcrf.crf import mean_field_crf

        return mean_field_crf(
            logits, {"rgb": features}, case.kernels, case.radius, iterations, backend=backend
        )

    return refine


def _unfold(case: CRFCase, logits: Tensor, features: Tensor, iterations: int) -> Tensor:
    from benchmarks.unfold_reference import unfold_mean_field_crf

    return unfold_mean_field_crf(logits, {"rgb": features}, case.kernels, case.radius, iterations)


def _pydensecrf(case: CRFCase, logits: Tensor, features: Tensor, iterations: int) -> Any:
    """pydensecrf2's inference (its inputs converted outside the timing, by the caller)."""
    import numpy as np
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian

    unary, image = logits, features  # numpy here: C×P float32 and the uint8 image
    size = case.logits
    norm = dcrf.NO_NORMALIZATION  # gcrf's kernels are not normalised either
    # On the logits' grid: σ_xy in its pixels, as gcrf's (sxy / stride).
    (gauss_xy, gauss_compat), (bi_xy, bi_rgb, bi_compat) = GAUSSIAN[0], BILATERAL[0]
    gauss_xy, bi_xy = gauss_xy / case.stride, bi_xy / case.stride
    if len(size) == 2:
        crf = dcrf.DenseCRF2D(size[1], size[0], case.classes)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=gauss_xy, compat=gauss_compat, normalization=norm)
        crf.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=image, compat=bi_compat,
                                 normalization=norm)  # fmt: skip
    else:
        crf = dcrf.DenseCRF(math.prod(size), case.classes)
        crf.setUnaryEnergy(unary)
        smooth = create_pairwise_gaussian((gauss_xy,) * 3, size)
        crf.addPairwiseEnergy(smooth, compat=gauss_compat, normalization=norm)
        bilateral = create_pairwise_bilateral((bi_xy,) * 3, (bi_rgb,), image, chdim=-1)
        crf.addPairwiseEnergy(bilateral, compat=bi_compat, normalization=norm)
    return np.asarray(crf.inference(iterations))


def _gcrf_crf_missing() -> str | None:
    if importlib.util.find_spec("gcrf.crf") is None:
        return "gcrf.crf is not in this checkout"
    return None


def _pydensecrf_missing(device: str) -> str | None:
    if importlib.util.find_spec("pydensecrf") is None:
        return "pydensecrf2 not installed (pip install pydensecrf2; builds with a C++ compiler)"
    return None


@dataclass(frozen=True)
class Implementation:
    """A row source: label, the refinement, whether it has a gradient, why it cannot run."""

    label: str
    refine: Any
    differentiable: bool = True
    unusable: Any = lambda device: None


IMPLEMENTATIONS: dict[str, Implementation] = {
    "gcrf_torch": Implementation(
        "gcrf torch", _gcrf("torch"), unusable=lambda d: _gcrf_crf_missing()
    ),
    "gcrf_triton": Implementation(
        "gcrf triton",
        _gcrf("triton"),
        unusable=lambda d: _gcrf_crf_missing() or (None if d == "cuda" else "needs --device cuda"),
    ),
    "unfold": Implementation("unfold (ConvCRF)", _unfold),
    "pydensecrf": Implementation(
        "pydensecrf2 (fully connected)",
        _pydensecrf,
        differentiable=False,
        unusable=_pydensecrf_missing,
    ),
}


def _unfold_estimate(case: CRFCase, grad: bool) -> int:
    from benchmarks.unfold_reference import unfold_crf_peak_bytes_estimate

    features = len(case.logits) + (3 if len(case.image) == 2 else 1)
    return unfold_crf_peak_bytes_estimate(1, case.classes, case.logits, case.radius, features, grad)


def measure_row(
    implementation: str,
    case: str,
    iterations: int,
    grad: bool,
    repeats: int,
    warmup: int,
    device: str,
    flush_denormal: bool = False,
) -> dict[str, Any]:
    """One row, in a fresh process: build the inputs, then time the refinement and its peak."""
    torch.set_flush_denormal(flush_denormal)
    crf_case = CASES[case]
    refine = IMPLEMENTATIONS[implementation].refine
    logits, features = _inputs(crf_case, device)
    if implementation == "pydensecrf":
        import numpy as np

        unary = -torch.log_softmax(logits[0], dim=0).flatten(1).numpy()
        image = features[0].round().to(torch.uint8)
        image = image.permute(1, 2, 0) if image.dim() == 3 else image[0]
        logits, features = np.ascontiguousarray(unary), np.ascontiguousarray(image.numpy())
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> None:
        if not grad:
            with torch.no_grad():
                refine(crf_case, logits, features, iterations)
            return
        leaf = logits.detach().requires_grad_(True)
        refine(crf_case, leaf, features, iterations).backward(upstream)

    memory = PeakMemory(device)
    memory.start()
    seconds = median_time(step, repeats, device, warmup)
    return {"time_s": seconds, "peak_bytes": memory.peak_bytes()}


def crf_goals(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The CPU goals for every measured gcrf torch row: (row, measured, "pass" / "short")."""
    measured = {(r["case"], r["iterations"], r["grad"], r["implementation"]): r
                for r in rows if "time_s" in r}  # fmt: skip
    goals = []
    for (case, iterations, grad, name), row in sorted(measured.items()):
        base = measured.get((case, iterations, grad, "unfold"))
        if name != "gcrf_torch" or base is None:
            continue
        speed = base["time_s"] / row["time_s"]
        memory = base["peak_bytes"] / max(row["peak_bytes"], 1)
        passed = memory >= (5 if grad else 10) and (speed > 1 if grad else speed >= 1)
        goals.append(
            (f"{CASES[case].label}, T={iterations}{', grad' if grad else ''}",
             f"{speed:.2f}× the speed, 1/{memory:.0f} of the memory of unfold",
             "pass" if passed else "short")
        )  # fmt: skip
    return goals


def case_work(case: CRFCase, iterations: int) -> Work:
    """The work model of a forward refinement (``benchmarks/roofline.py``)."""
    channels = 3 if len(case.image) == 2 else 1  # the appearance kernel's; positions are folded
    return mean_field_work(1, case.classes, case.logits, case.radius, channels, 2, iterations)


def crf_table(rows: list[dict[str, Any]], peaks: Peaks | None = None) -> ResultTable:
    """The measured rows, with ratios to the unfold row and (forward) to pydensecrf; with
    ``peaks``, the forward rows' fraction of the roofline."""
    columns = ["case", "T", "grad", "implementation", "time", "peak extra memory",
               "speed-up vs unfold", "memory vs unfold", "time / pydensecrf"]  # fmt: skip
    if peaks is not None:
        columns.append("of roofline")
    table = ResultTable("Mean-field CRF refinement", columns, left=4)
    measured = {(r["case"], r["iterations"], r["grad"], r["implementation"]): r
                for r in rows if "time_s" in r}  # fmt: skip
    not_run = sorted({f"{r['label']} ({r['unavailable']})" for r in rows if "unavailable" in r})
    for row in rows:
        if "unavailable" in row:
            continue
        key = (row["case"], row["iterations"], row["grad"])
        cells = [CASES[row["case"]].label, row["iterations"], "yes" if row["grad"] else "no",
                 row["label"]]  # fmt: skip
        if "time_s" not in row:
            table.add_row(*cells, row["skipped"], *[""] * (len(columns) - 5))
            continue
        base, dense = measured.get((*key, "unfold")), measured.get((*key, "pydensecrf"))
        speed = memory = versus_dense = ""
        if base is not None and row["implementation"] != "unfold":
            speed = f"{base['time_s'] / row['time_s']:.2f}×"
            memory = f"1/{base['peak_bytes'] / max(row['peak_bytes'], 1):.0f}"
        if dense is not None and row["implementation"] != "pydensecrf":
            versus_dense = f"{row['time_s'] / dense['time_s']:.1f}×"
        cells += [f"{row['time_s']:.3g} s", f"{row['peak_bytes'] / 2**20:.0f} MiB", speed, memory,
                  versus_dense]  # fmt: skip
        if peaks is not None:
            fraction = roofline_fraction(
                case_work(CASES[row["case"]], row["iterations"]), row["time_s"], peaks
            )
            cells.append("" if row["grad"] else f"{100 * fraction:.1f} %")
        table.add_row(*cells)
    if not_run:
        table.notes.append("Not run here: " + "; ".join(not_run) + ".")
    return table


def main(
    cases: list[str] | None = None,
    implementations: list[Literal["gcrf_torch", "gcrf_triton", "unfold", "pydensecrf"]]
    | None = None,
    iterations: list[int] | None = None,
    grad: list[bool] | None = None,
    repeats: int | None = None,
    warmup: int = 1,
    device: Literal["cpu", "cuda"] | None = None,
    isolate: bool = True,
    threads: int = 1,
    max_gb: float | None = None,
    timeout: float = 1800.0,
    flush_denormal: bool = False,
    write_results: bool = False,
    json_path: str | None = None,
) -> list[dict[str, Any]]:
    """Measure every (case, iterations, grad, implementation) in a fresh process; print the table.

    Args:
        cases: names of ``CASES`` (default: all).
        implementations: rows to run (default: all; those that cannot run here say why).
        iterations: mean-field iterations T (default: 5 and 10).
        grad: forward only (``false``) and/or forward + backward (``true``) (default: both).
        repeats: timed runs per row, median reported (default: 1 on CPU, 10 on CUDA).
        warmup: untimed runs first.
        device: ``cpu`` or ``cuda`` (default: cuda when available; pydensecrf is CPU only).
        isolate: run every row in a fresh process (``false``: all in this one, for CUDA
            rows only; see ``benchmarks/isolated.py``).
        threads: torch intra-op threads per worker.
        max_gb: skip unfold rows whose estimated peak exceeds this (default: 16 on CPU, 80 % of
            the GPU).
        timeout: seconds per worker process.
        flush_denormal: ``torch.set_flush_denormal(True)`` in every row (CPU: subnormal
            probabilities then compute at full speed; its own table in RESULTS.md).
        write_results: update this device's CRF table in ``benchmarks/RESULTS.md``.
        json_path: also write the rows as JSON there.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = cases or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"cases must be among {sorted(CASES)}, got {unknown}")
    repeats = repeats or (10 if device == "cuda" else 1)
    if max_gb is None:
        max_gb = (
            0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30
            if device == "cuda"
            else 16.0
        )
    rows = []
    for case_name in names:
        for count in iterations or [5, 10]:
            for with_grad in grad if grad is not None else [False, True]:
                for name in implementations or list(IMPLEMENTATIONS):
                    implementation = IMPLEMENTATIONS[name]
                    if with_grad and not implementation.differentiable:
                        continue
                    row: dict[str, Any] = {"case": case_name, "iterations": count,
                                           "grad": with_grad, "implementation": name,
                                           "label": implementation.label}  # fmt: skip
                    kwargs = {"implementation": name, "case": case_name, "iterations": count,
                              "grad": with_grad, "repeats": repeats, "warmup": warmup,
                              "device": "cpu" if name == "pydensecrf" else device,
                              "flush_denormal": flush_denormal}  # fmt: skip
                    unfold = name == "unfold"
                    rows.append(
                        measure_or_skip(
                            row,
                            "benchmarks.crf:measure_row",
                            kwargs,
                            unusable=implementation.unusable(device),
                            estimate_bytes=_unfold_estimate(CASES[case_name], with_grad)
                            if unfold
                            else 0,
                            max_gb=max_gb,
                            isolate=isolate,
                            threads=threads,
                            timeout=timeout,
                        )
                    )
    table = crf_table(rows)
    goals = crf_goals(rows)
    table.notes += [f"- {what}: {measured} — **{verdict}**" for what, measured, verdict in goals]
    table.print()
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    if write_results:
        runs = f"median of {repeats} run(s) after {warmup} warm-up"
        if flush_denormal:
            runs += ", denormals flushed to zero"
        block = f"{machine_header(device, threads, runs)}\n\n{table.markdown()}"
        key = f"crf-{device}{'-flush' if flush_denormal else ''}-table"
        update_results(key, block, f"{device.upper()}: CRF")
    return rows


if __name__ == "__main__":
    CLI(main)
