"""Mean-field CRF refinement in training and evaluation: settings, the learnt μ, the refined metrics
and the choice of a setting on training volumes.

The CRF itself is :class:`gcrf.crf.MeanFieldCRF` (docs/math.md#mean-field). This module holds what
the training module and the recipes add around it:

- :class:`CRFSetting`, one CRF setting as a typed value (kernels, radius, iterations, compatibility)
  and :meth:`CRFSetting.build`, the one place a setting becomes a ``MeanFieldCRF`` — with a learnt,
  non-negative compatibility μ = softplus(θ) on request (:class:`Softplus`, a
  ``torch.nn.utils.parametrize`` parametrisation);
- :func:`refined_metric`, the name under which a refined metric is logged beside the raw one
  (``val/mIoU`` → ``val/mIoU_crf``);
- :func:`select_refinement`, the choice of a refinement setting on volumes by mean 3D Dice, for any
  refinement given as a ``refine(logits, image, setting)`` callable (:func:`mean_field_refinement`
  for gcrf's own CRF; a peer CRF is selected by the same function), and
  :func:`mean_field_grid`, a grid of windowed settings.
"""

from __future__ import annotations

import copy
import itertools
import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gcrf.crf import MeanFieldCRF
from gcrf.training.metrics import labels_at_size, volume_dice

__all__ = [
    "CRF_SUFFIX",
    "CRFSetting",
    "PredictedVolume",
    "RefinementSelection",
    "Softplus",
    "mean_field_grid",
    "mean_field_refinement",
    "refined_metric",
    "select_refinement",
]

log = logging.getLogger("gcrf.training")

#: What the name of a refined metric adds to the raw one's (:func:`refined_metric`).
CRF_SUFFIX = "_crf"

#: The smallest initial μ entry of a learnt compatibility: softplus⁻¹ of 0 is −∞, so the zeros of
#: Potts (its diagonal) start at softplus(θ) = 1e-4.
_LEARNT_MU_FLOOR = 1e-4


def refined_metric(key: str) -> str:
    """The key under which the refined twin of a validation metric is logged.

    ``_crf`` goes after the metric's name, the component after ``val/``; a class name after it
    stays last.

    Example:
        >>> refined_metric("val/mIoU"), refined_metric("val/IoU/car"), refined_metric("val/dice_rv")
        ('val/mIoU_crf', 'val/IoU_crf/car', 'val/dice_rv_crf')
    """
    if not isinstance(key, str) or key.count("/") < 1 or not key.split("/")[1]:
        raise ValueError(f"key must be a metric name such as 'val/mIoU'; got {key!r}")
    parts = key.split("/")
    parts[1] += CRF_SUFFIX
    return "/".join(parts)


class Softplus(nn.Module):
    """The parametrisation μ = softplus(θ) ≥ 0 of a learnt compatibility.

    Register it with ``torch.nn.utils.parametrize.register_parametrization(crf, "compatibility",
    Softplus())``: the optimiser updates θ (``parametrizations.compatibility.original``), every
    read of ``crf.compatibility`` is softplus(θ). ``right_inverse`` makes the registration keep
    the given μ (entries > 0).
    """

    def forward(self, theta: Tensor) -> Tensor:
        return F.softplus(theta)

    def right_inverse(self, mu: Tensor) -> Tensor:
        # softplus⁻¹(μ) = log(e^μ − 1) = μ + log(1 − e^{−μ}), stable for small and large μ.
        return mu + torch.log(-torch.expm1(-mu))


def _check_int(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an int >= {least}; got {value!r}")
    return int(value)


@dataclass(frozen=True)
class CRFSetting:
    """One mean-field CRF setting (docs/math.md#mean-field): what a refinement flag describes.

    Args:
        kernels: kernel descriptors, the loss's rules (e.g. ``[{"weight": 1, "xy": 3,
            "intensity": 0.1}]``; positions in pixels of the logits refined).
        radius: window radius r.
        iterations: mean-field iterations T.
        compatibility: μ as a C×C nested list of non-negative numbers, used as given, or ``None``
            for Potts.

    Example:
        >>> setting = CRFSetting([{"weight": 1.0, "xy": 3.0, "rgb": 0.1}], radius=2)
        >>> str(setting)
        "kernels [{'weight': 1.0, 'xy': 3.0, 'rgb': 0.1}], radius 2, 5 iterations, Potts"
        >>> setting.build().iterations
        5
    """

    kernels: Sequence[Mapping[str, float]]
    radius: int = 5
    iterations: int = 5
    compatibility: Sequence[Sequence[float]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.kernels, Mapping) or not isinstance(self.kernels, Sequence):
            raise TypeError(f"kernels must be a list of kernel dicts; got {self.kernels!r}")
        # Copies: the setting is a value, not a view of the caller's lists.
        object.__setattr__(self, "kernels", tuple(dict(k) for k in self.kernels))
        _check_int("radius", self.radius, 1)
        _check_int("iterations", self.iterations, 1)
        if self.compatibility is not None:
            object.__setattr__(
                self,
                "compatibility",
                tuple(tuple(float(v) for v in row) for row in self.compatibility),
            )

    def __str__(self) -> str:
        mu = "Potts" if self.compatibility is None else f"μ {[list(r) for r in self.compatibility]}"
        return (
            f"kernels {[dict(k) for k in self.kernels]}, radius {self.radius}, "
            f"{self.iterations} iterations, {mu}"
        )

    def build(
        self,
        *,
        learn_compatibility: bool = False,
        num_classes: int | None = None,
        backend: str = "auto",
    ) -> MeanFieldCRF:
        """The :class:`gcrf.crf.MeanFieldCRF` of this setting.

        Args:
            learn_compatibility: make μ a parameter, kept non-negative as softplus(θ)
                (:class:`Softplus`): it starts at the setting's μ (Potts when ``None``, which needs
                ``num_classes``; entries below 1e-4, such as Potts' zero diagonal, start at 1e-4)
                and every C×C entry is learnt.
            num_classes: C, to build Potts for a learnt μ and to check a given μ's shape.
            backend: ``"auto"``, ``"triton"`` or ``"torch"``.

        Returns:
            The CRF module; with ``learn_compatibility``, θ is its parameter
            ``parametrizations.compatibility.original``.
        """
        mu = (
            None
            if self.compatibility is None
            else torch.tensor(self.compatibility, dtype=torch.float32)
        )
        if num_classes is not None and mu is not None and tuple(mu.shape) != (num_classes,) * 2:
            raise ValueError(
                f"compatibility must be {num_classes}×{num_classes} for {num_classes} classes; "
                f"got {tuple(mu.shape)}"
            )
        kernels = [dict(k) for k in self.kernels]
        if not learn_compatibility:
            return MeanFieldCRF(kernels, self.radius, self.iterations, mu, backend=backend)
        if mu is None:
            if num_classes is None:
                raise ValueError("a learnt Potts compatibility needs num_classes; got None")
            mu = 1.0 - torch.eye(num_classes)
        crf = MeanFieldCRF(
            kernels,
            self.radius,
            self.iterations,
            nn.Parameter(mu.clamp_min(_LEARNT_MU_FLOOR)),
            backend=backend,
        )
        parametrize.register_parametrization(crf, "compatibility", Softplus())
        return crf


def mean_field_grid(
    weights: Sequence[float],
    xy: Sequence[float],
    appearance: Sequence[float],
    radii: Sequence[int],
    modality: str,
    iterations: int = 5,
) -> list[CRFSetting]:
    """Every combination of one-kernel windowed settings, ``{"weight", "xy", modality}`` × radius.

    Args:
        weights: kernel weights.
        xy: position σ, in pixels of the logits refined.
        appearance: σ of the image term, in the units of the image tensor.
        radii: window radii.
        modality: the image's name (a data module's ``image_modality``).
        iterations: T of every setting.

    Returns:
        The settings, weights varying slowest and radii fastest.

    Example:
        >>> grid = mean_field_grid([1, 2], [3], [0.1], [3, 5], "intensity")
        >>> [(s.kernels[0]["weight"], s.radius) for s in grid]
        [(1.0, 3), (1.0, 5), (2.0, 3), (2.0, 5)]
    """
    return [
        CRFSetting([{"weight": float(w), "xy": float(s), modality: float(a)}], int(r), iterations)
        for w, s, a, r in itertools.product(weights, xy, appearance, radii)
    ]


def mean_field_refinement(
    logits: Tensor, image: Tensor, setting: CRFSetting, modality: str = "rgb"
) -> Tensor:
    """Refine logits with gcrf's windowed CRF of ``setting``: a ``refine`` of
    :func:`select_refinement` (bind ``modality`` with ``functools.partial``).

    Args:
        logits: N×C×h×w logits (the slices of a volume).
        image: N×D×h×w, the network input at the logits' size.
        setting: the CRF setting.
        modality: the image's name in the kernels.

    Returns:
        N×C×h×w refined logits (float32).
    """
    return setting.build()(logits.float(), {modality: image.float()})


class PredictedVolume(NamedTuple):
    """A volume predicted slice by slice, as :func:`select_refinement` reads it.

    Attributes:
        image: Z×D×h×w, the network input of every slice at the prediction size.
        logits: Z×C×h×w, the network's logits of every slice at that size.
        reference: Z×H×W reference labels at the volume's original size.
    """

    image: Tensor
    logits: Tensor
    reference: Tensor


S = TypeVar("S")


class RefinementSelection(NamedTuple):
    """The outcome of :func:`select_refinement`.

    Attributes:
        setting: the setting with the highest mean 3D Dice.
        dice: its mean 3D Dice.
        raw_dice: the mean 3D Dice of the unrefined logits.
        scores: the mean 3D Dice of every setting, in the order given.
        volumes: how many volumes were scored.
    """

    setting: Any
    dice: float
    raw_dice: float
    scores: tuple[float, ...]
    volumes: int


def select_refinement(
    predictions: Sequence[PredictedVolume],
    settings: Sequence[S],
    refine: Callable[[Tensor, Tensor, S], Tensor],
    num_classes: int,
) -> RefinementSelection:
    """Choose the refinement setting with the highest mean 3D Dice on the volumes given.

    Every volume's logits are refined with every setting (``refine(logits, image, setting)``),
    resized back to the volume's original size and scored in 3D, as validation scores volumes
    (:func:`gcrf.training.metrics.labels_at_size`, :func:`gcrf.training.metrics.volume_dice`). The
    score of a setting is the mean 3D Dice: the mean over the foreground classes of the per-class
    Dice averaged over the volumes (``val/dice``'s definition). Ties go to the setting given
    first. Give it volumes the model was trained on — never the ones it is validated on: the
    function reads nothing but its arguments.

    Args:
        predictions: the volumes, each with its network input and logits at the prediction size
            and its reference at the original size.
        settings: the candidate settings (any type ``refine`` understands).
        refine: ``refine(logits Z×C×h×w, image Z×D×h×w, setting) -> Z×C×h×w`` refined logits; it
            must not modify its inputs.
        num_classes: C, background included.

    Returns:
        The chosen setting with its score, the unrefined score and every setting's score.

    Example:
        >>> reference = torch.zeros(1, 4, 4, dtype=torch.long)
        >>> reference[:, :, 2:] = 1
        >>> right = torch.stack([1 - reference, reference], 1).float()
        >>> wrong = PredictedVolume(torch.zeros(1, 1, 4, 4), -right, reference)
        >>> flip = lambda logits, image, sign: sign * logits
        >>> select_refinement([wrong], [1.0, -1.0], flip, num_classes=2).setting
        -1.0
    """
    if not predictions:
        raise ValueError("predictions must hold at least one volume; got none")
    if not settings:
        raise ValueError("settings must hold at least one setting; got none")
    for k, volume in enumerate(predictions):
        if not isinstance(volume, PredictedVolume):
            raise TypeError(
                f"predictions[{k}] must be a PredictedVolume; got {type(volume).__name__}"
            )
        if volume.logits.dim() != 4 or volume.logits.shape[1] != num_classes:
            raise ValueError(
                f"predictions[{k}].logits must be Z×{num_classes}×h×w; got "
                f"{tuple(volume.logits.shape)}"
            )
        if volume.image.shape[0] != volume.logits.shape[0] or volume.reference.dim() != 3:
            raise ValueError(
                f"predictions[{k}]: image {tuple(volume.image.shape)}, logits "
                f"{tuple(volume.logits.shape)} and reference {tuple(volume.reference.shape)} must "
                "have one slice count Z (image Z×D×h×w, reference Z×H×W)"
            )

    def mean_dice(per_volume: list[Tensor]) -> float:
        return float(torch.stack(per_volume).mean(0).mean())

    def score(volume: PredictedVolume, logits: Tensor) -> Tensor:
        labels = labels_at_size(logits, volume.reference.shape[-2:])
        return volume_dice(labels, volume.reference, num_classes)

    raw = mean_dice([score(v, v.logits) for v in predictions])
    scores = []
    for setting in settings:
        per_volume = []
        for volume in predictions:
            with torch.no_grad():
                refined = refine(volume.logits, volume.image, setting)
            if tuple(refined.shape) != tuple(volume.logits.shape):
                raise ValueError(
                    f"refine returned {tuple(refined.shape)} for logits of "
                    f"{tuple(volume.logits.shape)}; it must keep the shape"
                )
            per_volume.append(score(volume, refined))
        scores.append(mean_dice(per_volume))
        log.debug("refinement %s: mean 3D Dice %.4f", setting, scores[-1])
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    log.info(
        "refinement chosen on %d volumes by mean 3D Dice (%.4f, unrefined %.4f) among %d "
        "settings: %s",
        len(predictions),
        scores[best],
        raw,
        len(settings),
        settings[best],
    )
    return RefinementSelection(
        copy.deepcopy(settings[best]), scores[best], raw, tuple(scores), len(predictions)
    )
