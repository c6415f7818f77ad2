"""gcrf's windowed CRF against pydensecrf2's fully connected CRF on the same ACDC predictions.

Issue: "on the same ACDC predictions, gcrf's refinement gains at least what pydensecrf2 gains, both
with settings chosen the same way on training volumes". This script takes trained ACDC models (the
checkpoints ``python -m recipes.acdc_compare`` writes, one per run), predicts the volumes slice by
slice as validation does, and for each model:

1. chooses gcrf's setting from the comparison's own grid (:class:`recipes.acdc_compare.RefinementGrid`:
   one kernel over position and intensity, 36 settings) and from pydensecrf2's own grid converted
   setting for setting (:func:`pydensecrf_grid_for_gcrf`, 36 settings), and pydensecrf2's from
   :data:`PYDENSECRF_GRID` (36 settings), all with
   :func:`gcrf.training.select_refinement` on the same volumes of the fold's **training** patients
   (by mean 3D Dice);
2. scores the validation volumes raw, refined by gcrf's choice and refined by pydensecrf2's:
   mean 3D Dice (± std over volumes), Dice per class, HD95 (medpy's definition) — the metrics of
   the comparison (:func:`gcrf.training.metrics.score_volume`).

pydensecrf2 (``pip install pydensecrf2``, built from source with a C++ compiler; a peer measured
against, never a dependency of gcrf or of CI) refines each slice at the prediction size: unaries
``−log softmax(logits)``, a Gaussian term and a bilateral term over the MR intensity in 0–255 units
(``create_pairwise_gaussian`` / ``create_pairwise_bilateral`` of ``pydensecrf.utils``, Potts
compatibilities, its default symmetric normalisation), ``inference(T)`` with the same T as gcrf.

Usage::

    python -m benchmarks.crf_quality --data.root /path/to/ACDC \\
        --checkpoints '{pce: runs/acdc_compare/pce/.../last.ckpt, pce_gatedcrf: ...}'
"""

from __future__ import annotations

import functools
import itertools
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jsonargparse import CLI
from rich.console import Console

from benchmarks.tables import ResultTable, update_results

__all__ = [
    "PYDENSECRF_GRID",
    "PYDENSECRF_GRID_RADIUS",
    "PydensecrfSetting",
    "main",
    "pydensecrf_grid_for_gcrf",
    "pydensecrf_refinement",
    "quality_table",
]


@dataclass(frozen=True)
class PydensecrfSetting:
    """One pydensecrf2 setting: ``addPairwiseGaussian(sxy, compat)`` and
    ``addPairwiseBilateral(sxy, srgb, compat)`` (σ in pixels, the intensity σ in 0–255 units)."""

    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    iterations: int = 5

    def __str__(self) -> str:
        return (
            f"Gaussian sxy {self.gaussian_sxy:g} compat {self.gaussian_compat:g}, bilateral sxy "
            f"{self.bilateral_sxy:g} srgb {self.bilateral_srgb:g} compat "
            f"{self.bilateral_compat:g}, {self.iterations} iterations"
        )


#: 36 settings (as many as the comparison's gcrf grid): Gaussian sxy × compat, bilateral sxy ×
#: srgb, bilateral compat 3; the setting of the issue's prototype (1/3, 5/5/3) is among them.
PYDENSECRF_GRID: tuple[PydensecrfSetting, ...] = tuple(
    PydensecrfSetting(g_sxy, g_compat, b_sxy, b_srgb, 3.0)
    for g_sxy, g_compat, b_sxy, b_srgb in itertools.product(
        (1.0, 3.0), (1.0, 3.0), (3.0, 5.0, 10.0), (3.0, 5.0, 10.0)
    )
)


#: The window of gcrf's counterpart of :data:`PYDENSECRF_GRID` (:func:`pydensecrf_grid_for_gcrf`).
PYDENSECRF_GRID_RADIUS = 5


def pydensecrf_grid_for_gcrf(
    modality: str, radius: int = PYDENSECRF_GRID_RADIUS, iterations: int = 5
) -> list[Any]:
    """gcrf's counterpart of :data:`PYDENSECRF_GRID`, setting for setting: the same Gaussian and
    bilateral terms (σ_xy in the pixels of the refined slices, the intensity σ converted from 0–255
    units) through :func:`gcrf.crf.kernels_from_pydensecrf` with ``window_radius``, so each weight
    is pydensecrf's ``compat`` over its Gaussian's mass in the window, as pydensecrf's
    normalisation makes it where the intensity is uniform; radius 5, Potts. The two CRFs then
    differ only in what they are: a window against full connection, the mass against the
    per-pixel normalisation."""
    from gcrf.crf import kernels_from_pydensecrf
    from gcrf.training import CRFSetting

    return [
        CRFSetting(
            kernels_from_pydensecrf(
                [(s.gaussian_sxy, s.gaussian_compat)],
                [(s.bilateral_sxy, s.bilateral_srgb, s.bilateral_compat)],
                modality=modality,
                window_radius=radius,
            ),
            radius=radius,
            iterations=iterations,
        )
        for s in PYDENSECRF_GRID
    ]


def pydensecrf_refinement(
    logits: torch.Tensor, image: torch.Tensor, setting: PydensecrfSetting
) -> torch.Tensor:
    """Refine each slice with pydensecrf2: a ``refine`` of :func:`gcrf.training.select_refinement`.

    Args:
        logits: Z×C×h×w logits.
        image: Z×1×h×w MR intensities in [0, 1] at the logits' size.
        setting: the pydensecrf2 setting.

    Returns:
        Z×C×h×w log-probabilities of pydensecrf's ``Q`` (its softmax is ``Q``).
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian

    num_slices, num_classes, height, width = logits.shape
    unary = -torch.log_softmax(logits.float(), dim=1).cpu().numpy()
    intensities = (image.float().clamp(0, 1) * 255.0).cpu().numpy()
    out = np.empty((num_slices, num_classes, height * width), dtype=np.float32)
    for z in range(num_slices):
        crf = dcrf.DenseCRF(height * width, num_classes)
        crf.setUnaryEnergy(np.ascontiguousarray(unary[z].reshape(num_classes, -1)))
        sxy = (setting.gaussian_sxy, setting.gaussian_sxy)
        crf.addPairwiseEnergy(
            create_pairwise_gaussian(sxy, (height, width)), compat=setting.gaussian_compat
        )
        bilateral = create_pairwise_bilateral(
            (setting.bilateral_sxy, setting.bilateral_sxy), (setting.bilateral_srgb,),
            intensities[z].transpose(1, 2, 0), chdim=2,
        )  # fmt: skip
        crf.addPairwiseEnergy(bilateral, compat=setting.bilateral_compat)
        out[z] = np.asarray(crf.inference(setting.iterations), dtype=np.float32)
    probs = torch.from_numpy(out).reshape(num_slices, num_classes, height, width)
    return torch.log(probs.clamp_min(1e-30))


@dataclass
class QualityData:
    """The ACDC data (``--data.*``): the WSL4MIS root and the fold the checkpoints were trained on.

    Args:
        root: ACDC root in the WSL4MIS layout.
        fold: the fold (its training patients choose the settings, its validation ones score).
    """

    root: str = "data/ACDC"
    fold: int = 1


@dataclass
class Options:
    """How the volumes are predicted and the settings chosen (as the comparison).

    Args:
        selection_volumes: training volumes the choice is made on (evenly spaced).
        image_size: the inference size the models were trained at.
        classes: names of the foreground classes, for the table.
    """

    selection_volumes: int = 12
    image_size: int = 128
    classes: list[str] = field(default_factory=lambda: ["rv", "myo", "lv"])


def _predict(module: Any, volumes: Sequence[Mapping[str, Any]]) -> list[Any]:
    from gcrf.training import PredictedVolume

    module.eval()
    out = []
    with torch.no_grad():
        for item in volumes:
            inputs, logits = module.predict_volume_logits(item["image"])
            out.append(PredictedVolume(inputs, logits, item["semseg_dense"]))
    return out


def _score(predictions: Sequence[Any], refine: Any, setting: Any, num_classes: int) -> dict:
    """Mean 3D Dice (± std over volumes), per class, and HD95 of the refined predictions."""
    from gcrf.training.metrics import labels_at_size, score_volume

    dice, hd95 = [], []
    for volume in predictions:
        logits = volume.logits if refine is None else refine(volume.logits, volume.image, setting)
        labels = labels_at_size(logits, volume.reference.shape[-2:])
        volume_dice, volume_hd95 = score_volume(labels, volume.reference, num_classes)
        dice.append(volume_dice.tolist())
        hd95.append(volume_hd95.tolist())
    per_volume = np.asarray(dice).mean(1)
    return {
        "dice": float(per_volume.mean()),
        "dice_std": float(per_volume.std()),
        "dice_per_class": np.asarray(dice).mean(0).tolist(),
        "hd95": float(np.nanmean(np.asarray(hd95))),
    }


def main(
    checkpoints: dict[str, str] | None = None,
    data: QualityData | None = None,
    options: Options | None = None,
    write_results: bool = False,
) -> list[dict[str, Any]]:
    """Choose and score both CRFs for every checkpoint; print the table (and write RESULTS.md).

    Args:
        checkpoints: run name → checkpoint of ``python -m recipes.acdc_compare`` (its runs write
            ``<output_dir>/<run>/lightning_logs/version_0/checkpoints/last.ckpt``).
        data: the ACDC root and fold.
        options: the number of training volumes the choice is made on.
        write_results: replace the ``crf-quality`` block of ``benchmarks/RESULTS.md``.
    """
    from gcrf.data.acdc import ACDCDataModule, ACDCVolumeDataset, acdc_fold
    from gcrf.training import mean_field_refinement, select_refinement
    from recipes.acdc_compare import RefinementGrid
    from recipes.cli import SegmentationRecipe

    if not checkpoints:
        raise ValueError(
            "checkpoints must name at least one run's checkpoint, e.g. --checkpoints "
            "'{pce: runs/acdc_compare/pce/lightning_logs/version_0/checkpoints/last.ckpt}'"
        )
    data = data or QualityData()
    options = options or Options()
    grid = RefinementGrid(volumes=options.selection_volumes)
    train_patients, val_patients = acdc_fold(data.fold)
    train_set = ACDCVolumeDataset(data.root, train_patients)
    count = min(options.selection_volumes, len(train_set))
    selection_items = [train_set[k * len(train_set) // count] for k in range(count)]
    val_set = ACDCVolumeDataset(data.root, val_patients)
    validation_items = [val_set[k] for k in range(len(val_set))]
    console = Console()
    rows = []
    for run, path in checkpoints.items():
        module = SegmentationRecipe.load_from_checkpoint(path, map_location="cpu")
        # What setup() takes from the data module: the inference size and the image's name.
        module.inference_size = (options.image_size, options.image_size)
        module.image_modality = ACDCDataModule.image_modality
        num_classes = module.num_classes
        modality = ACDCDataModule.image_modality
        ours = functools.partial(mean_field_refinement, modality=modality)
        selection = _predict(module, selection_items)
        validation = _predict(module, validation_items)
        raw = _score(validation, None, None, num_classes)
        rows.append({"run": run, "crf": "none", "setting": "", **raw})
        console.print(f"[{run}] validation mean 3D Dice {raw['dice']:.3f} (raw)", markup=False)
        candidates = (
            ("gcrf, one kernel", ours, grid.settings(modality)),
            (
                "gcrf, pydensecrf's grid",
                ours,
                pydensecrf_grid_for_gcrf(modality, iterations=grid.iterations),
            ),
            ("pydensecrf2", pydensecrf_refinement, PYDENSECRF_GRID),
        )
        for name, refine, settings in candidates:
            start = time.perf_counter()
            choice = select_refinement(selection, settings, refine, num_classes)
            chosen = _score(validation, refine, choice.setting, num_classes)
            rows.append({"run": run, "crf": name, "setting": str(choice.setting),
                         "selection_dice": choice.dice, "selection_raw_dice": choice.raw_dice,
                         "seconds": time.perf_counter() - start, **chosen})  # fmt: skip
            console.print(
                f"[{run}] {name}: chosen on {choice.volumes} training volumes "
                f"({choice.raw_dice:.3f} → {choice.dice:.3f}) among {len(settings)} settings: "
                f"{choice.setting}; validation {chosen['dice']:.3f} ({rows[-1]['seconds']:.0f} s)",
                markup=False,
            )
    table = quality_table(rows, options.classes)
    table.print()
    if write_results:
        update_results("crf-quality", table.markdown(), "CRF refinement quality on ACDC")
    return rows


def _short_numbers(text: str) -> str:
    """``text`` with every number of more than four decimals shown to four significant digits
    (the converted weights, e.g. 0.06200380582484522 → 0.062)."""
    return re.sub(r"\d+\.\d{5,}", lambda match: f"{float(match.group()):.4g}", text)


def quality_table(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> ResultTable:
    """The rows as a table: run, CRF, validation Dice (± std), per class, HD95, gain, setting."""
    table = ResultTable(
        "Refinement of the same ACDC predictions (validation volumes; settings chosen on training "
        "volumes)",
        ["run", "CRF", "Dice", *(f"Dice {c}" for c in classes), "HD95", "gain", "setting"],
        left=7,
    )
    raw = {row["run"]: row["dice"] for row in rows if row["crf"] == "none"}
    for row in rows:
        gain = "" if row["crf"] == "none" else f"{row['dice'] - raw[row['run']]:+.3f}"
        table.add_row(
            row["run"], row["crf"], f"{row['dice']:.3f} ± {row['dice_std']:.3f}",
            *(f"{d:.3f}" for d in row["dice_per_class"]), f"{row['hd95']:.1f}", gain,
            _short_numbers(row["setting"]),
        )  # fmt: skip
    return table


if __name__ == "__main__":
    CLI(main)
