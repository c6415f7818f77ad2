"""Callbacks of the training recipes: progress lines, TensorBoard image grids, checkpoints.

:class:`SegmentationVisualizer` writes TensorBoard image grids (image, ground truth, weak labels,
prediction, Gated CRF kernels) on the published schedule; :class:`PlainProgressLog` prints one line
every few steps where a rich progress bar cannot draw (no TTY); :class:`LearningRateLog` logs the
learning rate when the run has a logger; :func:`default_callbacks` assembles them with best/last
checkpoints.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from torch import Tensor

from gcrf.training.refinement import refined_metric

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from gcrf.training.module import SegmentationModule

__all__ = ["LearningRateLog", "PlainProgressLog", "SegmentationVisualizer", "default_callbacks"]

log = logging.getLogger("gcrf.training")

#: The validation metrics of the progress lines: each raw one, then its refined twin (shown when
#: the run refines at validation).
_VALIDATION_KEYS: tuple[str, ...] = tuple(
    key for raw in ("val/mIoU", "val/dice", "val/hd95") for key in (raw, refined_metric(raw))
)


class PlainProgressLog(Callback):
    """One log line every ``every_n_steps`` training steps: for logs and terminals without a TTY.

    A line holds the step, the latest training losses and, once a validation has run, its metrics
    with the step at which they were measured (``val/mIoU 0.7123 @ step 250``): a validation
    metric is not re-measured at every step, and the line says so. Lines go to the
    ``gcrf.training`` logger at INFO level (rank zero only).

    Args:
        every_n_steps: interval in optimiser steps.
        train_keys: the training metrics shown (when logged).
        validation_keys: the validation metrics shown (when logged).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        train_keys: Sequence[str] = ("train/loss", "train/loss_ce", "train/loss_gatedcrf"),
        validation_keys: Sequence[str] = _VALIDATION_KEYS,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.train_keys = tuple(train_keys)
        self.validation_keys = tuple(validation_keys)
        self._start = time.monotonic()
        self._validation: tuple[int, dict[str, float]] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        values = {k: float(metrics[k]) for k in self.validation_keys if k in metrics}
        if values:
            self._validation = (trainer.global_step, values)

    def line(self, trainer: pl.Trainer) -> str:
        """The progress line for the trainer's current state."""
        metrics = trainer.callback_metrics
        parts = [f"step {trainer.global_step}/{trainer.max_steps}"]
        parts += [f"{k} {float(metrics[k]):.4f}" for k in self.train_keys if k in metrics]
        if self._validation is not None:
            step, values = self._validation
            parts += [f"{k} {v:.4f} @ step {step}" for k, v in values.items()]
        parts.append(f"{time.monotonic() - self._start:.0f}s")
        return " | ".join(parts)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or (step % self.every_n_steps and step != trainer.max_steps):
            return
        log.info(self.line(trainer))


class LearningRateLog(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` that stands aside when the run has no logger.

    Lightning's own callback raises at the start of a run without a logger
    (``--trainer.logger false``); there is nothing to log the rate to then, so this one does
    nothing.
    """

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.loggers:
            return
        super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class SegmentationVisualizer(Callback):
    """TensorBoard image grids on the published schedule.

    Every visualised sample is a column of panels: image, ground truth, weak labels of the
    supervising modality, prediction and (when the module has a Gated CRF loss) its kernels. Samples
    are laid out ``grid_width`` per row.

    Training batches are visualised at step ``first`` and then every ``step`` steps, from what
    Lightning hands ``on_train_batch_end``: the batch and the ``outputs`` of
    :meth:`SegmentationModule.training_step` (its detached ``output``), so nothing outlives the
    step. After every validation, the items ``observe_train_ids`` / ``observe_valid_ids`` of the
    training / validation datasets are predicted and shown (validation items only where the data
    module serves images: whole volumes are not pictured).

    Args:
        num_batches_visualization_first: first step at which a training batch is shown.
        num_batches_visualization_step: interval in steps after that.
        visualize_num_samples_in_batch: most samples of a batch to show.
        observe_train_ids: dataset indices of training items to follow.
        observe_valid_ids: dataset indices of validation items to follow.
        tensorboard_img_grid_width: samples per row of a grid.
    """

    def __init__(
        self,
        num_batches_visualization_first: int = 100,
        num_batches_visualization_step: int = 1000,
        visualize_num_samples_in_batch: int = 8,
        observe_train_ids: list[int] | None = None,
        observe_valid_ids: list[int] | None = None,
        tensorboard_img_grid_width: int = 8,
    ) -> None:
        if num_batches_visualization_step < 1:
            raise ValueError(
                f"num_batches_visualization_step must be >= 1, got {num_batches_visualization_step!r}"
            )
        if visualize_num_samples_in_batch < 0 or tensorboard_img_grid_width < 1:
            raise ValueError(
                "visualize_num_samples_in_batch must be >= 0 and tensorboard_img_grid_width >= 1, got "
                f"{visualize_num_samples_in_batch!r}, {tensorboard_img_grid_width!r}"
            )
        self.first = num_batches_visualization_first
        self.step = num_batches_visualization_step
        self.num_samples = visualize_num_samples_in_batch
        self.observe_train_ids = [0, 100] if observe_train_ids is None else list(observe_train_ids)
        self.observe_valid_ids = [0, 100] if observe_valid_ids is None else list(observe_valid_ids)
        self.grid_width = tensorboard_img_grid_width

    def is_visualization_step(self, step: int) -> bool:
        """Whether training step ``step`` (number of steps taken) is on the schedule."""
        return step == self.first or (step > self.first and (step - self.first) % self.step == 0)

    @staticmethod
    def _experiment(trainer: pl.Trainer) -> Any:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                return experiment
        return None

    def render(
        self, pl_module: SegmentationModule, batch: Mapping[str, Any], output: Any
    ) -> Tensor:
        """The uint8 3×H'×W' grid of the first samples of a batch (one column of panels each).

        ``output`` is the network's output on the batch (``low`` and ``high`` logits). RGB inputs
        are shown denormalised (ImageNet statistics), 1-channel inputs (MR intensities in [0, 1])
        as grey.
        """
        from gcrf import viz

        count = min(self.num_samples, batch["image"].shape[0])
        palette = pl_module.palette
        if palette is None:
            from gcrf.data.palettes import distinct_palette

            palette = distinct_palette(pl_module.num_classes)
        network_input = batch["image"][:count].detach().float().cpu()
        if network_input.shape[1] == 1:
            image = viz.to_uint8_image(network_input.clamp(0, 1).expand(-1, 3, -1, -1))
        else:
            image = viz.to_uint8_image(viz.denormalize_image(network_input))
        weak = batch[pl_module.cross_entropy_modality][:count].cpu()
        panels = [
            image,
            viz.colorize_labels(batch["semseg_dense"][:count].cpu(), palette),
            viz.colorize_labels(viz.dilate_labels(weak, 3), palette),
            viz.colorize_labels(output.high[:count].argmax(1).cpu(), palette),
        ]
        kernels = self._kernels_vis(pl_module, batch, output, count)
        if kernels is not None:
            panels.append(viz.affinity_overlay(image, kernels.cpu()))
        columns = torch.cat(panels, dim=2)  # N×3×(P·H)×W: the panels of a sample stacked vertically
        return viz.make_grid(columns, ncols=self.grid_width)

    @staticmethod
    def _kernels_vis(
        pl_module: SegmentationModule, batch: Mapping[str, Any], output: Any, count: int
    ) -> Tensor | None:
        """The kernels the module's Gated CRF loss weighs on this batch (the published
        ``kernels_vis``), N×H×W: the loss's own :meth:`~gcrf.loss.GatedCRFLoss.kernels_vis` on
        the inputs :meth:`SegmentationModule.gated_crf_inputs` gives it."""
        loss = pl_module.gated_crf
        if loss is None or not hasattr(loss, "kernels_vis"):
            return None
        sample = {k: v[:count] if isinstance(v, Tensor) else v for k, v in batch.items()}
        first = type(output)(*(t[:count] for t in output))
        probs, features, mask_src = pl_module.gated_crf_inputs(sample, first)
        return loss.kernels_vis(features, probs.shape[-2:], mask_src=mask_src)[:, 0]

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.is_global_zero or self.num_samples == 0:
            return
        if not self.is_visualization_step(trainer.global_step):
            return
        experiment = self._experiment(trainer)
        output = outputs.get("output") if isinstance(outputs, Mapping) else None
        if experiment is None or output is None:
            return
        grid = self.render(pl_module, batch, output)
        experiment.add_image("train/batch", grid, global_step=trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        experiment = self._experiment(trainer)
        if experiment is None:
            return
        sources = [("train/observed", self._dataset(trainer, "train"), self.observe_train_ids)]
        if pl_module.validation_kind == "images":
            sources.append(
                ("valid/observed", self._dataset(trainer, "val"), self.observe_valid_ids)
            )
        for tag, dataset, ids in sources:
            if dataset is None or not ids:
                continue
            ids = [i for i in ids if 0 <= i < len(dataset)]
            if not ids:
                continue
            items = [dataset[i] for i in ids]
            batch = torch.utils.data.default_collate(items)
            batch = {
                k: v.to(pl_module.device) if isinstance(v, Tensor) else v for k, v in batch.items()
            }
            was_training = pl_module.training
            pl_module.eval()
            with torch.no_grad():
                output = pl_module(batch["image"])
            pl_module.train(was_training)
            saved = self.num_samples
            self.num_samples = len(ids)
            grid = self.render(pl_module, batch, output)
            self.num_samples = saved
            experiment.add_image(tag, grid, global_step=trainer.global_step)

    @staticmethod
    def _dataset(trainer: pl.Trainer, split: str) -> Any:
        try:
            loader = trainer.train_dataloader if split == "train" else trainer.val_dataloaders
        except (AttributeError, RuntimeError):
            return None
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        return getattr(loader, "dataset", None)


def default_callbacks(
    visualizer: SegmentationVisualizer | None = None,
    progress_every_n_steps: int = 50,
    checkpoint_dir: str | None = None,
    monitor: str = "val/mIoU",
    monitor_mode: Literal["min", "max"] = "max",
) -> list[Callback]:
    """Best and latest checkpoints, per-step LR logging, a progress display and the visualiser.

    The progress display is a rich progress bar on a TTY and :class:`PlainProgressLog` otherwise;
    pair it with ``Trainer(enable_progress_bar=sys.stdout.isatty())`` so that Lightning adds no
    default bar of its own where there is no terminal.

    Args:
        visualizer: the image-grid callback (``None``: none).
        progress_every_n_steps: interval of the plain progress lines.
        checkpoint_dir: where checkpoints go (default: the logger's directory).
        monitor: the validation metric of the best checkpoint (a data module's ``monitor``:
            ``"val/mIoU"`` for images, ``"val/dice"`` for ACDC's volumes).
        monitor_mode: ``"max"`` where higher is better (a data module's ``monitor_mode``).

    Returns:
        A list of callbacks for ``Trainer(callbacks=...)``.
    """
    callbacks: list[Callback] = [
        # Best by the monitored metric (first: `trainer.checkpoint_callback` reports its score).
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            monitor=monitor,
            mode=monitor_mode,
            save_top_k=1,
            filename="best-step{step:06d}-" + monitor.split("/")[-1] + "{" + monitor + ":.4f}",
            auto_insert_metric_name=False,
        ),
        # The latest state after every validation, plus `last.ckpt` linking to it: a run killed
        # mid-way resumes from there (`--ckpt_path last`). A monitored checkpoint alone would not do:
        # Lightning refreshes its `last.ckpt` only when the score improved.
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            monitor=None,
            save_top_k=1,
            save_last="link",
            filename="latest-step{step:06d}",
            auto_insert_metric_name=False,
        ),
        LearningRateLog(logging_interval="step"),
    ]
    if sys.stdout.isatty():
        callbacks.append(RichProgressBar())
    else:
        callbacks.append(PlainProgressLog(progress_every_n_steps))
    if visualizer is not None:
        callbacks.append(visualizer)
    return callbacks
