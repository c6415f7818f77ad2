"""Pascal VOC 2012 + SBD with clicks and ScribbleSup scribbles.

Splits (the standard "augmented VOC" of weakly supervised segmentation):

- **train** = VOC train ∪ SBD train ∪ SBD val − VOC val: 10,582 images on the real data;
- **val** = VOC val: 1,449 images.

Dense labels come from VOC's ``SegmentationClass`` PNGs where VOC has them and from SBD's
``cls/*.mat`` otherwise (VOC wins where both exist); images from VOC's ``JPEGImages`` (SBD's ``img``
when VOC lacks one). Layout under ``root`` (what torchvision's ``VOCSegmentation`` and ``SBDataset``
download and read)::

    root/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt}
    root/SBD/{img, cls, train.txt, val.txt}
    root/scribble_annotation.zip              (ScribbleSup: pascal_2012/<image>.xml)

Weak labels, joined by image name:

- **clicks**: the "What's the point" foreground clicks and the background clicks simulated from
  scribbles, shipped in ``datasets/voc_clicks/`` (checked against its ``manifest.json``);
- **scribbles**: ScribbleSup XML files inside their published zip, downloaded to ``root`` on first use
  (``download=True``) and checked against ``datasets/scribblesup.json`` where its sha256 is known.

**Missing annotations**: an image without clicks (20 images have no foreground click, 25 no background
click) or without a scribble file gets an empty list — an all-ignore label map for that modality, never
an error mid-epoch — and :class:`VOCDataModule` logs at setup how many images of each split lack
each annotation.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from gcrf.data.datamodule import DATASETS_DIR, ImageFileDataset, WeakSegmentationDataModule
from gcrf.data.downloads import download_verified, file_sha256
from gcrf.data.palettes import VOC_CLASS_NAMES, VOC_PALETTE
from gcrf.data.transforms import AugmentationConfig
from gcrf.data.weak_labels import (
    Click,
    Scribble,
    load_click_file,
    parse_scribblesup_xml,
)

__all__ = [
    "DATASETS_DIR",
    "VOC_AUGMENTATION",
    "VOCDataModule",
    "VOCRecord",
    "VOCWeak",
    "load_scribbles",
    "load_voc_clicks",
    "voc_sbd_splits",
]

logger = logging.getLogger(__name__)


VOC_SUBDIR = Path("VOCdevkit/VOC2012")
SBD_SUBDIR = Path("SBD")
SPLITS = ("train", "val")

#: Default augmentation of VOC: 512 crops, validation on the 512×512 centre crop.
VOC_AUGMENTATION = AugmentationConfig(
    crop_size=512, validation_center_crop=True, validation_center_crop_size=512
)


class VOCRecord(NamedTuple):
    """Where one image and its dense label live (``label_kind``: ``"png"`` VOC, ``"mat"`` SBD)."""

    name: str
    image: Path
    label: Path
    label_kind: str


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _layout_error(root: Path, missing: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"Pascal VOC 2012 + SBD not found under {root} (missing: {missing}). Pass download=True "
        f"(--data.download true) to fetch them with torchvision, or place them as\n"
        f"  {root / VOC_SUBDIR}/{{JPEGImages,SegmentationClass,ImageSets/Segmentation}}  "
        f"(VOCtrainval_11-May-2012.tar)\n"
        f"  {root / SBD_SUBDIR}/{{img,cls,train.txt,val.txt}}  (benchmark.tgz, "
        f"benchmark_RELEASE/dataset)"
    )


def download_voc_sbd(root: str | Path) -> None:
    """Download VOC 2012 and SBD into ``root`` with torchvision (skipping what is already there)."""
    from torchvision.datasets import SBDataset, VOCSegmentation

    root = Path(root)
    if not (root / VOC_SUBDIR / "ImageSets" / "Segmentation" / "train.txt").is_file():
        VOCSegmentation(str(root), year="2012", image_set="train", download=True)
    if not (root / SBD_SUBDIR / "train.txt").is_file():
        SBDataset(str(root / SBD_SUBDIR), image_set="train", mode="segmentation", download=True)


def voc_sbd_splits(root: str | Path, sbd: bool = True) -> dict[str, list[VOCRecord]]:
    """Training and validation records of VOC 2012 (+ SBD), sorted by image name.

    Args:
        root: data root (layout in the module docstring).
        sbd: add SBD train and val to the training set (``False``: VOC train only, 1,464 images).

    Returns:
        ``{"train": [...], "val": [...]}``.

    Raises:
        FileNotFoundError: the layout is incomplete; the message says what to download and where.
    """
    root = Path(root)
    voc, sbd_root = root / VOC_SUBDIR, root / SBD_SUBDIR
    lists = voc / "ImageSets" / "Segmentation"
    for required in (lists / "train.txt", lists / "val.txt", voc / "JPEGImages"):
        if not required.exists():
            raise _layout_error(root, required)
    voc_train, voc_val = _read_list(lists / "train.txt"), _read_list(lists / "val.txt")
    sbd_names: list[str] = []
    if sbd:
        for required in (sbd_root / "train.txt", sbd_root / "val.txt", sbd_root / "cls"):
            if not required.exists():
                raise _layout_error(root, required)
        sbd_names = _read_list(sbd_root / "train.txt") + _read_list(sbd_root / "val.txt")
    val_set = set(voc_val)
    names = {
        "train": sorted((set(voc_train) | set(sbd_names)) - val_set),
        "val": sorted(val_set),
    }
    voc_labelled = set(voc_train) | val_set

    def record(name: str) -> VOCRecord:
        image = voc / "JPEGImages" / f"{name}.jpg"
        if not image.is_file():
            image = sbd_root / "img" / f"{name}.jpg"
        if name in voc_labelled:
            return VOCRecord(name, image, voc / "SegmentationClass" / f"{name}.png", "png")
        return VOCRecord(name, image, sbd_root / "cls" / f"{name}.mat", "mat")

    return {split: [record(name) for name in names[split]] for split in SPLITS}


def _read_label(record: VOCRecord) -> np.ndarray:
    """The uint8 H×W class map of a record (255 = VOC's boundary / ignore)."""
    if record.label_kind == "png":
        with Image.open(record.label) as label:
            return np.array(label, dtype=np.uint8)  # palette indices are the class ids
    from scipy.io import loadmat

    return np.asarray(loadmat(record.label)["GTcls"][0]["Segmentation"][0], dtype=np.uint8)


def load_voc_clicks(clicks_dir: str | Path | None = None) -> dict[str, list[Click]]:
    """The shipped VOC clicks, foreground and background merged by image name, checksums verified.

    Args:
        clicks_dir: folder with ``manifest.json`` and the click files (default
            ``datasets/voc_clicks``).

    Returns:
        ``{image_name: [(class_id, float32 (x, y)), ...]}`` (foreground clicks first).
    """
    folder = Path(clicks_dir) if clicks_dir is not None else DATASETS_DIR / "voc_clicks"
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"VOC click manifest not found: {manifest_path}. The click files ship with gcrf in "
            "datasets/voc_clicks/ of its repository; pass clicks_dir to point at a copy."
        )
    manifest = json.loads(manifest_path.read_text())
    merged: dict[str, list[Click]] = {}
    for entry in manifest["files"].values():
        for name, clicks in load_click_file(folder / entry["file"], entry["sha256"]).items():
            merged.setdefault(name, []).extend(clicks)
    return merged


def _scribble_manifest(manifest: str | Path | None) -> dict[str, Any]:
    path = Path(manifest) if manifest is not None else DATASETS_DIR / "scribblesup.json"
    return json.loads(path.read_text())


def ensure_scribbles(
    root: str | Path, download: bool = False, manifest: str | Path | None = None
) -> Path:
    """The ScribbleSup zip under ``root``: downloaded when asked, verified against the manifest.

    The download is :func:`gcrf.data.downloads.download_verified` (torch.hub's transfer with the
    manifest's sha256 as its hash check, when the manifest has one); a file already in place is
    checked against the same sha256.

    Raises:
        FileNotFoundError: absent and ``download`` is off, or the download failed (offline); the
            message names the file, its URL and where to put it.
        ValueError: the manifest has a sha256 and the file's differs.
    """
    entry = _scribble_manifest(manifest)
    path = Path(root) / entry["filename"]
    if not path.is_file():
        where = (
            f"Download {entry['url']} and put it at {path} "
            "(or run with download=True / --data.download true on a machine that is online)."
        )
        if not download:
            raise FileNotFoundError(f"ScribbleSup scribbles not found: {path}. {where}")
        download_verified(
            entry["url"], path, entry.get("sha256"), what="ScribbleSup scribbles", where=where
        )
    elif entry.get("sha256"):
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise ValueError(
                f"ScribbleSup file {path} has sha256 {digest}, the manifest expects "
                f"{entry['sha256']} ({entry['url']}): delete it and download it again"
            )
    return path


def load_scribbles(
    zip_path: str | Path, names: Sequence[str] | None = None
) -> dict[str, list[Scribble]]:
    """Scribbles of every ``<image>.xml`` in a zip of ScribbleSup XML files (optionally only ``names``).

    Both published layouts read as they are: the ScribbleSup archive (``pascal_2012/<image>.xml``)
    and the ``datasets/voc_scribbles.zip`` of the published Gated CRF repository (``<image>.xml`` at
    the zip's root). macOS resource forks (``__MACOSX/``, ``._*``) are skipped.

    Raises:
        FileNotFoundError: no file at ``zip_path``.
        ValueError: not a zip, or a zip without any ``.xml`` member (the message names the file).
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise FileNotFoundError(f"scribble archive not found: {zip_path}")
    if not zipfile.is_zipfile(zip_path):
        raise ValueError(f"scribble archive {zip_path} is not a zip file")
    wanted = set(names) if names is not None else None
    scribbles: dict[str, list[Scribble]] = {}
    with zipfile.ZipFile(zip_path) as archive:
        members = [
            m
            for m in archive.namelist()
            if m.endswith(".xml")
            and not m.startswith("__MACOSX/")
            and not Path(m).name.startswith("._")
        ]
        if not members:
            raise ValueError(
                f"scribble archive {zip_path} holds no ScribbleSup .xml file "
                f"(first members: {archive.namelist()[:5]})"
            )
        for member in members:
            name = Path(member).stem
            if wanted is not None and name not in wanted:
                continue
            scribbles[name] = parse_scribblesup_xml(archive.read(member), name=f"{member}")
    return scribbles


class VOCWeak(ImageFileDataset):
    """Raw samples of one split: image, dense label, scribbles, clicks (see the module docstring).

    Args:
        records: the split's records (:func:`voc_sbd_splits`).
        clicks: image name → clicks (missing names get none).
        scribbles: image name → scribbles (missing names get none).
    """

    def __init__(
        self,
        records: Sequence[VOCRecord],
        clicks: dict[str, list[Click]],
        scribbles: dict[str, list[Scribble]],
    ) -> None:
        self.records = list(records)
        self.clicks = clicks
        self.scribbles = scribbles

    def __len__(self) -> int:
        return len(self.records)

    def load_labels(self, index: int) -> dict[str, Any]:
        """The sample without its image (``size`` = the label's (H, W))."""
        record = self.records[index]
        dense = _read_label(record)
        return {
            "size": dense.shape,
            "semseg_dense": dense,
            "scribbles": self.scribbles.get(record.name, []),
            "clicks": self.clicks.get(record.name, []),
            "index": index,
            "name": record.name,
        }

    def image_path(self, index: int) -> Path:
        return self.records[index].image

    def missing(self) -> dict[str, int]:
        """How many images of the split have no click and no scribble."""
        names = [r.name for r in self.records]
        return {
            "clicks": sum(not self.clicks.get(n) for n in names),
            "scribbles": sum(not self.scribbles.get(n) for n in names),
        }


class VOCDataModule(WeakSegmentationDataModule):
    """Pascal VOC 2012 + SBD with dense labels, clicks and ScribbleSup scribbles in every sample.

    Args:
        root: data root (published ``--datasets_dir``; layout in the module docstring).
        download: fetch VOC, SBD (torchvision) and the ScribbleSup zip when missing.
        sbd: add SBD to the training set (10,582 images; ``False``: VOC train, 1,464).
        clicks_dir: folder of the click files and their manifest (default: the shipped
            ``datasets/voc_clicks``).
        scribbles: load the ScribbleSup scribbles (``False``: no scribble file is needed; every
            sample's scribbles are empty — the click and full recipes).
        scribbles_manifest: manifest of the scribble archive (default ``datasets/scribblesup.json``).
        scribbles_file: a zip of ScribbleSup XML files to read as it is instead of the archive of
            the manifest (no download, no hash): e.g. the published repository's
            ``datasets/voc_scribbles.zip`` (``<image>.xml`` at its root) or a copy of
            ``scribble_annotation.zip`` kept elsewhere.
        augmentation: augmentation settings (published ``aug_*``); default
            :data:`VOC_AUGMENTATION`: validation on the 512×512 centre crop (batches collate).
        **kwargs: the other arguments of :class:`~gcrf.data.datamodule.WeakSegmentationDataModule`
            (``batch_size``, ``num_workers``, ...).

    Example:
        >>> dm = VOCDataModule("/data/voc", download=True)  # doctest: +SKIP
    """

    num_classes = len(VOC_CLASS_NAMES)
    class_names = VOC_CLASS_NAMES
    palette = VOC_PALETTE

    def __init__(
        self,
        root: str = "data/voc",
        download: bool = False,
        sbd: bool = True,
        clicks_dir: str | None = None,
        scribbles: bool = True,
        scribbles_manifest: str | None = None,
        scribbles_file: str | None = None,
        augmentation: AugmentationConfig = VOC_AUGMENTATION,
        **kwargs: Any,
    ) -> None:
        super().__init__(augmentation=augmentation, **kwargs)
        self.root = root
        self.download = download
        self.sbd = sbd
        self.clicks_dir = clicks_dir
        self.use_scribbles = scribbles
        self.scribbles_manifest = scribbles_manifest
        self.scribbles_file = scribbles_file

    def prepare_data(self) -> None:
        if self.download:
            download_voc_sbd(self.root)
            if self.use_scribbles and self.scribbles_file is None:
                ensure_scribbles(self.root, download=True, manifest=self.scribbles_manifest)

    def build_datasets(self) -> tuple[VOCWeak, VOCWeak]:
        splits = voc_sbd_splits(self.root, sbd=self.sbd)
        clicks = load_voc_clicks(self.clicks_dir)
        scribbles: dict[str, list[Scribble]] = {}
        if self.use_scribbles:
            zip_path = self.scribbles_file or ensure_scribbles(
                self.root, self.download, self.scribbles_manifest
            )
            scribbles = load_scribbles(zip_path)
        datasets = tuple(VOCWeak(splits[split], clicks, scribbles) for split in SPLITS)
        for split, dataset in zip(SPLITS, datasets, strict=True):
            missing = dataset.missing()
            logger.info(
                "VOC %s: %d images; without clicks: %d; without scribbles: %s (they get an "
                "all-ignore label map for that modality)",
                split,
                len(dataset),
                missing["clicks"],
                missing["scribbles"] if self.use_scribbles else "all (scribbles=False)",
            )
        return datasets  # type: ignore[return-value]
