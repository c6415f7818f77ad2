"""The transform pipeline: raw sample → the sample of docs/CONTRACTS.md §2.

:class:`SampleTransform` converts a raw sample (:mod:`~gcrf.data.transforms.raw_sample`) to
tv_tensors, moves them with one geometry (:mod:`~gcrf.data.transforms.geometry`; none, or the
validation centre crop, in validation) and finishes at the output size: weak labels are rasterised
there with the stroke width (clicks as discs), so a 1-pixel scribble stays 1 pixel wide at any
scale; the image becomes float (:func:`~gcrf.data.transforms.raw_sample.to_unit_float`) and is
normalised; padded pixels get ``valid`` = 0.

**Output sample**: ``image`` float32 C×H×W, ImageNet-normalised RGB by default (0 on padded
pixels), ``semseg_dense`` / ``semseg_scribbles`` / ``semseg_clicks`` int64 H×W with 255 = ignore,
``valid`` float32 1×H×W, ``index`` int.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import Transform

from gcrf.conventions import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from gcrf.data.transforms.config import AugmentationConfig
from gcrf.data.transforms.geometry import CenterCropPad, RandomGeometry
from gcrf.data.transforms.raw_sample import to_tv_tensors, to_unit_float
from gcrf.data.weak_labels import rasterise_clicks, scribble_label_map

__all__ = ["SampleTransform", "build_transform"]


class SampleTransform:
    """Raw sample → CONTRACTS §2 sample (see the module docstring).

    Args:
        config: augmentation settings.
        train: random geometry (training) or the deterministic validation path.
        normalize: ``(mean, std)`` per image channel applied after the geometry (default: the
            ImageNet statistics for RGB); ``None`` leaves the image in [0, 1] (uint8 images are
            scaled by 1/255, float images are taken as they are, e.g. MR intensities).
        geometry: the random geometry of training (default :class:`RandomGeometry` of
            ``config``); any v2 ``Transform`` that maps the sample's tv_tensors onto one output
            grid and returns the image as float32.
        padding_label: the label of padded pixels (outside the image) in the dense and scribble
            maps: 255 (ignore, the default: nothing is known there) or a class, e.g. 0 where the
            world outside the field of view is background (MR slices; WSL4MIS pads so).

    Example:
        >>> t = SampleTransform(AugmentationConfig(crop_size=8), train=True)
        >>> out = t({"image": np.zeros((5, 6, 3), np.uint8), "semseg_dense": None, "index": 0})
        >>> out["image"].shape, out["valid"].shape
        (torch.Size([3, 8, 8]), torch.Size([1, 8, 8]))
    """

    def __init__(
        self,
        config: AugmentationConfig | None = None,
        train: bool = True,
        normalize: tuple[Sequence[float], Sequence[float]] | None = (IMAGENET_MEAN, IMAGENET_STD),
        geometry: Transform | None = None,
        padding_label: int = IGNORE_INDEX,
    ) -> None:
        config = config if config is not None else AugmentationConfig()
        if isinstance(padding_label, bool) or not isinstance(padding_label, int):
            raise TypeError(f"padding_label must be an int, got {padding_label!r}")
        if not 0 <= padding_label <= IGNORE_INDEX:
            raise ValueError(f"padding_label must be in [0, 255], got {padding_label!r}")
        self.padding_label = padding_label
        if not isinstance(config, AugmentationConfig):
            raise TypeError(f"config must be an AugmentationConfig, got {type(config).__name__}")
        if geometry is not None and not isinstance(geometry, Transform):
            raise TypeError(
                f"geometry must be a v2 Transform or None, got {type(geometry).__name__}"
            )
        self.config = config
        self.train = bool(train)
        if self.train:
            self.geometry: Transform | None = geometry or RandomGeometry(config)
        elif config.validation_center_crop:
            self.geometry = CenterCropPad(config.validation_center_crop_size)
        else:
            self.geometry = None
        if normalize is None:
            self._mean = self._std = None
        else:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in normalize)
            if mean.shape != std.shape or bool((std <= 0).any()):
                raise ValueError(
                    f"normalize must be (mean, std) of one length with std > 0, got {normalize!r}"
                )
            self._mean, self._std = mean, std

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        data = to_tv_tensors(sample, self.config.scribble_length_ratio)
        keys = ("image", "semseg_dense", "invalid", "scribble_points", "click_points")
        spatial = {key: data[key] for key in (*keys, "semseg_scribbles") if key in data}
        if self.geometry is not None:
            spatial = self.geometry(spatial)
        return self.finish(spatial, data["scribble_layout"], data["click_classes"], data["index"])

    def finish(
        self,
        spatial: dict[str, Any],
        scribble_layout: tuple[Sequence[int], Sequence[int]],
        click_classes: Sequence[int],
        index: int,
    ) -> dict[str, Any]:
        """Rasterise weak labels, derive validity, convert and normalise the image (the last step
        of the pipeline, at the output size)."""
        image = to_unit_float(spatial["image"].as_subclass(torch.Tensor))
        size = (int(image.shape[-2]), int(image.shape[-1]))
        valid = (spatial["invalid"].as_subclass(torch.Tensor) == 0).float()
        if self._mean is not None:
            if self._mean.shape[0] != image.shape[0]:
                raise ValueError(
                    f"normalize has {self._mean.shape[0]} channel(s) but the image has "
                    f"{image.shape[0]}"
                )
            image = (image - self._mean) / self._std
        image = image * valid
        vertices = spatial["scribble_points"].as_subclass(torch.Tensor).numpy()
        classes, counts = scribble_layout
        bounds = np.cumsum([0, *counts])
        scribbles = [
            (c, vertices[a:b]) for c, a, b in zip(classes, bounds[:-1], bounds[1:], strict=True)
        ]
        clicks = list(
            zip(
                click_classes,
                spatial["click_points"].as_subclass(torch.Tensor).numpy(),
                strict=True,
            )
        )
        width = self.config.stroke_width
        raster = spatial.get("semseg_scribbles")  # a label map, resampled like the dense mask
        semseg_scribbles = scribble_label_map(
            scribbles, None if raster is None else raster.as_subclass(torch.Tensor)[0], size, width
        )
        semseg_dense = spatial["semseg_dense"].as_subclass(torch.Tensor)[0].long()
        if self.padding_label != IGNORE_INDEX:
            padded = valid[0] == 0
            semseg_dense = semseg_dense.masked_fill(padded, self.padding_label)
            semseg_scribbles = semseg_scribbles.masked_fill(padded, self.padding_label)
        return {
            "image": image.contiguous(),
            "semseg_dense": semseg_dense,
            "semseg_scribbles": semseg_scribbles,
            "semseg_clicks": rasterise_clicks(clicks, size, width),
            "valid": valid.contiguous(),
            "index": index,
        }


def build_transform(
    config: AugmentationConfig | None = None, train: bool = True
) -> SampleTransform:
    """The transform of a training (random) or validation (deterministic) dataset.

    Args:
        config: augmentation settings (default :class:`AugmentationConfig`).
        train: training or validation pipeline.

    Returns:
        A picklable callable: raw sample dict → CONTRACTS §2 sample dict.

    Example:
        >>> val = build_transform(AugmentationConfig(), train=False)
    """
    return SampleTransform(config, train)
