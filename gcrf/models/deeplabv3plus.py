"""DeepLabv3+ (Chen et al., ECCV 2018, arXiv:1802.02611) on any timm ``features_only`` encoder.

Split as in segmentation_models_pytorch: encoder (timm) → :class:`ASPP` → :class:`DeepLabV3PlusDecoder`
→ 1×1 head. The network predicts logits at stride 4; ``forward`` returns them (``low``, what the
Gated CRF loss consumes) together with their bilinear upsampling to the input size (``high``, for
cross-entropy and evaluation).

Input sizes: the image is padded at the bottom and right to a multiple of the encoder's output
stride (zeros by default, i.e. the mean colour of an ImageNet-normalised image; ``"replicate"``
repeats the border), so every feature map has exactly ``size / stride`` pixels and the stride-4
grid stays anchored at the top-left pixel; the outputs are cropped back. ``low`` has
``ceil(H/4) × ceil(W/4)`` pixels (exactly ``H/4 × W/4`` when H and W are multiples of 4, which the
loss's integer-ratio rule needs), ``high`` has ``H × W``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcrf.models.batchnorm import freeze_batchnorm as freeze_batchnorm_layers
from gcrf.models.encoders import SKIP_REDUCTION, build_encoder, load_whole_model
from gcrf.models.interface import SegmentationOutput, check_image_batch

__all__ = ["ASPP", "DeepLabV3Plus", "DeepLabV3PlusDecoder", "SegmentationOutput"]

logger = logging.getLogger(__name__)

OUTPUT_STRIDES = (8, 16, 32)
PADDING_MODES = ("constant", "replicate")
_BASE_RATES = (6, 12, 18)  # the paper's atrous rates at output stride 16


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1
) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average → 1×1 conv → ReLU → broadcast to the map size.

    No BatchNorm here, unlike the paper: after global pooling each image contributes a single value
    per channel, so BatchNorm in training mode fails with a batch of 1 ("Expected more than 1
    value per channel") and is noise with a batch of 2–4. The convolution has a bias instead.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1×1 conv, three dilated 3×3 convs, image pooling; fused 1×1.

    Args:
        in_channels: channels of the deepest encoder feature.
        out_channels: channels of every branch and of the output (256 in the paper).
        rates: dilation rates of the three 3×3 branches ((6, 12, 18) at output stride 16).
        dropout: dropout after the fusing 1×1 conv (0.1, the keep probability 0.9 of the reference
            TensorFlow implementation).

    Shape:
        N×in_channels×h×w → N×out_channels×h×w.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: Sequence[int] = _BASE_RATES,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [
                _conv_bn_relu(in_channels, out_channels, 1),
                *(_conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in rates),
                ImagePooling(in_channels, out_channels),
            ]
        )
        self.project = _conv_bn_relu(len(self.branches) * out_channels, out_channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.project(torch.cat([branch(x) for branch in self.branches], dim=1)))


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabv3+ decoder: project the stride-4 skip, concatenate with upsampled ASPP, refine.

    Args:
        skip_channels: channels of the stride-4 encoder feature.
        aspp_channels: channels of the ASPP output.
        skip_projection: channels of the 1×1 projection of the skip (48: few, so the decoder does
            not drown the semantic ASPP features in low-level ones).
        out_channels: channels of the two 3×3 refinement convs (256).

    Shape:
        (N×skip_channels×h4×w4, N×aspp_channels×h×w) → N×out_channels×h4×w4.
    """

    def __init__(
        self,
        skip_channels: int,
        aspp_channels: int = 256,
        skip_projection: int = 48,
        out_channels: int = 256,
    ) -> None:
        super().__init__()
        self.skip = _conv_bn_relu(skip_channels, skip_projection, 1)
        self.refine = nn.Sequential(
            _conv_bn_relu(aspp_channels + skip_projection, out_channels, 3),
            _conv_bn_relu(out_channels, out_channels, 3),
        )

    def forward(self, skip: Tensor, aspp: Tensor) -> Tensor:
        aspp = F.interpolate(aspp, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(torch.cat([aspp, self.skip(skip)], dim=1))


def _init_decoder(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if isinstance(value, bool) or type(value) is not type(choices[0]) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ with a timm encoder; returns logits at stride 4 and at the input size.

    Args:
        encoder: any timm model name with ``features_only`` support and a stride-4 feature level
            (``"resnet18"``, ``"resnet101"``, ``"convnext_tiny"``, ``"efficientnet_b0"``, ...;
            a pretrained tag is allowed: ``"resnet50.tv_in1k"``).
        num_classes: number of output classes.
        output_stride: stride of the deepest encoder feature: 16 (the paper's training setting),
            8 (denser, slower) or 32 (no dilation; for encoders without dilation support).
        pretrained: ``False``, ``True`` (timm downloads ImageNet weights; offline this raises
            :class:`~gcrf.models.PretrainedWeightsError` explaining how to provide a file), or the
            path of a local weight file: ``.safetensors`` or a ``torch.save`` file (read with
            ``weights_only=True``) holding a whole-model, encoder or timm classification state dict
            (see :mod:`gcrf.models.weights`); strict: any mismatch raises ``ValueError``.
        in_channels: input channels (timm adapts pretrained first-layer weights).
        aspp_channels: channels of ASPP and decoder (256).
        skip_projection: channels of the projected stride-4 skip (48).
        aspp_rates: dilation rates of ASPP; default (6, 12, 18) × 16 / output_stride.
        aspp_dropout: dropout after ASPP (0.1).
        padding_mode: how inputs are padded to a multiple of the output stride: ``"constant"``
            (zeros) or ``"replicate"``; the outputs are cropped back.
        freeze_batchnorm: keep every BatchNorm layer in eval mode (running statistics, never
            updated, affine parameters still trained) for tiny batches; see
            :func:`gcrf.models.freeze_batchnorm` for finer control.
        encoder_kwargs: extra keyword arguments for ``timm.create_model`` (e.g.
            ``{"drop_path_rate": 0.1}``).

    Shape:
        Input: N×in_channels×H×W, any H, W ≥ 1, any memory format.
        Output: :class:`SegmentationOutput` with ``low`` N×num_classes×ceil(H/4)×ceil(W/4) and
        ``high`` N×num_classes×H×W.

    Example:
        >>> model = DeepLabV3Plus("resnet18", num_classes=21).eval()
        >>> low, high = model(torch.randn(1, 3, 65, 97))
        >>> tuple(low.shape), tuple(high.shape)
        ((1, 21, 17, 25), (1, 21, 65, 97))
    """

    def __init__(
        self,
        encoder: str = "resnet34",
        num_classes: int = 21,
        output_stride: int = 16,
        pretrained: bool | str | os.PathLike[str] = False,
        *,
        in_channels: int = 3,
        aspp_channels: int = 256,
        skip_projection: int = 48,
        aspp_rates: Sequence[int] | None = None,
        aspp_dropout: float = 0.1,
        padding_mode: Literal["constant", "replicate"] = "constant",
        freeze_batchnorm: bool = False,
        encoder_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("aspp_channels", aspp_channels),
            ("skip_projection", skip_projection),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        _check_choice("output_stride", output_stride, OUTPUT_STRIDES)
        _check_choice("padding_mode", padding_mode, PADDING_MODES)
        if not 0.0 <= aspp_dropout < 1.0:
            raise ValueError(f"aspp_dropout must be in [0, 1); got {aspp_dropout!r}")
        if aspp_rates is None:
            aspp_rates = tuple(max(1, r * 16 // output_stride) for r in _BASE_RATES)
        aspp_rates = tuple(aspp_rates)
        if not aspp_rates or not all(isinstance(r, int) and r >= 1 for r in aspp_rates):
            raise ValueError(f"aspp_rates must be positive integers; got {aspp_rates!r}")

        _, self.encoder, pending = build_encoder(
            encoder,
            output_stride,
            pretrained,
            in_channels,
            encoder_kwargs,
            model="DeepLabV3Plus",
        )
        skip_channels, deep_channels = (int(c) for c in self.encoder.feature_info.channels())
        self.aspp = ASPP(deep_channels, aspp_channels, aspp_rates, aspp_dropout)
        self.decoder = DeepLabV3PlusDecoder(
            skip_channels, aspp_channels, skip_projection, aspp_channels
        )
        self.head = nn.Conv2d(aspp_channels, num_classes, 1)
        _init_decoder(self.aspp)
        _init_decoder(self.decoder)

        load_whole_model(self, pending)  # whole-model weights: everything, strictly

        self.encoder_name = encoder
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.output_stride = output_stride
        self.aspp_rates = aspp_rates
        self.padding_mode = padding_mode
        self.low_stride = SKIP_REDUCTION
        # Transformers such as Swin return channels-last features (timm's ``output_fmt``).
        self._encoder_nhwc = str(getattr(self.encoder, "output_fmt", "NCHW")).endswith("NHWC")
        if freeze_batchnorm:
            freeze_batchnorm_layers(self)

    def forward(self, x: Tensor) -> SegmentationOutput:
        """Predict class logits.

        Args:
            x: images, N×in_channels×H×W, normalised as the encoder expects (ImageNet mean/std
                for pretrained timm weights).

        Returns:
            :class:`SegmentationOutput` ``(low, high)``: logits at stride 4 and at the input size.
        """
        check_image_batch(x, self.in_channels)
        height, width = x.shape[-2:]
        multiple = self.output_stride
        pad_h = (-height) % multiple
        pad_w = (-width) % multiple
        if pad_h or pad_w:
            # Bottom/right only: low pixel (i, j) keeps covering input pixels [4i, 4i+4) × [4j, 4j+4).
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=self.padding_mode)
        skip, deep = self.encoder(x)
        if self._encoder_nhwc:
            skip, deep = skip.permute(0, 3, 1, 2), deep.permute(0, 3, 1, 2)
        logits = self.head(self.decoder(skip, self.aspp(deep)))
        high = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        low_h = math.ceil(height / self.low_stride)
        low_w = math.ceil(width / self.low_stride)
        return SegmentationOutput(logits[..., :low_h, :low_w], high[..., :height, :width])
