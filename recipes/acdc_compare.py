"""The Gated CRF loss on real MRI, on a CPU: ``python -m recipes.acdc_compare --data.root /data/ACDC``.

Four runs on one ACDC fold with the same seed, data, network and budget, differing only in
supervision, loss and layer, each through its recipe (``recipes.acdc_full`` /
``recipes.acdc_scribbles``):

1. ``full``: 0.5 · (CE + Dice) on the dense labels (WSL4MIS's full supervision);
2. ``pce``: partial cross entropy on the scribbles;
3. ``pce_gatedcrf``: partial cross entropy + the Gated CRF loss;
4. ``pce_gatedcrf_crflayer``: the same with a mean-field CRF as a layer of the model
   (``--model.crf_layer``: the losses see the refined logits), its compatibility μ learnt;
   ``--crf_layer_run false`` leaves it out.

The CPU-scale settings (the same for all runs) shrink WSL4MIS's run where it costs: 128×128
inputs instead of 256, a UNet on a small timm encoder (``mobilenetv3_small_100``, decoder
``[64, 32, 16, 8, 8]``) trained from scratch, 1,000 steps of batch 12, SGD with lr 0.03 instead of
0.01 (poly 0.9, momentum 0.9, weight decay 1e-4). The loss is the ACDC recipe's (WSL4MIS's) —
weight 0.1, σ 0.1 on the [0, 1] intensities (the ``intensity`` modality), full-resolution
probabilities — with its kernel scaled to the input size, so that it covers the same anatomy: σ_xy
6 → 3 and radius 5 → round(2.5) = 2 at 128². The CRF layer uses the loss's kernel and radius, 5
iterations, μ starting at Potts.

Every run is scored with and without the same CRF refinement. Once a run has trained, its process
chooses the refinement setting on volumes of the fold's **training** patients (``--crf_grid``:
a stated grid of kernel weight, σ_xy, σ of the intensity term and radius, 5 iterations, by mean 3D
Dice; :func:`gcrf.training.select_refinement`), never on the validation volumes, and validates
again with it (``--model.crf_refinement``: ``val/dice_crf``, ``val/hd95_crf``). The table reports
the validation volumes' 3D Dice (mean ± std over volumes, per class) and HD95 (medpy's definition,
in voxels) of the final model, raw and refined, the chosen setting of each run and the share of the
pCE → full gap that the Gated CRF loss closes. Runs train side by side, one process each, every
console line labelled with its run; logs, checkpoints and each run's ``config.yaml`` go to
``--output_dir``.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

from gcrf.data.acdc import ACDCDataModule, ACDCVolumeDataset, acdc_fold
from gcrf.training import (
    CRFSetting,
    PredictedVolume,
    RefinementSelection,
    SegmentationModule,
    mean_field_grid,
    mean_field_refinement,
    select_refinement,
)
from recipes import presets
from recipes.cli import command_line_args
from recipes.runs import RunResult, RunSpec, cpu_trainer_settings, gap_closed, run_side_by_side

__all__ = [
    "CompareData",
    "RefinementGrid",
    "choose_refinement",
    "compare",
    "main",
    "refine_after_training",
    "training_volumes",
]


@dataclass
class CompareData:
    """The data of the comparison (``--data.*``, as in the ACDC recipes).

    Args:
        root: ACDC root in the WSL4MIS layout (``ACDC_training_slices``, ``ACDC_training_volumes``).
        fold: WSL4MIS fold 1..5.
        download: fetch missing files from the WSL4MIS repository (checked by sha256).
    """

    root: str = "data/ACDC"
    fold: int = 1
    download: bool = False


@dataclass
class RefinementGrid:
    """The CRF settings each run's refinement is chosen from (``--crf_grid.*``), in pixels of the
    comparison's input: every combination of one kernel ``{"weight", "xy", "intensity"}`` and a
    radius, ``iterations`` mean-field iterations, Potts.

    Args:
        weights: kernel weights.
        xy: position σ (pixels of the inference size, 128² by default).
        intensity: σ of the intensity term ([0, 1] MR intensities).
        radii: window radii.
        iterations: mean-field iterations of every setting.
        volumes: how many of the fold's training volumes the choice is made on (evenly spaced
            over its 160; :func:`training_volumes`).
    """

    weights: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    xy: list[float] = field(default_factory=lambda: [3.0, 5.0])
    intensity: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    radii: list[int] = field(default_factory=lambda: [3, 5])
    iterations: int = 5
    volumes: int = 12

    def settings(self, modality: str = ACDCDataModule.image_modality) -> list[CRFSetting]:
        """The grid's settings (:func:`gcrf.training.mean_field_grid`)."""
        return mean_field_grid(
            self.weights, self.xy, self.intensity, self.radii, modality, self.iterations
        )


def training_volumes(datamodule: ACDCDataModule, count: int) -> list[dict[str, Any]]:
    """``count`` volumes of the fold's training patients, evenly spaced in file order.

    Read from ``ACDC_training_volumes`` for the patients the fold trains on (whose slices are the
    training set): never a validation patient's volume.

    Returns:
        Items of :class:`gcrf.data.acdc.ACDCVolumeDataset` (``image`` 1×Z×H×W, ``semseg_dense``
        Z×H×W, ``name``).
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    train, _ = acdc_fold(datamodule.fold)
    dataset = ACDCVolumeDataset(datamodule.root, train)
    count = min(count, len(dataset))
    return [dataset[k * len(dataset) // count] for k in range(count)]


def choose_refinement(
    module: SegmentationModule, datamodule: ACDCDataModule, grid: RefinementGrid
) -> RefinementSelection:
    """The grid's setting with the highest mean 3D Dice on the fold's training volumes.

    The volumes (:func:`training_volumes`) are predicted whole, slice by slice as validation
    predicts them (:meth:`gcrf.training.SegmentationModule.predict_volume_logits`), and refined by
    gcrf's windowed CRF with the network input as the image
    (:func:`gcrf.training.mean_field_refinement`).
    """
    module.eval()
    predictions = []
    for item in training_volumes(datamodule, grid.volumes):
        inputs, logits = module.predict_volume_logits(item["image"].to(module.device))
        predictions.append(PredictedVolume(inputs, logits, item["semseg_dense"]))
    modality = datamodule.image_modality
    refine = functools.partial(mean_field_refinement, modality=modality)
    return select_refinement(predictions, grid.settings(modality), refine, datamodule.num_classes)


def refine_after_training(cli: Any, grid: RefinementGrid) -> dict[str, Any]:
    """What a run does once trained (``RunSpec.after``): choose the refinement on training
    volumes (:func:`choose_refinement`), then validate the final model again with it.

    Returns:
        ``crf_setting`` (its description), ``selection_dice`` / ``selection_raw_dice`` (mean 3D
        Dice on the training volumes, refined / raw), ``selection_volumes``,
        ``refinement_seconds`` and, for a learnt CRF layer, ``crf_layer_compatibility`` (μ).
    """
    start = time.monotonic()
    module = cli.model
    choice = choose_refinement(module, cli.datamodule, grid)
    module.crf_refinement = choice.setting.build()
    cli.trainer.validate(module, datamodule=cli.datamodule, verbose=False)
    extra: dict[str, Any] = {
        "crf_setting": str(choice.setting),
        "selection_dice": choice.dice,
        "selection_raw_dice": choice.raw_dice,
        "selection_volumes": choice.volumes,
        "refinement_seconds": time.monotonic() - start,
    }
    if module.crf_layer is not None and module.crf_layer.compatibility is not None:
        extra["crf_layer_compatibility"] = module.crf_layer.compatibility.detach().cpu().tolist()
    return extra


def compare(
    data: CompareData | None = None,
    steps: int = 1000,
    image_size: int = 128,
    batch_size: int = 12,
    model_encoder_name: str = "mobilenetv3_small_100",
    decoder_channels: list[int] | None = None,
    optimizer: Literal["sgd", "adam"] = "sgd",
    lr: float = 0.03,
    gated_crf_kernels: list[dict[str, float]] | None = None,
    gated_crf_radius: int | None = None,
    crf_layer_run: bool = True,
    crf_layer_iterations: int = 5,
    crf_grid: RefinementGrid | None = None,
    validations: int = 1,
    seed: int = 0,
    output_dir: str = "runs/acdc_compare",
    workers: int | None = None,
) -> list[RunResult]:
    """Train the runs, choose each one's refinement on training volumes, print the comparison.

    Args:
        data: root, fold and download of the ACDC data.
        steps: training steps of every run.
        image_size: side of the network input (slices are resized to it; WSL4MIS: 256).
        batch_size: training batch size (WSL4MIS: 12).
        model_encoder_name: timm encoder of the UNet (trained from scratch, 1 input channel).
        decoder_channels: UNet decoder widths, deepest first (default ``[64, 32, 16, 8, 8]``).
        optimizer: ``sgd`` (momentum 0.9, as WSL4MIS) or ``adam``; weight decay 1e-4 and poly 0.9
            either way.
        lr: learning rate (default 0.03: WSL4MIS's 0.01 is made for 60,000 steps and leaves the
            dense baseline undertrained in 1,000).
        gated_crf_kernels: the Gated CRF kernels, appearance term on ``intensity`` (default: the
            ACDC recipe's, WSL4MIS's at 256², with σ_xy scaled to ``image_size``: the same reach
            over the anatomy, 3 at 128²).
        gated_crf_radius: window radius (default: the ACDC recipe's 5 at 256², scaled likewise
            and rounded half to even: 2 at 128²).
        crf_layer_run: add ``pce_gatedcrf_crflayer``, partial CE + Gated CRF with a mean-field
            CRF layer (the loss's kernels and radius, μ learnt from Potts).
        crf_layer_iterations: the layer's mean-field iterations.
        crf_grid: the CRF settings each run's refinement is chosen from, on the fold's training
            volumes (default: :class:`RefinementGrid`'s 36 settings on 12 volumes).
        validations: validations per run (the last one is reported).
        seed: seed of the initialisation, the batch order and the augmentation (shared).
        output_dir: where the runs write logs, checkpoints and configurations.
        workers: processes training the runs side by side (default: all at once).

    Returns:
        One :class:`~recipes.runs.RunResult` per run (full, pce, pce_gatedcrf[,
        pce_gatedcrf_crflayer]); ``extra`` holds the chosen refinement (:func:`refine_after_training`).
    """
    data = data or CompareData()
    grid = crf_grid or RefinementGrid()
    fold = data.fold
    # The ACDC recipes train at 256² as WSL4MIS does: its kernel, in pixels, scales with the size.
    scale = image_size / presets.ACDC["data.image_size"]
    kernels = gated_crf_kernels or [
        {**kernel, "xy": kernel["xy"] * scale}
        for kernel in presets.ACDC_SCRIBBLES["model.gated_crf_kernels"]
    ]
    radius = (
        gated_crf_radius
        if gated_crf_radius is not None
        else max(1, round(presets.ACDC_SCRIBBLES["model.gated_crf_radius"] * scale))
    )
    decoder = decoder_channels or [64, 32, 16, 8, 8]
    if data.download:  # once, here, rather than in three processes at a time
        from gcrf.data.acdc import download_acdc

        download_acdc(data.root)
    optimizer_kwargs = {
        "lr": lr,
        "weight_decay": 1e-4,
        **({"momentum": 0.9} if optimizer == "sgd" else {}),
    }
    common = {
        "data.root": data.root,
        "data.fold": fold,
        "data.image_size": image_size,
        "data.batch_size": batch_size,
        "data.num_workers": 0,
        "data.num_workers_validation": 0,
        "data.cache": True,
        "model.model_encoder_name": model_encoder_name,
        "model.model_kwargs": {"in_channels": 1, "decoder_channels": decoder},
        "model.optimizer": optimizer,
        "model.optimizer_kwargs": optimizer_kwargs,
        **cpu_trainer_settings(steps, validations),
        "seed_everything": seed,
        "visualization.num_batches_visualization_step": max(1, steps // 2),
    }
    gated_crf = {"model.gated_crf_kernels": kernels, "model.gated_crf_radius": radius}
    runs = [
        ("full", "0.5·(CE + Dice) on dense labels", "recipes.acdc_full", {}),
        ("pce", "partial CE on scribbles", "recipes.acdc_scribbles", {"model.gated_crf": False}),
        ("pce_gatedcrf", "partial CE + Gated CRF", "recipes.acdc_scribbles", gated_crf),
    ]
    if crf_layer_run:
        layer = {
            "model.crf_layer": True,
            "model.crf_layer_kernels": kernels,
            "model.crf_layer_radius": radius,
            "model.crf_layer_iterations": crf_layer_iterations,
            "model.crf_layer_learn_compatibility": True,
        }
        runs.append(
            (
                "pce_gatedcrf_crflayer",
                "partial CE + Gated CRF, CRF layer (μ learnt)",
                "recipes.acdc_scribbles",
                {**gated_crf, **layer},
            )
        )
    after = functools.partial(refine_after_training, grid=grid)
    specs = [
        RunSpec(
            name,
            description,
            recipe,
            tuple(
                command_line_args(
                    {**common, **settings, "trainer.default_root_dir": f"{output_dir}/{name}"}
                )
            ),
            after,
        )
        for name, description, recipe, settings in runs
    ]
    console = Console(width=164)
    console.print(
        f"ACDC fold {fold}: {steps} steps of batch {batch_size} at {image_size}², UNet "
        f"({model_encoder_name}, decoder {decoder}) from scratch, {optimizer} lr {lr} poly 0.9; "
        f"Gated CRF weight {presets.ACDC_SCRIBBLES['model.gated_crf_weight']}, kernels {kernels}, "
        f"radius {radius} — " + ", ".join(s.description for s in specs)
    )
    console.print(
        f"Refinement of every run chosen on {grid.volumes} of the fold's training volumes by mean "
        f"3D Dice among {len(grid.settings())} settings: weights {grid.weights}, σ_xy {grid.xy}, "
        f"σ_intensity {grid.intensity}, radius {grid.radii}, {grid.iterations} iterations, Potts"
    )
    start = time.monotonic()
    results = run_side_by_side(specs, workers=workers if workers is not None else len(specs))
    total = time.monotonic() - start

    title = f"ACDC fold {fold}, validation volumes in 3D (final model, seed {seed}): raw | + CRF"
    table = Table(title=title)
    scores = ("Dice", "RV", "Myo", "LV", "HD95")
    for column in ("run", *scores, *(f"{c} crf" for c in scores), "time"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in results:
        table.add_row(
            r.name, *_scores(r.metrics, ""), *_scores(r.metrics, "_crf"), f"{r.seconds:.0f} s"
        )
    console.print(table)
    for r in results:
        extra = r.extra
        mu = extra.get("crf_layer_compatibility")
        console.print(
            f"[{r.name}] {r.description}; CRF chosen on {extra.get('selection_volumes')} training "
            f"volumes (mean 3D Dice {extra.get('selection_raw_dice', math.nan):.3f} → "
            f"{extra.get('selection_dice', math.nan):.3f}): {extra.get('crf_setting')}"
            + ("" if mu is None else f"; learnt μ {[[round(v, 3) for v in row] for row in mu]}"),
            markup=False,
        )
    for suffix, what in (("", "raw"), ("_crf", "refined")):
        full, pce, gcrf = (r.metrics.get(f"val/dice{suffix}", math.nan) for r in results[:3])
        console.print(
            f"{what}: the Gated CRF loss closes [bold]{100 * gap_closed(full, pce, gcrf):.0f} "
            f"%[/bold] of the gap between partial CE ({pce:.3f}) and full supervision "
            f"({full:.3f}) in mean Dice."
        )
    console.print(f"Total time {total:.0f} s. Logs and checkpoints: {output_dir}/<run>.")
    return results


def _scores(metrics: dict[str, float], suffix: str) -> list[str]:
    """The table cells of one run: Dice (mean ± std), per class, HD95; ``suffix`` "_crf" for the
    refined ones."""

    def value(key: str) -> float:
        return metrics.get(f"val/{key}{suffix}", math.nan)

    return [
        f"{value('dice'):.3f} ± {value('dice_std'):.3f}",
        *(f"{value(f'dice_{name}'):.3f}" for name in ("rv", "myo", "lv")),
        f"{value('hd95'):.1f}",
    ]


def main(args: list[str] | None = None) -> list[RunResult]:
    """Command-line entry: ``python -m recipes.acdc_compare --data.root DIR [--steps N] | --help``."""
    return CLI(compare, args=args if args is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
