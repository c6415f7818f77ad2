"""Segmentation models on timm ``features_only`` encoders: DeepLabv3+ and UNet.

Public API:

- :class:`DeepLabV3Plus` — ``forward(x)`` returns :class:`SegmentationOutput` ``(low, high)``:
  logits at stride 4 (input of the Gated CRF loss) and at the input size;
- :class:`UNet` — the medical baseline, the same typed output with ``low`` at the input size;
- every model takes ``in_channels`` (1 for MR/CT slices; pretrained first layers adapted by timm);
- :func:`create_model`, :func:`list_models`, :func:`register_model` — models by name
  (``"deeplabv3p"`` with ``encoder=``, ``"deeplabv3p_resnet18/34/50/101"``);
- :func:`convert_sync_batchnorm` / :func:`revert_sync_batchnorm` (multi-GPU) and
  :func:`freeze_batchnorm` (tiny batches);
- :class:`PretrainedWeightsError` — ``pretrained=True`` could not fetch the weights (offline).

Needs timm (``pip install 'gcrf[train]'``); safetensors to read ``.safetensors`` files.
"""

from gcrf.models.batchnorm import convert_sync_batchnorm, freeze_batchnorm, revert_sync_batchnorm
from gcrf.models.deeplabv3plus import DeepLabV3Plus
from gcrf.models.interface import SegmentationOutput
from gcrf.models.registry import create_model, list_models, register_model
from gcrf.models.unet import UNet
from gcrf.models.weights import PretrainedWeightsError

__all__ = [
    "DeepLabV3Plus",
    "PretrainedWeightsError",
    "SegmentationOutput",
    "UNet",
    "convert_sync_batchnorm",
    "create_model",
    "freeze_batchnorm",
    "list_models",
    "register_model",
    "revert_sync_batchnorm",
]
