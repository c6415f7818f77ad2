"""Lightning training for weakly supervised semantic segmentation with the Gated CRF loss.

One module per concern:

- :mod:`gcrf.training.module` — :class:`SegmentationModule`, the ``LightningModule`` (built objects
  in: network, loss, factories; the objective, validation metrics, optimiser);
- :mod:`gcrf.training.objective` — the terms: :func:`cross_entropy_loss`, the Gated CRF input size
  (:func:`resize_probabilities`) and schedule (:func:`gated_crf_start_step`);
- :mod:`gcrf.training.metrics` — the volume scores of the medical recipes: 3D Dice and HD95
  (:class:`~gcrf.training.metrics.VolumeScores`, :func:`~gcrf.training.metrics.score_volume`,
  :func:`~gcrf.training.metrics.hd95`; medpy's definition by default);
- :mod:`gcrf.training.refinement` — the mean-field CRF in training and evaluation: a setting as a
  value (:class:`CRFSetting`, with a learnt non-negative μ on request), the refined metrics' names
  (:func:`refined_metric`) and the choice of a refinement setting on training volumes
  (:func:`select_refinement`);
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
from gcrf.training.refinement import (
    CRFSetting,
    PredictedVolume,
    RefinementSelection,
    Softplus,
    mean_field_grid,
    mean_field_refinement,
    refined_metric,
    select_refinement,
)
from gcrf.training.sync_batchnorm import TimmSyncBatchNorm

__all__ = [
    "DEFAULT_LR_SCHEDULER",
    "CRFSetting",
    "LearningRateLog",
    "OptimizerFactory",
    "PlainProgressLog",
    "PredictedVolume",
    "RefinementSelection",
    "SchedulerFactory",
    "SegmentationModule",
    "SegmentationVisualizer",
    "Softplus",
    "TimmSyncBatchNorm",
    "cross_entropy_loss",
    "default_callbacks",
    "gated_crf_start_step",
    "make_optimizer_factory",
    "make_poly_scheduler_factory",
    "mean_field_grid",
    "mean_field_refinement",
    "refined_metric",
    "resize_probabilities",
    "select_refinement",
]
