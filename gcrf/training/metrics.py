"""Volume metrics as the medical segmentation field reports them: per-class 3D Dice and HD95.

:class:`VolumeScores` collects, per validation volume, the Dice coefficient of every foreground
class (torchmetrics' ``dice_score``) and its 95th-percentile Hausdorff distance (MONAI's
``compute_hausdorff_distance(percentile=95)``, the definition of medpy's ``hd95`` that WSL4MIS uses),
and reports the mean over volumes per class and over classes. Volumes are scored in 3D at their
original size; distances are in voxels unless a spacing is given.

Empty masks: a class absent from both prediction and reference scores Dice 1 and no distance (the
volume is left out of that class's HD95 mean); a class present in one of the two only scores Dice 0
and, for HD95, the volume's diagonal — the largest distance possible — rather than WSL4MIS's 0,
which would reward predicting nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.segmentation import dice_score

__all__ = ["VolumeScores", "score_volume"]


def _hd95(prediction: Tensor, reference: Tensor, spacing: Sequence[float] | None) -> float:
    import warnings

    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():  # MONAI's own deprecation notices about its internals
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            prediction[None, None].float(),
            reference[None, None].float(),
            include_background=True,
            percentile=95,
            spacing=list(spacing) if spacing is not None else None,
        )
    return float(value.reshape(-1)[0])


def score_volume(
    prediction: Tensor,
    reference: Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Dice and HD95 of every foreground class of one volume.

    Args:
        prediction: Z×H×W (or H×W) integer labels.
        reference: the reference labels, same shape.
        num_classes: classes including the background (label 0, not scored).
        spacing: voxel size per axis (distances in its unit), or None for voxels.

    Returns:
        ``(dice, hd95)``, two float64 tensors of ``num_classes − 1`` values; HD95 is NaN where
        the class is in neither volume (see the module docstring for the empty cases).

    Example:
        >>> reference = torch.zeros(4, 8, 8, dtype=torch.long)
        >>> reference[1:3, 2:6, 2:6] = 1
        >>> dice, hd95 = score_volume(reference.clone(), reference, num_classes=2)
        >>> dice.tolist(), hd95.tolist()
        ([1.0], [0.0])
    """
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction and reference must have one shape, got {tuple(prediction.shape)} and "
            f"{tuple(reference.shape)}"
        )
    prediction, reference = prediction.long().cpu(), reference.long().cpu()
    for name, labels in (("prediction", prediction), ("reference", reference)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"{name} labels must be in [0, {num_classes}), got [{int(labels.min())}, "
                f"{int(labels.max())}]"
            )
    dice = dice_score(
        prediction[None],
        reference[None],
        num_classes=num_classes,
        include_background=False,
        average="none",
        input_format="index",
    ).reshape(-1)
    diagonal = math.sqrt(sum(s * s for s in prediction.shape))
    if spacing is not None:
        diagonal = math.sqrt(
            sum((s * d) ** 2 for s, d in zip(prediction.shape, spacing, strict=True))
        )
    dices, distances = [], []
    for k, label in enumerate(range(1, num_classes)):
        in_prediction = bool((prediction == label).any())
        in_reference = bool((reference == label).any())
        if not in_prediction and not in_reference:
            dices.append(1.0)
            distances.append(float("nan"))
        elif in_prediction != in_reference:
            dices.append(0.0)
            distances.append(diagonal)
        else:
            dices.append(float(dice[k]))
            distances.append(_hd95(prediction == label, reference == label, spacing))
    return torch.tensor(dices, dtype=torch.float64), torch.tensor(distances, dtype=torch.float64)


class VolumeScores(Metric):
    """Per-volume Dice and HD95 of every foreground class, averaged over the volumes seen.

    ``update(prediction, reference)`` scores one volume (Z×H×W labels); ``compute()`` returns a
    dict: ``dice`` and ``hd95`` (means over classes of the per-class means over volumes),
    ``dice_<name>`` / ``hd95_<name>`` per class, and ``dice_std`` (the standard deviation over
    volumes of the per-volume mean Dice). States are concatenated across processes (DDP).

    Args:
        class_names: names of all classes, background first (``("background", "rv", ...)``).
        spacing: voxel size per axis, or None (distances in voxels).
    """

    full_state_update = False

    def __init__(self, class_names: Sequence[str], spacing: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(class_names) < 2:
            raise ValueError(
                f"class_names must name the background and >= 1 class, got {class_names!r}"
            )
        self.class_names = list(class_names)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.add_state("dice", default=[], dist_reduce_fx="cat")
        self.add_state("hd95", default=[], dist_reduce_fx="cat")

    def update(self, prediction: Tensor, reference: Tensor) -> None:
        dice, hd95 = score_volume(prediction, reference, len(self.class_names), self.spacing)
        self.dice.append(dice.to(self.device, torch.float64)[None])
        self.hd95.append(hd95.to(self.device, torch.float64)[None])

    def compute(self) -> dict[str, Tensor]:
        dice = self.dice if isinstance(self.dice, Tensor) else torch.cat(self.dice)
        hd95 = self.hd95 if isinstance(self.hd95, Tensor) else torch.cat(self.hd95)
        dice_per_class = dice.mean(0)
        hd95_per_class = hd95.nanmean(0)
        out = {
            "dice": dice_per_class.mean(),
            "hd95": hd95_per_class.nanmean(),
            "dice_std": dice.mean(1).std(unbiased=False) if len(dice) > 1 else dice.new_zeros(()),
        }
        for k, name in enumerate(self.class_names[1:]):
            out[f"dice_{name}"] = dice_per_class[k]
            out[f"hd95_{name}"] = hd95_per_class[k]
        return {key: value.float() for key, value in out.items()}
