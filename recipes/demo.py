"""The Gated CRF loss earning its keep in a few CPU minutes: ``python -m recipes.demo``.

Three short runs on the procedural scenes (``gcrf.data.synthetic``), same model, seed, data and
budget, differing only in supervision and loss:

1. ``full``: cross entropy on dense masks (the upper bound);
2. ``scribbles``: cross entropy on scribbles only;
3. ``scribbles + Gated CRF``: cross entropy on scribbles plus the Gated CRF loss.

Scribbles never come closer than a few pixels to any boundary, so CE alone has to guess where
objects end; the Gated CRF loss reads the answer off the image edges. The table at the end gives the
validation mIoU of each run and the share of the scribbles→full gap that the Gated CRF loss closes.
TensorBoard logs and image grids go to ``--output_dir`` (``tensorboard --logdir runs/demo``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from jsonargparse import CLI
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.table import Table

from gcrf.data.synthetic import SyntheticDataModule
from gcrf.training import (
    PlainProgressLog,
    SegmentationModule,
    SegmentationVisualizer,
    make_optimizer_factory,
    make_poly_scheduler_factory,
)
from recipes import presets
from recipes.cli import build_gated_crf_loss, build_network, configure_logging
from recipes.runs import gap_closed

__all__ = ["DemoResult", "demo", "gap_closed", "main"]

SETTINGS = (
    ("full", "semseg_dense", False, "CE on dense masks"),
    ("scribbles", "semseg_scribbles", False, "CE on scribbles"),
    ("scribbles_gatedcrf", "semseg_scribbles", True, "CE on scribbles + Gated CRF"),
)


@dataclass
class DemoResult:
    """Outcome of one demo run."""

    name: str
    description: str
    miou: float
    seconds: float
    steps: int
    log_dir: str
    checkpoint: str  #: the final weights (``GCRF_CHECKPOINT`` of notebooks/training_results.ipynb)


def _run_one(
    name: str,
    modality: str,
    with_gated_crf: bool,
    description: str,
    *,
    steps: int,
    seed: int,
    datamodule_kwargs: dict,
    model_name: str,
    model_encoder_name: str,
    aspp_channels: int,
    lr: float,
    gatedcrf_kernels: list[dict[str, float]],
    gatedcrf_radius: int,
    gatedcrf_weight: float,
    gatedcrf_resolution: int | None,
    gatedcrf_use_after_progress_ratio: float,
    validations: int,
    output_dir: str,
) -> DemoResult:
    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule = SyntheticDataModule(seed=seed, **datamodule_kwargs)
    network = build_network(
        model_name,
        model_encoder_name,
        datamodule.num_classes,
        False,
        {"aspp_channels": aspp_channels},
    )
    module = SegmentationModule(
        network,
        datamodule.num_classes,
        gated_crf=build_gated_crf_loss(gatedcrf_kernels, gatedcrf_radius)
        if with_gated_crf
        else None,
        cross_entropy_modality=modality,
        gated_crf_weight=gatedcrf_weight,
        gated_crf_resolution=gatedcrf_resolution,
        gated_crf_use_after_progress_ratio=gatedcrf_use_after_progress_ratio,
        optimizer=make_optimizer_factory("adam", {"lr": lr}),
        lr_scheduler=make_poly_scheduler_factory(0.9),
    )
    logger = TensorBoardLogger(output_dir, name=name, version="", default_hp_metric=False)
    visualizer = SegmentationVisualizer(
        num_batches_visualization_first=max(1, steps // 10),
        num_batches_visualization_step=max(1, steps // 2),
        visualize_num_samples_in_batch=8,
        observe_train_ids=[0, 1, 2, 3],
        observe_valid_ids=[0, 1, 2, 3, 4, 5, 6, 7],
        tensorboard_img_grid_width=8,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=max(1, steps // validations),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[visualizer, PlainProgressLog(max(1, steps // 5))],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=max(1, steps // 50),
        deterministic=False,
    )
    start = time.monotonic()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.monotonic() - start
    miou = float(trainer.callback_metrics["val/mIoU"])
    checkpoint = os.path.join(logger.log_dir, "last.ckpt")
    trainer.save_checkpoint(checkpoint)
    return DemoResult(
        name, description, miou, seconds, int(trainer.global_step), logger.log_dir, checkpoint
    )


def _quiet_lightning() -> None:
    """The demo's own table is the output; keep Lightning's advice and warnings out of the way."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    configure_logging()
    warnings.filterwarnings("ignore", module="lightning")


def _run_in_worker(setting: tuple[str, str, bool, str], common: dict, threads: int) -> DemoResult:
    """One run in a worker process (spawned: it sets up its own logging and threads)."""
    torch.set_num_threads(threads)
    _quiet_lightning()
    return _run_one(*setting, **common)


def demo(
    steps: int = presets.SYNTHETIC_STEPS,
    seed: int = 0,
    image_size: int = 64,
    num_classes: int = 4,
    train_length: int = 1024,
    val_length: int = 256,
    batch_size: int = 8,
    scribble_margin: float = presets.SYNTHETIC_SCRIBBLE_MARGIN,
    model_name: str = "deeplabv3p",
    model_encoder_name: str = presets.SYNTHETIC_ENCODER,
    aspp_channels: int = presets.SYNTHETIC_ASPP_CHANNELS,
    lr: float = presets.SYNTHETIC_LR,
    gatedcrf_weight: float = presets.SYNTHETIC_GATEDCRF_WEIGHT,
    gatedcrf_xy_sigma: float = 6.0,
    gatedcrf_rgb_sigma: float = 0.1,
    gatedcrf_radius: int = 5,
    gatedcrf_resolution: int | None = None,
    gatedcrf_use_after_progress_ratio: float = presets.SYNTHETIC_GATEDCRF_USE_AFTER,
    validations: int = 2,
    output_dir: str = "runs/demo",
    threads: int | None = None,
    workers: int | None = None,
) -> list[DemoResult]:
    """Train the three demo runs and print the comparison table.

    Args:
        steps: training steps of every run (the same budget for all three).
        seed: seed of the data, the initialisation and the batch order (shared by the runs).
        image_size: side of the procedural scenes.
        num_classes: classes including the background.
        train_length: number of training scenes.
        val_length: number of validation scenes.
        batch_size: training batch size.
        scribble_margin: least distance in pixels of scribbles and clicks to any boundary: the
            band the weak labels leave open and the image edges have to fill.
        model_name: architecture in ``gcrf.models``.
        model_encoder_name: timm encoder (trained from scratch: no download).
        aspp_channels: width of the ASPP and decoder (256 in the paper; 64 keeps the demo fast).
        lr: Adam learning rate (polynomial decay, power 0.9).
        gatedcrf_weight: weight of the Gated CRF term.
        gatedcrf_xy_sigma: σ of the position kernel (prediction pixels).
        gatedcrf_rgb_sigma: σ of the colour kernel (normalised RGB units).
        gatedcrf_radius: window radius.
        gatedcrf_resolution: side of the probability map the loss sees (default: stride 4).
        gatedcrf_use_after_progress_ratio: share of the steps before the Gated CRF term is on.
        validations: number of validations per run (the last one is reported).
        output_dir: TensorBoard log directory.
        threads: torch CPU threads of the main process (default: torch's choice).
        workers: processes training the runs side by side (default: one per run, at most one per
            CPU core; 1 trains them in turn in this process).

    Returns:
        One :class:`DemoResult` per run.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    console = Console()
    datamodule_kwargs = {
        "num_classes": num_classes,
        "image_size": image_size,
        "train_length": train_length,
        "val_length": val_length,
        "batch_size": batch_size,
        "scribble_margin": scribble_margin,
    }
    kernels = [{"weight": 1.0, "xy": gatedcrf_xy_sigma, "rgb": gatedcrf_rgb_sigma}]
    common = {
        "steps": steps,
        "seed": seed,
        "datamodule_kwargs": datamodule_kwargs,
        "model_name": model_name,
        "model_encoder_name": model_encoder_name,
        "aspp_channels": aspp_channels,
        "lr": lr,
        "gatedcrf_kernels": kernels,
        "gatedcrf_radius": gatedcrf_radius,
        "gatedcrf_weight": gatedcrf_weight,
        "gatedcrf_resolution": gatedcrf_resolution,
        "gatedcrf_use_after_progress_ratio": gatedcrf_use_after_progress_ratio,
        "validations": validations,
        "output_dir": output_dir,
    }
    workers = workers if workers is not None else min(len(SETTINGS), os.cpu_count() or 1)
    total_start = time.monotonic()
    if workers <= 1:
        results = []
        for setting in SETTINGS:
            console.rule(f"[bold]{setting[3]}")
            results.append(_run_one(*setting, **common))
    else:
        # The runs are independent: one process each, the cores shared between them. A small
        # network keeps two cores far from busy with one run, so this is ~2x faster than in turn.
        threads_each = max(1, (os.cpu_count() or 1) // workers)
        console.print(
            f"Training the {len(SETTINGS)} runs in {workers} processes "
            f"({threads_each} thread(s) each): " + ", ".join(s[3] for s in SETTINGS)
        )
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [
                pool.submit(_run_in_worker, setting, common, threads_each) for setting in SETTINGS
            ]
            results = [future.result() for future in futures]
    total = time.monotonic() - total_start

    table = Table(title=f"Procedural scenes, {steps} steps per run, seed {seed}")
    table.add_column("run")
    table.add_column("supervision / loss")
    table.add_column("val mIoU", justify="right")
    table.add_column("time", justify="right")
    for result in results:
        table.add_row(
            result.name, result.description, f"{100 * result.miou:.1f}", f"{result.seconds:.0f} s"
        )
    closed = gap_closed(results[0].miou, results[1].miou, results[2].miou)
    console.print(table)
    console.print(
        f"Gated CRF closes [bold]{100 * closed:.0f} %[/bold] of the gap between scribbles "
        f"({100 * results[1].miou:.1f}) and full supervision ({100 * results[0].miou:.1f}). "
        f"Total time {total:.0f} s."
    )
    console.print(
        f"TensorBoard logs and image grids: [bold]{os.path.abspath(output_dir)}[/bold] "
        f"(tensorboard --logdir {output_dir}); final weights: <run>/last.ckpt, e.g. "
        f"GCRF_CHECKPOINT={results[2].checkpoint} jupyter lab notebooks/"
    )
    return results


def main(args: list[str] | None = None) -> list[DemoResult]:
    """Command-line entry: ``python -m recipes.demo [--steps N] [--seed S] ... | --help``."""
    _quiet_lightning()
    return CLI(demo, args=args if args is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
