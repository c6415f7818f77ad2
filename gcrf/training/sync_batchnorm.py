"""Lightning's SyncBatchNorm plugin for timm encoders."""

from __future__ import annotations

from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn

from gcrf.models.batchnorm import convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["TimmSyncBatchNorm"]


class TimmSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's SyncBatchNorm plugin for timm encoders: ``Trainer(plugins=[TimmSyncBatchNorm()])``.

    Lightning's own plugin (what ``Trainer(sync_batchnorm=True)`` installs) converts with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which turns timm's fused ``BatchNormAct2d``
    (MobileNet, EfficientNet, RegNet, ... encoders) into a plain ``SyncBatchNorm`` and silently drops
    its activation. This plugin converts with :func:`gcrf.models.convert_sync_batchnorm` (activation
    kept, frozen layers stay frozen) and, when Lightning reverts the model after ``fit``, turns each
    layer back into the class it came from, activation included. It is a no-op on one device, like
    Lightning's, and may be combined with ``sync_batchnorm=True``.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace every BatchNorm layer of ``model`` by its synchronised counterpart."""
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply`: synchronised layers become local ones, parameters and state shared."""
        return revert_sync_batchnorm(model)
