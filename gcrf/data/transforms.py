"""Sample transforms: one random geometric draw for image, masks, validity and weak-label geometry.

**Raw sample** (what a dataset hands to the transform; extra keys are ignored)::

    {
        "image": PIL RGB image | uint8 or float ([0, 1]) H×W×3 numpy array | uint8 or float 3×H×W tensor
                 | a 1-channel image (H×W, H×W×1 array; H×W, 1×H×W tensor), e.g. MR intensities,
        "semseg_dense": None | PIL "L"/"P" image | integer H×W numpy array or tensor (values 0..255,
                        255 = ignore),
        "scribbles": None | list of (class_id, P×2 (x, y) polyline, numpy or tensor),
        "semseg_scribbles": scribbles given as a label map instead (like semseg_dense; 255 =
                            unlabelled), resampled by nearest neighbour,
        "clicks": None | list of (class_id, (x, y) point: shape (2,) or (1, 2)),
        "index": int,
    }

Coordinates are pixels of the image, ``x`` = column, ``y`` = row, pixel centres at integers (see
:mod:`gcrf.data.weak_labels`). Missing keys or ``None`` mean "no such annotation" (the output map
is all ignore).

**Output sample** (docs/CONTRACTS.md §2): ``image`` float32 C×H×W, ImageNet-normalised RGB by
default (see ``normalize`` of :class:`SampleTransform`; 0 on padded pixels), ``semseg_dense`` / ``semseg_scribbles`` / ``semseg_clicks`` int64 H×W with 255 = ignore,
``valid`` float32 1×H×W (1 on real image pixels, 0 where the augmentation padded), ``index`` int.

Pipeline: the image stays at its stored dtype (uint8 for decoded files) as a ``tv_tensors.Image``,
the dense mask and an "invalid" mask (0 on the image) become ``tv_tensors.Mask``, scribble vertices
and clicks ``tv_tensors.KeyPoints``. Training applies :class:`RandomGeometry` — random scale,
rotation, perspective wiggle, horizontal flip and crop composed into *one* homography — and
resamples every raster **once, straight into the crop** (:class:`Resampler`): a sampling grid built
for the crop reads the source where the crop lands (bilinear for the image, converted to float only
there; nearest for masks; pixels from outside the image get the fill: image 0, masks 255, invalid
255), and key points are mapped exactly. No raster is ever padded, warped or converted at the
source's size. Validation optionally centre-crops with padding (integer shifts, no interpolation).
Weak labels stay geometry until the very end and are rasterised at the output resolution with the
stroke width (clicks as discs), so a 1-pixel scribble stays 1 pixel wide at any scale.
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
    "RandomRotateFlipResize",
    "Resampler",
    "SampleTransform",
    "build_transform",
    "to_tv_tensors",
    "warp_params",
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
    """Any supported image → C×H×W tensor (C = 1 or 3) at its stored dtype: uint8 or float32.

    No copy and no conversion where none is needed: the pipeline never writes into it, and the
    float conversion happens after the warp, at the output size.
    """
    if isinstance(image, PILImage.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ValueError(f"image array must be H×W, H×W×1 or H×W×3, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image.as_subclass(torch.Tensor)
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
            raise ValueError(
                f"image tensor must be H×W, 1×H×W or 3×H×W, got shape {tuple(image.shape)}"
            )
    else:
        raise TypeError(
            f"image must be a PIL image, numpy array or tensor, got {type(image).__name__}"
        )
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.is_floating_point():
        return tensor.float()
    raise TypeError(f"image must be uint8 or floating point, got {tensor.dtype}")


def _to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1] (x / 255); a float image is taken as it is."""
    return image.float().div_(255) if image.dtype == torch.uint8 else image.float()


def _mask_to_tensor(mask: Any, size: tuple[int, int], name: str = "semseg_dense") -> torch.Tensor:
    """Label map → uint8 1×H×W (a constant all-ignore view when ``mask`` is None)."""
    if mask is None:
        return torch.full((), IGNORE_INDEX, dtype=torch.uint8).expand(1, *size)
    if isinstance(mask, torch.Tensor):
        tensor = mask.as_subclass(torch.Tensor)
    else:
        array = np.asarray(mask)  # a decoded PIL image gives a read-only array: copy that one
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be H×W, got shape {tuple(tensor.shape)}")
    if tuple(tensor.shape) != size:
        raise ValueError(f"{name} has size {tuple(tensor.shape)} but the image has size {size}")
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {tensor.dtype}")
    if tensor.dtype != torch.uint8 and tensor.numel():
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high > 255:
            raise ValueError(f"{name} values must be in [0, 255], got [{low}, {high}]")
    return tensor.to(torch.uint8).unsqueeze(0)


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
        ``{"image": Image C×H×W (uint8 or float32, as stored), "semseg_dense": Mask uint8 1×H×W,
        "invalid": Mask uint8 1×H×W (zeros), "scribble_points": KeyPoints K×2, "click_points":
        KeyPoints N×2, "scribble_layout": (classes, counts), "click_classes": classes, "index":
        int}``, plus ``"semseg_scribbles": Mask uint8 1×H×W`` when the sample gives its scribbles
        as a label map (raw key ``semseg_scribbles``) instead of polylines.
    """
    if not isinstance(sample, dict) or "image" not in sample:
        raise TypeError(f"sample must be a dict with an 'image' key, got {type(sample).__name__}")
    image = _image_to_tensor(sample["image"])
    size = (int(image.shape[1]), int(image.shape[2]))
    dense = _mask_to_tensor(sample.get("semseg_dense"), size)
    scribbles = sample.get("scribbles") or []
    raster_scribbles = sample.get("semseg_scribbles")
    if raster_scribbles is not None and scribbles:
        raise ValueError(
            "a sample gives its scribbles either as polylines ('scribbles') or as a label map "
            "('semseg_scribbles'), not both"
        )
    if scribble_length_ratio < 1:
        scribbles = [
            (c, shorten_polyline(p, scribble_length_ratio)) for c, p in _iter_arrays(scribbles)
        ]
    s_classes, s_counts, s_vertices = _points(scribbles, "scribbles")
    c_classes, _, c_vertices = _points(sample.get("clicks"), "clicks")
    out = {
        "image": tv_tensors.Image(image),
        "semseg_dense": tv_tensors.Mask(dense),
        # A constant view, not a buffer: the resampler reads constants without touching memory.
        "invalid": tv_tensors.Mask(torch.zeros((), dtype=torch.uint8).expand(1, *size)),
        "scribble_points": tv_tensors.KeyPoints(torch.from_numpy(s_vertices), canvas_size=size),
        "click_points": tv_tensors.KeyPoints(torch.from_numpy(c_vertices), canvas_size=size),
        "scribble_layout": (s_classes, s_counts),
        "click_classes": c_classes,
        "index": int(sample.get("index", -1)),
    }
    if raster_scribbles is not None:
        out["semseg_scribbles"] = tv_tensors.Mask(
            _mask_to_tensor(raster_scribbles, size, "semseg_scribbles")
        )
    return out


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
      part of the source that the output reads is converted to float; uint8 is scaled to [0, 1].
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
        """C×H×W image (uint8 or float) → float32 C×h×w in the image's scale (uint8 → [0, 1])."""
        height, width = self.source_size
        # The source pixels the output reads: pixel centres around every p, clipped to the image.
        x0 = min(width, max(0, math.floor(float(self.x.min()) - 0.5)))
        x1 = min(width, max(0, math.floor(float(self.x.max()) + 0.5) + 1))
        y0 = min(height, max(0, math.floor(float(self.y.min()) - 0.5)))
        y1 = min(height, max(0, math.floor(float(self.y.max()) + 0.5) + 1))
        if x1 <= x0 or y1 <= y0:  # the output reads nothing of the image
            return torch.zeros((raster.shape[0], *self.output_size), dtype=torch.float32)
        region = _to_unit_float(raster[:, y0:y1, x0:x1])
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


class RandomGeometry(Transform):
    """Random scale, rotation, perspective wiggle, flip and crop as one homography (training).

    Sequence of the draw (one per call, shared by every tv_tensor of the sample): scale
    ``s ~ U[scale_min, scale_max]``; rotation ``θ ~ U[-tilt, tilt]`` about the scaled image centre;
    a ``crop_size`` window placed uniformly over the bounding box of the scaled, rotated image (or,
    when that box is smaller than the crop, the box placed uniformly inside the window); each window
    corner moved by ``U[-wiggle, wiggle] · crop_size`` in x and y; horizontal flip with probability
    1/2 when ``reflect``. Every raster is resampled once, straight into the crop
    (:class:`Resampler`): images bilinearly (returned as float32, uint8 scaled to [0, 1]), masks by
    nearest neighbour; key points are mapped exactly (pixel-centre convention); pixels from outside
    the image get the fill (image 0, masks 255). Uses the torch random generator (seeded per
    DataLoader worker).

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

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _query_size(flat_inputs)
        crop = self.config.crop_size
        return warp_params(self.forward_homography(height, width), (height, width), (crop, crop))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resample(inpt, params)


def _query_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """(H, W) of the first image or mask among the inputs (all share it)."""
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            height, width = F.get_size(inpt)
            return int(height), int(width)
    raise TypeError("the sample holds no image or mask to take the size from")


def warp_params(
    forward: np.ndarray, source_size: tuple[int, int], output_size: tuple[int, int]
) -> dict[str, Any]:
    """The parameters of one warp of a sample: its :class:`Resampler` and the key-point map.

    torchvision's key-point kernel reads index coordinates (pixel centres at integers), so the
    homography is conjugated by the half-pixel shift: ``p_index = p_continuous − 0.5`` on both sides.
    """
    shift = np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
    return {
        "resampler": Resampler(forward, source_size, output_size),
        "coefficients_points": _homography_coefficients(np.linalg.inv(shift) @ forward @ shift),
        "output_size": (int(output_size[0]), int(output_size[1])),
    }


def _resample(inpt: Any, params: dict[str, Any]) -> Any:
    """One tv_tensor through a :class:`Resampler` (images, masks) or the exact key-point map."""
    height, width = params["output_size"]
    if isinstance(inpt, tv_tensors.KeyPoints):
        moved = F.perspective(inpt, None, None, coefficients=params["coefficients_points"])
        return F.crop(moved, top=0, left=0, height=height, width=width)
    resampler: Resampler = params["resampler"]
    raw = inpt.as_subclass(torch.Tensor)
    if isinstance(inpt, tv_tensors.Mask):
        return tv_tensors.Mask(resampler.nearest(raw, _fills()[tv_tensors.Mask]))
    return tv_tensors.Image(resampler.bilinear(raw))


def _homography_from_points(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """3×3 homography mapping 4 ``source`` points onto 4 ``target`` points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(source, target, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    h = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


class RandomRotateFlipResize(Transform):
    """The augmentation of the medical recipes (WSL4MIS), as one homography, then resize.

    One draw per sample: with probability 1/2 a rotation by ``k·90°`` (``k`` uniform in 0..3)
    followed by a flip about a uniformly chosen axis; otherwise, with probability 1/2, a rotation
    by an angle uniform in ``[−max_rotation_deg, max_rotation_deg]`` about the image centre
    (corners that leave the image are cut, uncovered corners padded); otherwise nothing. The result
    is resized to ``size×size`` (each axis by its own factor, as WSL4MIS's ``zoom``). Every raster
    is resampled once, straight into the output (:class:`Resampler`: bilinear images, nearest
    masks); pixels from outside the image are padded (image 0, masks 255, invalid).

    Args:
        size: side of the output (the training size).
        max_rotation_deg: largest angle of the small rotation (WSL4MIS: 20).

    Example:
        >>> geometry = RandomRotateFlipResize(16)
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask, tv_tensors.KeyPoints)

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

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _query_size(flat_inputs)
        forward = self.forward_homography(height, width)
        return warp_params(forward, (height, width), (self.size, self.size))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resample(inpt, params)


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
        height, width = _query_size(flat_inputs)
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
        image = _to_unit_float(spatial["image"].as_subclass(torch.Tensor))
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
        if "semseg_scribbles" in spatial:  # given as a label map: resampled like the dense mask
            semseg_scribbles = spatial["semseg_scribbles"].as_subclass(torch.Tensor)[0].long()
        else:
            semseg_scribbles = rasterise_scribbles(scribbles, size, width)
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
