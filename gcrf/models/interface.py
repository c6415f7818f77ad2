"""What every segmentation model of the zoo shares: its input check and its typed output."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["SegmentationOutput", "check_image_batch"]


class SegmentationOutput(NamedTuple):
    """Logits of a segmentation network at two resolutions.

    Recipes and losses read the two fields and never ask which network produced them.

    Attributes:
        low: N×C×h×w logits at the network's own prediction resolution, the input of the Gated
            CRF loss (after softmax): stride 4 (``ceil(H/4)×ceil(W/4)``) for DeepLabv3+, the input
            size for UNet (the same tensor as ``high``).
        high: N×C×H×W logits at the input size (cross-entropy, evaluation).
    """

    low: Tensor
    high: Tensor


def check_image_batch(x: Any, in_channels: int) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``x`` is a non-empty float N×in_channels×H×W."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor; got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"x must be N×{in_channels}×H×W (a batch of images); got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x must not be empty; got shape {tuple(x.shape)}")
