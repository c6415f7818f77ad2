"""The Gated CRF loss as a function: validation, resizing, feature preparation, D, dispatch.

The specification is docs/math.md (#kernel, #gates, #loss, #denominator, #compatibility,
#volumes). This module turns user inputs (probabilities at the prediction resolution, feature
modalities and masks at the image resolution, kernel descriptors) into the typed values of the
backend contract (docs/CONTRACTS.md §1), calls the chosen backend for the pairwise sum S and divides
by D. The mean-field CRF (:mod:`gcrf.crf`) prepares its window with the same functions.

Positions. The position modality (``"xy"`` for images, ``"xyz"`` for volumes) is never passed by the
user: its distance depends only on the offset between two pixels, so it becomes a per-kernel,
per-axis scale (``s_k`` of docs/math.md#kernel): ``1/σ_xy`` in prediction pixels without
``spacing``, ``spacing_a · ratio_a / σ_xy`` with it (``ratio`` the input/prediction size ratio of
that axis), so σ_xy is then in the physical unit of ``spacing`` (docs/math.md#volumes).

Under ``torch.compile`` the value-dependent checks (non-finite features, negative or non-zero-diagonal
compatibility) are skipped, since they would force a graph break; shape, dtype and device checks
always run. Everything else is identical.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gcrf.kernels.window import (
    FLOAT_DTYPES,
    GatedWindow,
    PairwiseInputs,
    accumulation_dtype,
    check_radius,
    describe,
)
from gcrf.loss.backends import choose_backend, get_backend

__all__ = [
    "DEFAULT_KERNELS",
    "POSITION_KEYS",
    "Downsampler",
    "KernelDescriptor",
    "LossConfig",
    "PreparedInputs",
    "gated_crf_loss",
    "prepare_inputs",
    "prepare_window",
]

#: The published kernel: colour (σ 0.1, in the units of the image tensor passed as ``"rgb"``) and
#: position (σ 6 prediction pixels), weight 1. The recipes pass the ImageNet-normalised image, as the
#: published training did; WSL4MIS passes [0, 1] MRI intensities.
DEFAULT_KERNELS: tuple[dict[str, float], ...] = ({"weight": 1.0, "xy": 6.0, "rgb": 0.1},)
#: Name of the position modality per spatial rank.
POSITION_KEYS: dict[int, str] = {2: "xy", 3: "xyz"}
#: A kernel descriptor: ``{"weight": w, "xy": σ_xy, "rgb": σ_rgb, ...}``.
KernelDescriptor = Mapping[str, float]
#: A downsampler: ``f(tensor N×D×*Ω_in, size tuple) -> N×D×*size``, e.g. ``F.adaptive_max_pool2d``.
Downsampler = Callable[[Tensor, tuple[int, ...]], Tensor]


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


class _Kernel(NamedTuple):
    """A validated kernel descriptor."""

    weight: float
    position_key: str | None
    position_sigma: float
    modalities: tuple[tuple[str, float], ...]


def _check_positive_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be finite and > 0; got {value!r}")
    return value


def validate_kernels(kernels: Sequence[KernelDescriptor]) -> tuple[_Kernel, ...]:
    """Check kernel descriptors and return them in a normalised form.

    A descriptor is ``{"weight": w ≥ 0, "<modality>": σ > 0, ...}`` where the modality ``"xy"``
    (``"xyz"`` for volumes) is the pixel position and every other name is a key of ``features``.
    """
    if (
        isinstance(kernels, Mapping)
        or not isinstance(kernels, Sequence)
        or isinstance(kernels, str)
    ):
        raise TypeError(
            "kernels must be a list of descriptors like [{'weight': 1.0, 'xy': 6, 'rgb': 0.1}]; "
            f"got {type(kernels).__name__}"
        )
    if len(kernels) == 0:
        raise ValueError("kernels must hold at least one descriptor; got an empty list")
    result = []
    for index, descriptor in enumerate(kernels):
        where = f"kernels[{index}]"
        if not isinstance(descriptor, Mapping):
            raise TypeError(f"{where} must be a dict; got {type(descriptor).__name__}")
        if "weight" not in descriptor:
            raise ValueError(f"{where} has no 'weight'; got {dict(descriptor)!r}")
        weight = descriptor["weight"]
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"{where}['weight'] must be a real number; got {weight!r}")
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}['weight'] must be finite and >= 0; got {weight!r}")
        position_key = None
        position_sigma = 0.0
        modalities = []
        for name, sigma in descriptor.items():
            if name == "weight":
                continue
            if not isinstance(name, str):
                raise TypeError(f"{where}: modality names must be strings; got {name!r}")
            sigma = _check_positive_number(sigma, f"{where}[{name!r}] (σ)")
            if name in POSITION_KEYS.values():
                if position_key is not None:
                    raise ValueError(
                        f"{where} has two position terms {position_key!r} and {name!r}"
                    )
                position_key, position_sigma = name, sigma
            else:
                modalities.append((name, sigma))
        if position_key is None and not modalities:
            raise ValueError(f"{where} has no modality, only a weight; got {dict(descriptor)!r}")
        result.append(_Kernel(weight, position_key, position_sigma, tuple(modalities)))
    return tuple(result)


def validate_spacing(spacing: Sequence[float] | None) -> tuple[float, ...] | None:
    """Check the per-axis voxel spacing (positive finite numbers) or None."""
    if spacing is None:
        return None
    if isinstance(spacing, str) or not isinstance(spacing, Sequence):
        raise TypeError(f"spacing must be a sequence of numbers, one per axis; got {spacing!r}")
    return tuple(_check_positive_number(s, f"spacing[{a}]") for a, s in enumerate(spacing))


def check_compatibility(
    compatibility: Any, *, allow_grad: bool = False, zero_diagonal: bool = True
) -> Tensor | None:
    """Check μ: None, or a square, finite, non-negative floating matrix.

    The loss's μ (the defaults) must also have a zero diagonal and must not require grad; the CRF's
    (``allow_grad=True, zero_diagonal=False``) may be learnt and penalise agreeing neighbours. Value
    checks are skipped under ``torch.compile``.
    """
    if compatibility is None:
        return None
    if not isinstance(compatibility, Tensor):
        raise TypeError(
            f"compatibility must be a C×C torch.Tensor or None; got {type(compatibility).__name__}"
        )
    if compatibility.dim() != 2 or compatibility.shape[0] != compatibility.shape[1]:
        raise ValueError(f"compatibility must be a C×C matrix; got {describe(compatibility)}")
    if not compatibility.is_floating_point():
        raise TypeError(f"compatibility must be a floating tensor; got {describe(compatibility)}")
    if compatibility.requires_grad and not allow_grad:
        raise ValueError("compatibility must not require grad; pass compatibility.detach()")
    if not _is_compiling():
        values = compatibility.detach()
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"compatibility has non-finite values: {values.tolist()}")
        if bool((values < 0).any()):
            raise ValueError(f"compatibility must be >= 0; got {values.tolist()}")
        if zero_diagonal and bool((values.diagonal() != 0).any()):
            raise ValueError(
                f"compatibility must have a zero diagonal; got diagonal "
                f"{values.diagonal().tolist()}"
            )
    return compatibility


def validate_downsamplers(
    downsamplers: Mapping[str, Downsampler] | None,
) -> dict[str, Downsampler]:
    """Check the per-modality downsamplers (``"mask"`` applies to both masks)."""
    if downsamplers is None:
        return {}
    if not isinstance(downsamplers, Mapping):
        raise TypeError(
            f"downsamplers must be a dict of modality -> callable; got {type(downsamplers).__name__}"
        )
    for name, function in downsamplers.items():
        if not callable(function):
            raise TypeError(f"downsamplers[{name!r}] must be callable; got {function!r}")
    return dict(downsamplers)


@dataclass(frozen=True)
class LossConfig:
    """The validated configuration of the window and the loss: everything but the data.

    Build it with :meth:`build`, which validates each part and documents each argument (the one
    statement of them: :class:`~gcrf.loss.GatedCRFLoss`, :func:`~gcrf.loss.gated_crf_loss`,
    :func:`~gcrf.loss.gaussian_affinity`, the drop-in class and :mod:`gcrf.crf` take the same
    arguments and build one).
    """

    kernels: tuple[_Kernel, ...]
    radius: int
    compatibility: Tensor | None = None
    downsamplers: Mapping[str, Downsampler] = field(default_factory=dict)
    spacing: tuple[float, ...] | None = None

    @classmethod
    def build(
        cls,
        kernels: Sequence[KernelDescriptor],
        radius: int = 5,
        compatibility: Tensor | None = None,
        downsamplers: Mapping[str, Downsampler] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> LossConfig:
        """Validate the user's configuration (``ValueError``/``TypeError`` naming the argument).

        Args:
            kernels: descriptors ``[{"weight": w_k, "xy": σ_xy, "rgb": σ_rgb, ...}, ...]``
                (docs/math.md#kernel): a weight ``w_k ≥ 0`` and one σ > 0 per modality; ``"xy"``
                (``"xyz"`` for volumes) is the pixel position, every other key names a tensor of
                the ``features`` passed with the data.
            radius: window radius r ≥ 1 (docs/math.md#window).
            compatibility: class compatibility μ (C×C, ≥ 0, zero diagonal; docs/math.md#compatibility)
                or None for Potts. The loss normalises it; it must not require grad.
            downsamplers: modality name → ``f(tensor, size)`` replacing the area resize for that
                modality (``"mask"`` for both masks), e.g. ``F.adaptive_max_pool2d``.
            spacing: physical size of one input voxel per axis, in tensor axis order
                (docs/math.md#volumes); None keeps positions in prediction pixels.

        Example:
            >>> LossConfig.build([{"weight": 1, "xy": 6, "rgb": 0.1}], radius=5).radius
            5
        """
        return cls(
            kernels=validate_kernels(kernels),
            radius=check_radius(radius),
            compatibility=check_compatibility(compatibility),
            downsamplers=validate_downsamplers(downsamplers),
            spacing=validate_spacing(spacing),
        )


@dataclass(frozen=True)
class PreparedInputs:
    """What the front end hands a backend (docs/CONTRACTS.md §1), plus the denominator D."""

    pairwise: PairwiseInputs
    denominator: Tensor

    @property
    def window(self) -> GatedWindow:
        """The gated window (features, kernel tables, radius, gates)."""
        return self.pairwise.window


def _check_prediction(tensor: Any, what: str) -> None:
    """The N×C×*Ω prediction (``what``: "probs" for the loss, "logits" for the CRF)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{what} must be a float16, bfloat16, float32 or float64 tensor; got {describe(tensor)}"
        )
    if tensor.dim() not in (4, 5):
        raise ValueError(
            f"{what} must be N×C×h×w (images) or N×C×d×h×w (volumes); "
            f"got {tensor.dim()} dimensions ({describe(tensor)})"
        )
    if min(tensor.shape) < 1:
        raise ValueError(f"{what} must not be empty; got {describe(tensor)}")


def _input_ratio(name: str, shape: tuple[int, ...], pred: tuple[int, ...]) -> tuple[int, ...]:
    """Integer per-axis ratio input/prediction; images must keep the aspect ratio."""
    ratios = []
    for size_in, size_pred in zip(shape, pred, strict=True):
        if size_in % size_pred != 0:
            raise ValueError(
                f"{name} spatial size {shape} must be an integer multiple of the prediction size "
                f"{pred} on every axis"
            )
        ratios.append(size_in // size_pred)
    if len(pred) == 2 and ratios[0] != ratios[1]:
        raise ValueError(
            f"{name} spatial size {shape} must have the aspect ratio of the prediction size {pred} "
            f"(same integer factor on both axes); got factors {tuple(ratios)}"
        )
    return tuple(ratios)


def _check_map(
    name: str,
    tensor: Any,
    probs: Tensor,
    channels: int | None,
    allow_bool: bool = False,
    what: str = "probs",
) -> tuple[int, ...]:
    """Shared checks of a feature map or mask against the prediction ``probs`` (called ``what``
    in messages); returns its input/prediction ratio."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if not (tensor.is_floating_point() or (allow_bool and tensor.dtype == torch.bool)):
        raise TypeError(f"{name} must be a floating tensor; got {describe(tensor)}")
    if tensor.dim() != probs.dim():
        raise ValueError(
            f"{name} must have {probs.dim()} dimensions like {what} ({describe(probs)}); "
            f"got {describe(tensor)}"
        )
    if tensor.shape[0] != probs.shape[0]:
        raise ValueError(
            f"{name} batch size {tensor.shape[0]} differs from {what}' {probs.shape[0]}; "
            f"got {describe(tensor)}, {what} {describe(probs)}"
        )
    if channels is not None and tensor.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s); got {describe(tensor)}")
    if tensor.device != probs.device:
        raise ValueError(
            f"{name} is on {tensor.device} but {what} are on {probs.device}; move them to one device"
        )
    if tensor.requires_grad:
        raise ValueError(
            f"{name} requires grad, but gcrf is not differentiated w.r.t. it; pass {name}.detach()"
        )
    return _input_ratio(name, tuple(tensor.shape[2:]), tuple(probs.shape[2:]))


def _area_resize(tensor: Tensor, size: tuple[int, ...]) -> Tensor:
    if tuple(tensor.shape[2:]) == size:
        return tensor
    if len(size) == 2:
        return F.adaptive_avg_pool2d(tensor, size)
    return F.adaptive_avg_pool3d(tensor, size)


def _resize(
    name: str,
    tensor: Tensor,
    size: tuple[int, ...],
    downsampler: Downsampler | None,
) -> Tensor:
    """Resize to the prediction size: the custom downsampler if given, else area (average)."""
    if downsampler is None:
        return _area_resize(tensor, size)
    out = downsampler(tensor, size)
    expected = (*tensor.shape[:2], *size)
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        got = describe(out) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"downsamplers[{name!r}] must return shape {expected}; got {got}")
    return out.to(tensor.dtype)


def _prepare_mask(
    name: str,
    mask: Tensor | None,
    probs: Tensor,
    downsampler: Downsampler | None,
    what: str = "probs",
) -> Tensor | None:
    """Resize like a modality, NaN → 0, every value < 1 → 0, the rest → 1; float32."""
    if mask is None:
        return None
    _check_map(name, mask, probs, channels=1, allow_bool=True, what=what)
    size = tuple(probs.shape[2:])
    # Binarise in at least float32 (float64 masks stay float64: 0.99999999 must not round to 1).
    resized = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    if tuple(mask.shape[2:]) != size:
        resized = _resize("mask", resized, size, downsampler)
    # NaN >= 1 is False, so NaN becomes 0 here too.
    return torch.where(resized >= 1.0, 1.0, 0.0).to(torch.float32)


def _check_features(features: Any) -> None:
    if not isinstance(features, Mapping):
        raise TypeError(
            "features must be a dict of modality name -> N×D×H×W tensor, e.g. {'rgb': images}; "
            f"got {type(features).__name__}"
        )


def _used_modalities(
    probs: Tensor, features: Mapping[str, Tensor], config: LossConfig, what: str = "probs"
) -> list[str]:
    """Names of the modalities the kernels use, in order; each must be in ``features``."""
    spatial_rank = probs.dim() - 2
    position_key = POSITION_KEYS[spatial_rank]
    used: list[str] = []
    for index, kernel in enumerate(config.kernels):
        if kernel.position_key is not None and kernel.position_key != position_key:
            raise ValueError(
                f"kernels[{index}] uses the position term {kernel.position_key!r}, but {what} have "
                f"spatial rank {spatial_rank}: use {position_key!r}"
            )
        for name, _ in kernel.modalities:
            if name not in features:
                raise ValueError(
                    f"kernels[{index}] uses modality {name!r}, which is not in features "
                    f"(got keys {sorted(map(str, features))})"
                )
            if name not in used:
                used.append(name)
    return used


def _input_ratio_of(
    probs: Tensor,
    features: Mapping[str, Tensor],
    used: Sequence[str],
    masks: Sequence[tuple[str, Tensor | None]],
    what: str = "probs",
) -> tuple[int, ...]:
    """Input/prediction size ratio per axis, from the used modalities (one size for all), else a
    mask, else 1 (then ``spacing`` is the size of a prediction voxel)."""
    input_shape: tuple[int, ...] | None = None
    ratio: tuple[int, ...] = (1,) * (probs.dim() - 2)
    for name in used:
        ratio = _check_map(f"features[{name!r}]", features[name], probs, None, what=what)
        shape = tuple(features[name].shape[2:])
        if input_shape is not None and shape != input_shape:
            raise ValueError(
                f"all modalities must share one spatial size; features[{name!r}] has {shape}, "
                f"{used[0]!r} has {input_shape}"
            )
        input_shape = shape
    if input_shape is None:
        for name, mask in masks:
            if isinstance(mask, Tensor) and mask.dim() == probs.dim():
                return _check_map(name, mask, probs, channels=1, allow_bool=True, what=what)
    return ratio


def _position_scales(config: LossConfig, ratio: tuple[int, ...]) -> tuple[tuple[float, ...], ...]:
    """Per kernel, per axis: the factor turning an offset in prediction pixels into σ units."""
    rank = len(ratio)
    scales: list[tuple[float, ...]] = []
    for kernel in config.kernels:
        if kernel.position_key is None:
            scales.append((0.0,) * rank)
        elif config.spacing is None:
            scales.append((1.0 / kernel.position_sigma,) * rank)
        else:
            scales.append(
                tuple(
                    s * r / kernel.position_sigma
                    for s, r in zip(config.spacing, ratio, strict=True)
                )
            )
    return tuple(scales)


def prepare_features(
    probs: Tensor,
    features: Mapping[str, Tensor],
    config: LossConfig,
    used: Sequence[str],
) -> tuple[Tensor, tuple[tuple[int, int], ...]]:
    """Each kernel's modalities resized to the prediction size, divided by σ, concatenated.

    Returns the N×F×*Ω feature tensor (float32, float64 for float64 probs; F may be 0) and each
    kernel's ``[start, stop)`` channel range in it.
    """
    size = tuple(probs.shape[2:])
    acc = accumulation_dtype(probs.dtype)
    resized: dict[str, Tensor] = {}
    for name in used:
        tensor = _resize(name, features[name].to(acc), size, config.downsamplers.get(name))
        if not _is_compiling() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"features[{name!r}] has NaN or infinite values (after resizing to {size}); "
                "replace them (e.g. torch.nan_to_num) before the loss"
            )
        resized[name] = tensor
    chunks: list[Tensor] = []
    slices: list[tuple[int, int]] = []
    start = 0
    for kernel in config.kernels:
        for name, sigma in kernel.modalities:
            chunks.append(resized[name] / sigma)
        stop = start + sum(resized[name].shape[1] for name, _ in kernel.modalities)
        slices.append((start, stop))
        start = stop
    if not chunks:
        return probs.new_zeros((probs.shape[0], 0, *size), dtype=acc), tuple(slices)
    return torch.cat(chunks, dim=1).contiguous(), tuple(slices)


def prepare_gates(
    probs: Tensor,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
    downsampler: Downsampler | None,
    what: str = "probs",
) -> tuple[Tensor | None, Tensor | None]:
    """Both masks resized to the prediction size and binarised (docs/math.md#gates), 0/1 float32."""
    return (
        _prepare_mask("mask_src", mask_src, probs, downsampler, what),
        _prepare_mask("mask_dst", mask_dst, probs, downsampler, what),
    )


def denominator(probs: Tensor, mask_src: Tensor | None, mask_dst: Tensor | None) -> Tensor:
    """D of prepared gates (docs/math.md#denominator)."""
    acc = accumulation_dtype(probs.dtype)
    if mask_dst is not None:
        return mask_dst.sum(dtype=acc).clamp(min=1.0)
    if mask_src is not None:
        return mask_src.sum(dtype=acc).clamp(min=1.0)
    count = float(math.prod(probs.shape[:1] + probs.shape[2:]))
    return torch.tensor(count, dtype=acc, device=probs.device)


def normalise_compatibility(compatibility: Tensor | None, probs: Tensor) -> Tensor | None:
    """μ̂ = (C−1)·μ/rowsum(μ) on probs' device in the accumulation dtype (None stays None)."""
    if compatibility is None:
        return None
    num_classes = probs.shape[1]
    if tuple(compatibility.shape) != (num_classes, num_classes):
        raise ValueError(
            f"compatibility must be C×C = {num_classes}×{num_classes} for probs of "
            f"{describe(probs)}; got {describe(compatibility)}"
        )
    mu = compatibility.detach().to(device=probs.device, dtype=accumulation_dtype(probs.dtype))
    row_sum = mu.sum(dim=1, keepdim=True)
    # An all-zero row (a class compatible with every other) stays zero.
    mu_hat = torch.where(row_sum > 0, (num_classes - 1) * mu / row_sum.clamp(min=1e-30), 0.0)
    return mu_hat.contiguous()


def prepare_window(
    prediction: Tensor,
    features: Mapping[str, Tensor],
    config: LossConfig,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    what: str = "probs",
) -> GatedWindow:
    """Validate the data tensors and build the gated window at the prediction's size.

    Features (:func:`prepare_features`) and gates (:func:`prepare_gates`) are resized to the
    spatial size of ``prediction`` (N×C×*Ω: the loss's probabilities, the CRF's logits; only its
    shape, device and dtype are read), in its accumulation dtype. ``what`` names it in errors.
    """
    _check_prediction(prediction, what)
    _check_features(features)
    spatial_rank = prediction.dim() - 2
    if config.spacing is not None and len(config.spacing) != spatial_rank:
        raise ValueError(
            f"spacing must have one value per spatial axis ({spatial_rank} for {what} of "
            f"{describe(prediction)}); got {config.spacing!r}"
        )
    used = _used_modalities(prediction, features, config, what)
    masks = (("mask_src", mask_src), ("mask_dst", mask_dst))
    ratio = _input_ratio_of(prediction, features, used, masks, what)
    prepared_features, slices = prepare_features(prediction, features, config, used)
    gate_src, gate_dst = prepare_gates(
        prediction, mask_src, mask_dst, config.downsamplers.get("mask"), what
    )
    return GatedWindow(
        features=prepared_features,
        kernel_slices=slices,
        kernel_weights=tuple(k.weight for k in config.kernels),
        kernel_pos_scales=_position_scales(config, ratio),
        radius=config.radius,
        mask_src=gate_src,
        mask_dst=gate_dst,
    )


def prepare_inputs(
    probs: Tensor,
    features: Mapping[str, Tensor],
    config: LossConfig,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
) -> PreparedInputs:
    """The loss's backend inputs and D: :func:`prepare_window`, :func:`denominator` and
    :func:`normalise_compatibility` (the configuration is already validated)."""
    window = prepare_window(probs, features, config, mask_src, mask_dst)
    pairwise = PairwiseInputs(probs, window, normalise_compatibility(config.compatibility, probs))
    return PreparedInputs(pairwise, denominator(probs, window.mask_src, window.mask_dst))


def loss_from_prepared(prepared: PreparedInputs, backend: str) -> Tensor:
    """S / D with the backend resolved from ``backend`` ("auto", "triton" or "torch")."""
    probs = prepared.pairwise.probs
    core = get_backend(choose_backend(backend, probs, probs.dim() - 2))
    total = core.pairwise_sum(prepared.pairwise)
    return total / prepared.denominator.to(total.dtype)


def gated_crf_loss(
    probs: Tensor,
    features: Mapping[str, Tensor],
    kernels: Sequence[KernelDescriptor],
    radius: int = 5,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    compatibility: Tensor | None = None,
    downsamplers: Mapping[str, Downsampler] | None = None,
    spacing: Sequence[float] | None = None,
    backend: str = "auto",
) -> Tensor:
    """Gated CRF loss (Obukhov et al., arXiv:1906.04651): ``S / D`` of docs/math.md#loss, exact,
    with memory O(N·C·|Ω|).

    Args:
        probs: class probabilities (softmax output) at the prediction resolution; the only input
            the loss is differentiated with respect to.
        features: modality name → feature map at the image resolution, e.g. ``{"rgb": images}``.
            Each is resized to the prediction resolution (area by default). Must not require grad.
            Keys not used by any kernel are ignored. ``"xy"``/``"xyz"`` is built internally.
        kernels, radius, compatibility, downsamplers, spacing: the configuration, documented once
            at :meth:`LossConfig.build`.
        mask_src: gate of the neighbour j, N×1×H×W (float or bool): resized, NaN → 0, < 1 → 0
            (docs/math.md#gates).
        mask_dst: gate of the centre i, like ``mask_src``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`gcrf.loss.choose_backend`).

    Shape:
        probs: N×C×h×w or N×C×d×h×w. features[m]: N×D_m×H×W (N×D_m×D×H×W), integer multiples of
        the prediction size (images: same factor on both axes). masks: N×1×(same as features or
        prediction size).

    Returns:
        0-dim tensor (float32; float64 for float64 probs).

    Example:
        >>> images = torch.rand(2, 3, 64, 64)
        >>> probs = torch.softmax(torch.randn(2, 5, 16, 16), dim=1)
        >>> loss = gated_crf_loss(probs, {"rgb": images}, [{"weight": 1, "xy": 6, "rgb": 0.1}], 5)
    """
    config = LossConfig.build(kernels, radius, compatibility, downsamplers, spacing)
    return loss_from_prepared(prepare_inputs(probs, features, config, mask_src, mask_dst), backend)
