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

The runs are assembled the one way every recipe is: each is ``python -m recipes.synthetic`` with its
flags (:mod:`recipes.runs`), so every run records its whole configuration (``config.yaml``, the
checkpoint's and TensorBoard's hyperparameters) and can be repeated alone by its command line.
"""

from __future__ import annotations

import sys
import time

from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

from recipes import presets
from recipes.cli import configure_logging
from recipes.runs import RunResult, RunSpec, cpu_trainer_flags, gap_closed, run_side_by_side

__all__ = ["SETTINGS", "demo", "gap_closed", "main"]

#: The three runs: name, description and the flags that set their supervision.
SETTINGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "full",
        "CE on dense masks",
        ("--model.loss_cross_entropy_modality=semseg_dense", "--model.loss_gatedcrf=false"),
    ),
    (
        "scribbles",
        "CE on scribbles",
        ("--model.loss_cross_entropy_modality=semseg_scribbles", "--model.loss_gatedcrf=false"),
    ),
    (
        "scribbles_gatedcrf",
        "CE on scribbles + Gated CRF",
        ("--model.loss_cross_entropy_modality=semseg_scribbles", "--model.loss_gatedcrf=true"),
    ),
)


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
) -> list[RunResult]:
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
        output_dir: where each run writes its logs, configuration and checkpoints
            (``<output_dir>/<run>``).
        threads: torch CPU threads per run (default: the cores shared out between the runs).
        workers: processes training the runs side by side (default: one per run, at most one per
            CPU core; 1 trains them in turn in this process).

    Returns:
        One :class:`~recipes.runs.RunResult` per run (``.miou``, ``.checkpoint``, ``.log_dir``).
    """
    resolution = "null" if gatedcrf_resolution is None else gatedcrf_resolution
    common = (
        f"--seed_everything={seed}",
        f"--data.seed={seed}",
        f"--data.num_classes={num_classes}",
        f"--data.image_size={image_size}",
        f"--data.train_length={train_length}",
        f"--data.val_length={val_length}",
        f"--data.batch_size={batch_size}",
        f"--data.scribble_margin={scribble_margin}",
        f"--model.model_name={model_name}",
        f"--model.model_encoder_name={model_encoder_name}",
        "--model.model_pretrained=false",
        f"--model.model_kwargs={{aspp_channels: {aspp_channels}}}",
        "--model.optimizer=adam",
        f"--model.optimizer_kwargs={{lr: {lr}}}",
        f"--model.loss_gatedcrf_weight={gatedcrf_weight}",
        f"--model.loss_gatedcrf_kernels_desc=[{{weight: 1.0, xy: {gatedcrf_xy_sigma}, "
        f"rgb: {gatedcrf_rgb_sigma}}}]",
        f"--model.loss_gatedcrf_radius={gatedcrf_radius}",
        f"--model.loss_gatedcrf_resolution={resolution}",
        f"--model.loss_gatedcrf_use_after_progress_ratio={gatedcrf_use_after_progress_ratio}",
        *cpu_trainer_flags(steps, validations),
        "--trainer.enable_model_summary=false",
        f"--trainer.log_every_n_steps={max(1, steps // 50)}",
        f"--visualization.num_batches_visualization_first={max(1, steps // 10)}",
        f"--visualization.num_batches_visualization_step={max(1, steps // 2)}",
    )
    specs = [
        RunSpec(
            name,
            description,
            "recipes.synthetic",
            (*common, *flags, f"--trainer.default_root_dir={output_dir}/{name}"),
        )
        for name, description, flags in SETTINGS
    ]
    console = Console()
    console.print(
        f"Training the {len(specs)} runs (python -m recipes.synthetic, {steps} steps each): "
        + ", ".join(s.description for s in specs)
    )
    total_start = time.monotonic()
    results = run_side_by_side(specs, workers=workers, threads=threads)
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
        f"Logs, configurations and image grids: [bold]{output_dir}/<run>[/bold] "
        f"(tensorboard --logdir {output_dir}); final weights: e.g. "
        f"GCRF_CHECKPOINT={results[2].checkpoint} jupyter lab notebooks/"
    )
    return results


def main(args: list[str] | None = None) -> list[RunResult]:
    """Command-line entry: ``python -m recipes.demo [--steps N] [--seed S] ... | --help``."""
    configure_logging()
    return CLI(demo, args=args if args is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
