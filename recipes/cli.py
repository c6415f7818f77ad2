"""The command line shared by every recipe: LightningCLI over a recipe module and a data module.

A recipe is a data module class plus the paper's defaults for it; :func:`run_recipe` turns the two
into a ``LightningCLI`` with

- ``--model.*``: :class:`SegmentationRecipe` — the published model / loss / optimiser settings under
  their published names, turned into built objects for :class:`gcrf.training.SegmentationModule`;
- ``--data.*``: the data module's own arguments;
- ``--trainer.*``: Lightning's ``Trainer`` (``max_steps`` = the published ``num_batches_train_total``,
  ``val_check_interval`` = ``num_batches_validation_step``, ``default_root_dir`` = ``log_dir``,
  ``devices`` / ``num_nodes`` / ``strategy`` / ``precision`` for DDP and bf16);
- ``--visualization.*``: :class:`gcrf.training.SegmentationVisualizer` (the published schedule);
- ``--ckpt_path``: resume a run, ``--config file.yaml`` and ``--print_config`` from jsonargparse.

Training starts without a subcommand: ``python -m recipes.voc_scribbles --data.root /data``.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.layer_sync import LayerSync

from gcrf.conventions import LabelModality
from gcrf.loss import DEFAULT_KERNELS
from gcrf.training import (
    SegmentationModule,
    SegmentationVisualizer,
    TimmSyncBatchNorm,
    default_callbacks,
    make_optimizer_factory,
    make_poly_scheduler_factory,
)

__all__ = [
    "TRAINER_DEFAULTS",
    "RecipeCLI",
    "SegmentationRecipe",
    "build_gated_crf_loss",
    "build_network",
    "configure_logging",
    "recipe_main",
    "run_recipe",
]

#: Published schedule: 90,000 steps, validation every 5,000; SyncBatchNorm (timm-aware, see
#: :class:`gcrf.training.TimmSyncBatchNorm`) is a no-op on one device.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 90_000,
    "val_check_interval": 5_000,
    "check_val_every_n_epoch": None,
    "sync_batchnorm": True,
    "log_every_n_steps": 50,
}


def build_network(
    model_name: str,
    model_encoder_name: str | None,
    num_classes: int,
    model_pretrained: bool | str,
    model_kwargs: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """The segmentation network from ``gcrf.models`` (imported here: timm loads only when needed).

    Args:
        model_name: a name of ``gcrf.models.list_models()``.
        model_encoder_name: the timm encoder of ``"deeplabv3p"``; ``None`` for models that fix it
            (``"deeplabv3p_resnet50"``).
        num_classes: output classes.
        model_pretrained: ImageNet weights for the encoder (``True``), none, or a weight file.
        model_kwargs: further keyword arguments of the model (``output_stride``, ``aspp_channels``,
            ``freeze_batchnorm``, ...).
    """
    from gcrf.models import create_model

    kwargs = {
        "num_classes": num_classes,
        "pretrained": model_pretrained,
        **dict(model_kwargs or {}),
    }
    if model_encoder_name is not None:
        kwargs["encoder"] = model_encoder_name
    return create_model(model_name, **kwargs)


def build_gated_crf_loss(kernels: Sequence[Mapping[str, float]], radius: int) -> torch.nn.Module:
    """The Gated CRF loss module from ``gcrf.loss``."""
    from gcrf.loss import GatedCRFLoss

    return GatedCRFLoss(kernels=[dict(k) for k in kernels], radius=radius)


def configure_logging() -> None:
    """Show the library's INFO lines (progress, notes) on the console: rich on a TTY, plain otherwise."""
    logger = logging.getLogger("gcrf")
    logger.setLevel(logging.INFO)
    if logger.handlers:
        return
    if sys.stdout.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_level=False)
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False


class SegmentationRecipe(SegmentationModule):
    """The published training settings, by their published names, built into a SegmentationModule.

    Args:
        num_classes: number of classes (linked from the data module; no need to pass it).
        model_name: architecture in ``gcrf.models`` (published ``deeplabv3p``).
        model_encoder_name: timm encoder of ``deeplabv3p`` (published ``resnet34`` / ``resnet50`` /
            ``resnet101``; any timm ``features_only`` model works); ``None`` for named variants
            such as ``deeplabv3p_resnet50``.
        model_pretrained: start from ImageNet weights of the encoder (downloaded by timm), or the
            path of a local weight file.
        model_kwargs: further arguments of the model (``output_stride``, ``aspp_channels``,
            ``freeze_batchnorm``, ...; see ``gcrf.models.DeepLabV3Plus``).
        loss_cross_entropy_modality: labels for the CE term: ``semseg_dense``, ``semseg_scribbles``
            or ``semseg_clicks``.
        loss_cross_entropy_weight: weight of the CE term.
        loss_dice_weight: weight of a soft Dice term on the same labels (WSL4MIS's full
            supervision: CE and Dice weighted 0.5 each); 0 leaves it out.
        loss_cross_entropy_class_weights: weight CE by classes, w_c ∝ 1/ln(1.10 + p_c) from the
            data module's label histogram of the supervising modality (published ``..._sts``).
        loss_gatedcrf: add the Gated CRF term (published ``loss_gatedcrf_sts``).
        loss_gatedcrf_resolution: side of the probability map the Gated CRF loss sees (the stride-4
            softmax is resized bilinearly to it); ``None`` keeps the stride-4 size.
        loss_gatedcrf_radius: window radius r (window (2r+1)²).
        loss_gatedcrf_kernels_desc: kernel descriptors, e.g. ``[{"weight": 1, "xy": 6, "rgb": 0.1}]``.
        loss_gatedcrf_weight: weight of the Gated CRF term.
        loss_gatedcrf_use_after_progress_ratio: fraction of training before the Gated CRF term is on.
        optimizer: ``sgd`` or ``adam``.
        optimizer_kwargs: optimiser keyword arguments (``None``: the published DeepLab SGD settings).
        lr_scheduler: ``poly`` (per-step polynomial decay over ``trainer.max_steps``) or ``none``.
        lr_scheduler_power: exponent of the polynomial decay.
        compile_network: run the network's forward through ``torch.compile``.
    """

    def __init__(
        self,
        num_classes: int = 21,
        model_name: str = "deeplabv3p",
        model_encoder_name: str | None = "resnet34",
        model_pretrained: bool | str = True,
        model_kwargs: dict[str, Any] | None = None,
        loss_cross_entropy_modality: LabelModality = "semseg_dense",
        loss_cross_entropy_weight: float = 1.0,
        loss_cross_entropy_class_weights: bool = False,
        loss_dice_weight: float = 0.0,
        loss_gatedcrf: bool = False,
        loss_gatedcrf_resolution: int | None = None,
        loss_gatedcrf_radius: int = 5,
        loss_gatedcrf_kernels_desc: list[dict[str, float]] | None = None,
        loss_gatedcrf_weight: float = 0.1,
        loss_gatedcrf_use_after_progress_ratio: float = 0.005,
        optimizer: Literal["sgd", "adam"] = "sgd",
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_scheduler: Literal["poly", "none"] = "poly",
        lr_scheduler_power: float = 0.9,
        compile_network: bool = False,
    ) -> None:
        kernels = copy.deepcopy(loss_gatedcrf_kernels_desc or list(DEFAULT_KERNELS))
        network = build_network(
            model_name, model_encoder_name, num_classes, model_pretrained, model_kwargs
        )
        gated_crf = build_gated_crf_loss(kernels, loss_gatedcrf_radius) if loss_gatedcrf else None
        super().__init__(
            network,
            num_classes,
            gated_crf=gated_crf,
            cross_entropy_modality=loss_cross_entropy_modality,
            cross_entropy_weight=loss_cross_entropy_weight,
            dice_weight=loss_dice_weight,
            gated_crf_weight=loss_gatedcrf_weight,
            gated_crf_resolution=loss_gatedcrf_resolution,
            gated_crf_use_after_progress_ratio=loss_gatedcrf_use_after_progress_ratio,
            optimizer=make_optimizer_factory(optimizer, optimizer_kwargs),
            lr_scheduler=(
                make_poly_scheduler_factory(lr_scheduler_power) if lr_scheduler == "poly" else None
            ),
            compile_network=compile_network,
        )
        self.use_class_weights = loss_cross_entropy_class_weights
        # The flat settings fully describe the run: saved in checkpoints and TensorBoard hparams.
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.use_class_weights and self.class_weights is None:
            from gcrf.data import class_weights

            datamodule = self.trainer.datamodule
            histogram = datamodule.label_histogram(self.cross_entropy_modality)
            self.set_class_weights(class_weights(histogram))


class RecipeCLI(LightningCLI):
    """LightningCLI with the recipe's defaults, the visualiser, ``--ckpt_path`` and linked classes."""

    def __init__(self, *args: Any, recipe_defaults: Mapping[str, Any] | None = None, **kwargs: Any):
        self._recipe_defaults = dict(recipe_defaults or {})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SegmentationVisualizer, "visualization")
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Checkpoint to resume from (the same step, LR, optimiser and best mIoU); 'last' "
            "picks the run's last.ckpt.",
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.set_defaults(self._recipe_defaults)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with :class:`~gcrf.training.TimmSyncBatchNorm` behind ``sync_batchnorm``.

        Lightning's default SyncBatchNorm conversion would drop the activation of timm's fused
        BatchNorm+activation layers under DDP; a LayerSync plugin given by the user is kept. The
        recipe's default callbacks step aside where a ``--trainer.*`` flag turns their job off
        (``enable_checkpointing false``: no checkpoint callbacks; ``enable_progress_bar false``:
        no progress bar), instead of Lightning refusing the combination.
        """
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        defaults = self.trainer_defaults.get("callbacks") or []
        self.trainer_defaults["callbacks"] = [
            c
            for c in defaults
            if not (isinstance(c, ModelCheckpoint) and config.get("enable_checkpointing") is False)
            and not (isinstance(c, ProgressBar) and config.get("enable_progress_bar") is False)
        ]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if config.get("sync_batchnorm") and not any(isinstance(p, LayerSync) for p in plugins):
            kwargs["plugins"] = [*plugins, TimmSyncBatchNorm()]
        return super().instantiate_trainer(**kwargs)


def run_recipe(
    datamodule_class: type[LightningDataModule] | Callable[..., LightningDataModule],
    defaults: Mapping[str, Any] | None = None,
    args: list[str] | None = None,
    *,
    run: bool = True,
    monitor: str = "val/mIoU",
) -> RecipeCLI:
    """Parse the command line of a recipe and train.

    Args:
        datamodule_class: the recipe's data module class.
        defaults: the recipe's defaults, as dotted argument names (``"model.loss_gatedcrf": True``).
        args: the arguments (default: ``sys.argv[1:]``).
        run: train after parsing (``False`` only builds; tests use it).
        monitor: the validation metric of the best checkpoint (``"val/dice"`` for volumes).

    Returns:
        The CLI object (``.model``, ``.datamodule``, ``.trainer``).
    """
    configure_logging()
    cli = RecipeCLI(
        SegmentationRecipe,
        datamodule_class,
        recipe_defaults=defaults,
        trainer_defaults={
            **TRAINER_DEFAULTS,
            "callbacks": default_callbacks(monitor=monitor),
            "enable_progress_bar": sys.stdout.isatty(),
        },
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=False,
    )
    if run:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    return cli


def recipe_main(
    datamodule_class: type[LightningDataModule] | Callable[..., LightningDataModule],
    defaults: Mapping[str, Any],
    monitor: str = "val/mIoU",
) -> Callable[..., RecipeCLI]:
    """The ``main(args=None, run=True)`` entry of a recipe module: :func:`run_recipe` bound to its
    data module, defaults and monitored metric."""

    def main(args: list[str] | None = None, run: bool = True) -> RecipeCLI:
        """Parse ``args`` (default: the command line) and train (``run=False``: only build)."""
        return run_recipe(datamodule_class, defaults, args, run=run, monitor=monitor)

    return main
