"""Datasets, weak labels and augmentation of gcrf (docs/CONTRACTS.md §2).

- :mod:`gcrf.data.weak_labels` — scribbles / clicks as geometry, their file formats, rasterisation;
- :mod:`gcrf.data.transforms` — raw samples, the resampler, the geometries and the pipeline: one
  random geometric draw for image, masks and weak labels;
- :mod:`gcrf.data.datamodule` — the Lightning data module all datasets share, CE class weights;
- :mod:`gcrf.data.synthetic` — procedural scenes (no download; the demo and test default);
- :mod:`gcrf.data.voc` — Pascal VOC 2012 + SBD with clicks and ScribbleSup scribbles;
- :mod:`gcrf.data.cityscapes` and :mod:`gcrf.data.cityscapes_clicks` — Cityscapes with synthetic
  clicks generated from the instance masks;
- :mod:`gcrf.data.acdc` — ACDC cardiac MRI with scribbles (WSL4MIS layout, patient folds, volumes);
- :mod:`gcrf.data.palettes` — class names and colours of every dataset, the ignore colour.

The data modules need the ``train`` extra (Lightning); they are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from gcrf.conventions import IGNORE_INDEX
from gcrf.data.transforms import AugmentationConfig, build_transform

_LAZY = {
    "MODALITIES": "gcrf.data.datamodule",
    "WeakSegmentationDataModule": "gcrf.data.datamodule",
    "class_weights": "gcrf.data.datamodule",
    "SyntheticDataModule": "gcrf.data.synthetic",
    "VOCDataModule": "gcrf.data.voc",
    "CityscapesDataModule": "gcrf.data.cityscapes",
    "ACDCDataModule": "gcrf.data.acdc",
}

__all__ = ["IGNORE_INDEX", "AugmentationConfig", "build_transform", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gcrf.data' has no attribute {name!r}")
