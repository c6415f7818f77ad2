"""The conventions every layer of gcrf shares, each defined once here.

- :data:`IGNORE_INDEX` — the label of "no label here" in every label map (dense, scribbles, clicks);
- :data:`LabelModality` / :data:`LABEL_MODALITIES` — the label maps of a sample, by key;
- :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` — the normalisation of RGB network inputs.

This module imports nothing from the rest of gcrf, so every part (data, training, viz, benchmarks)
can use it without pulling in another.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "LABEL_MODALITIES", "LabelModality"]

#: Label value meaning "no label here" in every label map of gcrf.
IGNORE_INDEX: int = 255

#: The label maps of a sample (docs/CONTRACTS.md §2), in the order of the published
#: ``loss_cross_entropy_modality``.
LabelModality = Literal["semseg_dense", "semseg_scribbles", "semseg_clicks"]
LABEL_MODALITIES: tuple[str, ...] = get_args(LabelModality)

#: ImageNet RGB mean and standard deviation (images in [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
