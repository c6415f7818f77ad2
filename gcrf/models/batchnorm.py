"""BatchNorm for multi-GPU training (SyncBatchNorm) and for tiny batches (frozen statistics).

- :func:`convert_sync_batchnorm` swaps every BatchNorm for its synchronised version so the batch
  statistics are computed over all processes of a DDP run; :func:`revert_sync_batchnorm` undoes it.
- :func:`freeze_batchnorm` keeps BatchNorm layers in inference mode: they normalise with their
  running statistics (e.g. the ImageNet ones of a pretrained encoder) and never update them, which
  is what a batch of 1–4 images needs, since statistics over so few samples are noise. The freeze
  survives ``model.train()`` (which Lightning calls at every epoch).
"""

from __future__ import annotations

import functools
import logging

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "convert_sync_batchnorm",
    "freeze_batchnorm",
    "is_batchnorm_frozen",
    "revert_sync_batchnorm",
]

logger = logging.getLogger(__name__)

_FROZEN_AFFINE = "_gcrf_frozen_affine"


def _train_frozen(module: nn.Module, mode: bool = True) -> nn.Module:
    # Replaces ``module.train`` on a frozen BatchNorm: whatever the mode asked for, stay in eval.
    return nn.Module.train(module, False)


def is_batchnorm_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer frozen by :func:`freeze_batchnorm`."""
    return isinstance(module, _BatchNorm) and hasattr(module, _FROZEN_AFFINE)


def freeze_batchnorm(module: nn.Module, *, affine: bool = False) -> nn.Module:
    """Freeze the statistics (and optionally the affine parameters) of every BatchNorm layer.

    Each BatchNorm layer in ``module`` (including ``module`` itself, ``SyncBatchNorm`` and timm's
    ``BatchNormAct2d``) is put in eval mode and its ``train`` method is replaced by one that keeps
    it there, so ``model.train()`` on any parent leaves it normalising with its running mean and
    variance, which are never updated. Modifies ``module`` in place.

    Args:
        module: a model or a part of it (e.g. ``model.encoder`` to freeze only the encoder).
        affine: also freeze the BatchNorm weight and bias (``requires_grad = False``). Otherwise
            they keep training.

    Returns:
        ``module``.

    Example:
        >>> model = freeze_batchnorm(DeepLabV3Plus("resnet18"))
        >>> model.train().encoder.bn1.training
        False
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module; got {type(module).__name__}")
    count = 0
    for layer in module.modules():
        if not isinstance(layer, _BatchNorm):
            continue
        # An instance attribute shadows nn.Module.train, and nn.Module.train calls child.train(mode)
        # on every child, so the override is reached from any parent. functools.partial of a
        # module-level function keeps the layer picklable and deep-copyable.
        layer.train = functools.partial(_train_frozen, layer)
        layer.train()
        setattr(layer, _FROZEN_AFFINE, affine)
        if affine:
            for parameter in (layer.weight, layer.bias):
                if parameter is not None:
                    parameter.requires_grad_(False)
        count += 1
    logger.debug("froze %d BatchNorm layers (affine frozen: %s)", count, affine)
    return module


def convert_sync_batchnorm(module: nn.Module, process_group: object | None = None) -> nn.Module:
    """Replace every BatchNorm layer by a ``SyncBatchNorm`` (statistics over all DDP processes).

    Uses timm's converter, which wraps ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` and also
    maps timm's fused ``BatchNormAct2d`` (EfficientNet, MobileNet, ... encoders) to
    ``SyncBatchNormAct``; torch's own converter would turn it into a plain SyncBatchNorm and drop
    the activation. Parameters and running statistics are shared with the original layers. Layers
    frozen by :func:`freeze_batchnorm` stay frozen (they normalise with running statistics, so
    they need no synchronisation).

    Args:
        module: the model.
        process_group: the group to synchronise over (default: the whole world).

    Returns:
        The converted module (a new object if ``module`` itself is a BatchNorm layer).

    Example:
        >>> model = convert_sync_batchnorm(DeepLabV3Plus("resnet18"))
        >>> type(model.encoder.bn1).__name__
        'SyncBatchNorm'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module; got {type(module).__name__}")
    from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm

    frozen = {
        name: getattr(layer, _FROZEN_AFFINE)
        for name, layer in module.named_modules()
        if is_batchnorm_frozen(layer)
    }
    converted = timm_convert_sync_batchnorm(module, process_group)
    for name, affine in frozen.items():
        freeze_batchnorm(converted.get_submodule(name), affine=affine)
    return converted


class _BatchNormXd(_BatchNorm):
    """A local BatchNorm of any input rank: what a reverted ``SyncBatchNorm`` becomes.

    ``SyncBatchNorm`` does not record whether it came from a 1d, 2d or 3d layer; like Lightning's
    own revert, the reverted layer accepts any rank.
    """

    def _check_input_dim(self, input: object) -> None:  # any rank, as SyncBatchNorm accepted
        return


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`: synchronised layers become local ones.

    timm's ``SyncBatchNormAct`` becomes ``BatchNormAct2d`` again (activation kept) and
    ``torch.nn.SyncBatchNorm`` a local BatchNorm; parameters, running statistics and a freeze are
    shared with the synchronised layer (the class of each layer is switched in place).

    Args:
        module: the converted model.

    Returns:
        ``module``, with every synchronised BatchNorm made local.

    Example:
        >>> model = revert_sync_batchnorm(convert_sync_batchnorm(DeepLabV3Plus("resnet18")))
        >>> isinstance(model.encoder.bn1, torch.nn.SyncBatchNorm)
        False
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module; got {type(module).__name__}")
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    for layer in module.modules():
        if isinstance(layer, SyncBatchNormAct):
            layer.__class__ = BatchNormAct2d  # same attributes: norm, act, drop
        elif isinstance(layer, nn.SyncBatchNorm):
            layer.__class__ = _BatchNormXd
    return module
