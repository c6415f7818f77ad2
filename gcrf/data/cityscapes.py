"""Cityscapes (fine annotations) with synthetic clicks.

Cityscapes needs a login, so gcrf never downloads it: the user places it under ``root`` in the layout
of the official packages (the layout ``torchvision.datasets.Cityscapes`` reads)::

    root/
      leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png     (leftImg8bit_trainvaltest.zip)
      gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png      (gtFine_trainvaltest.zip)
      gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png
      gcrf_clicks_{train,val}.json (+ .meta.json)   written by ``python -m gcrf.data.cityscapes_clicks``

The real splits hold 2,975 (train) and 500 (val) images of 1024×2048. Dense labels are the 19
*train ids* of the Cityscapes ``labels.py`` (:data:`LABEL_ID_TO_TRAIN_ID`); every other label id is
255 (ignore). The image name of a sample is ``<city>_<seq>_<frame>``, the key of the click files.

Clicks are generated once from the instance masks by :mod:`gcrf.data.cityscapes_clicks` and written
to JSON in the format of the VOC click files, with a ``.meta.json`` sidecar that records how they
were made and the sha256 of the JSON. :class:`CityscapesDataModule` checks that checksum and that
every image of the split has an entry before training starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from gcrf.conventions import IGNORE_INDEX
from gcrf.data.datamodule import ImageFileDataset, WeakSegmentationDataModule
from gcrf.data.palettes import CITYSCAPES_CLASS_NAMES, CITYSCAPES_PALETTE
from gcrf.data.transforms import AugmentationConfig
from gcrf.data.weak_labels import Click, load_click_file

__all__ = [
    "CITYSCAPES_AUGMENTATION",
    "CITYSCAPES_URL",
    "CLICK_FORMATS",
    "LABEL_ID_TO_TRAIN_ID",
    "SPLITS",
    "SPLIT_SIZES",
    "STUFF_LABEL_IDS",
    "THING_LABEL_IDS",
    "CityscapesDataModule",
    "CityscapesFine",
    "CityscapesRecord",
    "click_sidecar_path",
    "default_clicks_file",
    "label_ids_to_train_ids",
    "list_split",
    "load_cityscapes_clicks",
    "load_published_cityscapes_clicks",
    "read_id_png",
]

log = logging.getLogger(__name__)

#: Where Cityscapes is obtained (free registration).
CITYSCAPES_URL = "https://www.cityscapes-dataset.com/"

#: How a click file is read: written by gcrf.data.cityscapes_clicks, or the published file.
CLICK_FORMATS: tuple[str, ...] = ("gcrf", "published")
#: File names of the published click file (its ``datasets/cityscapes_synthetic_clicks.json``).
PUBLISHED_CLICK_NAMES = ("cityscapes_synthetic_clicks.json", "cityscapes_synthetic_clicks.json.gz")

#: Splits with public fine annotations.
SPLITS: tuple[str, ...] = ("train", "val")

#: Number of images of the real splits (a tree of another size is accepted with a warning).
SPLIT_SIZES: dict[str, int] = {"train": 2975, "val": 500}

#: Label id → train id of the Cityscapes ``labels.py`` (ids 0..33); every id not listed is ignored
#: (255): unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground,
#: parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer, license plate.
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}

#: Label ids of the classes annotated per instance (``hasInstances`` in ``labels.py``): in an
#: ``instanceIds`` PNG their objects carry ``label_id * 1000 + k``; their crowds ("group" polygons)
#: carry the bare label id. Caravan (29) and trailer (30) have instances but no train id.
THING_LABEL_IDS: frozenset[int] = frozenset(range(24, 34))

#: Label ids of the train classes without instances (road ... sky, train ids 0..10).
STUFF_LABEL_IDS: frozenset[int] = frozenset(LABEL_ID_TO_TRAIN_ID) - THING_LABEL_IDS

# 256-entry lookup table: uint8 label id → uint8 train id.
_TRAIN_ID_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _train_id in LABEL_ID_TO_TRAIN_ID.items():
    _TRAIN_ID_LUT[_label_id] = _train_id

#: Default augmentation: the published 512×512 training crops, validation on the full 1024×2048 frame.
#: (Frozen, so it is safe as a default argument.)
CITYSCAPES_AUGMENTATION = AugmentationConfig(crop_size=512, validation_center_crop=False)

_LAYOUT = (
    "{root}/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
    "{root}/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png\n"
    "{root}/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png"
)
_IMAGE_SUFFIX = "_leftImg8bit.png"


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes label-id map to train ids (19 classes, 255 = ignore).

    Args:
        label_ids: integer array of label ids (a ``*_gtFine_labelIds.png``); values outside
            0..255 (e.g. the license plate's -1) become 255.

    Returns:
        uint8 array of the same shape, a new array.

    Example:
        >>> label_ids_to_train_ids(np.array([[7, 26, 0, 33]])).tolist()
        [[0, 13, 255, 18]]
    """
    array = np.asarray(label_ids)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"label_ids must hold integers, got dtype {array.dtype}")
    inside = (array >= 0) & (array <= 255)
    return np.where(inside, _TRAIN_ID_LUT[np.clip(array, 0, 255)], IGNORE_INDEX).astype(np.uint8)


def read_id_png(path: str | Path) -> np.ndarray:
    """Read a label-id or instance-id PNG as an int32 H×W array.

    Cityscapes stores ``labelIds`` as 8-bit and ``instanceIds`` as 16-bit grayscale PNGs; Pillow
    opens the latter as mode ``I;16`` (uint16) or, in older versions, ``I`` (int32).

    Args:
        path: the PNG file.

    Returns:
        int32 H×W array.
    """
    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel id image, got shape {array.shape}")
    return array.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class CityscapesRecord:
    """The files of one Cityscapes image.

    Args:
        name: ``<city>_<seq>_<frame>`` (the key of the click files).
        image: the ``leftImg8bit`` PNG.
        label_ids: the ``gtFine_labelIds`` PNG.
        instance_ids: the ``gtFine_instanceIds`` PNG.
    """

    name: str
    image: Path
    label_ids: Path
    instance_ids: Path


def _layout_error(root: Path, split: str, problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Cityscapes {split} split not found under {root}: {problem}.\n"
        f"Cityscapes needs a (free) login, so it is not downloaded: get the packages "
        f"leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from {CITYSCAPES_URL}, unzip "
        f"both into {root}, so that the layout is:\n" + _LAYOUT.format(root=root, split=split)
    )


def list_split(
    root: str | Path, split: str, require_instances: bool = False
) -> list[CityscapesRecord]:
    """The images of one split, sorted by name, with their annotation files (layout checked).

    Args:
        root: the Cityscapes root (holding ``leftImg8bit/`` and ``gtFine/``).
        split: ``"train"`` or ``"val"``.
        require_instances: also require every ``gtFine_instanceIds`` PNG (click generation).

    Returns:
        One :class:`CityscapesRecord` per image, sorted by name (city, then sequence, frame).

    Raises:
        ValueError: unknown split.
        FileNotFoundError: a folder or annotation file is missing; the message names it, where to
            get Cityscapes and the expected layout.

    Example:
        >>> # records = list_split("data/cityscapes", "val")  # 500 records on the real data
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    label_dir = root / "gtFine" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise _layout_error(root, split, f"missing folder {folder}")
    records = []
    for image in sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}")):
        name = image.name[: -len(_IMAGE_SUFFIX)]
        city = image.parent.name
        label_ids = label_dir / city / f"{name}_gtFine_labelIds.png"
        instance_ids = label_dir / city / f"{name}_gtFine_instanceIds.png"
        required = (label_ids, instance_ids) if require_instances else (label_ids,)
        for path in required:
            if not path.is_file():
                raise _layout_error(root, split, f"missing annotation {path}")
        records.append(CityscapesRecord(name, image, label_ids, instance_ids))
    if not records:
        raise _layout_error(root, split, f"no *{_IMAGE_SUFFIX} image in {image_dir}/<city>/")
    records.sort(key=lambda record: record.name)
    if len(records) != SPLIT_SIZES[split]:
        log.warning(
            "Cityscapes %s split under %s has %d images; the full split has %d",
            split,
            root,
            len(records),
            SPLIT_SIZES[split],
        )
    return records


# --------------------------------------------------------------------------------- click files
def default_clicks_file(root: str | Path) -> str:
    """The click-file template the generator writes by default: ``root/gcrf_clicks_{split}.json``."""
    return str(Path(root) / "gcrf_clicks_{split}.json")


def click_sidecar_path(path: str | Path) -> Path:
    """The metadata sidecar of a click file: the same name with ``.meta.json`` appended."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def _generate_command(root: str | Path, clicks_file: str | None, split: str) -> str:
    """The generator command that writes the click file the data module reads for ``split``."""
    command = f"python -m gcrf.data.cityscapes_clicks --root {root}"
    if clicks_file is not None and clicks_file != default_clicks_file(root):
        command += f" --output {clicks_file}"
    # One file without ``{split}`` serves both splits, so it must be generated for both.
    splits = split if clicks_file is None or "{split}" in clicks_file else ", ".join(SPLITS)
    return command + f" --splits [{splits}]"


def load_cityscapes_clicks(
    path: str | Path, image_names: list[str], command: str = "python -m gcrf.data.cityscapes_clicks"
) -> dict[str, list[Click]]:
    """Read a generated click file after checking it against its sidecar and the split.

    Args:
        path: the click JSON (``.gz`` allowed) written by :mod:`gcrf.data.cityscapes_clicks`.
        image_names: the images that must all have an entry (``<city>_<seq>_<frame>``).
        command: the command that (re)generates the file, shown in error messages.

    Returns:
        ``{image_name: [(train_id, float32 (x, y)), ...]}`` for the requested images.

    Raises:
        FileNotFoundError: the file or its sidecar is missing (the message gives ``command``).
        ValueError: the sha256 of the JSON differs from the sidecar's, or an image has no entry.

    Example:
        >>> # clicks = load_cityscapes_clicks("data/cityscapes/gcrf_clicks_val.json", names)
    """
    path = Path(path)
    sidecar = click_sidecar_path(path)
    for required in (path, sidecar):
        if not required.is_file():
            raise FileNotFoundError(
                f"Cityscapes click file {required} not found; generate the clicks with:\n  {command}"
            )
    try:
        expected = json.loads(sidecar.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"click metadata {sidecar} is malformed ({error!r}); regenerate with:\n  {command}"
        ) from error
    try:
        clicks = load_click_file(path, expected_sha256=expected)
    except ValueError as error:
        raise ValueError(
            f"Cityscapes click file {path} does not match its metadata {sidecar} ({error}); "
            f"regenerate it with:\n  {command}"
        ) from error
    missing = [name for name in image_names if name not in clicks]
    if missing:
        raise ValueError(
            f"Cityscapes click file {path} has no entry for {len(missing)} of the "
            f"{len(image_names)} images of the split (first: {missing[:3]}); it was generated for "
            f"another tree or split; regenerate it with:\n  {command}"
        )
    return {name: clicks[name] for name in image_names}


def load_published_cityscapes_clicks(
    path: str | Path, image_names: list[str]
) -> dict[str, list[Click]]:
    """Read the published repository's ``datasets/cityscapes_synthetic_clicks.json`` as it is.

    That file serves both splits: ``{image_name: [{"cls": <Cityscapes label id>, "x": ..., "y":
    ...}, ...]}`` with ``image_name`` = ``<city>_<seq>_<frame>``. As the published loader does,
    label ids are mapped to train ids and clicks on classes without a train id (ignored in
    evaluation, e.g. ``ground``, ``license plate`` = −1) are dropped.

    Args:
        path: the JSON file (``.gz`` allowed).
        image_names: the images that must all have an entry.

    Returns:
        ``{image_name: [(train_id, float32 (x, y)), ...]}`` for the requested images.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed JSON, a ``cls`` that is no Cityscapes label id (−1..33), or an image
            without an entry (the message names the file).
    """
    path = Path(path)
    clicks = load_click_file(path)
    missing = [name for name in image_names if name not in clicks]
    if missing:
        raise ValueError(
            f"click file {path} (published format) has no entry for {len(missing)} of the "
            f"{len(image_names)} images of the split (first: {missing[:3]})"
        )
    result: dict[str, list[Click]] = {}
    for name in image_names:
        kept = []
        for label_id, point in clicks[name]:
            if not -1 <= label_id <= 33:
                raise ValueError(
                    f"click file {path}: image {name!r} has a click of class {label_id}, which is "
                    "no Cityscapes label id (-1..33); is it a gcrf click file (train ids)? Pass "
                    "clicks_format='gcrf' then"
                )
            if label_id in LABEL_ID_TO_TRAIN_ID:
                kept.append((LABEL_ID_TO_TRAIN_ID[label_id], point))
        result[name] = kept
    return result


# ------------------------------------------------------------------------------------- datasets
class CityscapesFine(ImageFileDataset):
    """One split of Cityscapes fine as raw samples (see :mod:`gcrf.data.transforms.raw_sample`).

    Args:
        records: the images (:func:`list_split`).
        clicks: ``{image_name: clicks}`` or ``None`` (no clicks).

    A sample is ``{"image": PIL RGB, "semseg_dense": uint8 H×W train ids, "scribbles": [],
    "clicks": [(train_id, float32 (x, y))], "index": int}``.

    Example:
        >>> # ds = CityscapesFine(list_split("data/cityscapes", "val")); ds[0]["image"].size
    """

    def __init__(
        self, records: list[CityscapesRecord], clicks: dict[str, list[Click]] | None = None
    ) -> None:
        self.records = list(records)
        self.clicks = clicks

    def __len__(self) -> int:
        return len(self.records)

    def _record(self, index: int) -> CityscapesRecord:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} images")
        return self.records[index]

    def load_labels(self, index: int) -> dict[str, Any]:
        """The raw sample without its image, with ``size`` = (H, W)."""
        record = self._record(index)
        dense = label_ids_to_train_ids(read_id_png(record.label_ids))
        clicks = self.clicks[record.name] if self.clicks is not None else []
        return {
            "size": dense.shape,
            "semseg_dense": dense,
            "scribbles": [],
            "clicks": [(class_id, point.copy()) for class_id, point in clicks],
            "index": index,
        }

    def image_path(self, index: int) -> Path:
        return self._record(index).image


class CityscapesDataModule(WeakSegmentationDataModule):
    """Cityscapes fine (19 train ids, 2,975 train / 500 val) with synthetic clicks.

    Args:
        root: the Cityscapes root (``leftImg8bit/``, ``gtFine/``; see the module docstring).
        clicks_file: the click JSON; ``{split}`` in it is replaced by ``train`` / ``val`` (one file
            per split), a path without it is read for both splits. ``None``:
            ``root/gcrf_clicks_{split}.json``, as the generator writes by default.
        clicks: load clicks (``False``: full supervision, no click file needed).
        clicks_format: ``"gcrf"``: a file written by :mod:`gcrf.data.cityscapes_clicks` (train
            ids, checked against its ``.meta.json`` sidecar); ``"published"``: the published
            repository's ``cityscapes_synthetic_clicks.json`` (label ids, one file for both
            splits, no sidecar; :func:`load_published_cityscapes_clicks`). ``None``: published
            when the file is named ``cityscapes_synthetic_clicks.json`` (``.gz``), else gcrf.
        augmentation: augmentation settings (published ``aug_*``); default
            :data:`CITYSCAPES_AUGMENTATION`: the published 512 crops for training, validation at
            full size (1024×2048).
        batch_size_validation: validation batch size (2: full-size frames).
        num_workers_validation: validation loader processes.
        **kwargs: the other arguments of :class:`~gcrf.data.datamodule.WeakSegmentationDataModule`
            (``batch_size``, ``num_workers``, ``seed``).

    Raises:
        FileNotFoundError: (at setup) missing layout or click file, with what to do.
        ValueError: (at setup) a click file that does not match its sidecar or the split.

    Example:
        >>> # python -m gcrf.data.cityscapes_clicks --root data/cityscapes   (once)
        >>> # dm = CityscapesDataModule("data/cityscapes"); dm.setup("fit")
    """

    num_classes = len(CITYSCAPES_CLASS_NAMES)
    class_names = CITYSCAPES_CLASS_NAMES
    palette = CITYSCAPES_PALETTE

    def __init__(
        self,
        root: str = "data/cityscapes",
        clicks_file: str | None = None,
        clicks: bool = True,
        clicks_format: Literal["gcrf", "published"] | None = None,
        augmentation: AugmentationConfig = CITYSCAPES_AUGMENTATION,
        batch_size_validation: int = 2,
        num_workers_validation: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            augmentation=augmentation,
            batch_size_validation=batch_size_validation,
            num_workers_validation=num_workers_validation,
            **kwargs,
        )
        if not isinstance(root, (str, Path)):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        if clicks_file is not None and not isinstance(clicks_file, (str, Path)):
            raise TypeError(f"clicks_file must be a path or None, got {type(clicks_file).__name__}")
        self.root = str(root)
        self.clicks_file = str(clicks_file) if clicks_file is not None else None
        self.clicks = bool(clicks)
        if clicks_format not in (None, *CLICK_FORMATS):
            raise ValueError(
                f"clicks_format must be one of {CLICK_FORMATS} or None; got {clicks_format!r}"
            )
        self.clicks_format = clicks_format

    def clicks_path(self, split: str) -> Path:
        """The click file read for ``split``."""
        template = (
            self.clicks_file if self.clicks_file is not None else default_clicks_file(self.root)
        )
        return Path(template.replace("{split}", split))

    def resolved_clicks_format(self) -> str:
        """``"gcrf"`` or ``"published"``: how the click file is read (see ``clicks_format``)."""
        if self.clicks_format is not None:
            return self.clicks_format
        name = Path(self.clicks_file or "").name
        return "published" if name in PUBLISHED_CLICK_NAMES else "gcrf"

    def _split(self, split: str) -> CityscapesFine:
        records = list_split(self.root, split)
        clicks = None
        if self.clicks and self.resolved_clicks_format() == "published":
            clicks = load_published_cityscapes_clicks(
                self.clicks_path(split), [record.name for record in records]
            )
        elif self.clicks:
            clicks = load_cityscapes_clicks(
                self.clicks_path(split),
                [record.name for record in records],
                command=_generate_command(self.root, self.clicks_file, split),
            )
        return CityscapesFine(records, clicks)

    def build_datasets(self) -> tuple[CityscapesFine, CityscapesFine]:
        return self._split("train"), self._split("val")
