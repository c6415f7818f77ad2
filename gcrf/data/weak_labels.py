"""Weak labels as geometry: scribbles (polylines) and clicks (points), their file formats, rasterisation.

Coordinates are pixels of the image they annotate, ``x`` = column, ``y`` = row, pixel centres at
integer coordinates (pixel ``(row=r, col=c)`` covers ``[c - 0.5, c + 0.5) × [r - 0.5, r + 0.5)``).

Types used across :mod:`gcrf.data`:

- a **scribble** is ``(class_id, points)`` with ``points`` a float32 ``P×2`` array of ``(x, y)``
  vertices of a polyline (``P >= 1``);
- a **click** is ``(class_id, point)`` with ``point`` a float32 array of shape ``(2,)`` or ``(1, 2)``.

File formats read here:

- ScribbleSup XML (one file per image)::

    <annotation><size><width>W</width><height>H</height></size>
      <polygon><tag>class name</tag><point><X>int</X><Y>int</Y></point>...</polygon>...
    </annotation>

  class tags ``background, plane, bike, ..., monitor`` (:data:`SCRIBBLESUP_TAGS`, index = VOC id).
- click JSON (the published "What's the point" files): ``{image_name: [{"x": float, "y": float,
  "cls": int, "rank": int (optional)}, ...]}``, optionally gzip-compressed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcrf.conventions import IGNORE_INDEX
from gcrf.data.palettes import VOC_CLASS_NAMES

__all__ = [
    "IGNORE_INDEX",
    "SCRIBBLESUP_TAGS",
    "Click",
    "Scribble",
    "disc_offsets",
    "load_click_file",
    "parse_scribblesup_xml",
    "rasterise_clicks",
    "rasterise_scribbles",
    "scribble_label_map",
    "sha256_of_bytes",
    "shorten_polyline",
]

#: ScribbleSup class tags in VOC class order (index = VOC class id): the VOC class names, five of
#: them shortened.
SCRIBBLESUP_TAGS: tuple[str, ...] = tuple(
    {
        "aeroplane": "plane",
        "bicycle": "bike",
        "diningtable": "table",
        "pottedplant": "plant",
        "tvmonitor": "monitor",
    }.get(name, name)
    for name in VOC_CLASS_NAMES
)

Scribble = tuple[int, np.ndarray]
Click = tuple[int, np.ndarray]


def sha256_of_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ file formats
def parse_scribblesup_xml(
    data: bytes | str, expected_size: tuple[int, int] | None = None, name: str = "<xml>"
) -> list[Scribble]:
    """Parse one ScribbleSup XML annotation into scribbles.

    Args:
        data: the XML document.
        expected_size: ``(height, width)`` of the image; when given, the XML ``<size>`` must match.
        name: name shown in error messages (e.g. the image name).

    Returns:
        Scribbles in file order: ``(class_id, float32 P×2 (x, y))``.

    Raises:
        ValueError: malformed XML, unknown class tag, a polygon without points, or a size mismatch.

    Example:
        >>> xml = ("<annotation><size><width>4</width><height>3</height></size><polygon><tag>cat"
        ...        "</tag><point><X>1</X><Y>2</Y></point></polygon></annotation>")
        >>> parse_scribblesup_xml(xml)[0][0]
        8
    """
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise ValueError(f"scribble annotation {name}: not valid XML ({error})") from error
    if root.tag != "annotation":
        raise ValueError(
            f"scribble annotation {name}: root element is <{root.tag}>, expected <annotation>"
        )
    size = root.find("size")
    if size is None or size.findtext("width") is None or size.findtext("height") is None:
        raise ValueError(f"scribble annotation {name}: missing <size><width/><height/></size>")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
    if expected_size is not None and (height, width) != tuple(expected_size):
        raise ValueError(
            f"scribble annotation {name}: XML size (h={height}, w={width}) does not match the image "
            f"(h={expected_size[0]}, w={expected_size[1]})"
        )
    tag_to_id = {tag: i for i, tag in enumerate(SCRIBBLESUP_TAGS)}
    scribbles: list[Scribble] = []
    for polygon in root.iter("polygon"):
        tag = (polygon.findtext("tag") or "").strip()
        if tag not in tag_to_id:
            raise ValueError(
                f"scribble annotation {name}: unknown class tag {tag!r}; known: {', '.join(SCRIBBLESUP_TAGS)}"
            )
        points = [(float(p.findtext("X")), float(p.findtext("Y"))) for p in polygon.iter("point")]
        if not points:
            raise ValueError(f"scribble annotation {name}: polygon of class {tag!r} has no points")
        scribbles.append((tag_to_id[tag], np.asarray(points, dtype=np.float32)))
    return scribbles


def load_click_file(path: str | Path, expected_sha256: str | None = None) -> dict[str, list[Click]]:
    """Read a click JSON file (plain or ``.gz``) and verify its content.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.
        expected_sha256: sha256 of the *uncompressed* JSON bytes; ``None`` skips the check.

    Returns:
        ``{image_name: [(class_id, float32 (x, y)), ...]}`` in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: checksum mismatch or malformed content.

    Example:
        >>> # clicks = load_click_file("datasets/voc_whats_the_point.json.gz")
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"click file not found: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if expected_sha256 is not None:
        digest = sha256_of_bytes(raw)
        if digest != expected_sha256:
            raise ValueError(
                f"click file {path}: sha256 of its content is {digest}, expected {expected_sha256} "
                "(the file is corrupted or not the published one)"
            )
    try:
        content = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"click file {path}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(
            f"click file {path}: expected an object {{image_name: [...]}}, got {type(content).__name__}"
        )
    clicks: dict[str, list[Click]] = {}
    for image_name, entries in content.items():
        try:
            clicks[image_name] = [
                (int(e["cls"]), np.asarray([float(e["x"]), float(e["y"])], dtype=np.float32))
                for e in entries
            ]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"click file {path}: malformed entry for image {image_name!r} ({error})"
            ) from error
    return clicks


# --------------------------------------------------------------------------------- geometry
def shorten_polyline(points: np.ndarray, ratio: float) -> np.ndarray:
    """Keep the middle ``ratio`` of a polyline's arc length (the scribble-length ablation).

    The kept part is centred on the arc-length midpoint; its ends are interpolated, so the result is
    exactly ``ratio`` times as long. ``ratio >= 1`` returns the polyline unchanged; a single point
    stays a point.

    Args:
        points: ``P×2`` vertices.
        ratio: fraction of the length to keep, in ``(0, 1]``.

    Returns:
        float32 ``Q×2`` vertices.

    Example:
        >>> shorten_polyline(np.array([[0, 0], [10, 0]], np.float32), 0.5).tolist()
        [[2.5, 0.0], [7.5, 0.0]]
    """
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio!r}")
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if ratio >= 1 or len(points) < 2:
        return points.astype(np.float32)
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    total = cum[-1]
    if total == 0:
        return points[:1].astype(np.float32)
    start, stop = total * (1 - ratio) / 2, total * (1 + ratio) / 2

    def at(s: float) -> np.ndarray:
        return np.stack([np.interp(s, cum, points[:, 0]), np.interp(s, cum, points[:, 1])])

    inner = points[(cum > start) & (cum < stop)]
    return np.concatenate([at(start)[None], inner, at(stop)[None]]).astype(np.float32)


def disc_offsets(stroke_width: int) -> np.ndarray:
    """Integer ``(dx, dy)`` offsets of a round pen of diameter ``stroke_width`` pixels.

    The pen is the set of pixels of a ``stroke_width``×``stroke_width`` block whose centre lies within
    ``stroke_width / 2`` of the block centre: widths 1–3 give full squares (1×1, 2×2, 3×3), wider pens
    lose their corners. For even widths the pen centre sits half a pixel right/below the pixel it
    is anchored to, so the stroke is exactly ``stroke_width`` pixels wide.

    Example:
        >>> disc_offsets(1).tolist()
        [[0, 0]]
    """
    if not isinstance(stroke_width, int) or isinstance(stroke_width, bool) or stroke_width < 1:
        raise ValueError(f"stroke_width must be an int >= 1, got {stroke_width!r}")
    centre = (stroke_width - 1) / 2
    k = np.arange(stroke_width)
    kx, ky = np.meshgrid(k, k)
    keep = (kx - centre) ** 2 + (ky - centre) ** 2 <= (stroke_width / 2) ** 2 + 1e-9
    shift = math.floor(centre)
    return np.stack([kx[keep] - shift, ky[keep] - shift], axis=1).astype(np.int64)


def _clip_parameters(
    start: np.ndarray, delta: np.ndarray, low: np.ndarray, high: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Liang–Barsky: the parameter range [t0, t1] ⊂ [0, 1] of each segment ``start + t·delta``
    inside the box ``low ≤ (x, y) ≤ high`` (t0 > t1 where a segment misses the box)."""
    t0 = np.zeros(len(start))
    t1 = np.ones(len(start))
    with np.errstate(divide="ignore", invalid="ignore"):
        for p, q in (
            (-delta[:, 0], start[:, 0] - low[0]),
            (delta[:, 0], high[0] - start[:, 0]),
            (-delta[:, 1], start[:, 1] - low[1]),
            (delta[:, 1], high[1] - start[:, 1]),
        ):
            ratio = q / p
            t0 = np.where(p < 0, np.maximum(t0, ratio), t0)
            t1 = np.where(p > 0, np.minimum(t1, ratio), t1)
            t1 = np.where((p == 0) & (q < 0), -1.0, t1)  # parallel to an edge, outside it
    return t0, t1


def _polyline_pixels(points: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Integer ``(x, y)`` pixels hit by a polyline sampled every <= 0.5 px (vertices included),
    restricted to the samples inside the box ``[low, high]``.

    Segment ``a → b`` is sampled at ``a + (b − a)·k/n``, ``k = 0..n``, ``n = ceil(2·max|b − a|)``;
    only the ``k`` whose samples can fall in the box are generated (clipping in parameter space
    keeps the samples where they would be without it), so a polyline that a warp has stretched far
    beyond the canvas costs what its visible part costs.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    points = points[np.isfinite(points).all(axis=1)]
    if len(points) == 1:
        inside = ((points >= low) & (points <= high)).all(axis=1)
        return np.floor(points[inside] + 0.5).astype(np.int64)
    if len(points) == 0:
        return np.zeros((0, 2), np.int64)
    start, delta = points[:-1], points[1:] - points[:-1]
    steps = np.maximum(1, np.ceil(2 * np.abs(delta).max(axis=1))).astype(np.int64)
    t0, t1 = _clip_parameters(start, delta, low, high)
    first = np.clip(np.floor(t0 * steps).astype(np.int64), 0, steps)
    last = np.clip(np.ceil(t1 * steps).astype(np.int64), 0, steps)
    counts = np.where(t0 <= t1, last - first + 1, 0)
    if counts.sum() == 0:
        return np.zeros((0, 2), np.int64)
    segment = np.repeat(np.arange(len(start)), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + first[segment]
    dense = start[segment] + delta[segment] * (k / steps[segment])[:, None]
    return np.floor(dense + 0.5).astype(np.int64)


def _draw(
    shapes: Iterable[tuple[int, np.ndarray]], size: tuple[int, int], stroke_width: int
) -> torch.Tensor:
    height, width = size
    labels = np.full((height, width), IGNORE_INDEX, dtype=np.int64)
    offsets = disc_offsets(stroke_width)
    # Samples farther than the pen from the canvas cannot draw on it.
    low = np.array([-stroke_width, -stroke_width], np.float64)
    high = np.array([width + stroke_width, height + stroke_width], np.float64)
    for class_id, points in shapes:
        pixels = _polyline_pixels(points, low, high)
        if len(pixels) == 0:
            continue
        if len(offsets) > 1:  # one pen stamp per distinct pixel
            pixels = np.unique(pixels, axis=0)
        pen = (pixels[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
        inside = (pen[:, 0] >= 0) & (pen[:, 0] < width) & (pen[:, 1] >= 0) & (pen[:, 1] < height)
        pen = pen[inside]
        labels[pen[:, 1], pen[:, 0]] = int(class_id)
    return torch.from_numpy(labels)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be (height, width) with positive entries, got {tuple(size)!r}")
    return int(size[0]), int(size[1])


def rasterise_scribbles(
    scribbles: Iterable[tuple[int, Any]], size: Sequence[int], stroke_width: int = 1
) -> torch.Tensor:
    """Draw scribbles into a label map.

    Every segment is drawn with a round pen of diameter ``stroke_width`` (pixels whose centre the
    pen covers); later scribbles overwrite earlier ones; parts outside the canvas are clipped.

    Args:
        scribbles: ``(class_id, P×2 (x, y))`` polylines.
        size: ``(height, width)`` of the label map.
        stroke_width: pen diameter in pixels (>= 1).

    Returns:
        int64 ``H×W`` map, :data:`IGNORE_INDEX` where nothing is drawn.

    Example:
        >>> m = rasterise_scribbles([(3, np.array([[0, 1], [3, 1]], np.float32))], (3, 4))
        >>> m[1].tolist()
        [3, 3, 3, 3]
    """
    return _draw(scribbles, _check_size(size), stroke_width)


def rasterise_clicks(
    clicks: Iterable[tuple[int, Any]], size: Sequence[int], stroke_width: int = 1
) -> torch.Tensor:
    """Draw clicks as discs of diameter ``stroke_width`` into a label map.

    Args:
        clicks: ``(class_id, (x, y))`` points.
        size: ``(height, width)`` of the label map.
        stroke_width: disc diameter in pixels (>= 1; 1 = the single nearest pixel).

    Returns:
        int64 ``H×W`` map, :data:`IGNORE_INDEX` elsewhere.

    Example:
        >>> rasterise_clicks([(5, np.array([1.2, 0.9]))], (2, 3))[1].tolist()
        [255, 5, 255]
    """
    return _draw(
        ((c, np.asarray(p, dtype=np.float64).reshape(1, 2)) for c, p in clicks),
        _check_size(size),
        stroke_width,
    )


def scribble_label_map(
    scribbles: Iterable[tuple[int, Any]] | None,
    label_map: Any,
    size: Sequence[int],
    stroke_width: int = 1,
) -> torch.Tensor:
    """The scribbles of a sample as a label map, from the one form the sample gives them in.

    A sample gives its scribbles either as polylines (raw key ``scribbles``; drawn here by
    :func:`rasterise_scribbles`) or as a label map (raw key ``semseg_scribbles``, e.g. ACDC; taken
    as it is), never both. The transform pipeline and the label histogram both read scribbles
    through this function.

    Args:
        scribbles: ``(class_id, P×2 (x, y))`` polylines, or ``None`` / empty.
        label_map: integer ``H×W`` map (255 = unlabelled), or ``None``.
        size: ``(height, width)`` of the result.
        stroke_width: pen diameter of the polylines in pixels.

    Returns:
        int64 ``H×W`` map, :data:`IGNORE_INDEX` where unlabelled.

    Raises:
        ValueError: both forms given, or a label map that is not ``size``.

    Example:
        >>> scribble_label_map(None, np.array([[1, 255]]), (1, 2)).tolist()
        [[1, 255]]
    """
    scribbles = list(scribbles or ())
    if label_map is None:
        return rasterise_scribbles(scribbles, size, stroke_width)
    if scribbles:
        raise ValueError(
            "a sample gives its scribbles either as polylines ('scribbles') or as a label map "
            f"('semseg_scribbles'), not both; got {len(scribbles)} polyline(s) and a label map"
        )
    if not isinstance(label_map, torch.Tensor):
        label_map = np.asarray(label_map)
    labels = torch.as_tensor(label_map, dtype=torch.int64)
    if tuple(labels.shape) != _check_size(size):
        raise ValueError(
            f"semseg_scribbles must be {tuple(size)} (H×W), got shape {tuple(labels.shape)}"
        )
    return labels
