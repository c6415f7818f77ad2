"""Procedural scenes: a weakly supervised segmentation task that needs no download.

Every scene is generated on the fly from ``(seed, index)`` alone, so a dataset of any length costs no
disk and the same item is bit-identical in every process, worker and run.

The task is built so that the Gated CRF loss has something to do:

- the background is a smooth colour field with stripes and pixel noise, different in every scene;
- ``num_classes - 1`` object classes, each with its own shape (disc / ellipse, rotated rectangle,
  triangle, ring, cross, ...) and its own colour *distribution*; the distributions overlap, and
  background colours are drawn from the same range, so the colour of one pixel does not give its class
  — a model has to look at the shape and the surroundings;
- objects overlap (later ones occlude earlier ones), and each object differs in colour from the
  background around it, so image edges mark every object boundary;
- scribbles are strokes through the interior of every visible object part and through the background,
  always at least ``scribble_margin`` pixels away from any boundary, and clicks are single points at the
  pixel farthest from the boundary. The band around every boundary is therefore never labelled by
  weak supervision: cross entropy on scribbles alone has to guess where objects end, and the only
  information that places the boundary is the image edge — exactly what the Gated CRF loss uses.

Weak labels are geometry (polylines and points in pixel coordinates, ``x`` = column, ``y`` = row,
pixel centres at integer coordinates, the torchvision ``KeyPoints`` convention); they go through the
geometric transforms with the image and are rasterised at the end.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from gcrf.data.datamodule import WeakSegmentationDataModule
from gcrf.data.palettes import SYNTHETIC_MEAN_COLOURS, synthetic_palette
from gcrf.data.transforms import AugmentationConfig

__all__ = [
    "SHAPE_NAMES",
    "ProceduralScenes",
    "SceneConfig",
    "SyntheticDataModule",
    "generate_scene",
    "synthetic_augmentation",
    "synthetic_class_names",
]

#: Shape of each object class, in class order (class 0 is the background).
SHAPE_NAMES: tuple[str, ...] = ("disc", "rectangle", "triangle", "ring", "cross", "diamond")

# The generator's class colours, as an array (the palette module holds them).
_CLASS_MEAN_COLOURS = np.array(SYNTHETIC_MEAN_COLOURS, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Parameters of the procedural scene generator.

    Args:
        image_size: height and width of a scene in pixels.
        num_classes: number of classes including the background (class 0); 2 to 7.
        objects_min: fewest objects in a scene.
        objects_max: most objects in a scene.
        object_size_min: smallest object radius as a fraction of ``image_size``.
        object_size_max: largest object radius as a fraction of ``image_size``.
        colour_spread: standard deviation of an object's colour around its class mean (RGB in [0, 1]).
        min_contrast: least Euclidean RGB distance between an object's colour and the mean colour of
            the background under it (redrawn until met), so that every boundary is an image edge.
        noise_std: standard deviation of the per-pixel Gaussian noise.
        texture_amplitude: amplitude of the background stripes.
        scribble_margin: least distance in pixels from any scribble or click point to a region
            boundary (the unlabelled band).
        scribble_length_ratio: length of an object scribble as a fraction of the object's size.
        background_scribbles: number of background strokes per scene.
        background_clicks: number of background clicks per scene.
    """

    image_size: int = 64
    num_classes: int = 4
    objects_min: int = 2
    objects_max: int = 4
    object_size_min: float = 0.12
    object_size_max: float = 0.24
    colour_spread: float = 0.15
    min_contrast: float = 0.3
    noise_std: float = 0.03
    texture_amplitude: float = 0.06
    scribble_margin: float = 3.0
    scribble_length_ratio: float = 0.8
    background_scribbles: int = 3
    background_clicks: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {self.image_size!r}")
        if not 2 <= self.num_classes <= len(SHAPE_NAMES) + 1:
            raise ValueError(
                f"num_classes must be in [2, {len(SHAPE_NAMES) + 1}], got {self.num_classes!r}"
            )
        if not 1 <= self.objects_min <= self.objects_max:
            raise ValueError(
                "need 1 <= objects_min <= objects_max, got "
                f"objects_min={self.objects_min!r}, objects_max={self.objects_max!r}"
            )
        if not 0 < self.object_size_min <= self.object_size_max < 0.5:
            raise ValueError(
                "need 0 < object_size_min <= object_size_max < 0.5, got "
                f"{self.object_size_min!r}, {self.object_size_max!r}"
            )
        for name in ("colour_spread", "min_contrast", "noise_std", "texture_amplitude"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.scribble_margin < 1:
            raise ValueError(f"scribble_margin must be >= 1, got {self.scribble_margin!r}")
        if not 0 < self.scribble_length_ratio <= 4:
            raise ValueError(
                f"scribble_length_ratio must be in (0, 4], got {self.scribble_length_ratio!r}"
            )
        if self.background_scribbles < 0 or self.background_clicks < 0:
            raise ValueError(
                "background_scribbles and background_clicks must be >= 0, got "
                f"{self.background_scribbles!r}, {self.background_clicks!r}"
            )


def synthetic_class_names(num_classes: int) -> tuple[str, ...]:
    """Names of the procedural classes: ``("background", "disc", "rectangle", ...)``.

    Args:
        num_classes: number of classes including the background.

    Returns:
        A tuple of ``num_classes`` names.

    Example:
        >>> synthetic_class_names(3)
        ('background', 'disc', 'rectangle')
    """
    if not 2 <= num_classes <= len(SHAPE_NAMES) + 1:
        raise ValueError(f"num_classes must be in [2, {len(SHAPE_NAMES) + 1}], got {num_classes!r}")
    return ("background", *SHAPE_NAMES[: num_classes - 1])


# ----------------------------------------------------------------------------------------- shapes
def _shape_mask(
    shape: str, cx: float, cy: float, radius: float, angle: float, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """Boolean mask of one shape centred at (cx, cy) with the given size and rotation."""
    # Coordinates in the shape's own rotated frame, in units of `radius`.
    dx, dy = xx - cx, yy - cy
    cos, sin = math.cos(angle), math.sin(angle)
    u = (cos * dx + sin * dy) / radius
    v = (-sin * dx + cos * dy) / radius
    if shape == "disc":
        # An ellipse with a mild aspect ratio fixed by the angle, so discs are not all circles.
        aspect = 0.75 + 0.25 * abs(math.cos(2 * angle))
        return u**2 + (v / aspect) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.6)
    if shape == "triangle":
        # Equilateral triangle with circumradius 1: inside all three half-planes.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            theta = angle + 2 * math.pi * k / 3
            nx, ny = math.cos(theta), math.sin(theta)
            inside &= (nx * (xx - cx) + ny * (yy - cy)) / radius <= 0.5
        return inside
    if shape == "ring":
        r2 = u**2 + v**2
        return (r2 <= 1.0) & (r2 >= 0.45**2)
    if shape == "cross":
        return ((np.abs(u) <= 1.0) & (np.abs(v) <= 0.35)) | (
            (np.abs(v) <= 1.0) & (np.abs(u) <= 0.35)
        )
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape {shape!r}")


def _smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """A smooth random field: a coarse random grid upsampled bilinearly to size×size."""
    coarse = rng.normal(0.0, 1.0, (channels, cells, cells))
    zoom = (1, size / cells, size / cells)
    field = ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
    return field[:, :size, :size]


def _background(rng: np.random.Generator, config: SceneConfig) -> np.ndarray:
    """A 3×H×W background: base colour + smooth colour variation + stripes."""
    size = config.image_size
    base = rng.uniform(0.2, 0.8, (3, 1, 1))
    colour = base + 0.08 * _smooth_field(rng, size, 4, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(5.0, 12.0)
    stripes = np.sin(2 * math.pi * (math.cos(theta) * xx + math.sin(theta) * yy) / period)
    colour = colour + config.texture_amplitude * stripes[None] * rng.uniform(0.5, 1.0, (3, 1, 1))
    return colour


# --------------------------------------------------------------------------------- weak labels
def _random_walk(
    rng: np.random.Generator, allowed: np.ndarray, start: tuple[float, float], length: float
) -> list[tuple[float, float]]:
    """A smooth stroke from ``start`` (x, y) in both directions while it stays inside ``allowed``.

    Steps of one pixel with a slowly turning heading; each half stops at the first step that would
    leave ``allowed`` (tested at the rounded position) or when the half length is used up.
    """
    height, width = allowed.shape
    theta0 = rng.uniform(0, 2 * math.pi)
    halves = []
    for direction in (0.0, math.pi):
        theta = theta0 + direction
        x, y = start
        points = []
        for _ in range(int(length / 2)):
            theta += rng.normal(0.0, 0.25)
            nx, ny = x + math.cos(theta), y + math.sin(theta)
            col, row = round(nx), round(ny)
            if not (0 <= row < height and 0 <= col < width and allowed[row, col]):
                break
            x, y = nx, ny
            points.append((x, y))
        halves.append(points)
    return [*reversed(halves[1]), start, *halves[0]]


def _interior(region: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of ``region`` at least ``margin`` px from its boundary, and the distance map.

    The image border counts as a boundary too (labels must survive crops near the edge).
    """
    padded = np.pad(region, 1, constant_values=False)
    distance = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    return distance >= margin, distance


def _weak_labels(
    rng: np.random.Generator, mask: np.ndarray, instances: np.ndarray, config: SceneConfig
) -> tuple[list[tuple[int, np.ndarray]], list[tuple[int, np.ndarray]]]:
    """Scribbles and clicks of one scene from its class mask and instance map."""
    scribbles: list[tuple[int, np.ndarray]] = []
    clicks: list[tuple[int, np.ndarray]] = []
    margin = config.scribble_margin
    # Objects: every visible connected part of every instance gets a stroke and a click.
    for instance_id in np.unique(instances):
        if instance_id == 0:
            continue
        class_id = int(mask[instances == instance_id][0])
        parts, num_parts = ndimage.label(instances == instance_id)
        for part in range(1, num_parts + 1):
            region = parts == part
            allowed, distance = _interior(region, margin)
            if not allowed.any():
                continue
            row, col = np.unravel_index(np.argmax(distance), distance.shape)
            start = (float(col), float(row))
            clicks.append((class_id, np.array([start], dtype=np.float32)))
            length = config.scribble_length_ratio * 2 * math.sqrt(region.sum() / math.pi)
            stroke = _random_walk(rng, allowed, start, length)
            scribbles.append((class_id, np.array(stroke, dtype=np.float32)))
    # Background: strokes and clicks from random interior points of the background.
    allowed, _ = _interior(mask == 0, margin + 1)
    rows, cols = np.nonzero(allowed)
    if rows.size:
        for _ in range(config.background_scribbles):
            k = rng.integers(rows.size)
            start = (float(cols[k]), float(rows[k]))
            stroke = _random_walk(rng, allowed, start, 0.5 * config.image_size)
            scribbles.append((0, np.array(stroke, dtype=np.float32)))
        for _ in range(config.background_clicks):
            k = rng.integers(rows.size)
            clicks.append((0, np.array([(float(cols[k]), float(rows[k]))], dtype=np.float32)))
    return scribbles, clicks


# ------------------------------------------------------------------------------------- scenes
def generate_scene(config: SceneConfig, seed: int, index: int) -> dict[str, Any]:
    """Generate one procedural scene; the result depends on ``(config, seed, index)`` only.

    Args:
        config: generator parameters.
        seed: dataset seed (a different seed gives a different dataset).
        index: item index (>= 0).

    Returns:
        A dict with ``image`` (float32 H×W×3 RGB in [0, 1]), ``semseg_dense`` (int64 H×W class map),
        ``instances`` (int64 H×W, 0 = background), ``scribbles`` (list of ``(class, float32 P×2
        polyline)``, x = column, y = row) and ``clicks`` (list of ``(class, float32 1×2 point)``).

    Example:
        >>> scene = generate_scene(SceneConfig(image_size=32), seed=0, index=0)
        >>> scene["image"].shape, scene["semseg_dense"].shape
        ((32, 32, 3), (32, 32))
    """
    if not isinstance(config, SceneConfig):
        raise TypeError(f"config must be a SceneConfig, got {type(config).__name__}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index!r}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])
    size = config.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = _background(rng, config)
    mask = np.zeros((size, size), dtype=np.int64)
    instances = np.zeros((size, size), dtype=np.int64)
    num_objects = int(rng.integers(config.objects_min, config.objects_max + 1))
    for instance_id in range(1, num_objects + 1):
        class_id = int(rng.integers(1, config.num_classes))
        radius = size * rng.uniform(config.object_size_min, config.object_size_max)
        cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2)
        angle = rng.uniform(0, 2 * math.pi)
        inside = _shape_mask(SHAPE_NAMES[class_id - 1], cx, cy, radius, angle, yy, xx)
        if not inside.any():
            continue
        under = image[:, inside].mean(axis=1)
        for _ in range(20):
            colour = _CLASS_MEAN_COLOURS[class_id - 1] + rng.normal(0, config.colour_spread, 3)
            colour = np.clip(colour, 0.05, 0.95)
            if np.linalg.norm(colour - under) >= config.min_contrast:
                break
        # A gentle linear shading across the object keeps it from being perfectly flat.
        shade = 0.04 * (math.cos(angle) * (xx - cx) + math.sin(angle) * (yy - cy)) / radius
        image[:, inside] = colour[:, None] + shade[inside][None]
        mask[inside] = class_id
        instances[inside] = instance_id
    image = image + rng.normal(0.0, config.noise_std, image.shape)
    image = np.clip(image, 0.0, 1.0).transpose(1, 2, 0).astype(np.float32)
    scribbles, clicks = _weak_labels(rng, mask, instances, config)
    return {
        "image": image,
        "semseg_dense": mask,
        "instances": instances,
        "scribbles": scribbles,
        "clicks": clicks,
    }


class ProceduralScenes(torch.utils.data.Dataset):
    """A map-style dataset of procedural scenes (raw samples), generated on access.

    Items are the dicts of :func:`generate_scene` plus ``index``: raw samples, like every dataset
    of gcrf; the data module applies the transform (or wrap it by hand:
    ``TransformedDataset(ProceduralScenes(...), build_transform(...))``).

    Args:
        length: number of items.
        config: generator parameters (default ``SceneConfig()``).
        seed: dataset seed; train and validation sets should use different seeds.
        cache: keep generated scenes in memory (they are small; useful when the same items are
            read every epoch).

    Example:
        >>> ds = ProceduralScenes(8, SceneConfig(image_size=32), seed=1)
        >>> len(ds), ds[3]["semseg_dense"].shape
        (8, (32, 32))
    """

    def __init__(
        self,
        length: int,
        config: SceneConfig | None = None,
        seed: int = 0,
        cache: bool = False,
    ) -> None:
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be an int >= 1, got {length!r}")
        self.length = length
        self.config = config if config is not None else SceneConfig()
        self.seed = seed
        self._cache: dict[int, dict[str, Any]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        if self._cache is not None and index in self._cache:
            scene = self._cache[index]
        else:
            scene = generate_scene(self.config, self.seed, index)
            if self._cache is not None:
                self._cache[index] = scene
        return {**scene, "index": index}

    @property
    def class_names(self) -> Sequence[str]:
        return synthetic_class_names(self.config.num_classes)


# ----------------------------------------------------------------------------- data module
def synthetic_augmentation(
    image_size: int, stroke_width: int = 1, reflect: bool = True
) -> AugmentationConfig:
    """The default augmentation of procedural scenes: horizontal flips only, no crop or rescale.

    Args:
        image_size: side of the scenes (the crop keeps all of it).
        stroke_width: pen width of rasterised scribbles and clicks.
        reflect: random horizontal flips in training.
    """
    return AugmentationConfig(
        crop_size=image_size,
        scale_min=1.0,
        scale_max=1.0,
        reflect=reflect,
        validation_center_crop=False,
        stroke_width=stroke_width,
    )


class SyntheticDataModule(WeakSegmentationDataModule):
    """Procedural scenes as a Lightning data module: no download, no files.

    Training and validation sets are :class:`ProceduralScenes` with seeds ``seed`` and
    ``seed + 1`` (disjoint scenes). Items follow CONTRACTS §2
    (``image``, ``semseg_dense``, ``semseg_scribbles``, ``semseg_clicks``, ``valid``, ``index``).

    Args:
        num_classes: classes including the background (2 to 7).
        image_size: side of a scene in pixels.
        train_length: number of training scenes.
        val_length: number of validation scenes.
        scribble_margin: least distance of weak labels to any region boundary (pixels).
        objects_min: fewest objects per scene.
        objects_max: most objects per scene.
        noise_std: per-pixel noise.
        cache: keep generated scenes in memory.
        seed: seed of the training scenes (validation uses ``seed + 1``) and of the shuffle.
        augmentation: augmentation settings; ``None``: :func:`synthetic_augmentation` (flips only,
            the scenes are already at training size).
        batch_size_validation: validation batch size.
        num_workers: training loader processes (0: scenes are cheap and cached in this process).
        num_workers_validation: validation loader processes.
        **kwargs: the other arguments of :class:`~gcrf.data.datamodule.WeakSegmentationDataModule`
            (``batch_size``).

    Example:
        >>> dm = SyntheticDataModule(image_size=32, train_length=8, val_length=4, batch_size=2)
        >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))
        >>> batch["image"].shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 64,
        train_length: int = 1024,
        val_length: int = 256,
        scribble_margin: float = 3.0,
        objects_min: int = 2,
        objects_max: int = 4,
        noise_std: float = 0.03,
        cache: bool = True,
        seed: int = 0,
        augmentation: AugmentationConfig | None = None,
        batch_size_validation: int = 64,
        num_workers: int = 0,
        num_workers_validation: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            augmentation=(
                augmentation if augmentation is not None else synthetic_augmentation(image_size)
            ),
            batch_size_validation=batch_size_validation,
            num_workers=num_workers,
            num_workers_validation=num_workers_validation,
            seed=seed,
            **kwargs,
        )
        self.scene_config = SceneConfig(
            image_size=image_size,
            num_classes=num_classes,
            objects_min=objects_min,
            objects_max=objects_max,
            noise_std=noise_std,
            scribble_margin=scribble_margin,
        )
        for name, value in (("train_length", train_length), ("val_length", val_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_classes = num_classes
        self.class_names = synthetic_class_names(num_classes)
        self.palette = synthetic_palette(num_classes)
        self.train_length = train_length
        self.val_length = val_length
        self.cache = cache

    def build_datasets(self) -> tuple[ProceduralScenes, ProceduralScenes]:
        return (
            ProceduralScenes(self.train_length, self.scene_config, self.seed, cache=self.cache),
            ProceduralScenes(self.val_length, self.scene_config, self.seed + 1, cache=self.cache),
        )
