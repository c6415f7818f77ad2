"""timm ``features_only`` encoders sized for DeepLabv3+: the stride-4 skip and the deepest feature.

An encoder is any timm model that supports ``features_only=True``. Its ``feature_info`` tells, per
feature level, the channel count and the reduction (stride w.r.t. the input); the decoder sizes itself
from those numbers, never from a table of known encoders. Two levels are kept (``out_indices``):

- the *skip*: the level whose reduction is 4 (ResNets also expose a stride-2 stem level before it,
  ConvNeXt starts at stride 4: the index is looked up, not assumed);
- the *deepest* level, whose stride is brought down to ``output_stride`` (8 or 16) by timm's
  dilation support (the strides of the last stages become dilations).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gcrf.models.weights import (
    PretrainedWeightsError,
    check_state_dict_fits,
    encoder_weights_hint,
    identify_layout,
    read_state_dict,
    shorten,
)

try:
    import timm
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("gcrf.models needs timm: pip install 'gcrf[train]' (or timm)") from error

__all__ = [
    "SKIP_REDUCTION",
    "EncoderSpec",
    "build_encoder",
    "create_encoder",
    "load_whole_model",
    "probe_encoder",
]

logger = logging.getLogger(__name__)

SKIP_REDUCTION = 4
"""Stride of the low-level feature DeepLabv3+ concatenates in its decoder (and of ``low``)."""


@dataclass(frozen=True)
class EncoderSpec:
    """What the decoder needs to know about an encoder, read from timm's ``feature_info``.

    Attributes:
        name: timm model name.
        skip_index: index (into the encoder's full list of feature levels) of the stride-4 level.
        deep_index: index of the deepest level.
        natural_stride: reduction of the deepest level without dilation (typically 32).
        reductions: reductions of all levels without dilation.
        channels: channel counts of all levels.
    """

    name: str
    skip_index: int
    deep_index: int
    natural_stride: int
    reductions: tuple[int, ...]
    channels: tuple[int, ...]


def probe_encoder(name: str, encoder_kwargs: Mapping[str, Any] | None = None) -> EncoderSpec:
    """Read an encoder's feature levels without allocating its weights.

    The probe is built on the ``meta`` device (shapes only: no memory, no download), falling back
    to the CPU for a model whose constructor needs real tensors.

    Args:
        name: timm model name, e.g. ``"resnet34"`` or ``"convnext_atto"``.
        encoder_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``in_chans``).

    Returns:
        The :class:`EncoderSpec` of the encoder.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: unknown name, no ``features_only`` support, or no stride-4 level.

    Example:
        >>> probe_encoder("resnet18").skip_index, probe_encoder("convnext_atto").skip_index
        (1, 0)
    """
    if not isinstance(name, str):
        raise TypeError(f"encoder must be a timm model name (str); got {type(name).__name__}")
    if not timm.is_model(name):
        similar = timm.list_models(f"*{name}*")[:10]
        hint = f"; similar names: {similar}" if similar else ""
        raise ValueError(f"encoder {name!r} is not a timm model (see timm.list_models()){hint}")
    kwargs = dict(encoder_kwargs or {})
    try:
        try:
            with torch.device("meta"):
                probe = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
        except (NotImplementedError, RuntimeError):
            probe = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    except (TypeError, AttributeError, RuntimeError, AssertionError) as error:
        raise ValueError(
            f"encoder {name!r} cannot be built as a timm features_only model: {error}"
        ) from error
    reductions = tuple(int(r) for r in probe.feature_info.reduction())
    channels = tuple(int(c) for c in probe.feature_info.channels())
    if SKIP_REDUCTION not in reductions:
        raise ValueError(
            f"encoder {name!r} has no stride-{SKIP_REDUCTION} feature level for the DeepLabv3+ skip "
            f"connection; its feature reductions are {list(reductions)}"
        )
    return EncoderSpec(
        name=name,
        skip_index=reductions.index(SKIP_REDUCTION),
        deep_index=len(reductions) - 1,
        natural_stride=reductions[-1],
        reductions=reductions,
        channels=channels,
    )


def create_encoder(
    spec: EncoderSpec,
    output_stride: int,
    pretrained: bool = False,
    state_dict: Mapping[str, Tensor] | None = None,
    encoder_kwargs: Mapping[str, Any] | None = None,
    weights_origin: str = "the given state dict",
    all_levels: bool = False,
) -> nn.Module:
    """The timm ``features_only`` model returning [stride-4 skip, deepest feature] (or every level).

    Args:
        spec: the encoder's levels, from :func:`probe_encoder`.
        output_stride: stride of the deepest feature: 8 or 16 (dilated), or the encoder's natural
            stride (usually 32, no dilation).
        pretrained: ``True`` to let timm download ImageNet weights (Hugging Face hub / URL).
        state_dict: weights in timm's classification-model layout, loaded by timm itself (its
            checkpoint filter maps original checkpoints; the classifier is dropped), strictly.
        encoder_kwargs: extra keyword arguments for ``timm.create_model``.
        weights_origin: how error messages name ``state_dict`` (e.g. the file it came from).
        all_levels: return every feature level (a UNet decoder), not just the skip and the deepest.

    Returns:
        The timm module; its ``feature_info`` lists the two kept levels. Its output is a list of
        two tensors, NCHW (or NHWC where the module's ``output_fmt`` says so, e.g. Swin).

    Raises:
        ValueError: unsupported ``output_stride``, or ``state_dict`` does not fit the encoder.
        PretrainedWeightsError: ``pretrained=True`` and timm could not fetch the weights.

    Example:
        >>> encoder = create_encoder(probe_encoder("resnet18"), output_stride=16)
        >>> encoder.feature_info.reduction(), encoder.feature_info.channels()
        ([4, 16], [64, 512])
    """
    kwargs: dict[str, Any] = dict(encoder_kwargs or {})
    if output_stride != spec.natural_stride:
        # Ask for dilation only when needed: encoders without it (e.g. Swin) reject the argument.
        kwargs["output_stride"] = output_stride
    if state_dict is not None:
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"state_dict": dict(state_dict)}
    try:
        encoder = timm.create_model(
            spec.name,
            features_only=True,
            out_indices=(
                tuple(range(spec.deep_index + 1))
                if all_levels
                else (spec.skip_index, spec.deep_index)
            ),
            pretrained=pretrained,
            **kwargs,
        )
    except TypeError as error:
        if "output_stride" in str(error):
            raise ValueError(
                f"encoder {spec.name!r} does not support dilation, so output_stride must be its "
                f"natural stride {spec.natural_stride}; got output_stride={output_stride}"
            ) from error
        raise
    except (OSError, RuntimeError) as error:
        if state_dict is not None:
            raise ValueError(
                f"{weights_origin} was read as a timm classification-model state dict but timm "
                f"could not load it into encoder {spec.name!r}: {shorten(str(error))}"
            ) from error
        if pretrained:
            raise PretrainedWeightsError(
                f"could not fetch the pretrained weights of encoder {spec.name!r} "
                f"({type(error).__name__}: {shorten(str(error), 300)}). "
                f"{encoder_weights_hint(spec.name)}"
            ) from error
        raise
    reductions = [int(r) for r in encoder.feature_info.reduction()]
    expected = [SKIP_REDUCTION, output_stride]
    if all_levels:
        expected = [min(r, output_stride) for r in spec.reductions]
    if reductions != expected:
        raise ValueError(
            f"encoder {spec.name!r} built with output_stride={output_stride} has feature "
            f"reductions {reductions}, expected {expected}: it does not support this output stride"
        )
    return encoder


#: Whole-model weights still to load once the model around the encoder exists: (state dict, origin).
PendingWeights = tuple[dict[str, Tensor], str]


def build_encoder(
    name: str,
    output_stride: int,
    pretrained: bool | str | os.PathLike[str],
    in_channels: int,
    encoder_kwargs: Mapping[str, Any] | None,
    *,
    model: str,
    all_levels: bool = False,
) -> tuple[EncoderSpec, nn.Module, PendingWeights | None]:
    """The encoder of a segmentation model, with its pretrained weights where they are encoder or
    timm weights (one home for every model of the zoo).

    ``pretrained``: ``False``; ``True`` (timm downloads ImageNet weights and adapts the first
    convolution to ``in_channels`` the way timm does: summed or repeated over input channels); or a
    weight file (``.safetensors`` or ``torch.save``) holding an encoder, a timm classification or a
    whole-model state dict. Whole-model weights cannot be loaded before the model around the
    encoder exists: they are returned, for :func:`load_whole_model`.

    Args:
        name: timm encoder name.
        output_stride: stride of the deepest feature.
        pretrained: see above.
        in_channels: input channels (``in_chans`` of timm; 1 for MR/CT slices).
        encoder_kwargs: extra keyword arguments for ``timm.create_model``; must not set what the
            model sets itself.
        model: the model's name, for error messages.
        all_levels: keep every feature level (UNet) instead of the stride-4 skip and the deepest.

    Returns:
        ``(spec, encoder, pending whole-model weights or None)``.
    """
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(
            f"pretrained must be a bool or the path of a weight file; got {type(pretrained).__name__}"
        )
    kwargs = dict(encoder_kwargs or {})
    for reserved in ("in_chans", "features_only", "out_indices", "output_stride", "pretrained"):
        if reserved in kwargs:
            raise ValueError(
                f"encoder_kwargs must not set {reserved!r} ({model} sets it; use its own arguments "
                f"in_channels, output_stride, pretrained); got {dict(encoder_kwargs or {})!r}"
            )
    kwargs["in_chans"] = in_channels
    spec = probe_encoder(name, kwargs)
    if output_stride > spec.natural_stride:
        raise ValueError(
            f"output_stride={output_stride} exceeds the stride of encoder {name!r}'s deepest "
            f"feature ({spec.natural_stride})"
        )
    if isinstance(pretrained, bool):
        encoder = create_encoder(
            spec, output_stride, pretrained, None, kwargs, all_levels=all_levels
        )
        return spec, encoder, None
    origin = f"weight file {os.fspath(pretrained)!r}"
    weights = read_state_dict(pretrained)
    encoder = create_encoder(spec, output_stride, False, None, kwargs, all_levels=all_levels)
    layout = identify_layout(weights, encoder)
    logger.info("loading %s (%s layout)", origin, layout)
    if layout == "encoder":
        check_state_dict_fits(weights, encoder, origin, layout)
        encoder.load_state_dict(weights)
        return spec, encoder, None
    if layout == "timm":
        encoder = create_encoder(
            spec, output_stride, False, weights, kwargs, origin, all_levels=all_levels
        )
        return spec, encoder, None
    return spec, encoder, (weights, origin)


def load_whole_model(model: nn.Module, pending: PendingWeights | None) -> None:
    """Load the whole-model weights :func:`build_encoder` returned (strictly), if any."""
    if pending is not None:
        weights, origin = pending
        check_state_dict_fits(weights, model, origin, "whole-model")
        model.load_state_dict(weights)
