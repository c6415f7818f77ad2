"""Sample transforms: one random geometric draw for image, masks, validity and weak-label geometry.

One module per job:

- :mod:`~gcrf.data.transforms.config` — :class:`AugmentationConfig` (published ``aug_*`` flags);
- :mod:`~gcrf.data.transforms.raw_sample` — the raw sample a dataset returns, its conversion to
  tv_tensors, :func:`to_unit_float` (the one uint8 → float conversion);
- :mod:`~gcrf.data.transforms.resampler` — :class:`Resampler`: every raster resampled once,
  straight into the output, through a homography;
- :mod:`~gcrf.data.transforms.geometry` — :class:`RandomGeometry` (natural images),
  :class:`RandomRotateFlipResize` (MR slices), :class:`CenterCropPad` (validation);
- :mod:`~gcrf.data.transforms.pipeline` — :class:`SampleTransform` and :func:`build_transform`:
  raw sample → the sample of docs/CONTRACTS.md §2.
"""

from __future__ import annotations

from gcrf.data.transforms.config import AugmentationConfig
from gcrf.data.transforms.geometry import CenterCropPad, RandomGeometry, RandomRotateFlipResize
from gcrf.data.transforms.pipeline import SampleTransform, build_transform
from gcrf.data.transforms.raw_sample import to_tv_tensors, to_unit_float
from gcrf.data.transforms.resampler import Resampler, warp_params

__all__ = [
    "AugmentationConfig",
    "CenterCropPad",
    "RandomGeometry",
    "RandomRotateFlipResize",
    "Resampler",
    "SampleTransform",
    "build_transform",
    "to_tv_tensors",
    "to_unit_float",
    "warp_params",
]
