"""Raw samples (what a dataset of gcrf returns) and their conversion to tv_tensors.

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
is all ignore). A sample gives its scribbles one way, polylines or a label map
(:func:`gcrf.data.weak_labels.scribble_label_map` holds the rule).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torchvision import tv_tensors

from gcrf.conventions import IGNORE_INDEX
from gcrf.data.weak_labels import shorten_polyline

__all__ = ["to_tv_tensors", "to_unit_float"]


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """An image's values as float32 in its unit scale: uint8 ``x`` reads as ``x / 255``.

    The quotient is correctly rounded (equal to the float64 ``x / 255`` rounded to float32);
    torchvision's ``to_dtype(..., scale=True)`` multiplies by ``1 / 255`` instead, one rounding
    more, and is one ulp off for 126 of the 256 levels. A floating-point image is taken as it is
    (MR intensities, images already in [0, 1]).

    Args:
        image: uint8 or floating-point tensor, any shape.

    Returns:
        A new float32 tensor (the input itself when it is float32 already).

    Example:
        >>> to_unit_float(torch.tensor([0, 51, 255], dtype=torch.uint8)).tolist()
        [0.0, 0.20000000298023224, 1.0]
    """
    if image.dtype == torch.uint8:
        return image.to(torch.float32).div_(255)
    if not image.is_floating_point():
        raise TypeError(f"image must be uint8 or floating point, got {image.dtype}")
    return image.float()


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


def _mask_to_tensor(mask: Any, size: tuple[int, int], name: str) -> torch.Tensor:
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


def _shapes(shapes: Any, what: str) -> list[tuple[int, np.ndarray]]:
    """Polylines or points as ``(class id, float32 K×2)``, empty ones dropped."""
    out = []
    for item in shapes or ():
        try:
            class_id, points = item
        except (TypeError, ValueError) as error:
            raise TypeError(f"{what} entries must be (class_id, points), got {item!r}") from error
        if isinstance(points, torch.Tensor):
            points = points.as_subclass(torch.Tensor).numpy()
        array = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        if len(array):
            out.append((int(class_id), array))
    return out


def _key_points(
    shapes: list[tuple[int, np.ndarray]], size: tuple[int, int]
) -> tuple[list[int], list[int], tv_tensors.KeyPoints]:
    """(class ids, vertex counts, all vertices as one K×2 ``KeyPoints``) of polylines or points."""
    vertices = np.concatenate([p for _, p in shapes]) if shapes else np.zeros((0, 2), np.float32)
    points = tv_tensors.KeyPoints(torch.from_numpy(vertices), canvas_size=size)
    return [c for c, _ in shapes], [len(p) for _, p in shapes], points


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
        as a label map (raw key ``semseg_scribbles``).

    Example:
        >>> data = to_tv_tensors({"image": np.zeros((2, 3, 3), np.uint8), "clicks": [(1, (2, 0))]})
        >>> data["click_points"].tolist(), data["click_classes"]
        ([[2.0, 0.0]], [1])
    """
    if not isinstance(sample, dict) or "image" not in sample:
        raise TypeError(f"sample must be a dict with an 'image' key, got {type(sample).__name__}")
    image = _image_to_tensor(sample["image"])
    size = (int(image.shape[1]), int(image.shape[2]))
    scribbles = _shapes(sample.get("scribbles"), "scribbles")
    if scribble_length_ratio < 1:
        scribbles = [(c, shorten_polyline(p, scribble_length_ratio)) for c, p in scribbles]
    s_classes, s_counts, s_points = _key_points(scribbles, size)
    c_classes, _, c_points = _key_points(_shapes(sample.get("clicks"), "clicks"), size)
    out = {
        "image": tv_tensors.Image(image),
        "semseg_dense": tv_tensors.Mask(
            _mask_to_tensor(sample.get("semseg_dense"), size, "semseg_dense")
        ),
        # A constant view, not a buffer: the resampler reads constants without touching memory.
        "invalid": tv_tensors.Mask(torch.zeros((), dtype=torch.uint8).expand(1, *size)),
        "scribble_points": s_points,
        "click_points": c_points,
        "scribble_layout": (s_classes, s_counts),
        "click_classes": c_classes,
        "index": int(sample.get("index", -1)),
    }
    if sample.get("semseg_scribbles") is not None:
        out["semseg_scribbles"] = tv_tensors.Mask(
            _mask_to_tensor(sample["semseg_scribbles"], size, "semseg_scribbles")
        )
    return out
