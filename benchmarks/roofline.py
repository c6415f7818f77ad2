"""The roofline the GPU rows are compared against: a work model per kernel and the measured peaks.

Run from the repository root on a machine with a CUDA GPU (``python -m benchmarks.device`` runs
it as one of its steps)::

    python -m benchmarks.roofline                          # prints the measured peaks
    python -m benchmarks.roofline --json_path peaks.json   # and writes them as JSON

**Peaks, measured on the GPU at hand** (:func:`measure_peaks`): FLOP/s of a large matmul in fp32
(TF32 off: the FP32 roofline) and in bf16, and the bandwidth of a device-to-device copy (bytes read
+ written per second), each the median of ``triton.testing.do_bench``.

**Work model** (:func:`pairwise_sum_work`, :func:`mean_field_work`). The fused sweep of the gated
window filter (docs/math.md#message) visits, for every pixel ``i`` of the N×|Ω| pixels, every
offset of the (2r+1)^q window (k = 2 or 3 spatial axes; the centre and out-of-image neighbours
included: the kernel computes them and their weight is 0). Per (pixel, offset) pair, with F feature
channels, K Gaussian kernels, C classes and g gates given (0, 1 or 2), it counts

- the Gaussian: ``3F`` (difference, square and sum per feature channel) ``+ 4K`` (× −½, exp,
  × the kernel's weight-and-position coefficient, accumulate, per kernel; exp counted as one);
- the gate ``G_ij K_ij``: ``g`` multiplies; with the gradient, ``g`` more for ``G_ji K_ij`` and,
  Potts, one add ``(G_ij + G_ji) K_ij``;
- the message ``M_i += w · v_j``: ``2C`` (one multiply-add per channel); the μ̂ gradient filters two
  fields: ``4C``;
- Potts: ``Σ G_ij K_ij``, one add;

and per pixel ``⟨y_i, M_i⟩``: ``2C``. The bytes are the floor any implementation must move through
DRAM: read the probabilities (N·C·|Ω| in their dtype), the features (N·F·|Ω|, fp32) and each gate
(N·|Ω| fp32) once, and write ∂S/∂probs (N·C·|Ω| in the probabilities' dtype) once. The mean-field
CRF (docs/math.md#mean-field) is T sweeps of the value-only message (no Potts sum) plus, per pixel
and iteration, μ applied to M (``2C²``; Potts ``1 − I``: ``2C``, ``Σ_l' M(l') − M(l)``) and ``5C``
(``U − μM``, then the softmax: max, exp, sum, divide), moving per iteration U, Q, the features and
gates in and Ũ out.

**Achieved fraction**: the roofline time of a work is ``max(FLOPs / fp32 FLOP/s, bytes / copy
bandwidth)`` (the kernels accumulate in fp32 whatever the input dtype, so the fp32 peak applies to
bf16 rows too); the fraction is that time divided by the measured time (1 = on the roofline). A row
timed end to end (the whole loss call) gets a lower bound of its kernel's own fraction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from jsonargparse import CLI

__all__ = [
    "Peaks",
    "Work",
    "main",
    "mean_field_work",
    "measure_peaks",
    "pair_flops",
    "pairwise_sum_work",
    "roofline_fraction",
]


@dataclass(frozen=True)
class Work:
    """What a kernel has to do: floating-point operations and DRAM bytes."""

    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """FLOPs per byte."""
        return self.flops / self.bytes


@dataclass(frozen=True)
class Peaks:
    """The roofline measured on one GPU.

    Attributes:
        fp32_flops: FLOP/s of a large fp32 matmul (TF32 off).
        bf16_flops: FLOP/s of the same matmul in bf16.
        copy_bytes_per_s: bytes read + written per second by a device-to-device copy.
    """

    fp32_flops: float
    bf16_flops: float
    copy_bytes_per_s: float

    def seconds(self, work: Work) -> float:
        """The roofline time of ``work``: compute- or bandwidth-bound, whichever is slower."""
        return max(work.flops / self.fp32_flops, work.bytes / self.copy_bytes_per_s)


def _window(spatial: Sequence[int], radius: int) -> int:
    if not spatial or min(spatial) < 1 or radius < 0:
        raise ValueError(f"need spatial sizes >= 1 and radius >= 0, got {spatial}, {radius}")
    return (2 * radius + 1) ** len(spatial)


def pair_flops(
    classes: int,
    num_features: int,
    num_kernels: int,
    gates: int,
    grad: bool,
    compat: bool = False,
    potts_sum: bool = True,
) -> int:
    """FLOPs of one (pixel, window offset) pair of the sweep (see the module docstring)."""
    gaussian = 3 * num_features + 4 * num_kernels
    gate = gates + ((gates + (0 if compat else 1)) if grad else 0)
    message = (4 if grad and compat else 2) * classes
    weight_sum = 1 if potts_sum and not compat else 0
    return gaussian + gate + message + weight_sum


def pairwise_sum_work(
    batch: int,
    classes: int,
    spatial: Sequence[int],
    radius: int,
    num_features: int,
    num_kernels: int = 1,
    gates: int = 0,
    grad: bool = True,
    compat: bool = False,
    probs_bytes: int = 4,
) -> Work:
    """Work of one sweep of the loss's pairwise sum (value, and ∂S/∂probs when ``grad``).

    Args:
        batch: N.
        classes: C.
        spatial: the prediction's spatial sizes, (h, w) or (d, h, w).
        radius: window radius r.
        num_features: feature channels F over all kernels (the ``xy`` position is not one).
        num_kernels: Gaussian kernels K.
        gates: masks given (``mask_src``, ``mask_dst``): 0, 1 or 2.
        grad: the sweep also produces ∂S/∂probs.
        compat: a compatibility matrix μ̂ instead of Potts.
        probs_bytes: bytes per element of the probabilities (4 fp32, 2 bf16).
    """
    pixels = batch * math.prod(spatial)
    flops = (
        pixels
        * _window(spatial, radius)
        * pair_flops(classes, num_features, num_kernels, gates, grad, compat)
        + pixels * 2 * classes
    )
    fields = classes * probs_bytes * (2 if grad else 1)
    return Work(float(flops), float(pixels * (fields + 4 * num_features + 4 * gates)))


def mean_field_work(
    batch: int,
    classes: int,
    spatial: Sequence[int],
    radius: int,
    num_features: int,
    num_kernels: int,
    iterations: int,
    gates: int = 0,
    compat: bool = False,
    logits_bytes: int = 4,
) -> Work:
    """Work of ``iterations`` mean-field updates (the forward; see the module docstring).

    Args:
        batch, classes, spatial, radius, num_features, num_kernels, gates: as for
            :func:`pairwise_sum_work` (``spatial``: the logits' size).
        iterations: T.
        compat: a general compatibility μ (else Potts).
        logits_bytes: bytes per element of the logits.
    """
    pixels = batch * math.prod(spatial)
    message = pair_flops(classes, num_features, num_kernels, gates, grad=False, potts_sum=False)
    mixing = 2 * classes**2 if compat else 2 * classes
    per_iteration = pixels * (_window(spatial, radius) * message + mixing + 5 * classes)
    moved = pixels * (3 * classes * logits_bytes + 4 * num_features + 4 * gates)
    return Work(float(iterations * per_iteration), float(iterations * moved))


def roofline_fraction(work: Work, seconds: float, peaks: Peaks) -> float:
    """Roofline time of ``work`` over the measured ``seconds`` (1 = on the roofline)."""
    return peaks.seconds(work) / seconds


def measure_peaks(matmul_size: int = 8192, copy_bytes: int = 1 << 30) -> Peaks:
    """Measure the peaks on the current CUDA device (see the module docstring)."""
    import torch
    import triton.testing

    if not torch.cuda.is_available():
        raise RuntimeError("measure_peaks needs a CUDA device; none is visible")
    flops = {}
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 FMA, not TF32 tensor cores
    try:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(matmul_size, matmul_size, device="cuda", dtype=dtype)
            b = torch.randn(matmul_size, matmul_size, device="cuda", dtype=dtype)
            ms = triton.testing.do_bench(lambda a=a, b=b: a @ b, return_mode="median")
            flops[name] = 2 * matmul_size**3 / (ms * 1e-3)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return Peaks(flops["fp32"], flops["bf16"], 2 * copy_bytes / (ms * 1e-3))


def main(json_path: str | None = None) -> dict[str, float]:
    """Measure the peaks on this GPU, print them, optionally write them as JSON.

    Args:
        json_path: where to write ``{"fp32_flops", "bf16_flops", "copy_bytes_per_s"}``.
    """
    peaks = asdict(measure_peaks())
    print(
        f"fp32 matmul {peaks['fp32_flops'] / 1e12:.1f} TFLOP/s, bf16 matmul "
        f"{peaks['bf16_flops'] / 1e12:.1f} TFLOP/s, device copy "
        f"{peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s"
    )
    if json_path:
        Path(json_path).write_text(json.dumps(peaks, indent=1))
    return peaks


if __name__ == "__main__":
    CLI(main)
