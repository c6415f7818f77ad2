"""Benchmark of the fused Triton pairwise core against the torch backend, on a CUDA GPU.

Times forward + backward of ``gated_crf_pairwise_sum`` (docs/CONTRACTS.md §1; the loss is this sum
divided by a count) for each backend on the issue's shapes (N=16, C=21, 128×128 and N=8, C=21,
512×512, r=5, fp32 and bf16, the published kernel ``{"weight": 1, "xy": 6, "rgb": 0.1}`` with
``mask_src``), and reports:

- ``ms``: median fwd+bwd time (``triton.testing.do_bench``, gradients reset between runs);
- ``peak MiB``: ``torch.cuda.max_memory_allocated`` during one fwd+bwd, above the inputs;
- ``GB/s``: the bandwidth floor divided by the time. The floor is the bytes that must cross DRAM
  once: read probs, features and mask, write ∂S/∂probs. ``% copy`` relates it to the bandwidth of a
  plain device-to-device copy measured on the same GPU;
- ``bitwise``: whether three repeated fwd+bwd runs give bit-identical values and gradients.

The unfold formulation of the published code is timed by ``benchmarks/loss.py`` through
``gcrf.loss`` (``backend="triton"`` gives the same kernels as here).

Run from the repository root on a machine with a CUDA GPU::

    python benchmarks/loss_triton_rows.py                 # prints a markdown table
    python benchmarks/loss_triton_rows.py --out table.md  # also writes it to a file
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton.testing

from gcrf.kernels.gated_crf import gated_crf_pairwise_sum as triton_pairwise_sum
from gcrf.kernels.window import GatedWindow, PairwiseInputs
from gcrf.loss.torch_backend import gated_crf_pairwise_sum as torch_pairwise_sum

logger = logging.getLogger("benchmarks.loss_triton_rows")

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "triton": triton_pairwise_sum,
    "torch": torch_pairwise_sum,
}
SHAPES = [(16, 21, 128, 128), (8, 21, 512, 512)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RADIUS = 5
# {"weight": 1, "xy": 6, "rgb": 0.1}: rgb/0.1 in channels 0..3, xy scale 1/6 per pixel of offset.
WINDOW = {
    "kernel_slices": ((0, 3),),
    "kernel_weights": (1.0,),
    "kernel_pos_scales": ((1 / 6, 1 / 6),),
    "radius": RADIUS,
}


@dataclass
class Row:
    backend: str
    shape: tuple[int, int, int, int]
    dtype: str
    ms: float
    peak_mib: float
    gbps: float
    copy_fraction: float
    bitwise: bool

    def markdown(self) -> str:
        n, c, h, w = self.shape
        return (
            f"| {self.backend} | {n}×{c}×{h}×{w} | {self.dtype} | {self.ms:.3f} | "
            f"{self.peak_mib:.0f} | {self.gbps:.0f} | {100 * self.copy_fraction:.1f}% | "
            f"{'yes' if self.bitwise else 'no'} |"
        )


def make_inputs(shape: tuple[int, int, int, int], dtype: torch.dtype, seed: int = 0) -> dict:
    n, c, h, w = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(n, c, h, w, device="cuda", generator=gen)
    probs = torch.softmax(logits, dim=1).to(dtype).requires_grad_(True)
    rgb = torch.rand(n, 3, h, w, device="cuda", generator=gen) / 0.1
    mask_src = (torch.rand(n, 1, h, w, device="cuda", generator=gen) > 0.2).float()
    return {"probs": probs, "features": rgb, "mask_src": mask_src, "mask_dst": None,
            "compatibility": None}  # fmt: skip


def floor_bytes(inputs: dict) -> int:
    """Bytes that must be read and written once: probs, features, mask in; ∂S/∂probs out."""
    probs = inputs["probs"]
    read = sum(
        t.numel() * t.element_size()
        for t in (probs, inputs["features"], inputs["mask_src"])
        if t is not None
    )
    return read + probs.numel() * probs.element_size()


def copy_bandwidth_gbps(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write) on this GPU, the practical DRAM ceiling."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    probs = inputs["probs"]
    probs.grad = None
    window = GatedWindow(inputs["features"], **WINDOW, mask_src=inputs["mask_src"])
    value = fn(PairwiseInputs(probs, window, inputs["compatibility"]))
    value.backward()
    return value.detach(), probs.grad


def measure(
    backend: str, shape: tuple[int, int, int, int], dtype_name: str, copy_gbps: float
) -> Row:
    fn = BACKENDS[backend]
    inputs = make_inputs(shape, DTYPES[dtype_name])
    fwd_bwd(fn, inputs)  # compile / autotune outside the timing
    torch.cuda.synchronize()

    inputs["probs"].grad = None
    baseline = torch.cuda.memory_allocated()  # the inputs only
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd(fn, inputs)
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20

    ms = triton.testing.do_bench(lambda: fwd_bwd(fn, inputs), grad_to_none=[inputs["probs"]])

    first_value, first_grad = (t.clone() for t in fwd_bwd(fn, inputs))
    bitwise = True
    for _ in range(2):
        value, grad = fwd_bwd(fn, inputs)
        bitwise &= torch.equal(value, first_value) and torch.equal(grad, first_grad)

    gbps = floor_bytes(inputs) / (ms * 1e-3) / 1e9
    return Row(backend, shape, dtype_name, ms, peak_mib, gbps, gbps / copy_gbps, bitwise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/loss_triton_rows.py needs a CUDA GPU; none is visible.")

    device = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps()
    lines = [
        f"Device: {device}; torch {torch.__version__}, triton {triton.__version__}; r={RADIUS}; "
        f"device-to-device copy: {copy_gbps:.0f} GB/s.",
        "",
        "| backend | N×C×h×w | dtype | fwd+bwd ms | peak MiB | GB/s (floor) | % copy | bitwise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    times: dict[tuple, float] = {}
    for shape in SHAPES:
        for dtype_name in DTYPES:
            for backend in args.backends:
                try:
                    row = measure(backend, shape, dtype_name, copy_gbps)
                except torch.cuda.OutOfMemoryError:
                    lines.append(
                        f"| {backend} | {'×'.join(map(str, shape))} | {dtype_name} | OOM |||||"
                    )
                    torch.cuda.empty_cache()
                    continue
                times[(backend, shape, dtype_name)] = row.ms
                lines.append(row.markdown())
                logger.info(lines[-1])
    speedups = [
        f"- {'×'.join(map(str, shape))} {dtype_name}: triton is "
        f"{times[('torch', shape, dtype_name)] / times[('triton', shape, dtype_name)]:.1f}× faster "
        "than torch"
        for shape in SHAPES
        for dtype_name in DTYPES
        if ("torch", shape, dtype_name) in times and ("triton", shape, dtype_name) in times
    ]
    table = "\n".join([*lines, "", *speedups]) + "\n"
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
