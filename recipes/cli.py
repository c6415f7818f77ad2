"""The command line shared by every recipe: LightningCLI over the recipe's model and a data module.

A recipe is a data module class plus the paper's defaults for it; :func:`run_recipe` turns the two
into a ``LightningCLI`` with

- ``--model.*``: every setting of :class:`SegmentationRecipe` — the published model / loss /
  optimiser settings, turned into built objects for :class:`gcrf.training.SegmentationModule`;
- ``--data.*``: the data module's own arguments;
- ``--trainer.*``: Lightning's ``Trainer`` (``max_steps`` = the published ``num_batches_train_total``,
  ``val_check_interval`` = ``num_batches_validation_step``, ``default_root_dir`` = ``log_dir``,
  ``devices`` / ``num_nodes`` / ``strategy`` / ``precision`` for DDP and bf16);
- ``--visualization.*``: :class:`gcrf.training.SegmentationVisualizer` (the published schedule);
- ``--ckpt_path``: resume a run, ``--config file.yaml`` and ``--print_config`` from jsonargparse.

**One name per setting.** In Python — :class:`SegmentationModule`, :class:`SegmentationRecipe`, the
presets, the demo and the comparisons — a setting has gcrf's name (``gated_crf_weight``). The command
line keeps the published code's flags (``--model.loss_gatedcrf_weight``): :data:`PUBLISHED_NAMES`
is the one place that maps the two, and :func:`recipe_model`, the model the CLI builds, takes its
signature from the Python classes through it. A setting is added in one signature — a keyword
argument of ``SegmentationModule`` it passes on, or of ``SegmentationRecipe`` where the recipe
builds an object from it — and appears on the command line, documented by that signature's
docstring. Python code that drives the command line writes its settings in gcrf's names too and
turns them into arguments with :func:`command_line_args`.

Training starts without a subcommand: ``python -m recipes.voc_scribbles --data.root /data``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.layer_sync import LayerSync

from gcrf.data import WeakSegmentationDataModule
from gcrf.loss import DEFAULT_KERNELS
from gcrf.training import (
    CRFSetting,
    SegmentationModule,
    SegmentationVisualizer,
    TimmSyncBatchNorm,
    default_callbacks,
    make_optimizer_factory,
    make_poly_scheduler_factory,
)

__all__ = [
    "CONSOLE_HANDLER",
    "PUBLISHED_NAMES",
    "TRAINER_DEFAULTS",
    "RecipeCLI",
    "SaveRecipeConfig",
    "SegmentationRecipe",
    "build_gated_crf_loss",
    "build_network",
    "command_line_args",
    "command_line_key",
    "configure_logging",
    "model_settings",
    "recipe_main",
    "recipe_model",
    "run_recipe",
]

#: gcrf's name → the command line's, for every model setting whose flag is not gcrf's name: the
#: published flag (``--loss_gatedcrf_weight`` → ``--model.loss_gatedcrf_weight``), and the Dice
#: weight under the same ``loss_`` prefix. Every other setting keeps gcrf's name on the command line.
PUBLISHED_NAMES: dict[str, str] = {
    "cross_entropy_modality": "loss_cross_entropy_modality",
    "cross_entropy_weight": "loss_cross_entropy_weight",
    "cross_entropy_class_weights": "loss_cross_entropy_class_weights",
    "dice_weight": "loss_dice_weight",
    "gated_crf": "loss_gatedcrf",
    "gated_crf_resolution": "loss_gatedcrf_resolution",
    "gated_crf_radius": "loss_gatedcrf_radius",
    "gated_crf_kernels": "loss_gatedcrf_kernels_desc",
    "gated_crf_weight": "loss_gatedcrf_weight",
    "gated_crf_use_after_progress_ratio": "loss_gatedcrf_use_after_progress_ratio",
}
_GCRF_NAMES: dict[str, str] = {flag: name for name, flag in PUBLISHED_NAMES.items()}

#: Published schedule: 90,000 steps, validation every 5,000; SyncBatchNorm (timm-aware, see
#: :class:`gcrf.training.TimmSyncBatchNorm`) is a no-op on one device.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 90_000,
    "val_check_interval": 5_000,
    "check_val_every_n_epoch": None,
    "sync_batchnorm": True,
    "log_every_n_steps": 50,
}


def command_line_key(key: str) -> str:
    """The command line's key of a dotted setting written in gcrf's names.

    Example:
        >>> command_line_key("model.gated_crf_weight"), command_line_key("data.batch_size")
        ('model.loss_gatedcrf_weight', 'data.batch_size')
    """
    group, _, name = key.rpartition(".")
    return f"model.{PUBLISHED_NAMES.get(name, name)}" if group == "model" else key


def command_line_args(settings: Mapping[str, Any]) -> list[str]:
    """Command-line arguments of dotted settings written in gcrf's names.

    Strings are written as they are, other values as JSON, which the command line reads as YAML
    (``null``, ``true``, lists, dicts).

    Example:
        >>> command_line_args({"model.gated_crf": True, "model.gated_crf_resolution": None})
        ['--model.loss_gatedcrf=true', '--model.loss_gatedcrf_resolution=null']
        >>> command_line_args({"model.cross_entropy_modality": "semseg_scribbles"})
        ['--model.loss_cross_entropy_modality=semseg_scribbles']
    """
    return [
        f"--{command_line_key(key)}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in settings.items()
    ]


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


#: Name of the console handler :func:`configure_logging` installs on the ``gcrf`` logger.
CONSOLE_HANDLER = "gcrf.console"


def configure_logging(run: str | None = None) -> None:
    """Show the library's INFO lines (progress, notes) on the console: rich on a TTY, plain otherwise.

    Installs one console handler on the ``gcrf`` logger (named :data:`CONSOLE_HANDLER`) unless
    the logger has one, or handlers of the user's, already.

    Args:
        run: a label written ``[run]`` before every line from now on (runs sharing one console,
            see :func:`recipes.runs.labelled_console`); ``None`` keeps the lines as they are.
    """
    from rich.logging import RichHandler

    logger = logging.getLogger("gcrf")
    logger.setLevel(logging.INFO)
    ours = [h for h in logger.handlers if h.get_name() == CONSOLE_HANDLER]
    if not ours and not logger.handlers:
        handler: logging.Handler
        if sys.stdout.isatty():
            handler = RichHandler(show_path=False, show_level=False)  # it writes the time itself
        else:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler.set_name(CONSOLE_HANDLER)
        logger.addHandler(handler)
        logger.propagate = False
        ours = [handler]
    if run is None:
        return
    label = f"[{run.replace('%', '%%')}] "
    for handler in ours:
        if isinstance(handler, RichHandler):
            handler.setFormatter(logging.Formatter(f"{label}%(message)s"))
        else:
            handler.setFormatter(logging.Formatter(f"%(asctime)s {label}%(message)s", "%H:%M:%S"))


class SegmentationRecipe(SegmentationModule):
    """The model a recipe trains: a SegmentationModule built from flat settings.

    The arguments below are the settings the recipe turns into objects (the network, the Gated CRF
    loss, the two mean-field CRFs, the optimiser and scheduler factories, the CE class weights);
    every other keyword argument of :class:`~gcrf.training.SegmentationModule`
    (``cross_entropy_modality``, ``cross_entropy_weight``, ``dice_weight``, ``gated_crf_weight``,
    ``gated_crf_resolution``, ``gated_crf_use_after_progress_ratio``, ``compile_network``,
    ``crf_refinement_monitor``) is passed on as it is. On the command line they are the flags of
    :func:`recipe_model`.

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
        cross_entropy_class_weights: weight CE by classes, w_c ∝ 1/ln(1.10 + p_c) from the
            data module's label histogram of the supervising modality (published ``..._sts``).
        gated_crf: add the Gated CRF term (published ``loss_gatedcrf_sts``), a
            ``gcrf.loss.GatedCRFLoss`` of ``gated_crf_kernels`` and ``gated_crf_radius``.
        gated_crf_kernels: kernel descriptors, e.g. ``[{"weight": 1, "xy": 6, "rgb": 0.1}]``: the
            appearance term is named by the data module's ``image_modality`` (``rgb`` for the
            natural images, ``intensity`` for ACDC); ``None``: the published kernel
            ``gcrf.loss.DEFAULT_KERNELS``.
        gated_crf_radius: window radius r (window (2r+1)²).
        crf_refinement: refine the validation logits with a mean-field CRF
            (``gcrf.crf.MeanFieldCRF`` of the ``crf_refinement_*`` settings) and log the refined
            metrics beside the raw ones (``val/mIoU_crf``; ``val/dice_crf``, ``val/hd95_crf``).
        crf_refinement_kernels: the validation CRF's kernels, appearance term named by the data
            module's ``image_modality``, positions in pixels of the refined logits (the image's
            pixels for images, the inference size for volumes); ``None``: the Gated CRF kernels.
        crf_refinement_radius: the validation CRF's window radius.
        crf_refinement_iterations: the validation CRF's mean-field iterations.
        crf_refinement_compatibility: the validation CRF's C×C compatibility μ (non-negative,
            used as given); ``None``: Potts.
        crf_layer: a mean-field CRF as a layer of the model (CRF-as-RNN): it refines the
            network's ``low`` logits in every forward, so the losses see the refined logits.
        crf_layer_kernels: the layer's kernels (positions in pixels of the network's ``low``
            logits: stride 4 for DeepLabv3+, 1 for UNet); ``None``: the Gated CRF kernels.
        crf_layer_radius: the layer's window radius.
        crf_layer_iterations: the layer's mean-field iterations.
        crf_layer_compatibility: the layer's C×C compatibility μ (its start when learnt);
            ``None``: Potts.
        crf_layer_learn_compatibility: learn the layer's μ with the network, kept non-negative
            as softplus(θ) (``gcrf.training.Softplus``).
        optimizer: ``sgd`` or ``adam``.
        optimizer_kwargs: optimiser keyword arguments (``None``: the published DeepLab SGD settings).
        lr_scheduler: ``poly`` (per-step polynomial decay over ``trainer.max_steps``) or ``none``.
        lr_scheduler_power: exponent of the polynomial decay.
        **settings: the keyword settings of ``SegmentationModule`` passed on.

    Example:
        >>> recipe = SegmentationRecipe(4, model_encoder_name="mobilenetv3_small_050",
        ...                             model_pretrained=False, gated_crf=True, gated_crf_weight=0.5)
        >>> recipe.gated_crf_weight, recipe.hparams["gated_crf"]
        (0.5, True)
    """

    def __init__(
        self,
        num_classes: int = 21,
        *,
        model_name: str = "deeplabv3p",
        model_encoder_name: str | None = "resnet34",
        model_pretrained: bool | str = True,
        model_kwargs: dict[str, Any] | None = None,
        cross_entropy_class_weights: bool = False,
        gated_crf: bool = False,
        gated_crf_kernels: list[dict[str, float]] | None = None,
        gated_crf_radius: int = 5,
        crf_refinement: bool = False,
        crf_refinement_kernels: list[dict[str, float]] | None = None,
        crf_refinement_radius: int = 5,
        crf_refinement_iterations: int = 5,
        crf_refinement_compatibility: list[list[float]] | None = None,
        crf_layer: bool = False,
        crf_layer_kernels: list[dict[str, float]] | None = None,
        crf_layer_radius: int = 5,
        crf_layer_iterations: int = 5,
        crf_layer_compatibility: list[list[float]] | None = None,
        crf_layer_learn_compatibility: bool = False,
        optimizer: Literal["sgd", "adam"] = "sgd",
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_scheduler: Literal["poly", "none"] = "poly",
        lr_scheduler_power: float = 0.9,
        **settings: Any,
    ) -> None:
        kernels = copy.deepcopy(gated_crf_kernels or list(DEFAULT_KERNELS))
        network = build_network(
            model_name, model_encoder_name, num_classes, model_pretrained, model_kwargs
        )
        refinement = CRFSetting(
            crf_refinement_kernels or kernels,
            crf_refinement_radius,
            crf_refinement_iterations,
            crf_refinement_compatibility,
        )
        layer = CRFSetting(
            crf_layer_kernels or kernels,
            crf_layer_radius,
            crf_layer_iterations,
            crf_layer_compatibility,
        )
        super().__init__(
            network,
            num_classes,
            gated_crf=build_gated_crf_loss(kernels, gated_crf_radius) if gated_crf else None,
            crf_refinement=refinement.build(num_classes=num_classes) if crf_refinement else None,
            crf_layer=(
                layer.build(
                    learn_compatibility=crf_layer_learn_compatibility, num_classes=num_classes
                )
                if crf_layer
                else None
            ),
            optimizer=make_optimizer_factory(optimizer, optimizer_kwargs),
            lr_scheduler=(
                make_poly_scheduler_factory(lr_scheduler_power) if lr_scheduler == "poly" else None
            ),
            **settings,
        )
        self.use_class_weights = cross_entropy_class_weights
        # The flat settings fully describe the run: saved in checkpoints and TensorBoard hparams.
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.use_class_weights and self.class_weights is None:
            from gcrf.data import class_weights

            datamodule = self.trainer.datamodule
            histogram = datamodule.label_histogram(self.cross_entropy_modality)
            self.set_class_weights(class_weights(histogram))


#: Arguments of SegmentationModule that are objects, not settings: the recipe builds them from its
#: own settings (network, loss, factories, class weights) or the data module gives them.
_OBJECTS = (
    "network",
    "num_classes",
    "gated_crf",
    "crf_refinement",
    "crf_layer",
    "class_weights",
    "optimizer",
    "lr_scheduler",
    "class_names",
    "palette",
)


def _settings() -> list[inspect.Parameter]:
    """Every recipe setting by gcrf's name: SegmentationRecipe's own arguments, then the keyword
    settings of SegmentationModule that it passes on."""
    own = [
        p
        for p in inspect.signature(SegmentationRecipe.__init__, eval_str=True).parameters.values()
        if p.name != "self" and p.kind is not p.VAR_KEYWORD
    ]
    names = {p.name for p in own}
    passed = [
        p
        for p in inspect.signature(SegmentationModule.__init__, eval_str=True).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in names and p.name not in _OBJECTS
    ]
    return own + passed


def model_settings() -> tuple[str, ...]:
    """gcrf's names of every setting of the recipe's model (the ``--model.*`` flags, renamed by
    :data:`PUBLISHED_NAMES`).

    Example:
        >>> "gated_crf_weight" in model_settings() and "network" not in model_settings()
        True
    """
    return tuple(p.name for p in _settings())


def _setting_docs() -> str:
    """The ``Args`` section of :func:`recipe_model`: each setting's description from the docstring
    of its class, under its command-line name."""
    from docstring_parser import parse

    docs = {
        param.arg_name: " ".join((param.description or "").split())
        for cls in (SegmentationModule, SegmentationRecipe)
        for param in parse(cls.__doc__ or "").params
    }
    lines = []
    for param in _settings():
        flag = PUBLISHED_NAMES.get(param.name, param.name)
        gcrf_name = f" (gcrf: ``{param.name}``)" if flag != param.name else ""
        lines.append(f"    {flag}: {docs.get(param.name, '')}{gcrf_name}")
    return "\n".join(lines)


def recipe_model(**settings: Any) -> SegmentationRecipe:
    """Build :class:`SegmentationRecipe` from settings under their command-line names."""
    return SegmentationRecipe(**{_GCRF_NAMES.get(name, name): v for name, v in settings.items()})


# The command line reads its ``--model.*`` flags, their types, defaults and help from this
# signature and docstring: SegmentationRecipe's and SegmentationModule's, renamed once.
recipe_model.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [p.replace(name=PUBLISHED_NAMES.get(p.name, p.name), kind=p.KEYWORD_ONLY) for p in _settings()],
    return_annotation=SegmentationRecipe,
)
recipe_model.__doc__ = (
    "The recipe's model (:class:`SegmentationRecipe`), every setting under its command-line "
    "name: the published flag where the published code had one (:data:`PUBLISHED_NAMES`), gcrf's "
    "name otherwise.\n\nArgs:\n" + _setting_docs() + "\n"
)


@contextlib.contextmanager
def _without_lightning_cli_deprecations() -> Iterator[None]:
    """Lightning 2.6's CLI calls jsonargparse API that jsonargparse 4.49 deprecated; the notices
    name Lightning's own lines and nothing a recipe does can change them."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning, module=r"lightning\.pytorch\.cli"
        )
        yield


class SaveRecipeConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` (each run's ``config.yaml``), without the deprecation
    notices of Lightning's own call into jsonargparse."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        with _without_lightning_cli_deprecations():
            super().setup(trainer, pl_module, stage)


class RecipeCLI(LightningCLI):
    """LightningCLI with the recipe's defaults, the visualiser, ``--ckpt_path`` and linked classes.

    Args:
        recipe_defaults: the recipe's defaults, dotted settings in gcrf's names
            (``{"model.gated_crf": True}``; see :mod:`recipes.presets`).
        *args, **kwargs: ``LightningCLI``'s.
    """

    def __init__(self, *args: Any, recipe_defaults: Mapping[str, Any] | None = None, **kwargs: Any):
        self._recipe_defaults = {
            command_line_key(key): value for key, value in (recipe_defaults or {}).items()
        }
        with _without_lightning_cli_deprecations():
            super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (or ``sys.argv``); given ``args`` are the run's whole command line.

        LightningCLI warns when both ``args`` and ``sys.argv[1:]`` are non-empty. The recipes
        are called with ``args`` from Python on purpose (tests, the demo's worker processes,
        whose ``sys.argv`` is the demo's own command line), so that case is not a mistake here.
        """
        with warnings.catch_warnings():
            if args is not None:
                warnings.filterwarnings(
                    "ignore", message="LightningCLI's args parameter is intended to run from"
                )
            super().parse_arguments(parser, args)

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
        """The trainer, with the recipe's default callbacks and the timm-aware SyncBatchNorm.

        The default callbacks (:func:`gcrf.training.default_callbacks`) keep the best checkpoint
        by the metric the data module declares (``monitor``, ``monitor_mode``; a data module that
        declares none is taken to serve images: ``val/mIoU``, higher is better), or by its
        refined twin with ``--model.crf_refinement_monitor true``
        (:meth:`gcrf.training.SegmentationModule.monitored_metric`). They step aside
        where a ``--trainer.*`` flag turns their job off (``enable_checkpointing false``: no
        checkpoint callbacks; ``enable_progress_bar false``: no progress bar), instead of
        Lightning refusing the combination. :class:`~gcrf.training.TimmSyncBatchNorm` stands
        behind ``sync_batchnorm``: Lightning's default conversion would drop the activation of
        timm's fused BatchNorm+activation layers under DDP; a LayerSync plugin given by the user
        is kept.
        """
        # The trainer's settings as parsed (under the subcommand's key when there is one).
        parsed = self.config_init[self.subcommand] if self.subcommand else self.config_init
        config = {**parsed.get("trainer", {}), **kwargs}
        declared = getattr(self.datamodule, "monitor", WeakSegmentationDataModule.monitor)
        callbacks = default_callbacks(
            monitor=self.model.monitored_metric(declared),
            monitor_mode=getattr(
                self.datamodule, "monitor_mode", WeakSegmentationDataModule.monitor_mode
            ),
        )
        self.trainer_defaults["callbacks"] = [
            c
            for c in callbacks
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
) -> RecipeCLI:
    """Parse the command line of a recipe and train.

    Args:
        datamodule_class: the recipe's data module class (it declares the monitored metric).
        defaults: the recipe's defaults, dotted settings in gcrf's names
            (``"model.gated_crf": True``).
        args: the arguments (default: ``sys.argv[1:]``).
        run: train after parsing (``False`` only builds; tests use it).

    Returns:
        The CLI object (``.model``, ``.datamodule``, ``.trainer``).
    """
    configure_logging()
    cli = RecipeCLI(
        recipe_model,
        datamodule_class,
        recipe_defaults=defaults,
        trainer_defaults={**TRAINER_DEFAULTS, "enable_progress_bar": sys.stdout.isatty()},
        seed_everything_default=0,
        save_config_callback=SaveRecipeConfig,
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
) -> Callable[..., RecipeCLI]:
    """The ``main(args=None, run=True)`` entry of a recipe module: :func:`run_recipe` bound to its
    data module and defaults."""

    def main(args: list[str] | None = None, run: bool = True) -> RecipeCLI:
        """Parse ``args`` (default: the command line) and train (``run=False``: only build)."""
        return run_recipe(datamodule_class, defaults, args, run=run)

    return main
