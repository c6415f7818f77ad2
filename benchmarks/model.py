"""Benchmark of one training step of each recipe's default model, with and without the Gated CRF term.

Shows what the Gated CRF loss costs relative to the network. Each recipe's model and objective are
built by the recipe's own command line (``recipes.<recipe>.main(args, run=False)`` with
``--model.model_pretrained false`` and ``--model.loss_gatedcrf true``; nothing else changed), so
the rows follow the recipes' defaults:

- ``voc`` (``recipes.voc_scribbles``): DeepLabv3+ on ResNet-34, 256² crops, batch 48, 21 classes,
  the Gated CRF loss on the probabilities at 64×64;
- ``cityscapes`` (``recipes.cityscapes_clicks``): the same network, 512² crops, batch 16,
  19 classes, the loss at 128×128;
- ``acdc`` (``recipes.acdc_scribbles``): UNet on ResNet-34, 1-channel 256² slices, batch 12,
  4 classes, the loss on the full-resolution probabilities, Dice off;
- ``synthetic`` (``recipes.synthetic``): DeepLabv3+ on MobileNetV3-small-0.5, 64² scenes, batch 8.

One step: the network's forward, the recipe's objective (``CE`` on its label modality, plus Dice
where the recipe weights it; ``CE + GCRF`` adds the weighted Gated CRF term on the module's own
``gated_crf_inputs`` — softmax of the stride-4 logits at the recipe's resolution, the network input
as ``rgb``, ``mask_src`` = the valid pixels), backward and the recipe's optimiser step. Inputs are
random: ImageNet-normalised RGB (the MR recipes: intensities in [0, 1]), three quarters of the label
pixels unlabelled for weak supervision, the right eighth of every image invalid (padding).

The time is the median over ``--iterations`` steps after ``--warmup`` steps (CUDA: synchronised);
on CUDA the peak memory above the built model and batch is reported too. On CPU the numbers depend
strongly on the thread count and on other load; repeat and compare within one run only.

Run from the repository root::

    python -m benchmarks.model                                # every recipe (CPU: batch 2)
    python -m benchmarks.model --recipes [voc,acdc] --batch 4 --iterations 5 --threads 2
    python -m benchmarks.model --write_results true          # also update RESULTS.md's table
    python -m benchmarks.model --device cuda --json_path steps.json   # the recipes' batch sizes
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import torch
from jsonargparse import CLI
from torch import Tensor

from benchmarks.isolated import PeakMemory, median_time
from benchmarks.tables import ResultTable, machine_header, update_results
from gcrf.conventions import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from gcrf.training.objective import cross_entropy_loss, dice_loss

__all__ = ["RECIPES", "Row", "build_recipe", "main", "measure", "step_table"]

#: Benchmark name → the recipe module whose defaults it runs.
RECIPES: dict[str, str] = {
    "voc": "recipes.voc_scribbles",
    "cityscapes": "recipes.cityscapes_clicks",
    "acdc": "recipes.acdc_scribbles",
    "synthetic": "recipes.synthetic",
}


@dataclass(frozen=True)
class Row:
    """One measurement."""

    recipe: str
    model: str
    loss: str
    batch: int
    size: int
    ms_per_step: float
    images_per_s: float
    peak_bytes: int | None  #: CUDA only

    @property
    def steps_per_s(self) -> float:
        return 1e3 / self.ms_per_step


def build_recipe(recipe: str, encoder: str | None = None) -> tuple[Any, Any]:
    """The recipe's LightningModule (Gated CRF term on, random weights) and its data module."""
    args = ["--model.model_pretrained=false", "--model.loss_gatedcrf=true"]
    if encoder is not None:
        args.append(f"--model.model_encoder_name={encoder}")
    # The recipe parses ``args`` only; this command's own arguments are not its business.
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = importlib.import_module(RECIPES[recipe]).main(args, run=False)
    return cli.model, cli.datamodule


def _batch(module: Any, datamodule: Any, batch: int, device: torch.device) -> dict[str, Tensor]:
    size = datamodule.augmentation.crop_size
    channels = (module.hparams.get("model_kwargs") or {}).get("in_channels", 3)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, channels, size, size, generator=generator)
    if channels == 3:  # ImageNet-normalised RGB, as the natural-image recipes feed the network
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        image = (image - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    labels = torch.randint(0, datamodule.num_classes, (batch, size, size), generator=generator)
    if module.cross_entropy_modality != "semseg_dense":
        labels[torch.rand(labels.shape, generator=generator) < 0.75] = IGNORE_INDEX
    valid = torch.ones(batch, 1, size, size)
    valid[..., -size // 8 :] = 0
    labels[..., -size // 8 :] = IGNORE_INDEX
    return {
        "image": image.to(device),
        module.cross_entropy_modality: labels.to(device),
        "valid": valid.to(device),
    }


def measure(
    recipe: str,
    module: Any,
    datamodule: Any,
    with_gated_crf: bool,
    batch: int,
    iterations: int,
    warmup: int,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
) -> Row:
    """Time ``iterations`` training steps of a recipe's module on random data.

    Args:
        recipe: the name in :data:`RECIPES` (for the row).
        module: the recipe's LightningModule (:func:`build_recipe`), already on ``device``.
        datamodule: the recipe's data module (crop size, classes).
        with_gated_crf: add the Gated CRF term.
        batch: images per step.
        iterations: timed steps (median reported).
        warmup: untimed steps first.
        device: where to run.
        amp: bfloat16 autocast of the network (the objective stays fp32).
        channels_last: model and images in channels-last memory format.

    Returns:
        The :class:`Row`.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(memory_format=memory_format).train()
    data = _batch(module, datamodule, batch, device)
    data["image"] = data["image"].contiguous(memory_format=memory_format)
    target = data[module.cross_entropy_modality]
    optimiser = module.optimizer_factory(module.parameters())

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            output = module(data["image"])
        loss = module.cross_entropy_weight * cross_entropy_loss(
            output.high, target, module.class_weights
        )
        if module.dice_weight > 0:
            loss = loss + module.dice_weight * dice_loss(output.high, target)
        if with_gated_crf:
            probs, features, mask_src = module.gated_crf_inputs(data, output)
            gated_crf = module.gated_crf(probs, features, mask_src=mask_src)
            loss = loss + module.gated_crf_weight * gated_crf
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    memory = PeakMemory(device)
    if device.type == "cuda":
        memory.start()
    seconds = median_time(step, iterations, device, warmup)
    name = module.hparams["model_name"]
    encoder = module.hparams.get("model_encoder_name")
    return Row(
        recipe=recipe,
        model=f"{name} {encoder}" if encoder else name,
        loss="CE + GCRF" if with_gated_crf else "CE",
        batch=batch,
        size=datamodule.augmentation.crop_size,
        ms_per_step=1e3 * seconds,
        images_per_s=batch / seconds,
        peak_bytes=memory.peak_bytes() if device.type == "cuda" else None,
    )


def step_table(rows: list[Row], title: str) -> ResultTable:
    """The rows as a table, with the Gated CRF term's cost relative to the CE row of its recipe."""
    baseline = {(r.recipe, r.batch): r.ms_per_step for r in rows if r.loss == "CE"}
    with_peak = any(r.peak_bytes is not None for r in rows)
    columns = ["recipe", "model", "loss", "batch", "size", "ms / step", "steps / s", "images / s",
               "GCRF cost"] + (["peak memory"] if with_peak else [])  # fmt: skip
    table = ResultTable(title, columns, left=3)
    for r in rows:
        base = baseline.get((r.recipe, r.batch))
        cost = (
            "" if r.loss == "CE" or base is None else f"{100 * (r.ms_per_step / base - 1):+.1f} %"
        )
        cells = [r.recipe, r.model, r.loss, r.batch, f"{r.size}²", f"{r.ms_per_step:.0f}",
                 f"{r.steps_per_s:.2f}", f"{r.images_per_s:.1f}", cost]  # fmt: skip
        if with_peak:
            cells.append("" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.1f} GiB")
        table.add_row(*cells)
    return table


def main(
    recipes: list[Literal["voc", "cityscapes", "acdc", "synthetic"]] | None = None,
    batch: int | None = None,
    iterations: int | None = None,
    warmup: int | None = None,
    device: str | None = None,
    threads: int | None = None,
    encoder: str | None = None,
    amp: bool = False,
    channels_last: bool = False,
    no_loss: bool = False,
    write_results: bool = False,
    json_path: str | None = None,
) -> list[Row]:
    """Build each recipe's model, time its training step with and without the Gated CRF term.

    Args:
        recipes: names of :data:`RECIPES` (default: all).
        batch: images per step (default: the recipe's batch size on CUDA, 2 on CPU).
        iterations: timed steps (default: 3 on CPU, 10 on CUDA).
        warmup: untimed steps first (default: 1 on CPU, 3 on CUDA).
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        threads: CPU threads (default: torch's).
        encoder: replace the recipes' timm encoder (e.g. ``resnet50``).
        amp: bfloat16 autocast for the network.
        channels_last: channels-last memory format.
        no_loss: only the CE rows.
        write_results: update this device's training-step table in ``benchmarks/RESULTS.md``.
        json_path: also write the rows (and steps/s) as JSON there.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    iterations = iterations or (10 if on_cuda else 3)
    warmup = warmup if warmup is not None else (3 if on_cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    for name in ("lightning.pytorch", "lightning.fabric"):  # no "Seed set", "GPU available"
        logging.getLogger(name).setLevel(logging.WARNING)
    rows = []
    for recipe in recipes or list(RECIPES):
        module, datamodule = build_recipe(recipe, encoder)
        module = module.to(device)
        size = batch or (datamodule.batch_size if on_cuda else 2)
        for with_gated_crf in (False,) if no_loss else (False, True):
            rows.append(
                measure(
                    recipe,
                    module,
                    datamodule,
                    with_gated_crf,
                    size,
                    iterations,
                    warmup,
                    device,
                    amp,
                    channels_last,
                )
            )
            print(rows[-1], flush=True)
        del module
    where = (
        torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    )
    title = (
        f"Training step (fwd + objective + bwd + optimiser), {where}, amp {amp}, channels_last "
        f"{channels_last}, median of {iterations} steps after {warmup} warm-up"
    )
    table = step_table(rows, title)
    table.print()
    if write_results:
        runs = f"median of {iterations} steps after {warmup} warm-up, amp {amp}"
        block = (
            f"{machine_header(device.type, torch.get_num_threads(), runs)}\n\n{table.markdown()}"
        )
        update_results(f"model-{device.type}-table", block, f"{device.type.upper()}: training step")
    if json_path:
        records = [{**asdict(r), "steps_per_s": r.steps_per_s} for r in rows]
        Path(json_path).write_text(json.dumps(records, indent=1))
    return rows


if __name__ == "__main__":
    CLI(main)
