"""The Gaussian affinity K of the Gated CRF loss, for inspection and visualisation.

:func:`gaussian_affinity` returns the gated kernel ``G_ij · K_ij`` of DESIGN §1 either as a dense
window map (every pixel × every window offset) or as (2r+1)×(2r+1) patches around chosen pixels,
ready for ``imshow``. :func:`kernels_vis` tiles a window map into the published ``kernels_vis``
image (DESIGN §1.7). Both use the same backend ``window_affinity`` as the loss, so what is shown is
exactly what the loss weighs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gcrf.loss.backends import choose_backend, get_backend
from gcrf.loss.functional import (
    Downsampler,
    KernelDescriptor,
    LossConfig,
    PreparedInputs,
    prepare_inputs,
)

__all__ = ["affinity_from_prepared", "affinity_of_config", "gaussian_affinity", "kernels_vis"]


def affinity_from_prepared(prepared: PreparedInputs, backend: str = "auto") -> Tensor:
    """Dense window affinity N×(2r+1)^k×*S of prepared inputs (see :func:`gaussian_affinity`)."""
    probs = prepared.pairwise.probs
    _, window_affinity = get_backend(choose_backend(backend, probs, probs.dim() - 2))
    return window_affinity(prepared.window)


def _reference_shape(
    features: Mapping[str, Tensor],
    kernels: Sequence,
    size: Sequence[int] | None,
    masks: Sequence[Tensor | None],
) -> tuple[int, tuple[int, ...], torch.device, torch.dtype]:
    """Batch size, prediction size, device and dtype implied by the inputs."""
    tensors = [
        features[name]
        for kernel in kernels
        for name, _ in kernel.modalities
        if isinstance(features.get(name), Tensor)
    ]
    tensors += [m for m in masks if isinstance(m, Tensor)]
    if size is None:
        if not tensors:
            raise ValueError("size is required when no feature map or mask gives the image size")
        size = tuple(tensors[0].shape[2:])
    size = tuple(int(s) for s in size)
    if len(size) not in (2, 3) or min(size) < 1:
        raise ValueError(f"size must be (h, w) or (d, h, w) of positive ints; got {size!r}")
    if tensors:
        batch, device = tensors[0].shape[0], tensors[0].device
        dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    else:
        batch, device, dtype = 1, torch.device("cpu"), torch.float32
    return batch, size, device, dtype


def affinity_of_config(
    features: Mapping[str, Tensor],
    config: LossConfig,
    size: Sequence[int] | None = None,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Dense window affinity of a validated loss configuration (see :func:`gaussian_affinity`)."""
    batch, size, device, dtype = _reference_shape(
        features, config.kernels, size, (mask_src, mask_dst)
    )
    # The loss' preparation only needs probs for its shape, device and dtype: a zero-stride stand-in.
    stand_in = torch.zeros((), device=device, dtype=dtype).expand(batch, 1, *size)
    return affinity_from_prepared(
        prepare_inputs(stand_in, features, config, mask_src, mask_dst), backend
    )


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
        kernels: kernel descriptors, as for the loss.
        radius: window radius r.
        size: prediction size (h, w) or (d, h, w) at which K is computed; default: the size of the
            feature maps (no resizing).
        pixels: optional list of pixel coordinates ``(y, x)`` (``(z, y, x)``) at the prediction
            size; then only the window around each is returned.
        mask_src: optional gate of the neighbour, as for the loss.
        mask_dst: optional gate of the centre, as for the loss.
        downsamplers: as for the loss.
        spacing: as for the loss.
        backend: as for the loss.

    Shape:
        Returns N×(2r+1)^k×*size without ``pixels``: entry ``[n, o, i]`` is the affinity between
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
    (nearest) to ``output_size`` (DESIGN §1.7).

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
