"""Sample transforms: one random geometric draw for image, masks, validity and weak-label geometry.

**Raw sample** (what a dataset hands to the transform; extra keys are ignored)::

    {
        "image": PIL RGB image | uint8 or float ([0, 1]) H×W×3 numpy array | uint8 or float 3×H×W tensor,
        "semseg_dense": None | PIL "L"/"P" image | integer H×W numpy array or tensor (values 0..255,
                        255 = ignore),
        "scribbles": None | list of (class_id, P×2 (x, y) polyline, numpy or tensor),
        "clicks": None | list of (class_id, (x, y) point: shape (2,) or (1, 2)),
        "index": int,
    }

Coordinates are pixels of the image, ``x`` = column, ``y`` = row, pixel centres at integers (see
:mod:`gcrf.data.weak_labels`). Missing keys or ``None`` mean "no such annotation" (the output map
is all ignore).

**Output sample** (docs/CONTRACTS.md §2): ``image`` float32 3×H×W ImageNet-normalised (0 on padded
pixels), ``semseg_dense`` / ``semseg_scribbles`` / ``semseg_clicks`` int64 H×W with 255 = ignore,
``valid`` float32 1×H×W (1 on real image pixels, 0 where the augmentation padded), ``index`` int.

Pipeline: the image becomes a float ``tv_tensors.Image``, the dense mask and an "invalid" mask
(0 on the image, padded with 255) ``tv_tensors.Mask``, scribble vertices and clicks
``tv_tensors.KeyPoints``. Training applies :class:`RandomGeometry` — random scale, rotation,
perspective wiggle, horizontal flip and crop composed into *one* homography and applied once with
``torchvision.transforms.v2.functional.perspective`` (bilinear for the image, nearest for masks,
exact for key points), padding with ignore (masks) / invalid (validity) / 0 (image). Validation
optionally centre-crops with padding (integer shifts, no interpolation). Weak labels stay geometry
until the very end and are rasterised at the output resolution with the stroke width (clicks as
discs), so a 1-pixel scribble stays 1 pixel wide at any scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from gcrf.conventions import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from gcrf.data.weak_labels import (
    rasterise_clicks,
    rasterise_scribbles,
    shorten_polyline,
)

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentationConfig",
    "RandomGeometry",
    "SampleTransform",
    "build_transform",
    "to_tv_tensors",
]


@dataclasses.dataclass(frozen=True)
class AugmentationConfig:
    """Augmentation settings (published flags ``aug_*``).

    Args:
        crop_size: side of the square training crop (``aug_input_crop_size``).
        scale_min: lower bound of the random scale (``aug_geom_scale_min``).
        scale_max: upper bound of the random scale (``aug_geom_scale_max``).
        tilt_max_deg: largest rotation in degrees, either direction (``aug_geom_tilt_max_deg``).
        wiggle_max_ratio: perspective warp: each crop corner moves by up to this fraction of the
            crop size in x and y (``aug_geom_wiggle_max_ratio``, 0 to 1).
        reflect: random horizontal flips (``aug_geom_reflect``).
        validation_center_crop: centre-crop validation samples (``aug_geom_validation_center_crop_sts``).
        validation_center_crop_size: side of that crop, padded when the image is smaller
            (``aug_geom_validation_center_crop_size``).
        stroke_width: pen diameter in pixels for rasterised scribbles and clicks
            (``aug_semseg_weak_stroke_width``).
        scribble_length_ratio: keep the middle fraction of every scribble's length (1 = whole
            scribble; the published scribble-length ablation).

    Example:
        >>> AugmentationConfig(crop_size=256, tilt_max_deg=10).scale_max
        2.0
    """

    crop_size: int = 512
    scale_min: float = 0.5
    scale_max: float = 2.0
    tilt_max_deg: float = 0.0
    wiggle_max_ratio: float = 0.0
    reflect: bool = True
    validation_center_crop: bool = False
    validation_center_crop_size: int = 512
    stroke_width: int = 1
    scribble_length_ratio: float = 1.0

    def __post_init__(self) -> None:
        for name in ("crop_size", "validation_center_crop_size", "stroke_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(
                f"need 0 < scale_min <= scale_max, got scale_min={self.scale_min!r}, "
                f"scale_max={self.scale_max!r}"
            )
        if not 0 <= self.tilt_max_deg <= 180:
            raise ValueError(f"tilt_max_deg must be in [0, 180], got {self.tilt_max_deg!r}")
        if not 0 <= self.wiggle_max_ratio <= 1:
            raise ValueError(f"wiggle_max_ratio must be in [0, 1], got {self.wiggle_max_ratio!r}")
        if not 0 < self.scribble_length_ratio <= 1:
            raise ValueError(
                f"scribble_length_ratio must be in (0, 1], got {self.scribble_length_ratio!r}"
            )


# ------------------------------------------------------------------------------ conversion
def _image_to_tensor(image: Any) -> torch.Tensor:
    """Any supported image → float32 3×H×W in [0, 1] (a new tensor)."""
    if isinstance(image, PILImage.Image):
        array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be H×W×3, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be 3×H×W, got shape {tuple(image.shape)}")
        tensor = image.as_subclass(torch.Tensor)
    else:
        raise TypeError(
            f"image must be a PIL image, numpy array or tensor, got {type(image).__name__}"
        )
    if tensor.dtype == torch.uint8:
        return tensor.float().div(255)
    if tensor.is_floating_point():
        return tensor.float().clone()
    raise TypeError(f"image must be uint8 or floating point, got {tensor.dtype}")


def _mask_to_tensor(mask: Any, size: tuple[int, int]) -> torch.Tensor:
    """Dense label map → uint8 1×H×W (all ignore when ``mask`` is None)."""
    if mask is None:
        return torch.full((1, *size), IGNORE_INDEX, dtype=torch.uint8)
    if isinstance(mask, PILImage.Image):
        mask = np.asarray(mask)
    tensor = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    tensor = tensor.as_subclass(torch.Tensor)
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"semseg_dense must be H×W, got shape {tuple(tensor.shape)}")
    if tuple(tensor.shape) != size:
        raise ValueError(
            f"semseg_dense has size {tuple(tensor.shape)} but the image has size {size}"
        )
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise TypeError(f"semseg_dense must hold integers, got {tensor.dtype}")
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) > 255):
        raise ValueError(
            f"semseg_dense values must be in [0, 255], got [{int(tensor.min())}, {int(tensor.max())}]"
        )
    return tensor.to(torch.uint8).unsqueeze(0).clone()


def _points(shapes: Any, what: str) -> tuple[list[int], list[int], np.ndarray]:
    """(class ids, vertex counts, concatenated K×2 float32 vertices) of polylines or points."""
    classes, counts, chunks = [], [], []
    for item in shapes or ():
        try:
            class_id, points = item
        except (TypeError, ValueError) as error:
            raise TypeError(f"{what} entries must be (class_id, points), got {item!r}") from error
        array = np.asarray(
            points.as_subclass(torch.Tensor).numpy()
            if isinstance(points, torch.Tensor)
            else points,
            dtype=np.float32,
        ).reshape(-1, 2)
        if len(array) == 0:
            continue
        classes.append(int(class_id))
        counts.append(len(array))
        chunks.append(array)
    vertices = np.concatenate(chunks) if chunks else np.zeros((0, 2), dtype=np.float32)
    return classes, counts, vertices


def to_tv_tensors(sample: dict[str, Any], scribble_length_ratio: float = 1.0) -> dict[str, Any]:
    """Raw sample → tv_tensors for the geometric transforms (plus the weak-label layout).

    Args:
        sample: raw sample (module docstring).
        scribble_length_ratio: shorten every scribble to this fraction of its length first.

    Returns:
        ``{"image": Image float 3×H×W, "semseg_dense": Mask uint8 1×H×W, "invalid": Mask uint8
        1×H×W (zeros), "scribble_points": KeyPoints K×2, "click_points": KeyPoints N×2,
        "scribble_layout": (classes, counts), "click_classes": classes, "index": int}``.
    """
    if not isinstance(sample, dict) or "image" not in sample:
        raise TypeError(f"sample must be a dict with an 'image' key, got {type(sample).__name__}")
    image = _image_to_tensor(sample["image"])
    size = (int(image.shape[1]), int(image.shape[2]))
    dense = _mask_to_tensor(sample.get("semseg_dense"), size)
    scribbles = sample.get("scribbles") or []
    if scribble_length_ratio < 1:
        scribbles = [
            (c, shorten_polyline(p, scribble_length_ratio)) for c, p in _iter_arrays(scribbles)
        ]
    s_classes, s_counts, s_vertices = _points(scribbles, "scribbles")
    c_classes, _, c_vertices = _points(sample.get("clicks"), "clicks")
    return {
        "image": tv_tensors.Image(image),
        "semseg_dense": tv_tensors.Mask(dense),
        "invalid": tv_tensors.Mask(torch.zeros((1, *size), dtype=torch.uint8)),
        "scribble_points": tv_tensors.KeyPoints(torch.from_numpy(s_vertices), canvas_size=size),
        "click_points": tv_tensors.KeyPoints(torch.from_numpy(c_vertices), canvas_size=size),
        "scribble_layout": (s_classes, s_counts),
        "click_classes": c_classes,
        "index": int(sample.get("index", -1)),
    }


def _iter_arrays(shapes: Any) -> list[tuple[int, np.ndarray]]:
    out = []
    for class_id, points in shapes:
        if isinstance(points, torch.Tensor):
            points = points.as_subclass(torch.Tensor).numpy()
        out.append((int(class_id), np.asarray(points, dtype=np.float32).reshape(-1, 2)))
    return out


# ------------------------------------------------------------------------------- geometry
def _homography_coefficients(forward: np.ndarray) -> list[float]:
    """torchvision perspective coefficients (output → input map) of a forward 3×3 homography."""
    inverse = np.linalg.inv(forward)
    inverse = inverse / inverse[2, 2]
    return [float(v) for v in inverse.reshape(-1)[:8]]


def _fills() -> dict[type, float]:
    return {tv_tensors.Image: 0.0, tv_tensors.Mask: float(IGNORE_INDEX)}


class RandomGeometry(Transform):
    """Random scale, rotation, perspective wiggle, flip and crop as one homography (training).

    Sequence of the draw (one per call, shared by every tv_tensor of the sample): scale
    ``s ~ U[scale_min, scale_max]``; rotation ``θ ~ U[-tilt, tilt]`` about the scaled image centre;
    a ``crop_size`` window placed uniformly over the bounding box of the scaled, rotated image (or,
    when that box is smaller than the crop, the box placed uniformly inside the window); each window
    corner moved by ``U[-wiggle, wiggle] · crop_size`` in x and y; horizontal flip with probability
    1/2 when ``reflect``. Images are resampled bilinearly, masks by nearest neighbour, key points
    exactly (pixel-centre convention); pixels from outside the image get the fill (image 0,
    masks 255). Uses the torch random generator (seeded per DataLoader worker).

    Args:
        config: augmentation settings.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask, tv_tensors.KeyPoints)

    def __init__(self, config: AugmentationConfig) -> None:
        super().__init__()
        if not isinstance(config, AugmentationConfig):
            raise TypeError(f"config must be an AugmentationConfig, got {type(config).__name__}")
        self.config = config

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        cfg = self.config
        height, width = query_size(flat_inputs)
        crop = cfg.crop_size
        # Continuous coordinates (pixel (r, c) spans [c, c+1) × [r, r+1)) until the very end.
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
        # torchvision's image kernel reads the coefficients in continuous coordinates (it samples
        # at pixel centres x + 0.5), its key-point kernel in index coordinates (pixel centres at
        # integers): p_index = p_continuous - 0.5 on both sides.
        shift = np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
        forward_index = np.linalg.inv(shift) @ forward @ shift
        canvas = (max(height, crop), max(width, crop))
        return {
            "coefficients": _homography_coefficients(forward),
            "coefficients_points": _homography_coefficients(forward_index),
            "padding": [0, 0, canvas[1] - width, canvas[0] - height],
            "crop": crop,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = _fills().get(type(inpt), 0.0)
        if any(params["padding"]):
            inpt = self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)
        kwargs: dict[str, Any] = {"coefficients": params["coefficients"]}
        if isinstance(inpt, tv_tensors.KeyPoints):
            kwargs["coefficients"] = params["coefficients_points"]
        elif isinstance(inpt, tv_tensors.Image):
            kwargs.update(interpolation=F.InterpolationMode.BILINEAR, fill=fill)
        elif isinstance(inpt, tv_tensors.Mask):
            kwargs.update(fill=fill)
        inpt = self._call_kernel(F.perspective, inpt, None, None, **kwargs)
        return self._call_kernel(
            F.crop, inpt, top=0, left=0, height=params["crop"], width=params["crop"]
        )


def _homography_from_points(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """3×3 homography mapping 4 ``source`` points onto 4 ``target`` points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(source, target, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    h = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


class CenterCropPad(Transform):
    """Centre crop to ``size``×``size`` by integer shifts, padding with the fills where smaller.

    Args:
        size: side of the output.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask, tv_tensors.KeyPoints)

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
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
                F.pad, inpt, padding=params["padding"], fill=_fills().get(type(inpt), 0.0)
            )
        return self._call_kernel(
            F.crop, inpt, top=params["top"], left=params["left"], height=self.size, width=self.size
        )


# ------------------------------------------------------------------------------- the entry
class SampleTransform:
    """Raw sample → CONTRACTS §2 sample (see the module docstring).

    Args:
        config: augmentation settings.
        train: random geometry (training) or the deterministic validation path.

    Example:
        >>> t = SampleTransform(AugmentationConfig(crop_size=8), train=True)
        >>> out = t({"image": np.zeros((5, 6, 3), np.uint8), "semseg_dense": None, "index": 0})
        >>> out["image"].shape, out["valid"].shape
        (torch.Size([3, 8, 8]), torch.Size([1, 8, 8]))
    """

    def __init__(self, config: AugmentationConfig | None = None, train: bool = True) -> None:
        config = config if config is not None else AugmentationConfig()
        if not isinstance(config, AugmentationConfig):
            raise TypeError(f"config must be an AugmentationConfig, got {type(config).__name__}")
        self.config = config
        self.train = bool(train)
        if self.train:
            self.geometry: Transform | None = RandomGeometry(config)
        elif config.validation_center_crop:
            self.geometry = CenterCropPad(config.validation_center_crop_size)
        else:
            self.geometry = None
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        data = to_tv_tensors(sample, self.config.scribble_length_ratio)
        spatial = {
            key: data[key]
            for key in ("image", "semseg_dense", "invalid", "scribble_points", "click_points")
        }
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
        """Rasterise weak labels, derive validity and normalise (the last step of the pipeline)."""
        image = spatial["image"].as_subclass(torch.Tensor)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        valid = (spatial["invalid"].as_subclass(torch.Tensor) == 0).float()
        image = (image - self._mean) / self._std * valid
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
        return {
            "image": image.contiguous(),
            "semseg_dense": spatial["semseg_dense"].as_subclass(torch.Tensor)[0].long(),
            "semseg_scribbles": rasterise_scribbles(scribbles, size, width),
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
