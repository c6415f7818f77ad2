"""One warp of a sample: every raster resampled once, straight into the output grid.

A geometry (:mod:`gcrf.data.transforms.geometry`) draws a homography; :func:`warp_params` turns it
into a :class:`Resampler` (rasters) and torchvision's key-point map (scribble vertices, clicks), and
:func:`resample` moves one tv_tensor with them. No raster is ever padded, warped or converted at the
source's size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from gcrf.conventions import IGNORE_INDEX
from gcrf.data.transforms.raw_sample import to_unit_float

__all__ = ["FILLS", "Resampler", "resample", "source_size", "warp_params"]

#: The value of pixels from outside the image: image 0, masks (labels, "invalid") 255.
FILLS: dict[type, float] = {tv_tensors.Image: 0.0, tv_tensors.Mask: float(IGNORE_INDEX)}


class Resampler:
    """Resample rasters of one source size straight into an output grid through a homography.

    ``forward`` maps *continuous* source coordinates to continuous output coordinates (pixel
    ``(r, c)`` covers ``[c, c+1) × [r, r+1)``, its centre is ``(c + 0.5, r + 0.5)``). Output pixel
    ``(r, c)`` reads the source at ``p = forward⁻¹ (c + 0.5, r + 0.5)``, computed once in float64
    and shared by every raster of the sample:

    - :meth:`nearest` (masks): the source pixel that contains ``p``, i.e. ``floor(p)``; ``fill``
      where that pixel is outside the source. Exact (no interpolation), any dtype.
    - :meth:`bilinear` (images): the source read at ``p`` with bilinear weights over the four
      nearest pixel centres, zeros outside (``grid_sample``, ``align_corners=False``). Only the
      part of the source that the output reads is converted to float (:func:`to_unit_float`).
    - :attr:`inside`: whether ``floor(p)`` lies on the source (the valid pixels).

    Args:
        forward: 3×3 homography, continuous source → continuous output coordinates.
        source_size: (H, W) of the rasters to resample.
        output_size: (h, w) of the output.

    Example:
        >>> flip = np.array([[-1.0, 0, 4], [0, 1, 0], [0, 0, 1]])  # x → 4 − x on a 4-wide image
        >>> Resampler(flip, (1, 4), (1, 4)).nearest(torch.arange(4).view(1, 1, 4), 255).tolist()
        [[[3, 2, 1, 0]]]
    """

    def __init__(
        self, forward: np.ndarray, source_size: tuple[int, int], output_size: tuple[int, int]
    ) -> None:
        self.source_size = (int(source_size[0]), int(source_size[1]))
        self.output_size = (int(output_size[0]), int(output_size[1]))
        (a, b, c), (d, e, f), (g, h, i) = np.linalg.inv(np.asarray(forward, np.float64)).tolist()
        # Separable in (u, v) up to the final division: three outer sums instead of a matmul.
        u = torch.arange(self.output_size[1], dtype=torch.float64).add_(0.5)
        v = torch.arange(self.output_size[0], dtype=torch.float64).add_(0.5).view(-1, 1)
        denominator = torch.add(g * u, h * v + i)
        self.x = torch.add(a * u, b * v + c).div_(denominator)
        self.y = torch.add(d * u, e * v + f).div_(denominator)
        self._nearest: tuple[torch.Tensor, torch.Tensor] | None = None

    def _nearest_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat source index of floor(p), clamped; whether floor(p) is on the source)."""
        if self._nearest is None:
            height, width = self.source_size
            column, row = self.x.floor(), self.y.floor()
            inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
            flat = row.clamp_(0, height - 1).mul_(width).add_(column.clamp_(0, width - 1))
            self._nearest = (flat.to(torch.int64).view(-1), inside)
        return self._nearest

    @property
    def inside(self) -> torch.Tensor:
        """h×w bool: output pixels whose nearest source pixel is on the source."""
        return self._nearest_index()[1]

    def nearest(self, raster: torch.Tensor, fill: float) -> torch.Tensor:
        """C×H×W raster (any dtype) → C×h×w by nearest neighbour, ``fill`` outside the source."""
        channels = raster.shape[0]
        flat, inside = self._nearest_index()
        if all(stride == 0 for stride in raster.stride()):
            # A constant (an expanded scalar such as the all-ignore mask): nothing to read.
            out = raster.reshape(-1)[:1].expand(channels, *self.output_size)
        else:
            out = raster.reshape(channels, -1).index_select(1, flat)
            out = out.view(channels, *self.output_size)
        return torch.where(inside, out, torch.tensor(fill, dtype=raster.dtype))

    def bilinear(self, raster: torch.Tensor) -> torch.Tensor:
        """C×H×W image (uint8 or float) → float32 C×h×w in the image's unit scale."""
        height, width = self.source_size
        # The source pixels the output reads: pixel centres around every p, clipped to the image.
        x0 = min(width, max(0, math.floor(float(self.x.min()) - 0.5)))
        x1 = min(width, max(0, math.floor(float(self.x.max()) + 0.5) + 1))
        y0 = min(height, max(0, math.floor(float(self.y.min()) - 0.5)))
        y1 = min(height, max(0, math.floor(float(self.y.max()) + 0.5) + 1))
        if x1 <= x0 or y1 <= y0:  # the output reads nothing of the image
            return torch.zeros((raster.shape[0], *self.output_size), dtype=torch.float32)
        region = to_unit_float(raster[:, y0:y1, x0:x1])
        # grid_sample's normalised coordinates (align_corners=False): −1 and 1 are the region's
        # outer pixel edges, i.e. continuous coordinates 0 and its width / height.
        grid = torch.stack(
            (
                (self.x - x0).mul_(2.0 / (x1 - x0)).sub_(1.0),
                (self.y - y0).mul_(2.0 / (y1 - y0)).sub_(1.0),
            ),
            dim=-1,
        ).to(torch.float32)
        out = torch.nn.functional.grid_sample(
            region.unsqueeze(0),
            grid.unsqueeze(0),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        return out[0]


def _homography_coefficients(forward: np.ndarray) -> list[float]:
    """torchvision perspective coefficients (output → input map) of a forward 3×3 homography."""
    inverse = np.linalg.inv(forward)
    inverse = inverse / inverse[2, 2]
    return [float(v) for v in inverse.reshape(-1)[:8]]


def warp_params(
    forward: np.ndarray, source_size: tuple[int, int], output_size: tuple[int, int]
) -> dict[str, Any]:
    """The parameters of one warp of a sample: its :class:`Resampler` and the key-point map.

    torchvision's key-point kernel reads index coordinates (pixel centres at integers), so the
    homography is conjugated by the half-pixel shift: ``p_index = p_continuous − 0.5`` on both sides.

    Args:
        forward: 3×3 homography, continuous source → continuous output coordinates.
        source_size: (H, W) of the sample.
        output_size: (h, w) of the output.

    Returns:
        ``{"resampler": Resampler, "coefficients_points": 8 floats, "output_size": (h, w)}``,
        the ``params`` of :func:`resample`.
    """
    shift = np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
    return {
        "resampler": Resampler(forward, source_size, output_size),
        "coefficients_points": _homography_coefficients(np.linalg.inv(shift) @ forward @ shift),
        "output_size": (int(output_size[0]), int(output_size[1])),
    }


def resample(inpt: Any, params: dict[str, Any]) -> Any:
    """One tv_tensor through the warp of :func:`warp_params`: images bilinear (float32 out), masks
    nearest with :data:`FILLS`, key points mapped exactly and cropped to the output."""
    height, width = params["output_size"]
    if isinstance(inpt, tv_tensors.KeyPoints):
        moved = F.perspective(inpt, None, None, coefficients=params["coefficients_points"])
        return F.crop(moved, top=0, left=0, height=height, width=width)
    resampler: Resampler = params["resampler"]
    raw = inpt.as_subclass(torch.Tensor)
    if isinstance(inpt, tv_tensors.Mask):
        return tv_tensors.Mask(resampler.nearest(raw, FILLS[tv_tensors.Mask]))
    return tv_tensors.Image(resampler.bilinear(raw))


def source_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """(H, W) of the first image or mask among a sample's tv_tensors (all share it)."""
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            height, width = F.get_size(inpt)
            return int(height), int(width)
    raise TypeError("the sample holds no image or mask to take the size from")
