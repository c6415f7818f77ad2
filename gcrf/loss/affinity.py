"""The Gaussian affinity K of the Gated CRF loss, for inspection and visualisation.

:func:`gaussian_affinity` returns the gated affinity ``G_ij · K_ij`` (docs/math.md#kernel, #gates)
either as a dense window map (every pixel × every window offset) or as (2r+1)×(2r+1) patches around
chosen pixels, ready for ``imshow``. :func:`kernels_vis` tiles a window map into the published
``kernels_vis`` image (docs/math.md#kernels-vis). Both use the same backend ``window_affinity`` as
the loss, so what is shown is exactly what the loss weighs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gcrf.loss.backends import choose_backend, get_backend
from gcrf.loss.core import window_of_config
from gcrf.loss.functional import Downsampler, KernelDescriptor, LossConfig, PreparedInputs

__all__ = ["affinity_from_prepared", "affinity_of_config", "gaussian_affinity", "kernels_vis"]


def affinity_from_prepared(prepared: PreparedInputs, backend: str = "auto") -> Tensor:
    """Dense window affinity N×(2r+1)^q×*Ω of prepared inputs (see :func:`gaussian_affinity`)."""
    probs = prepared.pairwise.probs
    core = get_backend(choose_backend(backend, probs, probs.dim() - 2))
    return core.window_affinity(prepared.window)


def affinity_of_config(
    features: Mapping[str, Tensor],
    config: LossConfig,
    size: Sequence[int] | None = None,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Dense window affinity of a validated loss configuration (see :func:`gaussian_affinity`)."""
    window = window_of_config(features, config, size, mask_src, mask_dst)
    core = get_backend(choose_backend(backend, window.features, window.spatial_rank))
    return core.window_affinity(window)


def gaussian_affinity(
    features: Mapping[str, Tensor],
    kernels: Sequence[KernelDescriptor],
    radius: int = 5,
    size: Sequence[int] | None = None,
    pixels: Sequence[Sequence[int]] | None = None,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    downsamplers: Mapping[str, Downsampler] | None = None,
    spacing: Sequence[float] | None = None,
    backend: str = "auto",
) -> Tensor:
    """The gated Gaussian affinity ``G_ij · K_ij`` the loss uses, densely or around chosen pixels.

    Args:
        features: modality name → N×D×H×W (N×D×D'×H×W) feature map, as for the loss.
        kernels, radius, downsamplers, spacing: the configuration (:meth:`LossConfig.build`).
        size: prediction size (h, w) or (d, h, w) at which K is computed; default: the size of the
            feature maps (no resizing).
        pixels: optional list of pixel coordinates ``(y, x)`` (``(z, y, x)``) at the prediction
            size; then only the window around each is returned.
        mask_src, mask_dst: optional gates, as for the loss.
        backend: as for the loss.

    Shape:
        Returns N×(2r+1)^q×*size without ``pixels``: entry ``[n, o, i]`` is the affinity between
        pixel ``i`` and ``i + offset_o`` (offsets row-major over the window, see
        :func:`gcrf.loss.torch_backend.window_offsets`); with ``pixels`` (P of them):
        N×P×(2r+1)×(2r+1) (×(2r+1) for volumes), the window centred on each pixel. Entries for
        out-of-image neighbours and for the centre are 0.

    Returns:
        float32 tensor (float64 for float64 features).

    Example:
        >>> image = torch.rand(1, 3, 32, 32)
        >>> patches = gaussian_affinity({"rgb": image}, [{"weight": 1, "xy": 6, "rgb": 0.1}],
        ...                             radius=5, pixels=[(16, 16), (3, 30)])
        >>> patches.shape  # plt.imshow(patches[0, 0]) shows K around pixel (16, 16)
        torch.Size([1, 2, 11, 11])
    """
    config = LossConfig.build(kernels, radius, None, downsamplers, spacing)
    dense = affinity_of_config(features, config, size, mask_src, mask_dst, backend)
    if pixels is None:
        return dense
    batch, size = dense.shape[0], tuple(dense.shape[2:])
    rank = len(size)
    coordinates = [tuple(int(c) for c in p) for p in pixels]
    for p in coordinates:
        if len(p) != rank or any(not 0 <= c < s for c, s in zip(p, size, strict=True)):
            raise ValueError(f"pixels must be {rank}-tuples inside {size}; got {p!r}")
    diameter = 2 * config.radius + 1
    patches = [dense[(slice(None), slice(None), *p)] for p in coordinates]
    return torch.stack(patches, dim=1).reshape(batch, len(coordinates), *(diameter,) * rank)


def kernels_vis(affinity: Tensor, radius: int, output_size: Sequence[int]) -> Tensor:
    """Tile the kernel of every (2r+1)-th pixel into an image (the published ``kernels_vis``).

    The window of the pixels at ``(r + a·(2r+1), r + b·(2r+1))`` is placed at block ``(a, b)``, so
    the tiles cover the h×w map (cropped or zero-padded at the border), which is then upscaled
    (nearest) to ``output_size`` (docs/math.md#kernels-vis).

    Args:
        affinity: dense window affinity from :func:`gaussian_affinity` (images only).
        radius: the radius it was computed with.
        output_size: (H, W) of the output, usually the input image size.

    Shape:
        affinity: N×(2r+1)²×h×w → N×1×H×W.

    Returns:
        Tensor of affinity's dtype.

    Example:
        >>> a = gaussian_affinity({"rgb": torch.rand(1, 3, 64, 64)}, [{"weight": 1, "rgb": 0.1}], 2)
        >>> kernels_vis(a, 2, (128, 128)).shape
        torch.Size([1, 1, 128, 128])
    """
    diameter = 2 * radius + 1
    if affinity.dim() != 4 or affinity.shape[1] != diameter**2:
        raise ValueError(
            f"affinity must be N×{diameter**2}×h×w (images, radius {radius}); "
            f"got shape {tuple(affinity.shape)}"
        )
    batch, _, height, width = affinity.shape
    vis = affinity[:, :, radius::diameter, radius::diameter]
    tiles_h, tiles_w = vis.shape[-2:]
    vis = vis.reshape(batch, diameter, diameter, tiles_h, tiles_w).permute(0, 3, 1, 4, 2)
    vis = vis.reshape(batch, 1, tiles_h * diameter, tiles_w * diameter)[:, :, :height, :width]
    vis = F.pad(vis, [0, width - vis.shape[3], 0, height - vis.shape[2]])
    return F.interpolate(vis, tuple(int(s) for s in output_size), mode="nearest")
