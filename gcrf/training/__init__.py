"""Lightning training for weakly supervised semantic segmentation with the Gated CRF loss.

One module per concern:

- :mod:`gcrf.training.module` — :class:`SegmentationModule`, the ``LightningModule`` (built objects
  in: network, loss, factories; the objective, validation metrics, optimiser);
- :mod:`gcrf.training.objective` — the terms: :func:`cross_entropy_loss`, the Gated CRF input size
  (:func:`resize_probabilities`) and schedule (:func:`gated_crf_start_step`);
- :mod:`gcrf.training.metrics` — the volume scores of the medical recipes: 3D Dice and HD95
  (:class:`~gcrf.training.metrics.VolumeScores`, :func:`~gcrf.training.metrics.score_volume`,
  :func:`~gcrf.training.metrics.hd95`; medpy's definition by default);
- :mod:`gcrf.training.optim` — optimiser and scheduler factories;
- :mod:`gcrf.training.callbacks` — progress lines, learning-rate log, TensorBoard image grids,
  :func:`default_callbacks`;
- :mod:`gcrf.training.sync_batchnorm` — :class:`TimmSyncBatchNorm`, Lightning's SyncBatchNorm
  plugin for timm encoders (the conversion itself lives in :mod:`gcrf.models.batchnorm`).
"""

from gcrf.training.callbacks import (
    LearningRateLog,
    PlainProgressLog,
    SegmentationVisualizer,
    default_callbacks,
)
from gcrf.training.module import SegmentationModule
from gcrf.training.objective import cross_entropy_loss, gated_crf_start_step, resize_probabilities
from gcrf.training.optim import (
    DEFAULT_LR_SCHEDULER,
    OptimizerFactory,
    SchedulerFactory,
    make_optimizer_factory,
    make_poly_scheduler_factory,
)
from gcrf.training.sync_batchnorm import TimmSyncBatchNorm

__all__ = [
    "DEFAULT_LR_SCHEDULER",
    "LearningRateLog",
    "OptimizerFactory",
    "PlainProgressLog",
    "SchedulerFactory",
    "SegmentationModule",
    "SegmentationVisualizer",
    "TimmSyncBatchNorm",
    "cross_entropy_loss",
    "default_callbacks",
    "gated_crf_start_step",
    "make_optimizer_factory",
    "make_poly_scheduler_factory",
    "resize_probabilities",
]
