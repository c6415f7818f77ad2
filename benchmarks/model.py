"""Benchmark of a DeepLabv3+ training step, with and without the Gated CRF loss.

Shows what the Gated CRF loss costs relative to the network: images/s of one training step
(forward, backward, SGD step) of ``gcrf.models.DeepLabV3Plus`` at 256×256 for resnet34 and resnet50,

- ``CE``: cross-entropy on the full-size logits ``high`` only;
- ``CE + GCRF``: plus ``gcrf.loss.GatedCRFLoss`` as in the published recipe: kernel
  ``{"weight": 1, "xy": 6, "rgb": 0.1}``, radius 5, probabilities ``softmax(low)`` at 64×64 (``low``
  is already 64×64 for a 256×256 crop; other sizes are resized bilinearly), the ImageNet-normalised
  network input as the ``rgb`` modality (as in the recipes, so σ_rgb is in normalised units),
  ``mask_src`` = the valid-pixel mask.

The time is the median over ``--iterations`` steps after ``--warmup`` steps (CUDA: synchronised).
On CPU the numbers depend strongly on the thread count and on other load; repeat and compare
within one run only.

Run from the repository root::

    python -m benchmarks.model                                   # CPU (or CUDA if present)
    python -m benchmarks.model --device cuda --batch 16 --iterations 20 --amp --channels-last
    python -m benchmarks.model --encoders resnet34 --batch 2 --iterations 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gcrf.conventions import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from gcrf.loss import DEFAULT_KERNELS
from gcrf.models import DeepLabV3Plus

KERNELS = list(DEFAULT_KERNELS)
RADIUS = 5
LOSS_RESOLUTION = 64
CLASSES = 21


@dataclass(frozen=True)
class Row:
    """One measurement."""

    encoder: str
    loss: str
    batch: int
    size: int
    ms_per_step: float
    images_per_s: float


def _load_gated_crf_loss() -> tuple[type[nn.Module] | None, str]:
    try:
        from gcrf.loss import GatedCRFLoss
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"
    return GatedCRFLoss, ""


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    encoder: str,
    gated_crf: nn.Module | None,
    batch: int,
    size: int,
    iterations: int,
    warmup: int,
    device: torch.device,
    amp: bool,
    channels_last: bool,
) -> Row:
    """Time ``iterations`` training steps of DeepLabv3+ on ``encoder`` (random weights and data).

    Args:
        encoder: timm encoder name.
        gated_crf: a ``GatedCRFLoss`` module, or None for cross-entropy alone.
        batch: images per step.
        size: image side.
        iterations: timed steps (median reported).
        warmup: untimed steps first.
        device: where to run.
        amp: bfloat16 autocast (CUDA).
        channels_last: model and images in channels-last memory format.

    Returns:
        The :class:`Row`.
    """
    torch.manual_seed(0)
    model = DeepLabV3Plus(encoder, num_classes=CLASSES, output_stride=16).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rgb = torch.rand(batch, 3, size, size, device=device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    images = ((rgb - mean) / std).contiguous(memory_format=memory_format)
    labels = torch.randint(0, CLASSES, (batch, size, size), device=device)
    labels[:, :, : size // 4] = IGNORE_INDEX  # weak labels: most pixels unlabelled
    valid = torch.ones(batch, 1, size, size, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            low, high = model(images)
            loss = F.cross_entropy(high.float(), labels, ignore_index=IGNORE_INDEX)
        if gated_crf is not None:
            probs = torch.softmax(low.float(), dim=1)
            if probs.shape[-1] != LOSS_RESOLUTION or probs.shape[-2] != LOSS_RESOLUTION:
                probs = F.interpolate(
                    probs, size=(LOSS_RESOLUTION,) * 2, mode="bilinear", align_corners=False
                )
            # σ_rgb in normalised units, as in the recipes: the loss sees the network input.
            loss = loss + gated_crf(probs, {"rgb": images}, mask_src=valid)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iterations):
        _synchronise(device)
        start = time.perf_counter()
        step()
        _synchronise(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return Row(
        encoder=encoder,
        loss="CE" if gated_crf is None else "CE + GCRF",
        batch=batch,
        size=size,
        ms_per_step=1000 * seconds,
        images_per_s=batch / seconds,
    )


def _table(rows: list[Row]) -> str:
    baseline = {(r.encoder, r.batch): r.ms_per_step for r in rows if r.loss == "CE"}
    lines = [
        "| encoder | loss | batch | size | ms / step | images / s | GCRF cost |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = baseline.get((r.encoder, r.batch))
        cost = (
            "" if r.loss == "CE" or base is None else f"{100 * (r.ms_per_step / base - 1):+.1f} %"
        )
        lines.append(
            f"| {r.encoder} | {r.loss} | {r.batch} | {r.size}² | {r.ms_per_step:.0f} | "
            f"{r.images_per_s:.2f} | {cost} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run the measurements, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", default=["resnet34", "resnet50"])
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 16 on CUDA")
    parser.add_argument("--iterations", type=int, default=None, help="default: 3 CPU, 20 CUDA")
    parser.add_argument("--warmup", type=int, default=None, help="default: 1 CPU, 5 CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for the network")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-loss", action="store_true", help="only the CE rows")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    batch = args.batch or (16 if on_cuda else 2)
    iterations = args.iterations or (20 if on_cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if on_cuda:
        torch.backends.cudnn.benchmark = True

    loss_class, unavailable = (
        (None, "disabled by --no-loss") if args.no_loss else _load_gated_crf_loss()
    )
    losses: list[nn.Module | None] = [None]
    if loss_class is not None:
        losses.append(loss_class(KERNELS, radius=RADIUS).to(device))

    name = (
        torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"DeepLabv3+ training step (fwd+bwd+SGD), OS16, {CLASSES} classes, device: {name}, "
        f"amp: {args.amp}, channels_last: {args.channels_last}, median of {iterations} steps "
        f"after {warmup} warm-up"
    )
    if loss_class is None:
        print(f"Gated CRF loss unavailable ({unavailable}): CE rows only.")
    rows = [
        measure(
            encoder,
            loss,
            batch,
            args.size,
            iterations,
            warmup,
            device,
            args.amp,
            args.channels_last,
        )
        for encoder in args.encoders
        for loss in losses
    ]
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()
