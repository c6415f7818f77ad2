"""The paper's defaults per dataset and supervision, as dotted settings in gcrf's names.

One home for the settings the recipe modules compose: ``python -m recipes.voc_scribbles`` is
``run_recipe(VOCDataModule, VOC_SCRIBBLES)``. Keys are LightningCLI's groups (``data.``,
``model.``, ``trainer.``) with gcrf's setting names; :func:`recipes.cli.command_line_key` gives
each one's command-line name (``model.gated_crf_weight`` is ``--model.loss_gatedcrf_weight``). Any of
them can be overridden on the command line or in a ``--config`` file; ``--print_config`` shows the
result.
"""

from __future__ import annotations

from typing import Any

from gcrf.crf import window_mass
from gcrf.data.acdc import ACDCDataModule
from gcrf.loss import DEFAULT_KERNELS
from gcrf.loss.functional import POSITION_KEYS

__all__ = [
    "ACDC",
    "ACDC_FULL",
    "ACDC_REFINEMENT",
    "ACDC_SCRIBBLES",
    "CITYSCAPES",
    "CITYSCAPES_CLICKS",
    "CITYSCAPES_FULL",
    "RGB_REFINEMENT",
    "SYNTHETIC",
    "VOC",
    "VOC_CLICKS",
    "VOC_FULL",
    "VOC_SCRIBBLES",
    "crf_refinement",
    "published_kernels",
    "weak_supervision",
]


def weak_supervision(modality: str) -> dict[str, Any]:
    """Cross entropy on a weak modality with class weights, plus the Gated CRF loss (the paper)."""
    return {
        "model.cross_entropy_modality": modality,
        "model.cross_entropy_class_weights": True,
        "model.gated_crf": True,
    }


def published_kernels(image_modality: str) -> list[dict[str, float]]:
    """The published kernel (:data:`gcrf.loss.DEFAULT_KERNELS`) with its appearance term on the
    modality a data module declares as its image (``image_modality``).

    Example:
        >>> published_kernels("intensity")
        [{'weight': 1.0, 'xy': 6.0, 'intensity': 0.1}]
    """
    return [
        {
            key if key == "weight" or key in POSITION_KEYS.values() else image_modality: value
            for key, value in kernel.items()
        }
        for kernel in DEFAULT_KERNELS
    ]


def crf_refinement(
    kernels: list[dict[str, float]], radius: int, iterations: int = 5
) -> dict[str, Any]:
    """The validation CRF's setting of a recipe (on with ``--model.crf_refinement true``)."""
    return {
        "model.crf_refinement_kernels": kernels,
        "model.crf_refinement_radius": radius,
        "model.crf_refinement_iterations": iterations,
    }


#: The validation refinement of ImageNet-normalised RGB images (σ of ``rgb`` in those units),
#: on the image-size logits: the best of 54 settings (weight 0.5/1/2 × σ_xy 2/3/5 × σ_rgb
#: 0.25/0.5/1 × radius 3/5, 5 iterations) by the training mIoU of the three demo models on 256
#: procedural *training* scenes (see ``docs/recipes.md``); not tuned on VOC or Cityscapes.
RGB_REFINEMENT: dict[str, Any] = crf_refinement([{"weight": 2.0, "xy": 5.0, "rgb": 0.5}], 5)

#: Pascal VOC 2012 + SBD: the published example command (crop 256, batch 48, Gated CRF at 64×64,
#: validation on the 512×512 centre crop), DeepLabv3+ on an ImageNet ResNet-34.
VOC: dict[str, Any] = {
    "data.augmentation.crop_size": 256,
    "data.augmentation.validation_center_crop": True,
    "data.augmentation.validation_center_crop_size": 512,
    "data.batch_size": 48,
    "data.batch_size_validation": 8,
    "model.gated_crf_resolution": 64,
    **RGB_REFINEMENT,
}
VOC_FULL: dict[str, Any] = {**VOC, "model.cross_entropy_modality": "semseg_dense"}
VOC_SCRIBBLES: dict[str, Any] = {**VOC, **weak_supervision("semseg_scribbles")}
#: Clicks need no ScribbleSup download.
VOC_CLICKS: dict[str, Any] = {
    **VOC,
    **weak_supervision("semseg_clicks"),
    "data.scribbles": False,
}

#: Cityscapes (fine): 512 crops, full-size validation, the Gated CRF at 128×128.
CITYSCAPES: dict[str, Any] = {
    "data.augmentation.crop_size": 512,
    "data.augmentation.validation_center_crop": False,
    "data.batch_size": 16,
    "data.batch_size_validation": 2,
    "model.gated_crf_resolution": 128,
    **RGB_REFINEMENT,
}
CITYSCAPES_FULL: dict[str, Any] = {
    **CITYSCAPES,
    "model.cross_entropy_modality": "semseg_dense",
    "data.clicks": False,
}
CITYSCAPES_CLICKS: dict[str, Any] = {**CITYSCAPES, **weak_supervision("semseg_clicks")}

#: Procedural scenes on a CPU: a small network from scratch, Adam, a short schedule, and scribbles
#: 5 px away from every boundary (the band the Gated CRF loss has to fill from the image edges);
#: supervision by flag: ``--model.loss_cross_entropy_modality semseg_scribbles
#: --model.loss_gatedcrf true``. ``recipes.demo`` trains three runs of it.
SYNTHETIC: dict[str, Any] = {
    "model.model_encoder_name": "mobilenetv3_small_050",
    "model.model_pretrained": False,
    "model.model_kwargs": {"aspp_channels": 64},
    "model.optimizer": "adam",
    "model.optimizer_kwargs": {"lr": 3e-3},
    "data.scribble_margin": 5.0,
    "model.gated_crf_weight": 1.0,
    "model.gated_crf_use_after_progress_ratio": 0.05,
    "trainer.max_steps": 1000,
    "trainer.val_check_interval": 250,
    "trainer.accelerator": "cpu",
    **RGB_REFINEMENT,
}

#: The validation refinement of ACDC's 256² slices: the setting ``python -m recipes.acdc_compare``
#: chose for partial CE + Gated CRF on 12 of fold 1's *training* volumes at 128² (docs/acdc.md:
#: ``{"weight": 0.5, "xy": 3, "intensity": 0.05}``, radius 5), brought to 256² with the same reach
#: over the anatomy (σ_xy and r doubled) and the same total message per pixel (the weight scaled
#: by the ratio of the position Gaussian's window masses, :func:`gcrf.crf.window_mass`: ≈ 1/4).
ACDC_REFINEMENT: dict[str, Any] = crf_refinement(
    [{"weight": 0.5 * window_mass(3.0, 5) / window_mass(6.0, 10), "xy": 6.0, "intensity": 0.05}],
    10,
)

#: ACDC cardiac MRI (WSL4MIS layout), after WSL4MIS's published Gated CRF run: a UNet on 1-channel
#: 256×256 slices, batch 12, SGD lr 0.01 (momentum 0.9, weight decay 1e-4), poly 0.9, 60,000
#: iterations, validation of the fold's volumes every 200, the best checkpoint by mean 3D Dice.
ACDC: dict[str, Any] = {
    "data.image_size": 256,
    "data.batch_size": 12,
    "model.model_name": "unet",
    "model.model_encoder_name": "resnet34",
    "model.model_pretrained": False,
    "model.model_kwargs": {"in_channels": 1},
    "model.optimizer": "sgd",
    "model.optimizer_kwargs": {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
    "model.lr_scheduler": "poly",
    "model.lr_scheduler_power": 0.9,
    "trainer.max_steps": 60_000,
    "trainer.val_check_interval": 200,
    **ACDC_REFINEMENT,
}
#: Full supervision as WSL4MIS trains it: 0.5 · (CE + Dice) on the dense labels.
ACDC_FULL: dict[str, Any] = {
    **ACDC,
    "model.cross_entropy_modality": "semseg_dense",
    "model.cross_entropy_weight": 0.5,
    "model.dice_weight": 0.5,
}
#: Partial CE on the scribbles + the Gated CRF loss on full-resolution probabilities (weight 0.1,
#: the published kernel — WSL4MIS's ``{"weight": 1, "xy": 6, "rgb": 0.1}`` — on the [0, 1]
#: intensities, which ACDC names ``intensity``; radius 5, from the first step);
#: ``--model.loss_gatedcrf false`` trains partial CE alone.
ACDC_SCRIBBLES: dict[str, Any] = {
    **ACDC,
    "model.cross_entropy_modality": "semseg_scribbles",
    "model.gated_crf": True,
    "model.gated_crf_weight": 0.1,
    "model.gated_crf_kernels": published_kernels(ACDCDataModule.image_modality),
    "model.gated_crf_radius": 5,
    "model.gated_crf_resolution": None,
    "model.gated_crf_use_after_progress_ratio": 0.0,
}
