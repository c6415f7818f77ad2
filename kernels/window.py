"""The typed inputs of the Gated CRF core, shared by both backends (docs/CONTRACTS.md §1).

This module needs torch only (no Triton), so ``gcrf.loss`` builds these values and the PyTorch
backend (``gcrf.loss.torch_backend``) consumes them on any machine, while the Triton backend
(:mod:`gcrf.kernels.gated_crf`) consumes the same values on CUDA.

- :class:`GatedWindow`: everything the windowed, gated affinity ``G_ij · K_ij`` needs
  (docs/math.md#kernel, #gates) — the prepared features (each kernel's channels already divided
  by its σ), the kernels' channel ranges, weights and per-axis position scales, the radius and the
  0/1 gates. It is what ``window_affinity`` takes, and with a field what ``window_message`` takes
  (:func:`check_field`).
- :class:`PairwiseInputs`: a :class:`GatedWindow` plus the probabilities and the normalised
  compatibility μ̂: what ``gated_crf_pairwise_sum`` takes.

Both check their own consistency when built (shapes, ranges, one entry per kernel), so neither
backend repeats those checks and a malformed value never reaches a kernel. ``gcrf.loss`` builds them
from user inputs it has already validated; code that calls a backend directly builds them by hand.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "SPATIAL_RANKS",
    "GatedWindow",
    "PairwiseInputs",
    "accumulation_dtype",
    "check_field",
    "check_radius",
    "check_type",
    "describe",
    "flat_tables",
]

#: Spatial ranks of the contract: (h, w) images and (d, h, w) volumes.
SPATIAL_RANKS: tuple[int, ...] = (2, 3)
#: The dtypes of probabilities and fields: fp16/bf16/fp32 (accumulated in fp32) and fp64.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def describe(value: object) -> str:
    """What was received, for error messages: shape, dtype and device of a tensor, else its type."""
    if isinstance(value, Tensor):
        return f"shape {_shape(value)}, dtype {value.dtype}, device {value.device}"
    return type(value).__name__


def check_type(name: str, value: object, expected: type) -> None:
    """``TypeError`` naming ``name`` unless ``value`` is an ``expected`` (the backends take the
    contract's typed values only)."""
    if not isinstance(value, expected):
        raise TypeError(f"{name} must be a {expected.__name__}; got {type(value).__name__}")


def check_radius(radius: object) -> int:
    """The window radius as an int: ``TypeError`` if it is no integer, ``ValueError`` if < 1."""
    if isinstance(radius, bool) or not isinstance(radius, numbers.Integral):
        raise TypeError(f"radius must be an int >= 1; got {radius!r} ({type(radius).__name__})")
    if radius < 1:
        raise ValueError(f"radius must be an int >= 1; got {radius!r}")
    return int(radius)


@dataclass(frozen=True)
class GatedWindow:
    """The gated affinity ``G_ij · K_ij`` of every pixel to its (2r+1)^q window, as tables.

    ``K`` and ``G`` are those of docs/math.md#kernel and #gates: ``f_k`` is the channel range
    ``kernel_slices[k]`` of ``features``, ``s_k`` is ``kernel_pos_scales[k]``, ``w_k`` is
    ``kernel_weights[k]``.

    Args:
        features: N×F×*Ω per-pixel feature vectors, each kernel's channels already divided by its
            σ; F may be 0 (position-only kernels).
        kernel_slices: per kernel, the ``[start, stop)`` channel range of ``features``.
        kernel_weights: per kernel, ``w_k ≥ 0``.
        kernel_pos_scales: per kernel, per spatial axis, the factor turning an offset of δ
            prediction pixels into σ units (``spacing_a / σ_xy``); all 0.0 without a position term.
        radius: window radius r ≥ 1.
        mask_src: optional N×1×*Ω gate of the neighbour ``j``, values exactly 0 or 1.
        mask_dst: optional N×1×*Ω gate of the centre ``i``, likewise.

    Raises:
        TypeError, ValueError: an argument of the wrong type, shape or range (the message names it).

    Example:
        >>> window = GatedWindow(torch.rand(1, 3, 8, 8) / 0.1, ((0, 3),), (1.0,), ((1 / 6, 1 / 6),), 2)
        >>> window.spatial_shape
        (8, 8)
    """

    features: Tensor
    kernel_slices: tuple[tuple[int, int], ...]
    kernel_weights: tuple[float, ...]
    kernel_pos_scales: tuple[tuple[float, ...], ...]
    radius: int
    mask_src: Tensor | None = None
    mask_dst: Tensor | None = None

    def __post_init__(self) -> None:
        features = self.features
        if not isinstance(features, Tensor) or not features.is_floating_point():
            got = describe(features)
            raise TypeError(f"features must be a floating-point tensor; got {got}")
        rank = features.dim() - 2
        if rank not in SPATIAL_RANKS:
            raise ValueError(f"features must be N×F×h×w or N×F×d×h×w; got shape {_shape(features)}")
        radius = check_radius(self.radius)
        slices = tuple((int(start), int(stop)) for start, stop in self.kernel_slices)
        weights = tuple(float(w) for w in self.kernel_weights)
        scales = tuple(tuple(float(s) for s in per_axis) for per_axis in self.kernel_pos_scales)
        if not weights or len(slices) != len(weights) or len(scales) != len(weights):
            raise ValueError(
                "kernel_slices, kernel_weights and kernel_pos_scales must have one entry per "
                f"kernel (at least one); got {len(slices)}, {len(weights)}, {len(scales)}"
            )
        channels = features.shape[1]
        for start, stop in slices:
            if not 0 <= start <= stop <= channels:
                raise ValueError(
                    f"kernel_slices entry ({start}, {stop}) is not a channel range of features "
                    f"with {channels} channels"
                )
        for per_axis in scales:
            if len(per_axis) != rank:
                raise ValueError(
                    f"kernel_pos_scales needs {rank} entries per kernel (one per spatial axis); "
                    f"got {per_axis}"
                )
        expected = (features.shape[0], 1, *features.shape[2:])
        for name in ("mask_src", "mask_dst"):
            mask = getattr(self, name)
            if mask is None:
                continue
            if not isinstance(mask, Tensor) or _shape(mask) != expected:
                raise ValueError(
                    f"{name} must be a tensor of shape {expected} (N×1×*Ω of features); "
                    f"got {describe(mask)}"
                )
            if mask.device != features.device:
                raise ValueError(f"{name} is on {mask.device} but features on {features.device}")
        # Normalised to plain tuples of ints/floats: hashable, and the same value whatever
        # sequences the caller passed.
        object.__setattr__(self, "kernel_slices", slices)
        object.__setattr__(self, "kernel_weights", weights)
        object.__setattr__(self, "kernel_pos_scales", scales)
        object.__setattr__(self, "radius", radius)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Ω: (h, w) or (d, h, w)."""
        return tuple(self.features.shape[2:])

    @property
    def spatial_rank(self) -> int:
        """2 for images, 3 for volumes."""
        return self.features.dim() - 2

    @property
    def num_offsets(self) -> int:
        """Window size (2r+1)^q, the channel count of the affinity."""
        return (2 * self.radius + 1) ** self.spatial_rank


@dataclass(frozen=True)
class PairwiseInputs:
    """The inputs of ``gated_crf_pairwise_sum``: probabilities, the gated window, μ̂.

    Args:
        probs: N×C×*Ω class probabilities (fp16/bf16/fp32/fp64), the only input with a gradient.
        window: the gated Gaussian window at the same N and Ω.
        compatibility: the normalised compatibility μ̂ = (C−1)·μ/rowsum(μ) (C×C), or None (Potts).

    Raises:
        TypeError, ValueError: an argument of the wrong type or shape (the message names it).

    Example:
        >>> window = GatedWindow(torch.rand(2, 3, 8, 8) / 0.1, ((0, 3),), (1.0,), ((1 / 6, 1 / 6),), 2)
        >>> inputs = PairwiseInputs(torch.softmax(torch.randn(2, 4, 8, 8), 1), window)
    """

    probs: Tensor
    window: GatedWindow
    compatibility: Tensor | None = None

    def __post_init__(self) -> None:
        probs = self.probs
        check_type("window", self.window, GatedWindow)
        check_field(self.window, probs, "probs")
        compatibility = self.compatibility
        if compatibility is not None:
            c = probs.shape[1]
            if not isinstance(compatibility, Tensor) or _shape(compatibility) != (c, c):
                raise ValueError(f"compatibility must be {c}×{c}; got {describe(compatibility)}")


def check_field(window: GatedWindow, field: object, name: str = "field") -> None:
    """Check that ``field`` is an N×C×*Ω float tensor on the window's N, Ω and device.

    The input of ``window_message`` (``name="field"``) and the probabilities of
    :class:`PairwiseInputs` (``name="probs"``); raises ``TypeError``/``ValueError`` naming it.
    """
    check_type("window", window, GatedWindow)
    if not isinstance(field, Tensor) or field.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float16/bfloat16/float32/float64 tensor; got {describe(field)}"
        )
    if field.dim() - 2 not in SPATIAL_RANKS:
        raise ValueError(
            f"{name} must be N×C×h×w or N×C×d×h×w (spatial rank one of {SPATIAL_RANKS}); "
            f"got shape {_shape(field)}"
        )
    features = window.features
    if field.dim() != features.dim() or (
        (field.shape[0], *field.shape[2:]) != (features.shape[0], *features.shape[2:])
    ):
        raise ValueError(
            f"{name} must be N×C×*Ω with the N and Ω of the window's features "
            f"{_shape(features)}; got shape {_shape(field)}"
        )
    if field.device != features.device:
        raise ValueError(f"{name} is on {field.device} but features on {features.device}")


def flat_tables(window: GatedWindow) -> tuple[list[int], list[float], list[float]]:
    """The kernel tables flattened for a custom-op schema: bounds, weights, position scales."""
    bounds = [v for pair in window.kernel_slices for v in pair]
    scales = [s for per_axis in window.kernel_pos_scales for s in per_axis]
    return bounds, list(window.kernel_weights), scales
