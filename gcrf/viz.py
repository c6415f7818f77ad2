"""Pictures of images, label maps and affinities for the notebooks and TensorBoard.

What torchvision does not do, over torchvision where it does: every function takes torch tensors
and returns a **uint8 RGB image**, ``3×H×W`` or ``N×3×H×W`` (what ``SummaryWriter.add_image`` /
``add_images`` and ``torchvision.utils.make_grid`` take). Label maps are coloured through a
palette (:mod:`gcrf.data.palettes`) with the ignore label in its own colour; affinities (a kernel
around a pixel, ``kernels_vis``) are drawn as "hot" heat maps. Only :func:`show_images` draws, with
matplotlib, imported when called.

Example:
    >>> palette = torch.tensor([[0, 0, 0], [255, 0, 0]], dtype=torch.uint8)
    >>> colorize_labels(torch.tensor([[0, 1], [255, 1]]), palette)[:, 1, 0].tolist()  # ignore
    [224, 224, 192]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.utils import draw_segmentation_masks

from gcrf.conventions import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from gcrf.data.palettes import IGNORE_COLOR
from gcrf.data.transforms import to_unit_float

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from matplotlib.figure import Figure

__all__ = [
    "affinity_around_pixel",
    "affinity_overlay",
    "colorize_labels",
    "denormalize_image",
    "dilate_labels",
    "heatmap",
    "make_grid",
    "overlay_labels",
    "show_images",
    "to_uint8_image",
]


# ------------------------------------------------------------------------------------ validation
def _tensor(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        hint = " (use torch.from_numpy)" if type(value).__module__ == "numpy" else ""
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}{hint}")
    return value


def _image(name: str, image: Any, dtype: str | None = None) -> Tensor:
    """An RGB image 3×H×W or N×3×H×W; ``dtype`` "float" / "uint8" requires that kind."""
    image = _tensor(name, image)
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"{name} must be 3×H×W or N×3×H×W (RGB), got shape {tuple(image.shape)}")
    if dtype == "float" and not image.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {image.dtype}")
    if dtype == "uint8" and image.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor, got dtype {image.dtype}")
    return image


def _labels(labels: Any) -> Tensor:
    """Integer labels H×W or N×H×W (N×1×H×W squeezed), as int64."""
    labels = _tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() not in (2, 3):
        raise ValueError(f"labels must be H×W, N×H×W or N×1×H×W, got shape {tuple(labels.shape)}")
    return labels.long()


def _palette(palette: Any, labels: Tensor, ignore_index: int) -> Tensor:
    """The C×3 uint8 palette, after checking that every label has a colour."""
    colours = torch.as_tensor(palette)
    if colours.dim() != 2 or colours.shape[1] != 3 or colours.shape[0] == 0:
        raise ValueError(f"palette must be C×3 (C ≥ 1), got shape {tuple(colours.shape)}")
    if colours.is_floating_point():
        raise TypeError(f"palette must hold integers in [0, 255] (uint8), got {colours.dtype}")
    if ((colours < 0) | (colours > 255)).any():
        raise ValueError("palette values must be in [0, 255]")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= len(colours)))
    if bad.any():
        raise ValueError(
            f"labels must be in [0, {len(colours)}) (palette has {len(colours)} colours) or "
            f"ignore_index={ignore_index}, found {labels[bad].unique().tolist()[:10]}"
        )
    return colours.to(torch.uint8)


def _unit(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------- images, labels
def to_uint8_image(image: Tensor) -> Tensor:
    """A float RGB image in [0, 1] as uint8, rounded to nearest (values outside are clipped).

    Args:
        image: float RGB image, or uint8 (returned as a copy).

    Shape:
        image: ``3×H×W`` or ``N×3×H×W``; Returns: the same shape.

    Returns:
        A uint8 tensor.

    Example:
        >>> to_uint8_image(torch.tensor([0.0, 0.5, 2.0]).view(1, 1, 3).expand(3, 1, 3))[0].tolist()
        [[0, 128, 255]]
    """
    image = _image("image", image)
    if image.dtype == torch.uint8:
        return image.clone()
    return image.float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def denormalize_image(
    image: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    clamp: bool = True,
) -> Tensor:
    """Undo the per-channel normalisation: ``x · std + mean``, a network input back to RGB.

    Args:
        image: normalised float RGB image (a sample's ``image``, docs/CONTRACTS.md §2).
        mean: the normalisation's per-channel means.
        std: its per-channel standard deviations (> 0).
        clamp: clip to [0, 1] (padding and interpolation overshoot leave values outside).

    Shape:
        image: ``3×H×W`` or ``N×3×H×W``; Returns: the same shape.

    Returns:
        A new tensor of ``image``'s dtype (float32 for half precision).

    Example:
        >>> denormalize_image(torch.zeros(3, 2, 2))[:, 0, 0]
        tensor([0.4850, 0.4560, 0.4060])
    """
    image = _image("image", image, "float")
    x = image if image.dtype in (torch.float32, torch.float64) else image.float()
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if mean_t.shape != (3,) or std_t.shape != (3,):
        raise ValueError(f"mean and std must have 3 values each, got mean={mean!r}, std={std!r}")
    if (std_t <= 0).any():
        raise ValueError(f"std must be > 0 in every channel, got {std!r}")
    out = x * std_t.view(3, 1, 1) + mean_t.view(3, 1, 1)
    return out.clamp(0.0, 1.0) if clamp else out


def colorize_labels(
    labels: Tensor,
    palette: Tensor | Sequence[Sequence[int]],
    ignore_index: int = IGNORE_INDEX,
    ignore_color: Sequence[int] = IGNORE_COLOR,
) -> Tensor:
    """A label map in colour: class ``c`` gets ``palette[c]``, ``ignore_index`` ``ignore_color``.

    Args:
        labels: integer labels in ``[0, C)`` or ``ignore_index``.
        palette: ``C×3`` uint8 colours (a data module's ``palette``) or nested ints.
        ignore_index: the label of unlabelled / ignored pixels.
        ignore_color: their colour (default :data:`gcrf.data.palettes.IGNORE_COLOR`).

    Shape:
        labels: ``H×W``, ``N×H×W`` or ``N×1×H×W``; Returns: ``3×H×W`` or ``N×3×H×W``.

    Returns:
        A uint8 RGB image.

    Example:
        >>> colorize_labels(torch.tensor([[1]]), [[0, 0, 0], [255, 0, 0]]).flatten().tolist()
        [255, 0, 0]
    """
    labels = _labels(labels)
    colours = _palette(palette, labels, ignore_index)
    ignore = torch.as_tensor(ignore_color)
    if ignore.shape != (3,) or ignore.is_floating_point() or ((ignore < 0) | (ignore > 255)).any():
        raise ValueError(f"ignore_color must be three integers in [0, 255], got {ignore_color!r}")
    table = torch.cat([colours, ignore.to(torch.uint8).view(1, 3)]).to(labels.device)
    index = labels.masked_fill(labels == ignore_index, len(colours))  # row C of the table
    return table[index].movedim(-1, -3).contiguous()


def overlay_labels(
    image: Tensor,
    labels: Tensor,
    palette: Tensor | Sequence[Sequence[int]],
    alpha: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Labels blended over an image (``draw_segmentation_masks``); unlabelled pixels show the image.

    Args:
        image: RGB image, uint8 or float in [0, 1] (:func:`denormalize_image` a network input first).
        labels: integer labels in ``[0, C)`` or ``ignore_index``, the image's size.
        palette: ``C×3`` uint8 colours.
        alpha: opacity of the label colours, in [0, 1].
        ignore_index: the label of unlabelled pixels.

    Shape:
        image: ``3×H×W`` or ``N×3×H×W``; labels: ``H×W`` or ``N×H×W``; Returns: image's shape.

    Returns:
        A uint8 RGB image.

    Example:
        >>> img = torch.zeros(3, 1, 2, dtype=torch.uint8)
        >>> overlay_labels(img, torch.tensor([[0, 255]]), [[200, 100, 0]], 1.0)[:, 0].T.tolist()
        [[200, 100, 0], [0, 0, 0]]
    """
    image = _image("image", image)
    labels = _labels(labels)
    alpha = _unit("alpha", alpha)
    if labels.shape[-2:] != image.shape[-2:] or (image.dim() == 4) != (labels.dim() == 3):
        raise ValueError(
            f"labels must match image (3×H×W with H×W, N×3×H×W with N×H×W), got image "
            f"{tuple(image.shape)} and labels {tuple(labels.shape)}"
        )
    colours = _palette(palette, labels, ignore_index)
    classes = torch.arange(len(colours), device=labels.device).view(-1, 1, 1)
    colour_list = [tuple(colour) for colour in colours.tolist()]
    base = to_unit_float(image).clamp(0.0, 1.0)
    drawn = [  # torchvision draws one image at a time: class c's mask in palette[c]
        draw_segmentation_masks(picture, label_map == classes, alpha, colour_list)
        for picture, label_map in zip(
            base.reshape(-1, *base.shape[-3:]), labels.reshape(-1, *labels.shape[-2:]), strict=True
        )
    ]
    return to_uint8_image(torch.stack(drawn).reshape(base.shape))


def dilate_labels(labels: Tensor, size: int = 3, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Every labelled pixel grown into a ``size×size`` square: single-pixel clicks made visible.

    Unlabelled pixels take a label from within their square, the smallest where classes meet (a
    fixed rule: pictures are reproducible); labelled pixels keep theirs.

    Args:
        labels: integer labels, ``ignore_index`` for unlabelled pixels.
        size: odd side of the square, ≥ 1 (1 returns a copy).
        ignore_index: the label of unlabelled pixels (larger than every class index).

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
    labels = _labels(labels)
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
    # The smallest label in each square: a max-pool of the negated labels; unlabelled pixels are
    # ignore_index, larger than every class, so any labelled neighbour wins over them.
    grown = -F.max_pool2d(
        -labels.view(-1, 1, *labels.shape[-2:]).float(), size, stride=1, padding=size // 2
    )
    return torch.where(labelled, labels, grown.round().long().view(labels.shape))


# ------------------------------------------------------------------------------------- affinities
def _unit_map(name: str, values: Any, vmax: float | None, batched: bool = False) -> Tensor:
    """``values / vmax`` clipped to [0, 1], float32 ``H×W`` or ``N×H×W``.

    ``batched``: a ``1×H×W`` input is one map of a batch of one (kept), not a map with a channel.
    """
    values = _tensor(name, values)
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
    if vmax is not None and (not isinstance(vmax, (int, float)) or not vmax > 0):
        raise ValueError(f"vmax must be a positive number or None, got {vmax!r}")
    peak = values.amax(dim=(-2, -1), keepdim=True) if vmax is None else torch.tensor(float(vmax))
    return torch.where(peak > 0, values / peak.clamp_min(1e-30), 0.0).clamp(0.0, 1.0)


def _hot(v: Tensor) -> Tensor:
    """The "hot" colour map on values in [0, 1]: ``...×H×W`` → float ``...×3×H×W`` in [0, 1]."""
    return torch.stack([(3.0 * v - k).clamp(0.0, 1.0) for k in range(3)], dim=-3)


def heatmap(values: Tensor, vmax: float | None = None) -> Tensor:
    """A non-negative map through the "hot" colour map (black → red → yellow → white).

    Args:
        values: non-negative values (affinities, ``kernels_vis``), no NaN.
        vmax: the value shown white; ``None``: the map's maximum (a zero map stays black).

    Shape:
        values: ``H×W``, ``1×H×W``, ``N×H×W`` or ``N×1×H×W``; Returns: ``(N×)3×H×W``.

    Returns:
        A uint8 RGB image.

    Example:
        >>> heatmap(torch.tensor([[0.0, 1.0]]))[:, 0].T.tolist()
        [[0, 0, 0], [255, 255, 255]]
    """
    return to_uint8_image(_hot(_unit_map("values", values, vmax)))


def affinity_overlay(
    image: Tensor,
    affinity: Tensor,
    alpha: float = 0.8,
    gamma: float = 0.5,
    vmax: float | None = None,
) -> Tensor:
    """An affinity map as a heat map over an image: ``(1 − o)·image + o·hot(v)``.

    ``v = affinity / vmax`` clipped to [0, 1], opacity ``o = alpha · v**gamma``: zero affinity shows
    the image unchanged, ``gamma < 1`` keeps the weak tails of a Gaussian kernel visible.

    Args:
        image: RGB image, uint8 or float in [0, 1].
        affinity: non-negative map at the image's size or an integer fraction of it (the loss's
            resolution), upsampled by nearest neighbour.
        alpha: largest opacity, in [0, 1].
        gamma: exponent > 0 of the opacity.
        vmax: the affinity shown at full strength; ``None``: the map's maximum (pass one value to
            compare maps on one scale).

    Shape:
        image: ``3×H×W`` or ``N×3×H×W``; affinity: ``h×w`` / ``1×h×w`` with one image, ``N×h×w`` /
        ``N×1×h×w`` with a batch, ``H = s·h``, ``W = s'·w``; Returns: image's shape.

    Returns:
        A uint8 RGB image.

    Example:
        >>> aff = torch.zeros(2, 2)
        >>> aff[0, 0] = 1.0
        >>> out = affinity_overlay(torch.full((3, 4, 4), 128, dtype=torch.uint8), aff, alpha=1.0)
        >>> out[:, 0, 0].tolist(), out[:, 3, 3].tolist()
        ([255, 255, 255], [128, 128, 128])
    """
    image = _image("image", image)
    alpha = _unit("alpha", alpha)
    if not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma must be a positive number, got {gamma!r}")
    v = _unit_map("affinity", affinity, vmax, batched=image.dim() == 4).to(image.device)
    if (image.dim() == 4) != (v.dim() == 3) or (image.dim() == 4 and v.shape[0] != image.shape[0]):
        raise ValueError(
            f"affinity must be one map per image, got image {tuple(image.shape)} and affinity "
            f"{tuple(affinity.shape)}"
        )
    (h, w), (height, width) = v.shape[-2:], image.shape[-2:]
    if height % h or width % w:
        raise ValueError(
            f"affinity must be the image's size or an integer fraction of it, got {h}×{w} for "
            f"an image of {height}×{width}"
        )
    v = F.interpolate(v.view(-1, 1, h, w), size=(height, width), mode="nearest").view(
        *v.shape[:-2], height, width
    )
    opacity = (alpha * v.pow(gamma)).unsqueeze(-3)
    return to_uint8_image(to_unit_float(image).clamp(0, 1) * (1 - opacity) + _hot(v) * opacity)


def affinity_around_pixel(window_affinities: Tensor, pixel: tuple[int, int]) -> Tensor:
    """The window affinities of one pixel ``i`` pasted into a map: the kernel ``K_ij``, fixed ``i``.

    ``window_affinities`` has the layout of ``window_affinity`` / ``gaussian_affinity``
    (docs/CONTRACTS.md §1): ``[n, o, i] = G_ij·K_ij``, ``j = i + offset_o``, offsets row-major over
    the ``(2r+1)×(2r+1)`` window (``r`` read from the channel count). The map holds them at every
    ``j`` of the window of ``i`` and 0 elsewhere.

    Args:
        window_affinities: affinities of every pixel to its window.
        pixel: ``(row, col)`` of ``i``.

    Shape:
        window_affinities: ``N×(2r+1)²×h×w`` (2D); Returns: ``N×h×w``.

    Returns:
        A new float tensor.

    Example:
        >>> a = torch.zeros(1, 9, 5, 5)
        >>> a[0, 5, 2, 2] = 0.5  # offset (0, +1) of pixel (2, 2)
        >>> affinity_around_pixel(a, (2, 2))[0, 2, 3].item()
        0.5
    """
    window_affinities = _tensor("window_affinities", window_affinities)
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
    out = window_affinities.new_zeros((n, h + 2 * radius, w + 2 * radius))
    # The window of (row, col) covers rows row − r … row + r: row … row + 2r of the padded map.
    out[:, row : row + diameter, col : col + diameter] = (
        window_affinities[:, :, row, col].detach().reshape(n, diameter, diameter)
    )
    return out[:, radius : radius + h, radius : radius + w].contiguous()


# ------------------------------------------------------------------------------------------- grids
def make_grid(
    images: Sequence[Tensor] | Tensor,
    ncols: int | None = None,
    padding: int = 2,
    pad_value: int = 255,
) -> Tensor:
    """uint8 images tiled row-major (``torchvision.utils.make_grid``), by default in one row.

    Args:
        images: uint8 RGB images of one size: a sequence of ``3×H×W`` (``H×W`` maps are taken as
            grey) or a ``N×3×H×W`` tensor.
        ncols: images per row; ``None``: all in one row.
        padding: pixels between and around cells (none around a single image), ≥ 0.
        pad_value: grey level of the padding, in [0, 255].

    Shape:
        Returns: ``3×(rows·(H+p)+p)×(ncols·(W+p)+p)``, ``rows = ceil(N / ncols)``, ``p = padding``.

    Returns:
        A uint8 RGB image (``SummaryWriter.add_image(tag, grid, step)`` takes it as it is).

    Example:
        >>> grid = make_grid([torch.zeros(3, 4, 5, dtype=torch.uint8)] * 3, ncols=2, padding=1)
        >>> tuple(grid.shape)
        (3, 11, 13)
    """
    if isinstance(images, Tensor) and images.dim() != 4:
        raise ValueError(f"images as a tensor must be N×3×H×W, got shape {tuple(images.shape)}")
    if not isinstance(images, (Tensor, Sequence)) or isinstance(images, (str, bytes)):
        raise TypeError(f"images must be a sequence of tensors or a tensor, got {type(images)}")
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got none")
    cells = []
    for k, item in enumerate(images):
        item = _tensor(f"images[{k}]", item)
        cell = _image(f"images[{k}]", item.expand(3, -1, -1) if item.dim() == 2 else item, "uint8")
        cells.append(cell)
        if cell.shape != cells[0].shape:
            raise ValueError(
                f"images must all be shaped like images[0] {tuple(cells[0].shape)}, got "
                f"images[{k}] of shape {tuple(cell.shape)}"
            )
    ncols = len(cells) if ncols is None else ncols
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
    """Images side by side with matplotlib (imported here; ``pip install -e ".[notebooks]"``).

    Args:
        images: torch tensors or NumPy arrays: RGB ``3×H×W`` or ``H×W×3`` (uint8, or float in
            [0, 1]), or ``H×W`` maps (drawn with "viridis" and a colour bar).
        titles: one title per image, or ``None``.
        ncols: images per row; ``None``: all in one row.
        size: side of one panel in inches.
        suptitle: title of the figure.

    Returns:
        The matplotlib ``Figure`` (call ``plt.close(fig)`` in loops).

    Example:
        >>> fig = show_images([torch.zeros(3, 8, 8, dtype=torch.uint8)], ["black"])  # doctest: +SKIP
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
    arrays = [_displayable(f"images[{k}]", image) for k, image in enumerate(images)]
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False, layout="constrained"
    )
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= len(arrays):
            continue
        if arrays[k].ndim == 2:
            shown = ax.imshow(arrays[k], cmap="viridis", interpolation="nearest")
            fig.colorbar(shown, ax=ax, shrink=0.8)
        else:
            ax.imshow(arrays[k], interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
    if suptitle is not None:
        fig.suptitle(suptitle)
    return fig


def _displayable(name: str, image: Any) -> Any:
    """A tensor / array as a NumPy ``H×W`` or ``H×W×3`` array for ``imshow``."""
    if isinstance(image, Tensor):
        array = image.detach().cpu()
        if array.dim() == 3 and array.shape[0] in (1, 3):
            array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
        array = (array if array.dtype == torch.uint8 else array.float()).numpy()
    elif type(image).__module__ == "numpy":
        array = image
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(image).__name__}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"{name} must be 3×H×W, H×W×3 or H×W, got shape {tuple(array.shape)}")
    return array.clip(0.0, 1.0) if array.ndim == 3 and array.dtype.kind == "f" else array
