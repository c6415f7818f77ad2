"""Pictures of images, label maps and affinities: one home for the notebooks and TensorBoard.

Everything here works on torch tensors and returns **uint8 RGB images in C×H×W layout** (``3×H×W``,
or ``N×3×H×W`` for a batch), which is what ``SummaryWriter.add_image`` / ``add_images`` take as they
are and what :func:`make_grid` tiles. Only :func:`show_images` draws with matplotlib, and imports it
when called: ``import gcrf.viz`` needs nothing beyond torch and torchvision. The routine work is
torchvision's: ``torchvision.utils.make_grid`` tiles, ``draw_segmentation_masks`` blends labels,
``transforms.v2.functional.normalize`` (de)normalises; this module checks inputs and sets the
conventions (uint8 out, the ignore label, palettes).

- :func:`colorize_labels` — a label map through a palette; the ignore label gets its own colour.
- :func:`overlay_labels` — a label map blended over an image; unlabelled pixels show the image.
- :func:`dilate_labels` — grow sparse labels (single-pixel clicks) into visible squares.
- :func:`denormalize_image` / :func:`normalize_image` — undo / apply the ImageNet normalisation.
- :func:`to_uint8_image` — a float image in [0, 1] to uint8.
- :func:`heatmap` — a non-negative map through the black-red-yellow-white colour map.
- :func:`affinity_overlay` — an affinity map (a kernel around a pixel, ``kernels_vis``) as a heat map
  over an image.
- :func:`affinity_around_pixel` — the window affinities of one pixel (the layout of
  ``window_affinity`` / ``gaussian_affinity``) pasted into an image-shaped map.
- :func:`make_grid` — images tiled row-major into one image.

Example:
    >>> import torch
    >>> labels = torch.tensor([[0, 1], [255, 1]])
    >>> palette = torch.tensor([[0, 0, 0], [255, 0, 0]], dtype=torch.uint8)
    >>> colorize_labels(labels, palette)[:, 1, 0].tolist()  # the ignore colour
    [224, 224, 192]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.utils import draw_segmentation_masks

from gcrf.conventions import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from matplotlib.figure import Figure

__all__ = [
    "IGNORE_COLOR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "affinity_around_pixel",
    "affinity_overlay",
    "colorize_labels",
    "denormalize_image",
    "dilate_labels",
    "heatmap",
    "make_grid",
    "normalize_image",
    "overlay_labels",
    "show_images",
    "to_uint8_image",
]

#: Default colour of the ignore label: the "void" colour of the Pascal VOC annotations, which no
#: VOC or Cityscapes class uses.
IGNORE_COLOR: tuple[int, int, int] = (224, 224, 192)


# ------------------------------------------------------------------------------------ validation
def _check_tensor(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(value).__name__}"
            + (" (use torch.from_numpy)" if type(value).__module__ == "numpy" else "")
        )
    return value


def _check_image(name: str, image: Any, *, floating: bool | None = None) -> Tensor:
    """An image 3×H×W or N×3×H×W; ``floating`` True/False requires a float/uint8 dtype."""
    image = _check_tensor(name, image)
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"{name} must be 3×H×W or N×3×H×W (RGB), got shape {tuple(image.shape)}")
    if floating is True and not image.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {image.dtype}")
    if floating is False and image.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor, got dtype {image.dtype}")
    return image


def _check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _as_color(name: str, color: Sequence[int]) -> Tensor:
    values = torch.as_tensor(color)
    if values.shape != (3,) or values.is_floating_point() or ((values < 0) | (values > 255)).any():
        raise ValueError(f"{name} must be three integers in [0, 255], got {color!r}")
    return values.to(torch.uint8)


def _image_as_float(image: Tensor) -> Tensor:
    """uint8 → float in [0, 1]; a float image is taken to be in [0, 1] already (and clamped)."""
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    return image.float().clamp(0.0, 1.0)


# --------------------------------------------------------------------------------- images, labels
def normalize_image(
    image: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Apply the per-channel normalisation ``(x − mean) / std`` to an RGB image.

    Args:
        image: RGB image, uint8 (read as ``x / 255``) or float in [0, 1].
        mean: per-channel means.
        std: per-channel standard deviations (all > 0).

    Shape:
        image: ``3×H×W`` or ``N×3×H×W``; the result has the same shape.

    Returns:
        A new float32 tensor (float64 when ``image`` is float64).

    Example:
        >>> x = torch.rand(3, 4, 4)
        >>> torch.allclose(denormalize_image(normalize_image(x)), x, atol=1e-6)
        True
    """
    image = _check_image("image", image)
    mean_t, std_t = _mean_std(mean, std, image)
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return TF.normalize(x, mean=mean_t.tolist(), std=std_t.tolist())


def denormalize_image(
    image: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    clamp: bool = True,
) -> Tensor:
    """Undo the per-channel normalisation: ``x · std + mean``, the network input back to [0, 1] RGB.

    Args:
        image: normalised float RGB image (e.g. a sample's ``image``, see docs/CONTRACTS.md §2).
        mean: per-channel means used by the normalisation.
        std: per-channel standard deviations used by the normalisation.
        clamp: clip the result to [0, 1] (augmentation padding and interpolation overshoot otherwise
            leave values slightly outside).

    Shape:
        image: ``3×H×W`` or ``N×3×H×W``; the result has the same shape.

    Returns:
        A new float tensor of ``image``'s dtype (float32 for half precision).

    Example:
        >>> denormalize_image(torch.zeros(3, 2, 2))[:, 0, 0]
        tensor([0.4850, 0.4560, 0.4060])
    """
    image = _check_image("image", image, floating=True)
    mean_t, std_t = _mean_std(mean, std, image)
    x = image if image.dtype in (torch.float32, torch.float64) else image.float()
    # x·std + mean is a normalisation by mean' = −mean/std, std' = 1/std.
    out = TF.normalize(x, mean=(-mean_t / std_t).tolist(), std=(1.0 / std_t).tolist())
    return out.clamp(0.0, 1.0) if clamp else out


def _mean_std(mean: Sequence[float], std: Sequence[float], image: Tensor) -> tuple[Tensor, Tensor]:
    mean_t = torch.as_tensor(mean, dtype=torch.float64, device=image.device)
    std_t = torch.as_tensor(std, dtype=torch.float64, device=image.device)
    if mean_t.shape != (3,) or std_t.shape != (3,):
        raise ValueError(f"mean and std must have 3 values each, got mean={mean!r}, std={std!r}")
    if (std_t <= 0).any():
        raise ValueError(f"std must be > 0 in every channel, got {std!r}")
    return mean_t, std_t


def to_uint8_image(image: Tensor) -> Tensor:
    """A float RGB image in [0, 1] (values outside are clipped) as uint8, rounding to nearest.

    Args:
        image: float RGB image in [0, 1], or uint8 (returned as a copy).

    Shape:
        image: ``3×H×W`` or ``N×3×H×W``; the result has the same shape.

    Returns:
        A uint8 tensor.

    Example:
        >>> to_uint8_image(torch.ones(3, 1, 1)).flatten().tolist()
        [255, 255, 255]
    """
    image = _check_image("image", image)
    if image.dtype == torch.uint8:
        return image.clone()
    return (image.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def colorize_labels(
    labels: Tensor,
    palette: Tensor | Sequence[Sequence[int]],
    ignore_index: int = IGNORE_INDEX,
    ignore_color: Sequence[int] = IGNORE_COLOR,
) -> Tensor:
    """Colour a label map with a palette: pixel of class c gets ``palette[c]``.

    Args:
        labels: integer class indices in ``[0, C)``, or ``ignore_index``.
        palette: ``C×3`` uint8 colours (a data module's ``palette``), or a nested sequence of ints.
        ignore_index: the label of unlabelled / ignored pixels.
        ignore_color: the colour of ``ignore_index`` pixels (default :data:`IGNORE_COLOR`).

    Shape:
        labels: ``H×W`` or ``N×H×W`` (a singleton channel ``N×1×H×W`` is accepted too).
        Returns: ``3×H×W`` or ``N×3×H×W``.

    Returns:
        A uint8 RGB image.

    Raises:
        ValueError: a label outside ``[0, C)`` that is not ``ignore_index``, or a malformed palette.

    Example:
        >>> palette = torch.tensor([[0, 0, 0], [255, 0, 0]], dtype=torch.uint8)
        >>> colorize_labels(torch.tensor([[1]]), palette).flatten().tolist()
        [255, 0, 0]
    """
    labels = _check_labels(labels)
    palette_t = _check_palette(palette).to(labels.device)
    ignore_rgb = _as_color("ignore_color", ignore_color).to(labels.device)
    ignored = labels == ignore_index
    num_classes = palette_t.shape[0]
    _check_label_range(labels, num_classes, ignore_index)
    table = torch.cat([palette_t, ignore_rgb.view(1, 3)], dim=0)  # row C = ignore
    index = torch.where(ignored, torch.full_like(labels, num_classes), labels)
    rgb = table[index]  # ...×H×W×3
    return rgb.movedim(-1, -3).contiguous()


def _check_labels(labels: Any) -> Tensor:
    labels = _check_tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() not in (2, 3):
        raise ValueError(f"labels must be H×W, N×H×W or N×1×H×W, got shape {tuple(labels.shape)}")
    return labels.long()


def _check_label_range(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        found = sorted(set(labels[bad].unique().tolist()))[:10]
        raise ValueError(
            f"labels must be in [0, {num_classes}) (palette has {num_classes} colours) or "
            f"ignore_index={ignore_index}, found {found}"
        )


def _check_palette(palette: Any) -> Tensor:
    palette_t = palette if isinstance(palette, Tensor) else torch.as_tensor(palette)
    if palette_t.dim() != 2 or palette_t.shape[1] != 3 or palette_t.shape[0] == 0:
        raise ValueError(f"palette must be C×3 (C ≥ 1), got shape {tuple(palette_t.shape)}")
    if palette_t.is_floating_point():
        raise TypeError(
            f"palette must hold integers in [0, 255] (uint8), got dtype {palette_t.dtype}"
        )
    if palette_t.dtype != torch.uint8 and ((palette_t < 0) | (palette_t > 255)).any():
        raise ValueError("palette values must be in [0, 255]")
    return palette_t.to(torch.uint8)


def overlay_labels(
    image: Tensor,
    labels: Tensor,
    palette: Tensor | Sequence[Sequence[int]],
    alpha: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Blend a coloured label map over an image; ``ignore_index`` pixels show the image unchanged.

    The way to look at weak labels (scribbles, clicks): strokes in class colour on the photograph.

    Args:
        image: RGB image, uint8 or float in [0, 1] (use :func:`denormalize_image` first on a
            normalised network input).
        labels: integer labels in ``[0, C)`` or ``ignore_index``, the image's size.
        palette: ``C×3`` uint8 colours.
        alpha: opacity of the label colours in [0, 1].
        ignore_index: the label of unlabelled pixels.

    Shape:
        image: ``3×H×W`` or ``N×3×H×W``; labels: ``H×W`` or ``N×H×W``; Returns: image's shape.

    Returns:
        A uint8 RGB image.

    Example:
        >>> img = torch.zeros(3, 1, 2, dtype=torch.uint8)
        >>> pal = torch.tensor([[200, 100, 0]], dtype=torch.uint8)
        >>> overlay_labels(img, torch.tensor([[0, 255]]), pal, alpha=1.0)[:, 0].T.tolist()
        [[200, 100, 0], [0, 0, 0]]
    """
    image = _check_image("image", image)
    labels = _check_labels(labels)
    alpha = _check_alpha(alpha)
    if labels.shape[-2:] != image.shape[-2:] or (image.dim() == 4) != (labels.dim() == 3):
        raise ValueError(
            f"labels must match image (3×H×W with H×W, N×3×H×W with N×H×W), got image "
            f"{tuple(image.shape)} and labels {tuple(labels.shape)}"
        )
    palette_t = _check_palette(palette)
    num_classes = palette_t.shape[0]
    _check_label_range(labels, num_classes, ignore_index)
    colors = [tuple(color) for color in palette_t.tolist()]
    classes = torch.arange(num_classes, device=labels.device).view(-1, 1, 1)
    base = _image_as_float(image)
    # torchvision draws one image at a time: class c's mask (labels == c) blended in palette[c].
    drawn = [
        draw_segmentation_masks(picture, label_map.unsqueeze(0) == classes, alpha, colors)
        for picture, label_map in zip(
            base.reshape(-1, *base.shape[-3:]), labels.reshape(-1, *labels.shape[-2:]), strict=True
        )
    ]
    return to_uint8_image(torch.stack(drawn).reshape(base.shape))


def dilate_labels(labels: Tensor, size: int = 3, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Grow every labelled pixel into a ``size×size`` square, for display of sparse labels.

    Single-pixel clicks vanish in a downscaled picture; dilated, they show. Unlabelled pixels
    (``ignore_index``) take the label of a labelled pixel within the square; where squares of
    different classes meet, the smallest class index wins (a fixed rule, so pictures are
    reproducible). Labelled pixels keep their own label.

    Args:
        labels: integer labels, ``ignore_index`` for unlabelled pixels.
        size: odd side of the square, ≥ 1 (1 returns a copy).
        ignore_index: the label of unlabelled pixels (must be larger than every class index).

    Shape:
        labels: ``H×W`` or ``N×H×W``; Returns: the same shape.

    Returns:
        A new int64 tensor.

    Example:
        >>> clicks = torch.full((3, 3), 255)
        >>> clicks[1, 1] = 2
        >>> dilate_labels(clicks).unique().tolist()
        [2]
    """
    labels = _check_labels(labels)
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be an odd int >= 1, got {size!r}")
    labelled = labels != ignore_index
    if labelled.any() and labels[labelled].max() >= ignore_index:
        raise ValueError(
            f"ignore_index ({ignore_index}) must exceed every class index, found "
            f"{labels[labelled].max().item()}"
        )
    if size == 1:
        return labels.clone()
    # The smallest label in each square, by a max-pool of the negated labels; unlabelled pixels
    # are ignore_index, larger than every class, so any labelled neighbour wins over them.
    grown = -F.max_pool2d(
        -labels.view(-1, 1, *labels.shape[-2:]).float(), size, stride=1, padding=size // 2
    )
    grown = grown.round().long().view(labels.shape)
    return torch.where(labelled, labels, grown)


# ------------------------------------------------------------------------------------- affinities
def heatmap(values: Tensor, vmax: float | None = None) -> Tensor:
    """A non-negative map through the "hot" colour map (black → red → yellow → white).

    Args:
        values: non-negative values (affinities, ``kernels_vis``); NaN is not allowed.
        vmax: the value shown as white; ``None`` uses the map's maximum (a zero map stays black).

    Shape:
        values: ``H×W``, ``1×H×W``, ``N×H×W`` or ``N×1×H×W``; Returns: ``3×H×W`` or ``N×3×H×W``.

    Returns:
        A uint8 RGB image.

    Example:
        >>> heatmap(torch.tensor([[0.0, 1.0]]))[:, 0].T.tolist()
        [[0, 0, 0], [255, 255, 255]]
    """
    normalized = _normalize_map("values", values, vmax)
    return to_uint8_image(_hot(normalized))


def _normalize_map(name: str, values: Any, vmax: float | None, batched: bool = False) -> Tensor:
    """``values / vmax`` clipped to [0, 1], as float32 ``H×W`` or ``N×H×W``.

    ``batched``: the maps belong to a batch of images, so a ``1×H×W`` input is one map for a batch
    of one (kept 3-D) rather than a single map with a channel axis (squeezed).
    """
    values = _check_tensor(name, values)
    if not values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {values.dtype}")
    if values.dim() == 4 and values.shape[1] == 1:
        values = values[:, 0]
    elif values.dim() == 3 and values.shape[0] == 1 and not batched:
        values = values[0]
    if values.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be H×W, 1×H×W, N×H×W or N×1×H×W, got shape {tuple(values.shape)}"
        )
    values = values.detach().float()
    if torch.isnan(values).any():
        raise ValueError(f"{name} contains NaN")
    if (values < 0).any():
        raise ValueError(f"{name} must be non-negative, got minimum {values.min().item():.4g}")
    if vmax is None:
        peak = values.amax(dim=(-2, -1), keepdim=True)
    else:
        if not isinstance(vmax, (int, float)) or not vmax > 0:
            raise ValueError(f"vmax must be a positive number or None, got {vmax!r}")
        peak = torch.tensor(float(vmax))
    return torch.where(peak > 0, values / peak.clamp_min(1e-30), torch.zeros_like(values)).clamp(
        0.0, 1.0
    )


def _hot(v: Tensor) -> Tensor:
    """The "hot" colour map on values in [0, 1]: ``...×H×W`` → float ``...×3×H×W`` in [0, 1]."""
    red = (3.0 * v).clamp(0.0, 1.0)
    green = (3.0 * v - 1.0).clamp(0.0, 1.0)
    blue = (3.0 * v - 2.0).clamp(0.0, 1.0)
    return torch.stack([red, green, blue], dim=-3)


def affinity_overlay(
    image: Tensor,
    affinity: Tensor,
    alpha: float = 0.8,
    gamma: float = 0.5,
    vmax: float | None = None,
) -> Tensor:
    """Show an affinity map as a heat map over an image.

    Each pixel is blended as ``(1 − o)·image + o·hot(v)`` with ``v = affinity / vmax`` clipped to
    [0, 1] and opacity ``o = alpha · v**gamma``: pixels with zero affinity show the image unchanged,
    and ``gamma < 1`` keeps the weak tails of a Gaussian kernel visible.

    Args:
        image: RGB image, uint8 or float in [0, 1].
        affinity: non-negative map, at the image's size or at an integer fraction of it (the
            prediction resolution of the loss), upsampled with nearest neighbours.
        alpha: largest opacity of the heat map, in [0, 1].
        gamma: exponent > 0 of the opacity curve.
        vmax: the affinity shown at full strength; ``None`` uses the map's maximum. Pass the same
            value to compare several maps on one scale.

    Shape:
        image: ``3×H×W`` or ``N×3×H×W``; affinity: ``h×w`` / ``1×h×w`` (with a single image),
        ``N×h×w`` / ``N×1×h×w`` (with a batch); ``H = s·h``, ``W = s'·w``. Returns: image's shape.

    Returns:
        A uint8 RGB image.

    Example:
        >>> img = torch.full((3, 4, 4), 128, dtype=torch.uint8)
        >>> aff = torch.zeros(2, 2)
        >>> aff[0, 0] = 1.0
        >>> out = affinity_overlay(img, aff, alpha=1.0)
        >>> out[:, 0, 0].tolist(), out[:, 3, 3].tolist()
        ([255, 255, 255], [128, 128, 128])
    """
    image = _check_image("image", image)
    alpha = _check_alpha(alpha)
    if not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma must be a positive number, got {gamma!r}")
    v = _normalize_map("affinity", affinity, vmax, batched=image.dim() == 4).to(image.device)
    if (image.dim() == 4) != (v.dim() == 3) or (image.dim() == 4 and v.shape[0] != image.shape[0]):
        raise ValueError(
            f"affinity must be one map per image, got image {tuple(image.shape)} and affinity "
            f"{tuple(affinity.shape)}"
        )
    v = _upsample_nearest("affinity", v, tuple(image.shape[-2:]))
    opacity = (alpha * v.pow(gamma)).unsqueeze(-3)
    base = _image_as_float(image)
    return to_uint8_image(base * (1.0 - opacity) + _hot(v) * opacity)


def _upsample_nearest(name: str, v: Tensor, size: tuple[int, int]) -> Tensor:
    h, w = v.shape[-2:]
    if (h, w) == size:
        return v
    if size[0] % h or size[1] % w:
        raise ValueError(
            f"{name} must be the image's size or an integer fraction of it, got {h}×{w} for an "
            f"image of {size[0]}×{size[1]}"
        )
    batched = v.dim() == 3
    out = F.interpolate(v.view(-1, 1, h, w), size=size, mode="nearest")
    return out[:, 0] if batched else out[0, 0]


def affinity_around_pixel(window_affinities: Tensor, pixel: tuple[int, int]) -> Tensor:
    """Paste the window affinities of one pixel into a map: the kernel ``K_ij`` for fixed ``i``.

    ``window_affinities`` has the layout of ``window_affinity`` / ``gaussian_affinity``
    (docs/CONTRACTS.md §1): ``[n, o, i] = G_ij·K_ij`` for ``j = i + offset_o``, offsets row-major over
    the ``(2r+1)×(2r+1)`` window. The result holds ``G_ij·K_ij`` at every ``j`` in the window of
    ``i = pixel`` and 0 elsewhere (and at ``i`` itself); the radius is read from the channel count.

    Args:
        window_affinities: affinities of every pixel to its window.
        pixel: ``(row, col)`` of ``i``.

    Shape:
        window_affinities: ``N×(2r+1)²×h×w`` (2D only); Returns: ``N×h×w``.

    Returns:
        A new float tensor.

    Example:
        >>> a = torch.zeros(1, 9, 5, 5)
        >>> a[0, 5, 2, 2] = 0.7  # offset (0, +1) of pixel (2, 2)
        >>> affinity_around_pixel(a, (2, 2))[0, 2, 3].item()
        0.699999988079071
    """
    window_affinities = _check_tensor("window_affinities", window_affinities)
    if window_affinities.dim() != 4:
        raise ValueError(
            "window_affinities must be N×(2r+1)²×h×w (2D), got shape "
            f"{tuple(window_affinities.shape)}"
        )
    n, k, h, w = window_affinities.shape
    diameter = math.isqrt(k)
    if diameter * diameter != k or diameter % 2 == 0 or diameter < 3:
        raise ValueError(
            f"window_affinities must have (2r+1)² channels with r ≥ 1, got {k} channels "
            f"(shape {tuple(window_affinities.shape)})"
        )
    if (
        not isinstance(pixel, (tuple, list))
        or len(pixel) != 2
        or not all(isinstance(p, int) for p in pixel)
        or not (0 <= pixel[0] < h and 0 <= pixel[1] < w)
    ):
        raise ValueError(f"pixel must be (row, col) inside the {h}×{w} map, got {pixel!r}")
    radius = diameter // 2
    row, col = pixel
    window = window_affinities[:, :, row, col].detach().reshape(n, diameter, diameter)
    out = window_affinities.new_zeros((n, h + 2 * radius, w + 2 * radius))
    # The window of pixel (row, col) covers rows row-r..row+r: in the padded map, row..row+2r.
    out[:, row : row + diameter, col : col + diameter] = window
    return out[:, radius : radius + h, radius : radius + w].contiguous()


# ------------------------------------------------------------------------------------------- grids
def make_grid(
    images: Sequence[Tensor] | Tensor,
    ncols: int | None = None,
    padding: int = 2,
    pad_value: int = 255,
) -> Tensor:
    """Tile images row-major into one image: image k goes to row ``k // ncols``, column ``k % ncols``.

    ``torchvision.utils.make_grid`` after checking the inputs: cells are separated (and framed) by
    ``padding`` pixels of ``pad_value``; the last row is filled with ``pad_value`` where it has
    fewer images. A single image is returned as it is (no frame), as torchvision does.

    Args:
        images: uint8 RGB images of one size, as a sequence of ``3×H×W`` or a ``N×3×H×W`` tensor;
            ``H×W`` uint8 maps are taken as grey.
        ncols: images per row; ``None`` puts all in one row.
        padding: pixels between and around cells, ≥ 0.
        pad_value: grey level of the padding, in [0, 255].

    Shape:
        Returns: ``3×(rows·(H+p)+p)×(ncols·(W+p)+p)`` with ``rows = ceil(N / ncols)``, ``p = padding``.

    Returns:
        A uint8 RGB image (``SummaryWriter.add_image(tag, grid, step)`` takes it as it is).

    Example:
        >>> grid = make_grid([torch.zeros(3, 4, 5, dtype=torch.uint8)] * 3, ncols=2, padding=1)
        >>> tuple(grid.shape)
        (3, 11, 13)
    """
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images as a tensor must be N×3×H×W, got shape {tuple(images.shape)}")
        items = list(images.unbind(0))
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        items = list(images)
    else:
        raise TypeError(
            f"images must be a sequence of tensors or a tensor, got {type(images).__name__}"
        )
    if not items:
        raise ValueError("images must hold at least one image, got none")
    cells = []
    for k, item in enumerate(items):
        item = _check_tensor(f"images[{k}]", item)
        if item.dim() == 2:
            item = item.unsqueeze(0).expand(3, -1, -1)
        cells.append(_check_image(f"images[{k}]", item, floating=False))
    height, width = cells[0].shape[-2:]
    for k, cell in enumerate(cells):
        if cell.shape[-2:] != (height, width) or cell.dim() != 3:
            raise ValueError(
                f"images must all be 3×{height}×{width} like images[0], got images[{k}] of shape "
                f"{tuple(cell.shape)}"
            )
    if ncols is None:
        ncols = len(cells)
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int or None, got {ncols!r}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    if not isinstance(pad_value, int) or not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be an int in [0, 255], got {pad_value!r}")
    batch = torch.stack([cell.to(cells[0].device) for cell in cells])
    return torchvision.utils.make_grid(batch, nrow=ncols, padding=padding, pad_value=pad_value)


# ---------------------------------------------------------------------------------- matplotlib
def show_images(
    images: Sequence[Any],
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    size: float = 3.0,
    suptitle: str | None = None,
) -> Figure:
    """Draw images side by side with matplotlib (imported here; ``pip install -e ".[notebooks]"``).

    Args:
        images: each a torch tensor or NumPy array: RGB ``3×H×W`` (uint8, or float in [0, 1]),
            RGB ``H×W×3`` (NumPy layout), or a ``H×W`` map (drawn with the "viridis" colour map
            and a colour bar).
        titles: one title per image, or ``None``.
        ncols: images per row; ``None`` puts all in one row.
        size: size of one panel in inches.
        suptitle: title of the whole figure.

    Returns:
        The matplotlib ``Figure`` (a notebook displays it; call ``plt.close(fig)`` in loops).

    Example:
        >>> fig = show_images([torch.zeros(3, 8, 8, dtype=torch.uint8)], titles=["black"])  # doctest: +SKIP
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('show_images needs matplotlib: pip install -e ".[notebooks]"') from error
    if isinstance(images, (Tensor, str, bytes)) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list of images, got {type(images).__name__}")
    if not images:
        raise ValueError("images must hold at least one image, got none")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles must have one entry per image ({len(images)}), got {len(titles)}")
    ncols = len(images) if ncols is None else ncols
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int or None, got {ncols!r}")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    arrays = [_as_displayable(f"images[{k}]", image) for k, image in enumerate(images)]
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False, layout="constrained"
    )
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= len(arrays):
            continue
        array = arrays[k]
        if array.ndim == 2:
            shown = ax.imshow(array, cmap="viridis", interpolation="nearest")
            fig.colorbar(shown, ax=ax, shrink=0.8)
        else:
            ax.imshow(array, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
    if suptitle is not None:
        fig.suptitle(suptitle)
    return fig


def _as_displayable(name: str, image: Any) -> Any:
    """A tensor / array as a NumPy ``H×W`` or ``H×W×3`` array for ``imshow``."""
    if isinstance(image, Tensor):
        array = image.detach().cpu()
        if array.dim() == 3 and array.shape[0] == 3:
            array = array.permute(1, 2, 0)
        elif array.dim() == 3 and array.shape[0] == 1:
            array = array[0]
        if array.dtype not in (torch.uint8,) and not array.is_floating_point():
            array = array.float()
        array = array.numpy()
    elif type(image).__module__ == "numpy":
        array = image
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(image).__name__}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"{name} must be 3×H×W, H×W×3 or H×W, got shape {tuple(array.shape)}")
    if array.ndim == 3 and array.dtype.kind == "f":
        array = array.clip(0.0, 1.0)
    return array
