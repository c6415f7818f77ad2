"""The terms of the training objective: cross entropy and Dice on (weak) labels, the Gated CRF input
size and schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gcrf.conventions import IGNORE_INDEX

__all__ = [
    "cross_entropy_loss",
    "dice_loss",
    "gated_crf_start_step",
    "resize_probabilities",
]


def cross_entropy_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean cross entropy over labelled pixels (255 = unlabelled), 0 when no pixel is labelled.

    Equal to ``F.cross_entropy(logits, target, weight, ignore_index=255)`` whenever at least one
    pixel is labelled; a batch without labels (possible with clicks after cropping) gives a zero that
    still carries the graph, instead of NaN.

    Args:
        logits: N×C×H×W logits.
        target: N×H×W int64 labels in [0, C) or 255.
        weight: optional C class weights.

    Shape:
        logits N×C×H×W, target N×H×W, weight C.

    Returns:
        0-dim float32 tensor.

    Example:
        >>> cross_entropy_loss(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 255)).item()
        0.0
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            "expected logits N×C×H×W and target N×H×W, got logits "
            f"{tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    logits = logits.float()
    summed = F.cross_entropy(
        logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    labelled = target != IGNORE_INDEX
    if weight is None:
        denominator = labelled.sum().to(summed.dtype)
    else:
        denominator = weight.to(summed.dtype)[target[labelled]].sum()
    return summed / denominator.clamp_min(torch.finfo(summed.dtype).tiny)


def resize_probabilities(
    probs: Tensor, resolution: int | Sequence[int] | None, input_size: Sequence[int]
) -> Tensor:
    """Resize class probabilities (bilinear) to the Gated CRF resolution.

    Bilinear interpolation takes convex combinations of neighbouring pixels, so the result is still a
    probability distribution at every pixel.

    Args:
        probs: N×C×h×w probabilities (the softmax of the stride-4 logits).
        resolution: ``None`` keeps h×w; an int ``R`` gives R×R for a square input and otherwise R rows
            with the input's aspect ratio (the width must come out integral); a pair gives (rows, cols).
        input_size: (H, W) of the network input; every output side must divide the input side (the
            loss pools the image features by an integer factor).

    Returns:
        N×C×R×R' probabilities (``probs`` itself when the size already matches).

    Example:
        >>> resize_probabilities(torch.full((1, 2, 4, 4), 0.5), 8, (16, 16)).shape
        torch.Size([1, 2, 8, 8])
    """
    height, width = int(input_size[0]), int(input_size[1])
    if resolution is None:
        return probs
    if isinstance(resolution, int):
        rows = resolution
        cols = resolution * width / height
        if cols != int(cols):
            raise ValueError(
                f"resolution={resolution} on a {height}×{width} input gives a non-integral "
                f"width {cols}; pass (rows, cols)"
            )
        size = (rows, int(cols))
    else:
        if len(resolution) != 2:
            raise ValueError(f"resolution must be an int or a pair, got {resolution!r}")
        size = (int(resolution[0]), int(resolution[1]))
    if size[0] < 1 or size[1] < 1 or height % size[0] or width % size[1]:
        raise ValueError(
            f"resolution {size} must divide the input size {(height, width)} (the image "
            "features are pooled by an integer factor)"
        )
    if tuple(probs.shape[-2:]) == size:
        return probs
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)


def gated_crf_start_step(use_after_progress_ratio: float, total_steps: int) -> int:
    """The first global step at which the Gated CRF term is on: ``floor(ratio · total_steps)``.

    Example:
        >>> gated_crf_start_step(0.005, 90_000)
        450
    """
    return math.floor(use_after_progress_ratio * total_steps)


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Soft Dice loss over all classes (background included), the one WSL4MIS adds to CE.

    ``1 − (2 Σ p_c t_c + s) / (Σ p_c² + Σ t_c² + s)`` per class over the labelled pixels of the
    batch (255 = unlabelled pixels take no part), averaged over the classes; ``p = softmax(logits)``
    and ``t`` the one-hot target.

    Args:
        logits: N×C×H×W logits.
        target: N×H×W int64 labels in [0, C) or 255.
        smooth: the additive constant ``s``.

    Returns:
        0-dim float32 tensor in [0, 1].

    Example:
        >>> logits = torch.tensor([[[[9.0, -9.0]], [[-9.0, 9.0]]]])  # class 0, then class 1
        >>> round(dice_loss(logits, torch.tensor([[[0, 1]]])).item(), 3)
        0.0
        >>> round(dice_loss(logits, torch.tensor([[[1, 0]]])).item(), 3)
        1.0
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            "expected logits N×C×H×W and target N×H×W, got logits "
            f"{tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    labelled = (target != IGNORE_INDEX).unsqueeze(1)
    one_hot = F.one_hot(torch.where(labelled[:, 0], target, 0), num_classes).movedim(-1, 1)
    probs = probs * labelled
    one_hot = one_hot.to(probs.dtype) * labelled
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    denominator = (probs * probs).sum(dims) + (one_hot * one_hot).sum(dims)
    return (1 - (2 * intersection + smooth) / (denominator + smooth)).mean()
