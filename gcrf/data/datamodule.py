"""The Lightning data module every dataset of gcrf shares.

A dataset of gcrf is a map-style dataset of **raw samples** (see
:mod:`gcrf.data.transforms.raw_sample`: ``image``, ``semseg_dense``, ``scribbles``, ``clicks``,
``index``). :class:`WeakSegmentationDataModule` builds the training and validation raw datasets
through :meth:`~WeakSegmentationDataModule.build_datasets` (the one method a dataset's data module
writes), wraps them with the augmentation pipeline of
:func:`gcrf.data.transforms.build_transform`, and serves the batches of CONTRACTS §2 together with
what the training module reads from a data module: ``num_classes``, ``class_names``, ``palette`` and
:meth:`~WeakSegmentationDataModule.label_histogram` (for the class weights of cross entropy).

The arguments of :class:`WeakSegmentationDataModule` (``augmentation``, ``batch_size``, ...) have
one home, its ``__init__``: a data module's ``__init__`` takes its own arguments and ``**kwargs``,
passed on as ``super().__init__(**kwargs)``. jsonargparse follows that call, so LightningCLI lists
them (``--data.batch_size``, ...) for every data module with the types, defaults and help written
there. A data module names one of them in its own signature only to give it another default (or,
passing it itself, to fix it and take it off the command line).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from gcrf.conventions import IGNORE_INDEX, LABEL_MODALITIES
from gcrf.data.transforms import AugmentationConfig, build_transform
from gcrf.data.weak_labels import rasterise_clicks, scribble_label_map

__all__ = [
    "DATASETS_DIR",
    "MODALITIES",
    "ImageFileDataset",
    "TransformedDataset",
    "ValidationKind",
    "WeakSegmentationDataModule",
    "class_weights",
]


def _datasets_dir() -> Path:
    """The shipped annotations: ``datasets/`` of the repository, installed as ``gcrf.datasets``."""
    from importlib.resources import files

    try:
        return Path(str(files("gcrf.datasets")))
    except ModuleNotFoundError:  # a source tree on sys.path without an install
        return Path(__file__).resolve().parents[2] / "datasets"


#: The repository's ``datasets/`` folder (shipped annotations and manifests), wherever gcrf runs
#: from: a source tree or an installed wheel (``gcrf.datasets``).
DATASETS_DIR = _datasets_dir()

#: Label modalities of a sample (defined in :mod:`gcrf.conventions`).
MODALITIES: tuple[str, ...] = LABEL_MODALITIES

#: What a data module's validation loader serves: ``"images"`` (N×C×H×W batches of the sample
#: contract, scored by mIoU) or ``"volumes"`` (one whole 1×C×Z×H×W volume per batch with its
#: Z×H×W ``semseg_dense``, predicted slice by slice and scored by 3D Dice and HD95).
ValidationKind = Literal["images", "volumes"]


def class_weights(histogram: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Cross-entropy class weights from a label histogram: w_c ∝ 1 / ln(1.10 + p_c), Σ w_c = 1.

    ``p_c`` is the share of class ``c`` among the labelled pixels (the published weighting, after
    ENet). Classes that never occur get the largest weight, ``1 / ln(1.10)``, before normalisation.

    Args:
        histogram: C pixel counts (non-negative, not all zero).

    Returns:
        float32 tensor of C weights summing to 1.

    Example:
        >>> [round(w, 4) for w in class_weights([90, 10]).tolist()]  # the rare class weighs more
        [0.2083, 0.7917]
    """
    counts = torch.as_tensor(histogram, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(
            f"histogram must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}"
        )
    if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError(f"histogram must hold finite counts >= 0, got {counts.tolist()}")
    total = counts.sum()
    if total <= 0:
        raise ValueError("histogram has no labelled pixel (all counts are 0)")
    weights = 1.0 / torch.log(1.10 + counts / total)
    return (weights / weights.sum()).float()


class TransformedDataset(Dataset):
    """A raw-sample dataset seen through a transform (raw sample → CONTRACTS §2 sample).

    Args:
        raw: map-style dataset of raw samples.
        transform: callable applied to every raw sample.
    """

    def __init__(
        self, raw: Dataset, transform: Callable[[dict[str, Any]], dict[str, Any]] | None
    ) -> None:
        self.raw = raw
        self.transform = transform

    def __len__(self) -> int:
        return len(self.raw)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.raw[index]
        return sample if self.transform is None else self.transform(sample)


class ImageFileDataset(Dataset):
    """Raw samples whose image is a file on disk and whose labels load without it.

    A subclass implements :meth:`load_labels` (the raw sample without ``image``, with ``size`` =
    the labels' (H, W)) and :meth:`image_path`; ``__getitem__`` adds the RGB image and checks that
    it has the labels' size. :meth:`WeakSegmentationDataModule.label_histogram` uses
    ``load_labels`` alone, so it never decodes an image.
    """

    def load_labels(self, index: int) -> dict[str, Any]:
        """The raw sample of ``index`` without its image, with ``size`` = (H, W)."""
        raise NotImplementedError

    def image_path(self, index: int) -> Path:
        """The image file of ``index``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.load_labels(index)
        size = tuple(int(s) for s in sample.pop("size"))
        path = self.image_path(index)
        with Image.open(path) as image:
            sample["image"] = image.convert("RGB")
        if sample["image"].size[::-1] != size:
            raise ValueError(
                f"{path}: image size (h, w) {sample['image'].size[::-1]} differs from its "
                f"labels' {size}"
            )
        return sample


def _labels_of(raw: Dataset, index: int) -> dict[str, Any]:
    """Labels of one raw sample without decoding its image where the dataset allows it."""
    load_labels = getattr(raw, "load_labels", None)
    return load_labels(index) if load_labels is not None else raw[index]


def _size_of(sample: dict[str, Any]) -> tuple[int, int]:
    if "size" in sample:
        height, width = sample["size"]
        return int(height), int(width)
    image = sample["image"]
    if hasattr(image, "size") and not isinstance(image, (np.ndarray, torch.Tensor)):
        width, height = image.size  # PIL
        return int(height), int(width)
    shape = tuple(image.shape)
    return (shape[0], shape[1]) if shape[-1] == 3 and len(shape) == 3 else (shape[-2], shape[-1])


def label_map(sample: dict[str, Any], modality: str, stroke_width: int = 1) -> torch.Tensor:
    """The H×W int64 label map (255 = unlabelled) of one modality of a raw sample, at its own size."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    size = _size_of(sample)
    if modality == "semseg_dense":
        dense = sample.get("semseg_dense")
        if dense is None:
            return torch.full(size, IGNORE_INDEX, dtype=torch.int64)
        return torch.as_tensor(np.asarray(dense), dtype=torch.int64)
    if modality == "semseg_scribbles":
        return scribble_label_map(
            sample.get("scribbles"), sample.get("semseg_scribbles"), size, stroke_width
        )
    return rasterise_clicks(sample.get("clicks") or [], size, stroke_width)


class WeakSegmentationDataModule(pl.LightningDataModule):
    """Training and validation loaders of one weakly annotated segmentation dataset.

    Subclasses set ``num_classes``, ``class_names`` and ``palette`` and implement
    :meth:`build_datasets`. Everything else — augmentation, loaders, seeding, the label histogram —
    lives here once. What the training module reads is declared beside them: ``validation_kind``
    (what the validation loader serves), ``monitor`` / ``monitor_mode`` (the validation metric that
    picks the best checkpoint) and ``image_modality`` (what the network input is, by the name the
    Gated CRF kernels give it); the defaults here are those of the image datasets.

    Args:
        augmentation: augmentation settings (published ``aug_*`` flags); ``None``: the defaults of
            :class:`~gcrf.data.transforms.AugmentationConfig`.
        batch_size: training batch size (published ``batch_size``).
        batch_size_validation: validation batch size (published ``batch_size_validation``).
        num_workers: training loader processes (published ``workers``).
        num_workers_validation: validation loader processes (published ``workers_validation``).
        seed: seed of the training shuffle (augmentation draws follow Lightning's worker seeding).
    """

    num_classes: int
    class_names: Sequence[str]
    palette: torch.Tensor
    #: What the validation loader serves (:data:`ValidationKind`): batches of images here.
    validation_kind: ValidationKind = "images"
    #: The validation metric of the best checkpoint, and whether higher (``"max"``) is better.
    monitor: str = "val/mIoU"
    monitor_mode: Literal["min", "max"] = "max"
    #: The network input as a Gated CRF modality: ``"rgb"``, the ImageNet-normalised RGB image (the
    #: key of the published kernels, :data:`gcrf.loss.DEFAULT_KERNELS`, σ in normalised units).
    image_modality: str = "rgb"

    def __init__(
        self,
        augmentation: AugmentationConfig | None = None,
        batch_size: int = 8,
        batch_size_validation: int = 8,
        num_workers: int = 4,
        num_workers_validation: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        augmentation = augmentation if augmentation is not None else AugmentationConfig()
        if not isinstance(augmentation, AugmentationConfig):
            raise TypeError(
                f"augmentation must be an AugmentationConfig, got {type(augmentation).__name__}"
            )
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("batch_size_validation", batch_size_validation, 1),
            ("num_workers", num_workers, 0),
            ("num_workers_validation", num_workers_validation, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        self.augmentation = augmentation
        self.batch_size = batch_size
        self.batch_size_validation = batch_size_validation
        self.num_workers = num_workers
        self.num_workers_validation = num_workers_validation
        self.seed = seed
        self.train_raw: Dataset | None = None
        self.val_raw: Dataset | None = None
        self.train_dataset: TransformedDataset | None = None
        self.val_dataset: TransformedDataset | None = None
        self._histograms: dict[str, torch.Tensor] = {}

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        """The training and validation datasets of raw samples (the subclass's one job).

        A raw dataset may also define ``load_labels(index)``, returning the raw sample without its
        image but with ``size`` = (H, W), so that :meth:`label_histogram` does not decode images.
        """
        raise NotImplementedError

    def build_transforms(self) -> tuple[Callable | None, Callable | None]:
        """The training and validation transforms (raw sample → sample; ``None``: none).

        Default: :func:`~gcrf.data.transforms.build_transform` of the augmentation settings.
        """
        return (
            build_transform(self.augmentation, train=True),
            build_transform(self.augmentation, train=False),
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_raw is None or self.val_raw is None:
            self.train_raw, self.val_raw = self.build_datasets()
            train_transform, val_transform = self.build_transforms()
            self.train_dataset = TransformedDataset(self.train_raw, train_transform)
            self.val_dataset = TransformedDataset(self.val_raw, val_transform)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size_validation,
            shuffle=False,
            num_workers=self.num_workers_validation,
            persistent_workers=self.num_workers_validation > 0,
        )

    def label_histogram(self, modality: str = "semseg_dense") -> torch.Tensor:
        """Pixel count of every class in the training labels of ``modality`` (before augmentation).

        Weak labels are rasterised with the configured stroke width at the image's own size. The
        result is computed once per modality and kept.

        Returns:
            float64 tensor of ``num_classes`` counts.
        """
        if modality not in self._histograms:
            self.setup("fit")
            counts = torch.zeros(self.num_classes, dtype=torch.float64)
            width = self.augmentation.stroke_width
            for index in range(len(self.train_raw)):  # type: ignore[arg-type]
                labels = label_map(_labels_of(self.train_raw, index), modality, width)
                labels = labels[labels < self.num_classes]
                counts += torch.bincount(labels, minlength=self.num_classes).double()
            self._histograms[modality] = counts
        return self._histograms[modality].clone()
