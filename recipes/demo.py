"""The Gated CRF loss earning its keep in a few CPU minutes: ``python -m recipes.demo``.

Three short runs on the procedural scenes (``gcrf.data.synthetic``), same model, seed, data and
budget, differing only in supervision and loss:

1. ``full``: cross entropy on dense masks (the upper bound);
2. ``scribbles``: cross entropy on scribbles only;
3. ``scribbles + Gated CRF``: cross entropy on scribbles plus the Gated CRF loss.

Scribbles never come closer than a few pixels to any boundary, so CE alone has to guess where
objects end; the Gated CRF loss reads the answer off the image edges. The table at the end gives the
validation mIoU of each run, raw and refined by one mean-field CRF setting stated beside it, the same
for every run (``--model.crf_refinement``, the synthetic recipe's setting:
``recipes.presets.SYNTHETIC``), and the share of the scribbles→full gap that the Gated CRF loss
closes.
TensorBoard logs and image grids go to ``--output_dir`` (``tensorboard --logdir runs/demo``).

The runs are assembled the one way every recipe is: each is ``python -m recipes.synthetic`` with its
flags (:mod:`recipes.runs`), so every run records its whole configuration (``config.yaml``, the
checkpoint's and TensorBoard's hyperparameters) and can be repeated alone by its command line. The
defaults are the recipe's: the demo passes only what makes its runs differ and what it is told
(``--data``, ``--model``). The runs train side by side; each console line says which run it comes
from (``[scribbles_gatedcrf] step 50/1000 | train/loss …``).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from jsonargparse import CLI, ArgumentParser
from rich.console import Console
from rich.table import Table

from gcrf.data.synthetic import SyntheticDataModule
from gcrf.training import CRFSetting
from recipes import presets
from recipes.cli import command_line_args, configure_logging, model_settings
from recipes.runs import RunResult, RunSpec, cpu_trainer_settings, gap_closed, run_side_by_side

__all__ = ["SETTINGS", "demo", "gap_closed", "main"]

#: The three runs: name, description and their supervision (settings of ``recipes.synthetic`` in
#: gcrf's names).
SETTINGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "full",
        "CE on dense masks",
        {"model.cross_entropy_modality": "semseg_dense", "model.gated_crf": False},
    ),
    (
        "scribbles",
        "CE on scribbles",
        {"model.cross_entropy_modality": "semseg_scribbles", "model.gated_crf": False},
    ),
    (
        "scribbles_gatedcrf",
        "CE on scribbles + Gated CRF",
        {"model.cross_entropy_modality": "semseg_scribbles", "model.gated_crf": True},
    ),
)


def _data_settings() -> set[str]:
    """The arguments of ``--data.*`` in ``recipes.synthetic``: SyntheticDataModule's, with those
    it forwards to its base class, as the command line resolves them."""
    parser = ArgumentParser()
    parser.add_class_arguments(SyntheticDataModule, "data")
    return set(parser.get_defaults()["data"].as_dict())


def _check_names(group: str, given: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(
            f"{group} has settings recipes.synthetic does not know: {unknown}; known: {sorted(known)}"
        )


def demo(
    steps: int = presets.SYNTHETIC["trainer.max_steps"],
    seed: int = 0,
    validations: int = 2,
    data: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    output_dir: str = "runs/demo",
    threads: int | None = None,
    workers: int | None = None,
) -> list[RunResult]:
    """Train the three demo runs and print the comparison table, raw and refined.

    Every run is ``python -m recipes.synthetic`` with the settings of its supervision: the data,
    the model and the loss are that recipe's (``recipes.presets.SYNTHETIC`` and the defaults of
    ``SyntheticDataModule`` / ``SegmentationRecipe``), changed for all three runs by ``data`` and
    ``model``.

    Args:
        steps: training steps of every run (the same budget for all three; default: the synthetic
            recipe's).
        seed: seed of the data, the initialisation and the batch order (shared by the runs).
        validations: number of validations per run (the last one is reported).
        data: settings of ``SyntheticDataModule`` for the three runs, e.g. ``{image_size: 32,
            train_length: 256, scribble_margin: 3}``.
        model: settings of the recipe's model for the three runs, by gcrf's names, e.g.
            ``{gated_crf_weight: 0.5, gated_crf_kernels: [{weight: 1, xy: 4, rgb: 0.1}],
            optimizer_kwargs: {lr: 0.001}, crf_refinement_radius: 3}`` (``python -m
            recipes.synthetic --help`` lists them, under their command-line names); every run
            is validated with ``crf_refinement`` on unless this says ``crf_refinement: false``.
        output_dir: where each run writes its logs, configuration and checkpoints
            (``<output_dir>/<run>``).
        threads: torch CPU threads per run (default: the cores shared out between the runs).
        workers: processes training the runs side by side (default: one per run, at most one per
            CPU core; 1 trains them in turn in this process).

    Returns:
        One :class:`~recipes.runs.RunResult` per run (``.miou``, ``.checkpoint``, ``.log_dir``).
    """
    data, model = dict(data or {}), dict(model or {})
    _check_names("data", data, _data_settings())
    _check_names("model", model, set(model_settings()))
    common = {
        "seed_everything": seed,
        "data.seed": seed,
        "model.crf_refinement": True,
        **{f"data.{name}": value for name, value in data.items()},
        **{f"model.{name}": value for name, value in model.items()},
        **cpu_trainer_settings(steps, validations),
        "trainer.enable_model_summary": False,
        "trainer.log_every_n_steps": max(1, steps // 50),
        "visualization.num_batches_visualization_first": max(1, steps // 10),
        "visualization.num_batches_visualization_step": max(1, steps // 2),
    }
    specs = [
        RunSpec(
            name,
            description,
            "recipes.synthetic",
            tuple(
                command_line_args(
                    {**common, **supervision, "trainer.default_root_dir": f"{output_dir}/{name}"}
                )
            ),
        )
        for name, description, supervision in SETTINGS
    ]
    refined = bool(common["model.crf_refinement"])
    refinement = CRFSetting(
        *(
            common.get(
                f"model.crf_refinement_{name}", presets.SYNTHETIC[f"model.crf_refinement_{name}"]
            )
            for name in ("kernels", "radius", "iterations")
        ),
        common.get("model.crf_refinement_compatibility"),
    )
    console = Console()
    console.print(
        f"Training the {len(specs)} runs (python -m recipes.synthetic, {steps} steps each): "
        + ", ".join(s.description for s in specs)
        + (f"; validation also refined by the mean-field CRF {refinement}" if refined else "")
    )
    total_start = time.monotonic()
    results = run_side_by_side(specs, workers=workers, threads=threads)
    total = time.monotonic() - total_start

    table = Table(title=f"Procedural scenes, {steps} steps per run, seed {seed}")
    table.add_column("run")
    table.add_column("supervision / loss")
    table.add_column("val mIoU", justify="right")
    table.add_column("+ CRF", justify="right")
    table.add_column("time", justify="right")
    for result in results:
        table.add_row(
            result.name,
            result.description,
            f"{100 * result.miou:.1f}",
            f"{100 * result.metrics.get('val/mIoU_crf', float('nan')):.1f}" if refined else "–",
            f"{result.seconds:.0f} s",
        )
    closed = gap_closed(results[0].miou, results[1].miou, results[2].miou)
    console.print(table)
    console.print(
        f"Gated CRF closes [bold]{100 * closed:.0f} %[/bold] of the gap between scribbles "
        f"({100 * results[1].miou:.1f}) and full supervision ({100 * results[0].miou:.1f}). "
        f"Total time {total:.0f} s."
    )
    if refined:
        crf = [r.metrics.get("val/mIoU_crf", float("nan")) for r in results]
        console.print(
            f"+ CRF: every run's validation logits refined by {refinement}; with it, Gated CRF "
            f"closes {100 * gap_closed(*crf):.0f} % of the gap ({100 * crf[1]:.1f} → "
            f"{100 * crf[0]:.1f})."
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
