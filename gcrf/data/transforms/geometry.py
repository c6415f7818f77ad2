"""The geometries of the pipeline: v2 transforms that move a sample's tv_tensors together.

- :class:`RandomGeometry` — random scale, rotation, perspective wiggle, flip and crop (natural
  images, the published ``aug_geom_*``);
- :class:`RandomRotateFlipResize` — WSL4MIS's rotations and flips, then the resize (MR slices);
- :class:`CenterCropPad` — the deterministic validation crop (integer shifts, no interpolation).

The random ones draw one homography per sample and warp through
:mod:`~gcrf.data.transforms.resampler` (every raster resampled once, straight into the output; key
points mapped exactly). They use the torch random generator, which Lightning seeds per DataLoader
worker.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2 import functional as F

from gcrf.data.transforms.config import AugmentationConfig
from gcrf.data.transforms.resampler import FILLS, resample, source_size, warp_params

__all__ = ["CenterCropPad", "RandomGeometry", "RandomRotateFlipResize"]


class _HomographyWarp(Transform):
    """A random warp: :meth:`forward_homography` draws it, the resampler applies it."""

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask, tv_tensors.KeyPoints)

    def forward_homography(self, height: int, width: int) -> np.ndarray:
        """Draw the homography (continuous source → continuous output coordinates)."""
        raise NotImplementedError

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the output for a sample of (height, width)."""
        raise NotImplementedError

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        size = source_size(flat_inputs)
        return warp_params(self.forward_homography(*size), size, self.output_size(*size))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return resample(inpt, params)


def _homography_from_points(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """3×3 homography mapping 4 ``source`` points onto 4 ``target`` points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(source, target, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    h = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


class RandomGeometry(_HomographyWarp):
    """Random scale, rotation, perspective wiggle, flip and crop as one homography (training).

    Sequence of the draw (one per call, shared by every tv_tensor of the sample): scale
    ``s ~ U[scale_min, scale_max]``; rotation ``θ ~ U[-tilt, tilt]`` about the scaled image centre;
    a ``crop_size`` window placed uniformly over the bounding box of the scaled, rotated image (or,
    when that box is smaller than the crop, the box placed uniformly inside the window); each window
    corner moved by ``U[-wiggle, wiggle] · crop_size`` in x and y; horizontal flip with probability
    1/2 when ``reflect``. Images come out float32 in their unit scale, masks by nearest neighbour;
    pixels from outside the image get :data:`~gcrf.data.transforms.resampler.FILLS`.

    Args:
        config: augmentation settings.

    Example:
        >>> geometry = RandomGeometry(AugmentationConfig(crop_size=32))
    """

    def __init__(self, config: AugmentationConfig) -> None:
        super().__init__()
        if not isinstance(config, AugmentationConfig):
            raise TypeError(f"config must be an AugmentationConfig, got {type(config).__name__}")
        self.config = config

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()))

    def forward_homography(self, height: int, width: int) -> np.ndarray:
        """Draw the homography (continuous source → continuous crop coordinates) for one sample."""
        cfg = self.config
        crop = cfg.crop_size
        scale = self._uniform(cfg.scale_min, cfg.scale_max)
        angle = (
            math.radians(self._uniform(-cfg.tilt_max_deg, cfg.tilt_max_deg))
            if cfg.tilt_max_deg
            else 0.0
        )
        cos, sin = math.cos(angle), math.sin(angle)
        cx, cy = width / 2, height / 2
        # Scale and rotate about the image centre (counter-clockwise on screen for angle > 0).
        rotate = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]]) @ np.diag(
            [scale, scale, 1.0]
        )
        to_centre = np.array([[1.0, 0, -cx], [0, 1.0, -cy], [0, 0, 1.0]])
        forward = rotate @ to_centre
        corners = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], float).T
        moved = forward @ corners
        x0, y0 = moved[0].min(), moved[1].min()
        extent_x, extent_y = moved[0].max() - x0, moved[1].max() - y0
        left = (
            x0 + self._uniform(0.0, extent_x - crop)
            if extent_x >= crop
            else x0 - self._uniform(0.0, crop - extent_x)
        )
        top = (
            y0 + self._uniform(0.0, extent_y - crop)
            if extent_y >= crop
            else y0 - self._uniform(0.0, crop - extent_y)
        )
        forward = np.array([[1.0, 0, -left], [0, 1.0, -top], [0, 0, 1.0]]) @ forward
        if cfg.wiggle_max_ratio > 0:
            square = np.array([[0, 0], [crop, 0], [crop, crop], [0, crop]], dtype=np.float64)
            jitter = (
                (torch.rand(4, 2, dtype=torch.float64).numpy() * 2 - 1)
                * cfg.wiggle_max_ratio
                * crop
            )
            forward = _homography_from_points(square, square + jitter) @ forward
        if cfg.reflect and float(torch.rand(())) < 0.5:
            forward = np.array([[-1.0, 0, crop], [0, 1.0, 0], [0, 0, 1.0]]) @ forward
        return forward

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.config.crop_size, self.config.crop_size


class RandomRotateFlipResize(_HomographyWarp):
    """The augmentation of the medical recipes (WSL4MIS), as one homography, then resize.

    One draw per sample: with probability 1/2 a rotation by ``k·90°`` (``k`` uniform in 0..3)
    followed by a flip about a uniformly chosen axis; otherwise, with probability 1/2, a rotation
    by an angle uniform in ``[−max_rotation_deg, max_rotation_deg]`` about the image centre
    (corners that leave the image are cut, uncovered corners padded); otherwise nothing. The result
    is resized to ``size×size`` (each axis by its own factor, as WSL4MIS's ``zoom``): bilinear
    images, nearest masks, padding with :data:`~gcrf.data.transforms.resampler.FILLS`.

    Args:
        size: side of the output (the training size).
        max_rotation_deg: largest angle of the small rotation (WSL4MIS: 20).

    Example:
        >>> geometry = RandomRotateFlipResize(16)
    """

    def __init__(self, size: int, max_rotation_deg: float = 20.0) -> None:
        super().__init__()
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if not 0 <= max_rotation_deg <= 180:
            raise ValueError(f"max_rotation_deg must be in [0, 180], got {max_rotation_deg!r}")
        self.size = size
        self.max_rotation_deg = float(max_rotation_deg)

    def forward_homography(self, height: int, width: int) -> np.ndarray:
        """Draw the homography (continuous source → continuous output coordinates)."""
        cx, cy = width / 2, height / 2
        to_centre = np.array([[1.0, 0, -cx], [0, 1.0, -cy], [0, 0, 1.0]])
        linear = np.eye(3)
        turned_w, turned_h = width, height  # the frame after the rotation, before the resize
        if float(torch.rand(())) > 0.5:
            k = int(torch.randint(0, 4, ()))
            flip_rows = bool(torch.randint(0, 2, ()))
            quarter = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # 90° on screen
            flip = np.diag([1.0, -1.0, 1.0]) if flip_rows else np.diag([-1.0, 1.0, 1.0])
            linear = flip @ np.linalg.matrix_power(quarter, k)
            if k % 2:  # quarter turns swap the axes
                turned_w, turned_h = height, width
        elif float(torch.rand(())) > 0.5:
            angle = math.radians(
                -self.max_rotation_deg + 2 * self.max_rotation_deg * float(torch.rand(()))
            )
            cos, sin = math.cos(angle), math.sin(angle)
            linear = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
        back = np.array([[1.0, 0, turned_w / 2], [0, 1.0, turned_h / 2], [0, 0, 1.0]])
        resize = np.diag([self.size / turned_w, self.size / turned_h, 1.0])
        return resize @ back @ linear @ to_centre

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.size, self.size


class CenterCropPad(Transform):
    """Centre crop to ``size``×``size`` by integer shifts, padding with the fills where smaller.

    Args:
        size: side of the output.

    Example:
        >>> crop = CenterCropPad(512)
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask, tv_tensors.KeyPoints)

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = source_size(flat_inputs)
        pad_x, pad_y = max(0, self.size - width), max(0, self.size - height)
        padding = [pad_x // 2, pad_y // 2, pad_x - pad_x // 2, pad_y - pad_y // 2]
        padded_h, padded_w = height + pad_y, width + pad_x
        return {
            "padding": padding,
            "top": (padded_h - self.size) // 2,
            "left": (padded_w - self.size) // 2,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if any(params["padding"]):
            inpt = self._call_kernel(
                F.pad, inpt, padding=params["padding"], fill=FILLS.get(type(inpt), 0.0)
            )
        return self._call_kernel(
            F.crop, inpt, top=params["top"], left=params["left"], height=self.size, width=self.size
        )
