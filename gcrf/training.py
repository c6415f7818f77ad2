"""Lightning training for weakly supervised semantic segmentation with the Gated CRF loss.

:class:`SegmentationModule` is a ``LightningModule`` that receives built objects — the network, the
Gated CRF loss module (or ``None``), the cross-entropy settings and the optimiser / scheduler
factories — and builds no dataset and moves nothing to a device itself. The objective is the
published one::

    total = w_ce · CE(high, labels of the supervising modality; ignore 255, optional class weights)
          + w_gcrf · GatedCRF(softmax(low) resized to the Gated CRF resolution,
                              {"rgb": normalised image at input resolution}, mask_src = valid)

where ``high`` / ``low`` are the network's logits at the input size / at stride 4, and the Gated CRF
term is switched on once ``use_after_progress_ratio`` of the training steps have been taken.

Callbacks: :class:`SegmentationVisualizer` writes TensorBoard image grids (image, ground truth, weak
labels, prediction, Gated CRF kernels) on the published schedule; :class:`PlainProgressLog` prints
one line every few steps where a rich progress bar cannot draw (no TTY); :func:`default_callbacks`
assembles them with best/last checkpoints by validation mIoU.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

__all__ = [
    "IGNORE_INDEX",
    "SUPERVISION_MODALITIES",
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

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
SUPERVISION_MODALITIES = ("semseg_dense", "semseg_scribbles", "semseg_clicks")

#: Builds an optimiser from the parameters to train.
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
#: Builds a per-step learning-rate scheduler from the optimiser and the total number of steps.
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]

# The DeepLab defaults of the published code.
SGD_DEFAULTS: dict[str, float] = {
    "lr": 0.007,
    "momentum": 0.9,
    "dampening": 0.0,
    "weight_decay": 1e-4,
}
ADAM_DEFAULTS: dict[str, float] = {"lr": 1e-4}


# ------------------------------------------------------------------------------- factories
def make_optimizer_factory(
    name: str = "sgd", kwargs: Mapping[str, Any] | None = None
) -> OptimizerFactory:
    """An optimiser factory for ``"sgd"`` or ``"adam"``.

    Args:
        name: ``"sgd"`` (``torch.optim.SGD``) or ``"adam"`` (``torch.optim.Adam``).
        kwargs: keyword arguments of the optimiser; ``None`` takes the published defaults (SGD: lr
            0.007, momentum 0.9, dampening 0, weight decay 1e-4; Adam: lr 1e-4). Given kwargs replace
            the defaults entirely, as the published ``--optimizer_kwargs`` did.

    Returns:
        A callable ``factory(parameters) -> torch.optim.Optimizer``.

    Example:
        >>> factory = make_optimizer_factory("adam", {"lr": 1e-3})
        >>> factory(torch.nn.Linear(2, 2).parameters()).defaults["lr"]
        0.001
    """
    classes = {"sgd": (torch.optim.SGD, SGD_DEFAULTS), "adam": (torch.optim.Adam, ADAM_DEFAULTS)}
    if name not in classes:
        raise ValueError(f"optimizer name must be one of {sorted(classes)}, got {name!r}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"optimizer kwargs must be a mapping or None, got {type(kwargs).__name__}")
    cls, defaults = classes[name]
    # A partial, not a closure: DDP-spawn and checkpoints pickle the module that holds it.
    return functools.partial(cls, **dict(defaults if kwargs is None else kwargs))


def make_poly_scheduler_factory(power: float = 0.9) -> SchedulerFactory:
    """A polynomial-decay scheduler factory, ``lr_t = lr_0 · (1 − t / T)^power``, stepped per step.

    Args:
        power: the decay exponent (published default 0.9).

    Returns:
        A callable ``factory(optimizer, total_steps) -> PolynomialLR``.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        >>> sched = make_poly_scheduler_factory(1.0)(opt, 4)
        >>> sched.step(); round(opt.param_groups[0]["lr"], 3)
        0.75
    """
    if not isinstance(power, (int, float)) or isinstance(power, bool) or power < 0:
        raise ValueError(f"power must be a number >= 0, got {power!r}")
    return functools.partial(_polynomial_lr, power=float(power))


def _polynomial_lr(
    optimizer: torch.optim.Optimizer, total_steps: int, power: float
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=power)


# ---------------------------------------------------------------------------- loss helpers
def cross_entropy_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean cross entropy over labelled pixels (255 = unlabelled), 0 when no pixel is labelled.

    Equal to ``F.cross_entropy(logits, target, weight, ignore_index=255)`` whenever at least one
    pixel is labelled; a batch without labels (possible with clicks after cropping) gives a zero that
    still carries the graph, instead of NaN.

    Args:
        logits: N×C×H×W logits.
        target: N×H×W int64 labels in [0, C) or 255.
        weight: optional C class weights.

    Shape:
        logits N×C×H×W, target N×H×W, weight C.

    Returns:
        0-dim float32 tensor.

    Example:
        >>> cross_entropy_loss(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 255)).item()
        0.0
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            "expected logits N×C×H×W and target N×H×W, got logits "
            f"{tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    logits = logits.float()
    summed = F.cross_entropy(
        logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    labelled = target != IGNORE_INDEX
    if weight is None:
        denominator = labelled.sum().to(summed.dtype)
    else:
        denominator = weight.to(summed.dtype)[target[labelled]].sum()
    return summed / denominator.clamp_min(torch.finfo(summed.dtype).tiny)


def resize_probabilities(
    probs: Tensor, resolution: int | Sequence[int] | None, input_size: Sequence[int]
) -> Tensor:
    """Resize class probabilities (bilinear) to the Gated CRF resolution.

    Bilinear interpolation takes convex combinations of neighbouring pixels, so the result is still a
    probability distribution at every pixel.

    Args:
        probs: N×C×h×w probabilities (the softmax of the stride-4 logits).
        resolution: ``None`` keeps h×w; an int ``R`` gives R×R for a square input and otherwise R rows
            with the input's aspect ratio (the width must come out integral); a pair gives (rows, cols).
        input_size: (H, W) of the network input; every output side must divide the input side (the
            loss pools the image features by an integer factor).

    Returns:
        N×C×R×R' probabilities (``probs`` itself when the size already matches).

    Example:
        >>> resize_probabilities(torch.full((1, 2, 4, 4), 0.5), 8, (16, 16)).shape
        torch.Size([1, 2, 8, 8])
    """
    height, width = int(input_size[0]), int(input_size[1])
    if resolution is None:
        return probs
    if isinstance(resolution, int):
        rows = resolution
        cols = resolution * width / height
        if cols != int(cols):
            raise ValueError(
                f"loss_gatedcrf_resolution={resolution} on a {height}×{width} input gives a "
                f"non-integral width {cols}; pass (rows, cols)"
            )
        size = (rows, int(cols))
    else:
        if len(resolution) != 2:
            raise ValueError(f"resolution must be an int or a pair, got {resolution!r}")
        size = (int(resolution[0]), int(resolution[1]))
    if size[0] < 1 or size[1] < 1 or height % size[0] or width % size[1]:
        raise ValueError(
            f"loss_gatedcrf_resolution {size} must divide the input size {(height, width)} "
            "(the image features are pooled by an integer factor)"
        )
    if tuple(probs.shape[-2:]) == size:
        return probs
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)


def gated_crf_start_step(use_after_progress_ratio: float, total_steps: int) -> int:
    """The first global step at which the Gated CRF term is on: ``floor(ratio · total_steps)``.

    Example:
        >>> gated_crf_start_step(0.005, 90_000)
        450
    """
    return math.floor(use_after_progress_ratio * total_steps)


# -------------------------------------------------------------------------------- the module
class SegmentationModule(pl.LightningModule):
    """Train a segmentation network with cross entropy on (weak) labels plus the Gated CRF loss.

    Args:
        network: a module whose ``forward(image)`` returns an object with ``low`` (N×C×H/4×W/4) and
            ``high`` (N×C×H×W) logits (``gcrf.models.SegmentationOutput``).
        num_classes: number of classes C.
        gated_crf: the Gated CRF loss module, called as
            ``gated_crf(probs, {"rgb": image}, mask_src=valid)``; ``None`` trains with CE only.
        cross_entropy_modality: batch key of the CE labels: ``"semseg_dense"``,
            ``"semseg_scribbles"`` or ``"semseg_clicks"``.
        cross_entropy_weight: weight of the CE term.
        class_weights: optional C class weights of the CE term.
        gated_crf_weight: weight of the Gated CRF term.
        gated_crf_resolution: resolution of the probabilities the Gated CRF loss sees (see
            :func:`resize_probabilities`); ``None`` keeps the network's stride-4 size.
        gated_crf_use_after_progress_ratio: the Gated CRF term is off for this fraction of the training
            steps (``trainer.estimated_stepping_batches``), then on.
        optimizer: optimiser factory (default: published SGD).
        lr_scheduler: scheduler factory stepped every step (default: poly, power 0.9); ``None`` for
            a constant learning rate.
        class_names: names for per-class metrics (default: the datamodule's ``class_names`` or
            ``class_0`` …).
        palette: C×3 uint8 display colours (default: the datamodule's ``palette``).
        compile: run the network's forward through ``torch.compile``.

    Example:
        >>> # module = SegmentationModule(create_model("deeplabv3p", num_classes=21), 21,
        >>> #                             gated_crf=GatedCRFLoss(...), gated_crf_resolution=64)
        >>> # lightning.Trainer(max_steps=90_000).fit(module, datamodule)
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        *,
        gated_crf: nn.Module | None = None,
        cross_entropy_modality: str = "semseg_dense",
        cross_entropy_weight: float = 1.0,
        class_weights: Tensor | Sequence[float] | None = None,
        gated_crf_weight: float = 0.1,
        gated_crf_resolution: int | Sequence[int] | None = None,
        gated_crf_use_after_progress_ratio: float = 0.005,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        class_names: Sequence[str] | None = None,
        palette: Tensor | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if cross_entropy_modality not in SUPERVISION_MODALITIES:
            raise ValueError(
                f"cross_entropy_modality must be one of {SUPERVISION_MODALITIES}, "
                f"got {cross_entropy_modality!r}"
            )
        if not 0 <= gated_crf_use_after_progress_ratio <= 1:
            raise ValueError(
                "gated_crf_use_after_progress_ratio must be in [0, 1], got "
                f"{gated_crf_use_after_progress_ratio!r}"
            )
        if gated_crf is not None and not callable(gated_crf):
            raise TypeError(
                f"gated_crf must be a callable loss module, got {type(gated_crf).__name__}"
            )
        self.network = network
        self.num_classes = num_classes
        self.gated_crf = gated_crf
        self.cross_entropy_modality = cross_entropy_modality
        self.cross_entropy_weight = float(cross_entropy_weight)
        self.gated_crf_weight = float(gated_crf_weight)
        self.gated_crf_resolution = gated_crf_resolution
        self.gated_crf_use_after_progress_ratio = float(gated_crf_use_after_progress_ratio)
        self.optimizer_factory = optimizer if optimizer is not None else make_optimizer_factory()
        self.scheduler_factory = (
            lr_scheduler if lr_scheduler is not None else make_poly_scheduler_factory()
        )
        self.class_names = list(class_names) if class_names is not None else None
        self.palette = palette
        self.compile = compile
        # The compiled forward is kept out of the module tree (object.__setattr__): registered, it
        # would add a second copy of every weight to the state dict under another prefix.
        object.__setattr__(self, "_compiled_network", None)
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if class_weights.shape != (num_classes,):
                raise ValueError(
                    f"class_weights must have {num_classes} entries, got shape {tuple(class_weights.shape)}"
                )
        # A buffer moves with the module and is saved in checkpoints; None keeps CE unweighted.
        self.register_buffer("class_weights", class_weights, persistent=True)
        self.val_confusion = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)
        self._gated_crf_start: int | None = None

    # ---------------------------------------------------------------------------- setup
    def set_class_weights(self, class_weights: Tensor | Sequence[float] | None) -> None:
        """Replace the CE class weights (e.g. computed from the datamodule's label histogram)."""
        if class_weights is None:
            self.class_weights = None
            return
        weights = torch.as_tensor(class_weights, dtype=torch.float32, device=self.device)
        if weights.shape != (self.num_classes,):
            raise ValueError(
                f"class_weights must have {self.num_classes} entries, got shape {tuple(weights.shape)}"
            )
        self.class_weights = weights

    def setup(self, stage: str) -> None:
        datamodule = (
            getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        )
        if self.class_names is None:
            names = getattr(datamodule, "class_names", None)
            self.class_names = (
                list(names)
                if names is not None
                else [f"class_{c}" for c in range(self.num_classes)]
            )
        if self.palette is None and getattr(datamodule, "palette", None) is not None:
            self.palette = torch.as_tensor(datamodule.palette, dtype=torch.uint8)
        if self.compile and self._compiled_network is None:
            # Compile the forward only; the parameters stay registered under `network` alone, so
            # checkpoints of compiled and eager runs are interchangeable.
            object.__setattr__(self, "_compiled_network", torch.compile(self.network))

    @property
    def gated_crf_start_step(self) -> int:
        """First global step with the Gated CRF term on (needs an attached trainer)."""
        if self._gated_crf_start is None:
            total = int(self.trainer.estimated_stepping_batches)
            self._gated_crf_start = gated_crf_start_step(
                self.gated_crf_use_after_progress_ratio, total
            )
        return self._gated_crf_start

    def gated_crf_active(self) -> bool:
        """Whether the Gated CRF term is part of the objective at the current global step."""
        return (
            self.gated_crf is not None
            and self.gated_crf_weight > 0
            and self.global_step >= self.gated_crf_start_step
        )

    # -------------------------------------------------------------------------- forward
    def forward(self, image: Tensor) -> Any:
        """The network's output (``low`` and ``high`` logits) for an N×3×H×W normalised image."""
        network = self.network if self._compiled_network is None else self._compiled_network
        return network(image)

    def compute_losses(self, batch: Mapping[str, Any], output: Any) -> dict[str, Tensor]:
        """The objective's terms for one batch.

        Returns:
            ``{"loss_ce", "loss_gatedcrf", "loss"}``; ``loss_gatedcrf`` is 0 while the term is off.
        """
        target = batch[self.cross_entropy_modality]
        loss_ce = cross_entropy_loss(output.high, target, self.class_weights)
        loss = self.cross_entropy_weight * loss_ce
        loss_gatedcrf = torch.zeros((), device=loss_ce.device)
        if self.gated_crf_active():
            image = batch["image"]
            probs = torch.softmax(output.low.float(), dim=1)
            probs = resize_probabilities(probs, self.gated_crf_resolution, image.shape[-2:])
            loss_gatedcrf = self.gated_crf(
                probs, {"rgb": image.float()}, mask_src=batch["valid"].float()
            )
            loss = loss + self.gated_crf_weight * loss_gatedcrf
        return {"loss_ce": loss_ce, "loss_gatedcrf": loss_gatedcrf, "loss": loss}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        output = self(batch["image"])
        losses = self.compute_losses(batch, output)
        batch_size = batch["image"].shape[0]
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/loss_ce", losses["loss_ce"].detach(), batch_size=batch_size)
        self.log("train/loss_gatedcrf", losses["loss_gatedcrf"].detach(), batch_size=batch_size)
        self.log("train/gatedcrf_active", float(self.gated_crf_active()), batch_size=batch_size)
        self._last_train_output = (output.high.detach(), batch)
        return losses["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        output = self(batch["image"])
        target = batch["semseg_dense"]
        self.val_confusion.update(output.high.argmax(dim=1), target)
        self.log(
            "val/loss_ce_dense",
            cross_entropy_loss(output.high, target),
            batch_size=batch["image"].shape[0],
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        iou = self.iou_per_class(self.val_confusion.compute())
        self.val_confusion.reset()
        present = ~torch.isnan(iou)
        miou = iou[present].mean() if present.any() else torch.zeros((), device=iou.device)
        self.log("val/mIoU", miou, prog_bar=True)
        names = self.class_names or [f"class_{c}" for c in range(self.num_classes)]
        for name, value in zip(names, iou.tolist(), strict=True):
            if not math.isnan(value):
                self.log(f"val/IoU/{name}", value)

    @staticmethod
    def iou_per_class(confusion: Tensor) -> Tensor:
        """IoU of every class from a C×C confusion matrix (rows = truth); NaN for absent classes.

        Example:
            >>> SegmentationModule.iou_per_class(torch.tensor([[2, 1], [0, 1]]))
            tensor([0.6667, 0.5000])
        """
        confusion = confusion.double()
        intersection = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - intersection
        return (intersection / union).float()  # 0/0 = NaN marks a class never seen or predicted

    # ------------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


# ------------------------------------------------------------------------------- callbacks
class PlainProgressLog(Callback):
    """One log line every ``every_n_steps`` training steps: for logs and terminals without a TTY.

    Lines go to the ``gcrf.training`` logger at INFO level (rank zero only).

    Args:
        every_n_steps: interval in optimiser steps.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self._start = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

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
        metrics = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps}"]
        for key in ("train/loss", "train/loss_ce", "train/loss_gatedcrf", "val/mIoU"):
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4f}")
        parts.append(f"{time.monotonic() - self._start:.0f}s")
        log.info(" | ".join(parts))


class SegmentationVisualizer(Callback):
    """TensorBoard image grids on the published schedule.

    Every visualised sample is a column of panels: image, ground truth, weak labels of the
    supervising modality, prediction and (when the module has a Gated CRF loss) its kernels. Samples
    are laid out ``grid_width`` per row.

    Training batches are visualised at step ``first`` and then every ``step`` steps; after every
    validation, the items ``observe_train_ids`` / ``observe_valid_ids`` of the training / validation
    datasets are predicted and shown.

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
        self, pl_module: SegmentationModule, batch: Mapping[str, Any], high: Tensor
    ) -> Tensor:
        """The uint8 3×H'×W' grid of the first samples of a batch (one column of panels each)."""
        from gcrf import viz

        count = min(self.num_samples, batch["image"].shape[0])
        palette = pl_module.palette
        if palette is None:
            from gcrf.data.palettes import distinct_palette

            palette = distinct_palette(pl_module.num_classes)
        image = viz.to_uint8_image(
            viz.denormalize_image(batch["image"][:count].detach().float().cpu())
        )
        weak = batch[pl_module.cross_entropy_modality][:count].cpu()
        panels = [
            image,
            viz.colorize_labels(batch["semseg_dense"][:count].cpu(), palette),
            viz.colorize_labels(viz.dilate_labels(weak, 3), palette),
            viz.colorize_labels(high[:count].argmax(1).cpu(), palette),
        ]
        kernels = self._kernels_vis(pl_module, batch, count)
        if kernels is not None:
            panels.append(viz.affinity_overlay(image, kernels.cpu()))
        columns = torch.cat(panels, dim=2)  # N×3×(P·H)×W: the panels of a sample stacked vertically
        return viz.make_grid(columns, ncols=self.grid_width)

    @staticmethod
    def _kernels_vis(
        pl_module: SegmentationModule, batch: Mapping[str, Any], count: int
    ) -> Tensor | None:
        """Gated CRF kernels of the first samples (the published ``kernels_vis``) as N×H×W."""
        loss = pl_module.gated_crf
        if loss is None:
            return None
        kernels = getattr(loss, "kernels", None) or getattr(loss, "_kernels_desc", None)
        radius = getattr(loss, "radius", None)
        if kernels is None or radius is None:
            return None
        from gcrf.loss.affinity import gaussian_affinity, kernels_vis

        image = batch["image"][:count].float()
        if pl_module.gated_crf_resolution is None:
            size = (image.shape[-2] // 4, image.shape[-1] // 4)
        else:
            size = tuple(
                resize_probabilities(
                    image[:1, :1], pl_module.gated_crf_resolution, image.shape[-2:]
                ).shape[-2:]
            )
        affinity = gaussian_affinity(
            {"rgb": image}, kernels, radius, size=size, mask_src=batch["valid"][:count].float()
        )
        return kernels_vis(affinity, radius, image.shape[-2:])[:, 0]

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
        last = getattr(pl_module, "_last_train_output", None)
        if experiment is None or last is None:
            return
        high, last_batch = last
        grid = self.render(pl_module, last_batch, high)
        experiment.add_image("train/batch", grid, global_step=trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        experiment = self._experiment(trainer)
        if experiment is None:
            return
        sources = (
            ("train/observed", self._dataset(trainer, "train"), self.observe_train_ids),
            ("valid/observed", self._dataset(trainer, "val"), self.observe_valid_ids),
        )
        for tag, dataset, ids in sources:
            if dataset is None or not ids:
                continue
            ids = [i for i in ids if 0 <= i < len(dataset)]
            if not ids:
                continue
            batch = torch.utils.data.default_collate([dataset[i] for i in ids])
            batch = {
                k: v.to(pl_module.device) if isinstance(v, Tensor) else v for k, v in batch.items()
            }
            was_training = pl_module.training
            pl_module.eval()
            with torch.no_grad():
                high = pl_module(batch["image"]).high
            pl_module.train(was_training)
            saved = self.num_samples
            self.num_samples = len(ids)
            grid = self.render(pl_module, batch, high)
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
        from gcrf.models import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply`: synchronised layers become local ones, parameters and state shared."""
        from lightning.pytorch.plugins.layer_sync import _BatchNormXd
        from timm.layers import BatchNormAct2d, SyncBatchNormAct

        if isinstance(model, SyncBatchNormAct):
            model.__class__ = BatchNormAct2d  # same attributes: norm, act, drop
        elif isinstance(model, nn.SyncBatchNorm):
            model.__class__ = _BatchNormXd
        for name, child in model.named_children():
            setattr(model, name, self.revert(child))
        return model


def default_callbacks(
    visualizer: SegmentationVisualizer | None = None,
    progress_every_n_steps: int = 50,
    checkpoint_dir: str | None = None,
) -> list[Callback]:
    """Best and latest checkpoints, per-step LR logging, a progress display and the visualiser.

    The progress display is a rich progress bar on a TTY and :class:`PlainProgressLog` otherwise;
    pair it with ``Trainer(enable_progress_bar=sys.stdout.isatty())`` so that Lightning adds no
    default bar of its own where there is no terminal.

    Args:
        visualizer: the image-grid callback (``None``: none).
        progress_every_n_steps: interval of the plain progress lines.
        checkpoint_dir: where checkpoints go (default: the logger's directory).

    Returns:
        A list of callbacks for ``Trainer(callbacks=...)``.
    """
    callbacks: list[Callback] = [
        # Best by validation mIoU (first: `trainer.checkpoint_callback` reports its best score).
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            monitor="val/mIoU",
            mode="max",
            save_top_k=1,
            filename="best-step{step:06d}-miou{val/mIoU:.4f}",
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
        LearningRateMonitor(logging_interval="step"),
    ]
    if sys.stdout.isatty():
        callbacks.append(RichProgressBar())
    else:
        callbacks.append(PlainProgressLog(progress_every_n_steps))
    if visualizer is not None:
        callbacks.append(visualizer)
    return callbacks
