"""UNet (Ronneberger et al., MICCAI 2015) on any timm ``features_only`` encoder.

The medical-imaging baseline (WSL4MIS, PyMIC, nnU-Net all train UNets): the encoder's feature levels
are decoded from the deepest up, each decoder block upsampling ×2 (nearest), concatenating the skip
of that resolution and applying two 3×3 conv–BN–ReLU; blocks without a skip (below the encoder's
first level) bring the map to the input size. A 1×1 head gives logits at the input size, returned as
both fields of :class:`~gcrf.models.SegmentationOutput`: the Gated CRF loss reads full-resolution
probabilities, as the medical training code does.

Input sizes: the image is padded at the bottom and right to a multiple of the encoder's stride
(32 for most encoders) and the logits are cropped back, so any H×W works.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcrf.models.batchnorm import freeze_batchnorm as freeze_batchnorm_layers
from gcrf.models.encoders import build_encoder, load_whole_model
from gcrf.models.interface import SegmentationOutput, check_image_batch

__all__ = ["UNet", "UNetDecoderBlock"]

PADDING_MODES = ("constant", "replicate")


class UNetDecoderBlock(nn.Module):
    """Upsample ×``scale`` (nearest), concatenate the skip (if any), two 3×3 conv–BN–ReLU.

    Args:
        in_channels: channels of the incoming (deeper) map.
        skip_channels: channels of the skip (0: none).
        out_channels: channels of the output.
        scale: upsampling factor (the ratio of the two levels' strides).

    Shape:
        x: N×in_channels×h×w, skip: N×skip_channels×(scale·h)×(scale·w) → N×out_channels×(scale·h)×(scale·w).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = []
        channels = in_channels + skip_channels
        for _ in range(2):
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            channels = out_channels
        self.convs = nn.Sequential(*layers)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.scale > 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class UNet(nn.Module):
    """UNet with a timm encoder; returns logits at the input size.

    Args:
        encoder: any timm model name with ``features_only`` support (``"resnet18"``,
            ``"resnet34"``, ``"efficientnet_b0"``, ``"convnext_atto"``, ...).
        num_classes: number of output classes.
        pretrained: ``False``, ``True`` (timm's ImageNet weights, the first convolution adapted to
            ``in_channels`` as timm does) or the path of a weight file (see
            :func:`gcrf.models.encoders.build_encoder`).
        in_channels: input channels (1 for MR slices).
        decoder_channels: channels of the decoder blocks from the deepest up; one per encoder
            level plus one per further ×2 step to the input size (default: halving from 256, at
            least 16). Fewer entries are an error.
        padding_mode: how inputs are padded to a multiple of the encoder stride: ``"constant"``
            (zeros) or ``"replicate"``; the outputs are cropped back.
        freeze_batchnorm: keep every BatchNorm layer in eval mode (tiny batches).
        encoder_kwargs: extra keyword arguments for ``timm.create_model``.

    Shape:
        Input: N×in_channels×H×W, any H, W ≥ 1. Output: :class:`SegmentationOutput` whose ``low``
        and ``high`` are the same N×num_classes×H×W logits.

    Example:
        >>> model = UNet("resnet18", num_classes=4, in_channels=1).eval()
        >>> out = model(torch.randn(1, 1, 75, 90))
        >>> tuple(out.high.shape), out.low is out.high
        ((1, 4, 75, 90), True)
    """

    def __init__(
        self,
        encoder: str = "resnet34",
        num_classes: int = 4,
        pretrained: bool | str | os.PathLike[str] = False,
        *,
        in_channels: int = 3,
        decoder_channels: Sequence[int] | None = None,
        padding_mode: Literal["constant", "replicate"] = "constant",
        freeze_batchnorm: bool = False,
        encoder_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {list(PADDING_MODES)}; got {padding_mode!r}"
            )
        spec, self.encoder, pending = build_encoder(
            encoder, 32, pretrained, in_channels, encoder_kwargs, model="UNet", all_levels=True
        )
        # build_encoder was asked for output stride 32; encoders whose natural stride differs
        # (e.g. 16) keep their own: the strides come from feature_info either way.
        reductions = [int(r) for r in self.encoder.feature_info.reduction()]
        channels = [int(c) for c in self.encoder.feature_info.channels()]
        if any(b % a for a, b in itertools.pairwise(reductions)) or any(
            r & (r - 1) for r in reductions
        ):
            raise ValueError(
                f"encoder {encoder!r} has feature strides {reductions}; UNet needs powers of two"
            )
        # Decoder: one block per encoder level (deepest first: upsample to the next level's
        # stride and take its skip), then ×2 blocks without skip down to stride 1.
        steps: list[tuple[int, int]] = []  # (skip channels, scale)
        for level in range(len(reductions) - 1, 0, -1):
            steps.append((channels[level - 1], reductions[level] // reductions[level - 1]))
        stride = reductions[0]
        while stride > 1:
            steps.append((0, 2))
            stride //= 2
        if decoder_channels is None:
            decoder_channels = [max(16, 256 >> k) for k in range(len(steps))]
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) < len(steps) or min(decoder_channels, default=1) < 1:
            raise ValueError(
                f"decoder_channels must give {len(steps)} positive channel counts for encoder "
                f"{encoder!r} (strides {reductions}); got {decoder_channels!r}"
            )
        blocks = []
        incoming = channels[-1]
        for (skip, scale), out in zip(steps, decoder_channels, strict=False):
            blocks.append(UNetDecoderBlock(incoming, skip, out, scale))
            incoming = out
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(incoming, num_classes, 1)
        for layer in [*self.decoder.modules(), self.head]:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        load_whole_model(self, pending)

        self.encoder_name = spec.name
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.padding_mode = padding_mode
        self.stride = reductions[-1]
        self.low_stride = 1
        self._encoder_nhwc = str(getattr(self.encoder, "output_fmt", "NCHW")).endswith("NHWC")
        if freeze_batchnorm:
            freeze_batchnorm_layers(self)

    def forward(self, x: Tensor) -> SegmentationOutput:
        """Predict class logits at the input size.

        Args:
            x: images, N×in_channels×H×W (ImageNet-normalised for pretrained RGB encoders; MR
                intensities in [0, 1] as they come for 1-channel inputs).

        Returns:
            :class:`SegmentationOutput` with ``low is high``: N×num_classes×H×W logits.
        """
        check_image_batch(x, self.in_channels)
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.stride, (-width) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=self.padding_mode)
        features = self.encoder(x)
        if self._encoder_nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        skips = features[:-1][::-1]
        y = features[-1]
        for k, block in enumerate(self.decoder):
            y = block(y, skips[k] if k < len(skips) else None)
        logits = self.head(y)[..., :height, :width]
        return SegmentationOutput(logits, logits)
