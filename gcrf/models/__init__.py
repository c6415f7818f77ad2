"""Segmentation models: DeepLabv3+ on timm ``features_only`` encoders.

Public API:

- :class:`DeepLabV3Plus` — ``forward(x)`` returns :class:`SegmentationOutput` ``(low, high)``:
  logits at stride 4 (input of the Gated CRF loss) and at the input size;
- :func:`create_model`, :func:`list_models`, :func:`register_model` — models by name
  (``"deeplabv3p"`` with ``encoder=``, ``"deeplabv3p_resnet18/34/50/101"``);
- :func:`convert_sync_batchnorm` / :func:`revert_sync_batchnorm` (multi-GPU) and
  :func:`freeze_batchnorm` (tiny batches);
- :class:`PretrainedWeightsError` — ``pretrained=True`` could not fetch the weights (offline).

Needs timm (``pip install 'gcrf[train]'``); safetensors to read ``.safetensors`` files.
"""

from gcrf.models.batchnorm import convert_sync_batchnorm, freeze_batchnorm, revert_sync_batchnorm
from gcrf.models.deeplabv3plus import DeepLabV3Plus, SegmentationOutput
from gcrf.models.registry import create_model, list_models, register_model
from gcrf.models.weights import PretrainedWeightsError

__all__ = [
    "DeepLabV3Plus",
    "PretrainedWeightsError",
    "SegmentationOutput",
    "convert_sync_batchnorm",
    "create_model",
    "freeze_batchnorm",
    "list_models",
    "register_model",
    "revert_sync_batchnorm",
]
