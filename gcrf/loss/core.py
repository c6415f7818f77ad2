"""The computational core, public: the gated window of user-level inputs and its message.

The loss, the affinity pictures and the mean-field CRF all run on one windowed, gated Gaussian
filter (docs/math.md#message). These two functions give it to researchers who build other pairwise
terms on it (normalised cut, affinity propagation; docs/crf.md shows one):

- :func:`gated_window`: the :class:`~gcrf.kernels.window.GatedWindow` (features divided by σ, kernel
  tables, 0/1 gates) for kernel descriptors and feature maps, prepared exactly as the loss prepares
  them (same resizing, positions, spacing and gates);
- :func:`window_message`: ``M_i = Σ_{j∈W(i)} G_ij K_ij v_j`` of a field on the chosen backend,
  differentiable w.r.t. the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gcrf.kernels.window import GatedWindow, check_field
from gcrf.loss.backends import choose_backend, get_backend
from gcrf.loss.functional import (
    Downsampler,
    KernelDescriptor,
    LossConfig,
    prepare_window,
)

__all__ = ["gated_window", "window_message", "window_of_config"]


def _reference_shape(
    features: Mapping[str, Tensor],
    config: LossConfig,
    size: Sequence[int] | None,
    masks: Sequence[Tensor | None],
) -> tuple[int, tuple[int, ...], torch.device, torch.dtype]:
    """Batch size, prediction size, device and dtype implied by the inputs."""
    tensors = [
        features[name]
        for kernel in config.kernels
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


def window_of_config(
    features: Mapping[str, Tensor],
    config: LossConfig,
    size: Sequence[int] | None = None,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
) -> GatedWindow:
    """The gated window of a validated configuration (see :func:`gated_window`)."""
    batch, size, device, dtype = _reference_shape(features, config, size, (mask_src, mask_dst))
    # The preparation reads only the prediction's shape, device and dtype: a zero-stride stand-in.
    stand_in = torch.zeros((), device=device, dtype=dtype).expand(batch, 1, *size)
    return prepare_window(stand_in, features, config, mask_src, mask_dst)


def gated_window(
    features: Mapping[str, Tensor],
    kernels: Sequence[KernelDescriptor],
    radius: int = 5,
    size: Sequence[int] | None = None,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    downsamplers: Mapping[str, Downsampler] | None = None,
    spacing: Sequence[float] | None = None,
) -> GatedWindow:
    """The gated window that the loss and the CRF use for these inputs, at prediction ``size``.

    Args:
        features: modality name → N×D×H×W (N×D×D'×H×W) feature map, as for the loss.
        kernels, radius, downsamplers, spacing: the configuration (:meth:`LossConfig.build`).
        size: prediction size (h, w) or (d, h, w); default: the feature maps' size (no resizing).
        mask_src, mask_dst: optional gates, as for the loss (docs/math.md#gates).

    Returns:
        The :class:`~gcrf.kernels.window.GatedWindow` (float32 features; float64 for float64
        feature maps), on the feature maps' device.

    Example:
        >>> image = torch.rand(1, 3, 32, 32)
        >>> window = gated_window({"rgb": image}, [{"weight": 1, "xy": 3, "rgb": 0.1}], radius=2)
        >>> window.spatial_shape, window.num_offsets
        ((32, 32), 25)
    """
    config = LossConfig.build(kernels, radius, None, downsamplers, spacing)
    return window_of_config(features, config, size, mask_src, mask_dst)


def window_message(window: GatedWindow, field: Tensor, backend: str = "auto") -> Tensor:
    """The message ``M_i = Σ_{j∈W(i)} G_ij K_ij v_j`` of a field (docs/math.md#message).

    Differentiable w.r.t. ``field`` (the backward is the same filter with the gate transposed);
    the affinity is never stored, memory O(N·C·|Ω|).

    Args:
        window: the gated window, e.g. from :func:`gated_window`.
        field: the per-pixel vector field ``v`` (fp16/bf16/fp32, accumulated in fp32; fp64 in fp64).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (:func:`gcrf.loss.choose_backend`).

    Shape:
        field: N×C×*Ω with the window's N and Ω → N×C×*Ω.

    Returns:
        ``M``, float32 (float64 for a float64 field).

    Example:
        >>> window = gated_window({"rgb": torch.rand(1, 3, 16, 16)}, [{"weight": 1, "xy": 3}], 2)
        >>> degree = window_message(window, torch.ones(1, 1, 16, 16))  # Σ_j G_ij K_ij
        >>> degree.shape
        torch.Size([1, 1, 16, 16])
    """
    check_field(window, field)
    core = get_backend(choose_backend(backend, field, field.dim() - 2))
    return core.window_message(window, field)
