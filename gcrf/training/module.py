"""The LightningModule of gcrf: cross entropy on (weak) labels plus the Gated CRF loss.

:class:`SegmentationModule` receives built objects — the network, the Gated CRF loss module (or
``None``), the cross-entropy settings and the optimiser / scheduler factories — and builds no
dataset and moves nothing to a device itself. The objective is the published one::

    total = w_ce · CE(high, labels of the supervising modality; ignore 255, optional class weights)
          + w_gcrf · GatedCRF(softmax(low) resized to the Gated CRF resolution,
                              {image_modality: the network input at input resolution},
                              mask_src = valid)

where ``high`` / ``low`` are the network's logits at the input size / at stride 4, and the Gated CRF
term is switched on once ``use_after_progress_ratio`` of the training steps have been taken.

Two mean-field CRFs (:class:`gcrf.crf.MeanFieldCRF`, docs/math.md#mean-field) can be given, each
with the network input under the declared ``image_modality`` as its image, computed in float32 with
autocast off (:meth:`SegmentationModule.refine`):

- ``crf_layer``, a layer of the model (CRF-as-RNN): :meth:`SegmentationModule.forward` refines the
  network's ``low`` logits, and ``high`` becomes their bilinear resize to the input size (the same
  tensor where the two sizes agree, as for UNet). The losses, validation and the visualiser all see
  the refined logits; the CRF's gradient reaches the network, and a learnt compatibility is
  optimised with it.
- ``crf_refinement``, applied at validation only, to the logits the metrics are computed from:
  the image-size ``high`` logits of image batches, and for volumes each slice's ``high`` logits at
  the inference size inside the slice-by-slice prediction (2D: the volumes carry no voxel
  spacing). The refined metrics are logged beside the raw ones under :func:`refined_metric`'s names
  (``val/mIoU_crf``, ``val/IoU_crf/<class>``; ``val/dice_crf``, ``val/hd95_crf``,
  ``val/dice_<class>_crf``, ...). The best checkpoint follows the raw metric unless
  ``crf_refinement_monitor`` asks for the refined one (:meth:`SegmentationModule.monitored_metric`).

The data module says what the module is given (its declarations, see
:class:`gcrf.data.WeakSegmentationDataModule`): ``image_modality``, the name under which the network
input reaches the Gated CRF loss (``"rgb"`` for ImageNet-normalised RGB, ``"intensity"`` for ACDC's
MR intensities), and ``validation_kind``, whether validation batches are images (scored by mIoU) or
whole volumes (3D Dice and HD95). A data module that declares nothing, or none at all (loaders
passed to ``Trainer.fit`` directly), is taken to serve RGB images — the defaults of
``WeakSegmentationDataModule``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, get_args

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassJaccardIndex

from gcrf.conventions import IGNORE_INDEX, LABEL_MODALITIES, LabelModality
from gcrf.data.datamodule import ValidationKind, WeakSegmentationDataModule
from gcrf.training.metrics import VolumeScores, labels_at_size
from gcrf.training.objective import (
    cross_entropy_loss,
    dice_loss,
    gated_crf_start_step,
    resize_probabilities,
)
from gcrf.training.optim import (
    DEFAULT_LR_SCHEDULER,
    OptimizerFactory,
    SchedulerFactory,
    make_optimizer_factory,
)
from gcrf.training.refinement import refined_metric

__all__ = ["SegmentationModule"]


class SegmentationModule(pl.LightningModule):
    """Train a segmentation network with cross entropy on (weak) labels plus the Gated CRF loss.

    Args:
        network: a module whose ``forward(image)`` returns an object with ``low`` (N×C×H/4×W/4) and
            ``high`` (N×C×H×W) logits (``gcrf.models.SegmentationOutput``).
        num_classes: number of classes C.
        gated_crf: the Gated CRF loss module, called as
            ``gated_crf(probs, {image_modality: image}, mask_src=valid)``; its kernels name the
            data module's ``image_modality`` (checked at setup); ``None`` trains with CE only.
        cross_entropy_modality: batch key of the CE labels: ``"semseg_dense"``,
            ``"semseg_scribbles"`` or ``"semseg_clicks"``.
        cross_entropy_weight: weight of the CE term.
        dice_weight: weight of a soft Dice term on the same labels (WSL4MIS trains dense labels with
            0.5·CE + 0.5·Dice); 0 leaves it out.
        class_weights: optional C class weights of the CE term.
        gated_crf_weight: weight of the Gated CRF term.
        gated_crf_resolution: resolution of the probabilities the Gated CRF loss sees: an int
            (rows; the columns follow the input's aspect ratio) or (rows, cols), each dividing the
            input size (see :func:`resize_probabilities`); ``None`` keeps the size of the
            network's ``low`` logits (stride 4 for DeepLabv3+).
        gated_crf_use_after_progress_ratio: the Gated CRF term is off for this fraction of the training
            steps (``trainer.estimated_stepping_batches``), then on.
        optimizer: optimiser factory (default: published SGD).
        lr_scheduler: scheduler factory stepped every step (default: the published poly decay,
            power 0.9, :data:`~gcrf.training.optim.DEFAULT_LR_SCHEDULER`); ``None`` keeps the
            learning rate constant.
        class_names: names for per-class metrics (default: the datamodule's ``class_names`` or
            ``class_0`` …).
        palette: C×3 uint8 display colours (default: the datamodule's ``palette``).
        compile_network: run the network's forward through ``torch.compile`` (named so as not to
            shadow ``nn.Module.compile()``).
        crf_refinement: a :class:`gcrf.crf.MeanFieldCRF` that refines the validation logits, or
            ``None``; its kernels name the data module's ``image_modality``. The refined metrics
            are logged beside the raw ones (``val/mIoU_crf``; ``val/dice_crf``,
            ``val/hd95_crf`` for volumes; per class as the raw ones). The attribute may be
            assigned later, before ``Trainer.validate`` (e.g. a setting chosen after training).
        crf_refinement_monitor: keep the best checkpoint by the refined validation metric
            (``val/dice_crf`` instead of ``val/dice``); needs ``crf_refinement``.
        crf_layer: a :class:`gcrf.crf.MeanFieldCRF` applied to the network's ``low`` logits in
            every forward, training included (the losses see the refined logits), or ``None``.

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
        cross_entropy_modality: LabelModality = "semseg_dense",
        cross_entropy_weight: float = 1.0,
        dice_weight: float = 0.0,
        class_weights: Tensor | Sequence[float] | None = None,
        gated_crf_weight: float = 0.1,
        gated_crf_resolution: int | Sequence[int] | None = None,
        gated_crf_use_after_progress_ratio: float = 0.005,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = DEFAULT_LR_SCHEDULER,
        class_names: Sequence[str] | None = None,
        palette: Tensor | None = None,
        compile_network: bool = False,
        crf_refinement: nn.Module | None = None,
        crf_refinement_monitor: bool = False,
        crf_layer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if cross_entropy_modality not in LABEL_MODALITIES:
            raise ValueError(
                f"cross_entropy_modality must be one of {LABEL_MODALITIES}, "
                f"got {cross_entropy_modality!r}"
            )
        if not 0 <= gated_crf_use_after_progress_ratio <= 1:
            raise ValueError(
                "gated_crf_use_after_progress_ratio must be in [0, 1], got "
                f"{gated_crf_use_after_progress_ratio!r}"
            )
        if gated_crf_resolution is not None:
            sides = (
                [gated_crf_resolution]
                if isinstance(gated_crf_resolution, int)
                else list(gated_crf_resolution)
                if isinstance(gated_crf_resolution, Sequence) and len(gated_crf_resolution) == 2
                else [None]
            )
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sides):
                raise ValueError(
                    "gated_crf_resolution must be None, an int >= 1 or a pair of ints >= 1, got "
                    f"{gated_crf_resolution!r}"
                )
        if gated_crf is not None and not callable(gated_crf):
            raise TypeError(
                f"gated_crf must be a callable loss module, got {type(gated_crf).__name__}"
            )
        for name, crf in (("crf_refinement", crf_refinement), ("crf_layer", crf_layer)):
            if crf is not None and not isinstance(crf, nn.Module):
                raise TypeError(
                    f"{name} must be a CRF module (gcrf.crf.MeanFieldCRF) or None, got "
                    f"{type(crf).__name__}"
                )
        if crf_refinement_monitor and crf_refinement is None:
            raise ValueError(
                "crf_refinement_monitor=True keeps the best checkpoint by the refined metric, "
                "but crf_refinement is None: give the validation CRF"
            )
        self.network = network
        self.num_classes = num_classes
        self.gated_crf = gated_crf
        self.cross_entropy_modality = cross_entropy_modality
        self.cross_entropy_weight = float(cross_entropy_weight)
        self.dice_weight = float(dice_weight)
        self.gated_crf_weight = float(gated_crf_weight)
        self.gated_crf_resolution = (
            gated_crf_resolution
            if gated_crf_resolution is None or isinstance(gated_crf_resolution, int)
            else tuple(gated_crf_resolution)
        )
        self.gated_crf_use_after_progress_ratio = float(gated_crf_use_after_progress_ratio)
        self.optimizer_factory = optimizer if optimizer is not None else make_optimizer_factory()
        self.scheduler_factory = lr_scheduler
        self.class_names = list(class_names) if class_names is not None else None
        self.palette = palette
        self.compile_network = bool(compile_network)
        self.crf_refinement = crf_refinement
        self.crf_refinement_monitor = bool(crf_refinement_monitor)
        self.crf_layer = crf_layer
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
        # IoU per class; NaN marks a class neither present nor predicted (left out of the mean).
        self.val_iou = MulticlassJaccardIndex(
            num_classes, average="none", ignore_index=IGNORE_INDEX, zero_division=float("nan")
        )
        # Volumes (N×C×Z×H×W validation batches): 3D Dice and HD95, built at setup (class names).
        self.val_volumes: VolumeScores | None = None
        # The same scores of the refined predictions, side by side with the raw ones (built at
        # setup when there is a validation CRF, so that one assigned later works too).
        self.val_iou_crf: MulticlassJaccardIndex | None = None
        self.val_volumes_crf: VolumeScores | None = None
        #: What the data module declares (read at setup; until then, and without a data module,
        #: the defaults of :class:`~gcrf.data.WeakSegmentationDataModule`: RGB images).
        self.image_modality: str = WeakSegmentationDataModule.image_modality
        self.validation_kind: ValidationKind = WeakSegmentationDataModule.validation_kind
        #: Size at which validation volumes are predicted slice by slice (default: the data
        #: module's ``inference_size``, else each slice's own size).
        self.inference_size: tuple[int, int] | None = None
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
        if self.inference_size is None and getattr(datamodule, "inference_size", None):
            self.inference_size = tuple(int(s) for s in datamodule.inference_size)
        self.image_modality = getattr(datamodule, "image_modality", self.image_modality)
        self.validation_kind = getattr(datamodule, "validation_kind", self.validation_kind)
        if self.validation_kind not in get_args(ValidationKind):
            raise ValueError(
                f"the data module's validation_kind must be one of {get_args(ValidationKind)}, "
                f"got {self.validation_kind!r}"
            )
        self._check_kernel_modalities()
        if self.validation_kind == "volumes" and self.val_volumes is None:
            self.val_volumes = VolumeScores(self.class_names)
        if self.crf_refinement is not None:
            if self.validation_kind == "volumes" and self.val_volumes_crf is None:
                self.val_volumes_crf = VolumeScores(self.class_names).to(self.device)
            if self.validation_kind == "images" and self.val_iou_crf is None:
                self.val_iou_crf = self.val_iou.clone().to(self.device)
        if self.compile_network and self._compiled_network is None:
            # Compile the forward only; the parameters stay registered under `network` alone, so
            # checkpoints of compiled and eager runs are interchangeable.
            object.__setattr__(self, "_compiled_network", torch.compile(self.network))

    def _check_kernel_modalities(self) -> None:
        """The kernels of the loss and of the CRFs read the one modality the module gives them:
        the declared image.

        Checked at setup, so that a kernel on another name fails before training instead of at
        the first step with the Gated CRF term on (or at the first validation).
        """
        for what, module in (
            ("Gated CRF", self.gated_crf),
            ("crf_refinement", self.crf_refinement),
            ("crf_layer", self.crf_layer),
        ):
            kernels = getattr(getattr(module, "config", None), "kernels", None) or ()
            named = {name for kernel in kernels for name, _ in kernel.modalities}
            if named - {self.image_modality}:
                raise ValueError(
                    f"the {what} kernels use the modalities {sorted(named)}, but the module gives "
                    f"them only the network input, which the data module declares as "
                    f"image_modality={self.image_modality!r}: name the kernels' appearance term "
                    f"{self.image_modality!r}, e.g. [{{'weight': 1.0, 'xy': 6.0, "
                    f"{self.image_modality!r}: 0.1}}]"
                )

    def monitored_metric(self, declared: str) -> str:
        """The validation metric the best checkpoint follows, given the data module's ``monitor``.

        The declared metric itself, or with ``crf_refinement_monitor`` its refined twin
        (:func:`~gcrf.training.refinement.refined_metric`: ``val/dice`` → ``val/dice_crf``).

        Example:
            >>> SegmentationModule(torch.nn.Identity(), 2).monitored_metric("val/dice")
            'val/dice'
        """
        return refined_metric(declared) if self.crf_refinement_monitor else declared

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
    def forward(self, image: Tensor, mask_src: Tensor | None = None) -> Any:
        """The model's output (``low`` and ``high`` logits) for an N×C×H×W network input.

        Without ``crf_layer``, the network's output. With it, the network's ``low`` logits refined
        by the layer (``mask_src``: its source gate, N×1×H×W, e.g. the valid-pixel mask; ``None``
        lets every pixel send messages) and ``high`` their bilinear resize to the input size —
        the refined ``low`` itself where the two sizes agree (UNet).
        """
        network = self.network if self._compiled_network is None else self._compiled_network
        output = network(image)
        if self.crf_layer is None:
            return output
        low = self.refine(self.crf_layer, output.low, image, mask_src)
        if tuple(output.high.shape) == tuple(low.shape):
            high = low
        else:
            high = F.interpolate(
                low, size=output.high.shape[-2:], mode="bilinear", align_corners=False
            )
        return type(output)(low, high)

    def refine(
        self, crf: nn.Module, logits: Tensor, image: Tensor, mask_src: Tensor | None = None
    ) -> Tensor:
        """Logits refined by a CRF whose image is the network input, as the Gated CRF loss gets it.

        The CRF is called as ``crf(logits, {image_modality: image}, mask_src=mask_src)`` in
        float32 with autocast off (under ``bf16-mixed`` the network's bf16 logits are cast up
        first), so its iterations never run in reduced precision.

        Args:
            crf: a :class:`gcrf.crf.MeanFieldCRF` (any module with that call).
            logits: N×C×h×w logits; the image's size must be an integer multiple of theirs.
            image: N×D×H×W network input.
            mask_src: optional N×1×H×W source gate.

        Returns:
            N×C×h×w float32 refined logits.
        """
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return crf(
                logits.float(),
                {self.image_modality: image.float()},
                mask_src=None if mask_src is None else mask_src.float(),
            )

    def compute_losses(self, batch: Mapping[str, Any], output: Any) -> dict[str, Tensor]:
        """The objective's terms for one batch.

        Returns:
            ``{"loss_ce", "loss_gatedcrf", "loss"}``; ``loss_gatedcrf`` is 0 while the term is off.
        """
        target = batch[self.cross_entropy_modality]
        loss_ce = cross_entropy_loss(output.high, target, self.class_weights)
        loss = self.cross_entropy_weight * loss_ce
        losses = {"loss_ce": loss_ce}
        if self.dice_weight > 0:
            losses["loss_dice"] = dice_loss(output.high, target)
            loss = loss + self.dice_weight * losses["loss_dice"]
        loss_gatedcrf = torch.zeros((), device=loss_ce.device)
        if self.gated_crf_active():
            probs, features, mask_src = self.gated_crf_inputs(batch, output)
            loss_gatedcrf = self.gated_crf(probs, features, mask_src=mask_src)
            loss = loss + self.gated_crf_weight * loss_gatedcrf
        return {**losses, "loss_gatedcrf": loss_gatedcrf, "loss": loss}

    def gated_crf_inputs(
        self, batch: Mapping[str, Any], output: Any
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """What the Gated CRF loss is called with: ``(probs, features, mask_src)``.

        ``probs`` = softmax of the network's ``low`` logits resized to ``gated_crf_resolution``;
        ``features`` = ``{image_modality: the network input}`` (the data module's declaration; σ
        of that modality is in the units of the input: ImageNet-normalised RGB for the
        natural-image data, [0, 1] intensities for ACDC); ``mask_src`` = the valid-pixel mask. The
        training visualiser shows the kernels of exactly these inputs.
        """
        image = batch["image"]
        probs = torch.softmax(output.low.float(), dim=1)
        probs = resize_probabilities(probs, self.gated_crf_resolution, image.shape[-2:])
        return probs, {self.image_modality: image.float()}, batch["valid"].float()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """The objective of one batch, logged; returns ``{"loss", "output"}``.

        ``output`` is the network's output detached from the graph (views, no copy): what the
        ``on_train_batch_end`` hooks of callbacks receive as ``outputs["output"]`` (the
        visualiser draws it); Lightning drops it after the step.
        """
        output = self(batch["image"], batch.get("valid"))
        losses = self.compute_losses(batch, output)
        batch_size = batch["image"].shape[0]
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/loss_ce", losses["loss_ce"].detach(), batch_size=batch_size)
        self.log("train/loss_gatedcrf", losses["loss_gatedcrf"].detach(), batch_size=batch_size)
        if "loss_dice" in losses:
            self.log("train/loss_dice", losses["loss_dice"].detach(), batch_size=batch_size)
        self.log("train/gatedcrf_active", float(self.gated_crf_active()), batch_size=batch_size)
        return {"loss": losses["loss"], "output": type(output)(*(t.detach() for t in output))}

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        image = batch["image"]
        expected = 5 if self.validation_kind == "volumes" else 4
        if image.dim() != expected:
            raise ValueError(
                f"the data module declares validation_kind={self.validation_kind!r}: validation "
                f"images must be {'N×C×Z×H×W' if expected == 5 else 'N×C×H×W'}, got shape "
                f"{tuple(image.shape)}"
            )
        if self.validation_kind == "volumes":
            for volume, reference in zip(image, batch["semseg_dense"], strict=True):
                inputs, logits = self.predict_volume_logits(volume)
                size = reference.shape[-2:]
                self.val_volumes.update(labels_at_size(logits, size), reference)
                if self.crf_refinement is not None:
                    refined = self.refine(self.crf_refinement, logits, inputs)
                    self.val_volumes_crf.update(labels_at_size(refined, size), reference)
            return
        output = self(image)
        target = batch["semseg_dense"]
        self.val_iou.update(output.high.argmax(dim=1), target)
        if self.crf_refinement is not None:
            # Pixels outside the image (validation padding) send no message.
            refined = self.refine(self.crf_refinement, output.high, image, batch.get("valid"))
            self.val_iou_crf.update(refined.argmax(dim=1), target)
        self.log(
            "val/loss_ce_dense",
            cross_entropy_loss(output.high, target),
            batch_size=image.shape[0],
            sync_dist=True,
        )

    @torch.no_grad()
    def predict_volume_logits(
        self, volume: Tensor, slices_per_batch: int = 16
    ) -> tuple[Tensor, Tensor]:
        """The network input and the ``high`` logits of every slice of a C×Z×H×W volume.

        Each slice is resized (bilinear) to :attr:`inference_size` (kept at its own size without
        one) and predicted (the model's forward: with ``crf_layer``, its refined logits). The
        volume is scored at its original size from these logits
        (:func:`~gcrf.training.metrics.labels_at_size`); a validation refinement refines them at
        this size.

        Returns:
            ``(inputs, logits)``: Z×C×h×w network inputs and Z×K×h×w float32 logits (K classes).
        """
        slices = volume.transpose(0, 1).float()  # Z×C×H×W
        if self.inference_size is not None and tuple(self.inference_size) != tuple(
            slices.shape[-2:]
        ):
            slices = F.interpolate(
                slices, size=self.inference_size, mode="bilinear", align_corners=False
            )
        logits = [self(chunk).high.float() for chunk in slices.split(slices_per_batch)]
        return slices, torch.cat(logits)

    @torch.no_grad()
    def predict_volume(self, volume: Tensor, slices_per_batch: int = 16) -> Tensor:
        """Labels of a C×Z×H×W volume, predicted slice by slice at :attr:`inference_size`.

        The logits of :meth:`predict_volume_logits` are resized back to the slice's original
        size (bilinear) and the argmax taken there: the volume is scored at its original size.

        Returns:
            Z×H×W int64 labels.
        """
        _, logits = self.predict_volume_logits(volume, slices_per_batch)
        return labels_at_size(logits, volume.shape[-2:])

    def on_validation_epoch_end(self) -> None:
        raw, refined = (
            (self.val_volumes, self.val_volumes_crf)
            if self.validation_kind == "volumes"
            else (self.val_iou, self.val_iou_crf)
        )
        if raw is None or raw.update_count == 0:  # e.g. limit_val_batches=0
            return
        self._log_scores(raw, refine=False)
        if self.crf_refinement is not None and refined is not None:
            self._log_scores(refined, refine=True)

    def _log_scores(self, metric: Any, refine: bool) -> None:
        """Log and reset one validation metric, under the refined names for ``refine``."""
        name = refined_metric if refine else str
        if self.validation_kind == "volumes":
            scores = metric.compute()
            metric.reset()
            for key, value in scores.items():
                self.log(name(f"val/{key}"), value, prog_bar=key == "dice" and not refine)
            return
        iou = metric.compute()
        metric.reset()
        present = ~torch.isnan(iou)
        miou = iou[present].mean() if present.any() else torch.zeros((), device=iou.device)
        self.log(name("val/mIoU"), miou, prog_bar=not refine)
        names = self.class_names or [f"class_{c}" for c in range(self.num_classes)]
        for class_name, value in zip(names, iou.tolist(), strict=True):
            if not math.isnan(value):
                self.log(name(f"val/IoU/{class_name}"), value)

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
