"""ACDC cardiac MRI with the scribbles of Valvano et al., in the layout WSL4MIS publishes.

The Automated Cardiac Diagnosis Challenge data (Bernard et al., IEEE TMI 2018: 100 patients × 2
frames, end-diastole and end-systole), preprocessed by WSL4MIS (github HiLab-git/WSL4MIS, folder
``data/ACDC``) with the scribbles of Valvano et al. (IEEE TMI 2021). Layout under ``root``::

    root/ACDC_training_slices/patientXXX_frameYY_slice_Z.h5    (1,902 slices)
    root/ACDC_training_volumes/patientXXX_frameYY.h5           (200 volumes)

HDF5 keys: ``image`` (float32 in [0, 1], H×W for a slice, Z×H×W for a volume; sizes vary),
``label`` (uint8: 0 background, 1 RV, 2 myocardium, 3 LV) and ``scribble`` (0–3, 4 = unlabelled,
which becomes 255 here). The files carry no voxel spacing: distances (HD95) are in voxels.

**Folds** by patient, as WSL4MIS defines them: fold k validates on the volumes of patients
20(k−1)+1 … 20k and trains on the slices of the other 80 (fold 1: 1,512 training slices,
40 validation volumes).

**Samples.** Training items are raw samples (:mod:`gcrf.data.transforms.raw_sample`: a 1-channel
float image, ``semseg_dense`` and ``semseg_scribbles`` label maps), augmented by
:class:`~gcrf.data.transforms.RandomRotateFlipResize` (WSL4MIS's random 90° rotations and flips, or a
small rotation, then the resize to the training size; labels and scribbles nearest) into the sample
contract with the image left in [0, 1]. Validation items are whole volumes at their original size:
``image`` float32 1×Z×H×W, ``semseg_dense`` int64 Z×H×W, ``index``; the training module predicts
them slice by slice at the training size and scores them in 3D at the original size.

**Getting the data.** ``download=True`` fetches every file from the WSL4MIS repository at the
pinned commit and checks it against the sha256 manifest ``datasets/acdc_wsl4mis.json`` (made from
the real files; gcrf does not redistribute the images). Terms: cite Bernard et al. (2018) for ACDC
and Valvano et al. (2021) for the scribbles.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gcrf.conventions import IGNORE_INDEX
from gcrf.data.datamodule import DATASETS_DIR, WeakSegmentationDataModule
from gcrf.data.downloads import download_verified, file_sha256
from gcrf.data.palettes import ACDC_CLASS_NAMES, ACDC_PALETTE
from gcrf.data.transforms import AugmentationConfig, RandomRotateFlipResize, SampleTransform

__all__ = [
    "ACDCDataModule",
    "ACDCSliceDataset",
    "ACDCVolumeDataset",
    "acdc_fold",
    "download_acdc",
    "read_manifest",
    "verify_acdc",
]

logger = logging.getLogger(__name__)

SLICES = "ACDC_training_slices"
VOLUMES = "ACDC_training_volumes"
#: The scribble value of unlabelled pixels in the WSL4MIS files.
UNLABELLED = 4
NUM_PATIENTS = 100
MANIFEST = DATASETS_DIR / "acdc_wsl4mis.json"
_SLICE_NAME = re.compile(r"^(patient\d{3})_frame\d{2}_slice_\d+\.h5$")
_VOLUME_NAME = re.compile(r"^(patient\d{3})_frame\d{2}\.h5$")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("ACDC needs h5py: pip install 'gcrf[medical]'") from error
    return h5py


def acdc_fold(fold: int) -> tuple[list[str], list[str]]:
    """(training patients, validation patients) of WSL4MIS fold ``fold`` (1..5).

    Example:
        >>> train, val = acdc_fold(1)
        >>> len(train), val[0], val[-1]
        (80, 'patient001', 'patient020')
    """
    if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= 5:
        raise ValueError(f"fold must be an int in 1..5 (WSL4MIS folds), got {fold!r}")
    patients = [f"patient{i:03d}" for i in range(1, NUM_PATIENTS + 1)]
    val = patients[20 * (fold - 1) : 20 * fold]
    return [p for p in patients if p not in val], val


# ------------------------------------------------------------------------------------ files
def read_manifest(path: str | Path | None = None) -> dict[str, Any]:
    """The sha256 manifest of the WSL4MIS ACDC files (``datasets/acdc_wsl4mis.json``)."""
    path = Path(path) if path is not None else MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"ACDC manifest not found: {path}")
    manifest = json.loads(path.read_text())
    for key in ("repository", "commit", "url", "files"):
        if key not in manifest:
            raise ValueError(f"ACDC manifest {path} has no {key!r} entry")
    return manifest


def _where_to_get(root: Path, manifest: dict[str, Any]) -> str:
    return (
        f"Fetch the folder data/ACDC of {manifest['repository']} at commit {manifest['commit']} "
        f"(for example `git clone` it, or run with download=True / --data.download true on a "
        f"machine that is online, which fetches {len(manifest['files'])} files from "
        f"{manifest['url'].format(commit=manifest['commit'], path='<file>')}) and place its two "
        f"folders as {root / SLICES} and {root / VOLUMES}."
    )


def verify_acdc(root: str | Path, manifest: dict[str, Any] | None = None) -> int:
    """Check every file of the manifest under ``root`` against its sha256.

    Returns:
        The number of files checked.

    Raises:
        FileNotFoundError: a file is missing (the message says where to get it).
        ValueError: a file's sha256 differs from the manifest (the message names the file).
    """
    root = Path(root)
    manifest = manifest if manifest is not None else read_manifest()
    for relative, expected in manifest["files"].items():
        path = root / relative
        if not path.is_file():
            raise FileNotFoundError(f"ACDC file {path} is missing. {_where_to_get(root, manifest)}")
        digest = file_sha256(path)
        if digest != expected:
            raise ValueError(
                f"ACDC file {path} has sha256 {digest}, the manifest expects {expected} "
                f"({manifest['repository']} at {manifest['commit']}): delete it and download it again"
            )
    return len(manifest["files"])


def download_acdc(root: str | Path, manifest: dict[str, Any] | None = None) -> int:
    """Fetch the files of the manifest missing under ``root``, each checked against its sha256.

    Uses :func:`gcrf.data.downloads.download_verified` (``torch.hub.download_url_to_file`` with the
    sha256 as its hash check): a file arrives in place only once its hash matched.

    Returns:
        The number of files downloaded.

    Raises:
        FileNotFoundError: a download failed (offline); the message says where to get the files.
        ValueError: a downloaded file's sha256 differs from the manifest (names the file).
    """
    root = Path(root)
    manifest = manifest if manifest is not None else read_manifest()
    missing = [r for r in manifest["files"] if not (root / r).is_file()]
    for count, relative in enumerate(missing, 1):
        url = manifest["url"].format(commit=manifest["commit"], path=relative)
        try:
            download_verified(
                url, root / relative, manifest["files"][relative], what=f"ACDC file {relative}"
            )
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error} {_where_to_get(root, manifest)}") from error
        if count % 200 == 0:
            logger.info("ACDC: %d/%d files downloaded", count, len(missing))
    return len(missing)


def _check_layout(root: Path) -> None:
    absent = [name for name in (SLICES, VOLUMES) if not (root / name).is_dir()]
    if absent:
        raise FileNotFoundError(
            f"ACDC not found under {root} (missing folders: {absent}). "
            f"{_where_to_get(root, read_manifest())}"
        )


def _read(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The named arrays of one HDF5 file, with errors that name the file."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as handle:
            absent = [k for k in keys if k not in handle]
            if absent:
                raise KeyError(
                    f"{path} has no {absent} (keys: {sorted(handle)}); expected {list(keys)}"
                )
            return {k: handle[k][()] for k in keys}
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 file ({error})") from error


def _check_shapes(path: Path, arrays: dict[str, np.ndarray], rank: int) -> None:
    image = arrays["image"]
    if image.ndim != rank or image.dtype.kind != "f":
        raise ValueError(
            f"{path}: 'image' must be a float {'H×W' if rank == 2 else 'Z×H×W'} array, got "
            f"shape {image.shape}, dtype {image.dtype}"
        )
    for key, array in arrays.items():
        if array.shape != image.shape:
            raise ValueError(
                f"{path}: {key!r} has shape {array.shape} but 'image' has {image.shape}"
            )
        if key != "image" and array.dtype.kind not in "iu":
            raise ValueError(f"{path}: {key!r} must hold integers, got dtype {array.dtype}")


def _patient_files(
    root: Path, folder: str, pattern: re.Pattern[str], patients: Sequence[str]
) -> list[Path]:
    """The files of ``patients`` in ``root / folder``, sorted; the layout checked, none is an error."""
    _check_layout(root)
    wanted = set(patients)
    files = []
    for path in sorted((root / folder).iterdir()):
        match = pattern.match(path.name)
        if match and match.group(1) in wanted:
            files.append(path)
    if not files:
        raise FileNotFoundError(
            f"no ACDC file of patients {list(patients)[:3]}… in {root / folder}"
        )
    return files


# --------------------------------------------------------------------------------- datasets
class ACDCSliceDataset(Dataset):
    """Training slices of some patients as raw samples (1-channel image, dense label, scribbles).

    Args:
        root: the data root (layout in the module docstring).
        patients: patient ids (``"patient001"`` ...).
        cache: keep every slice in memory after its first read (~0.3 GB for a fold's slices).
    """

    def __init__(self, root: str | Path, patients: Sequence[str], cache: bool = False) -> None:
        self.root = Path(root)
        self.files = _patient_files(self.root, SLICES, _SLICE_NAME, patients)
        self.cache = cache
        self._cached: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.files)

    def load_labels(self, index: int) -> dict[str, Any]:
        """The raw sample of ``index`` (labels need the image file anyway: one HDF5 read)."""
        sample = self[index]
        sample["size"] = sample["image"].shape
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index in self._cached:
            return dict(self._cached[index])
        path = self.files[index]
        arrays = _read(path, ("image", "label", "scribble"))
        _check_shapes(path, arrays, rank=2)
        scribble = arrays["scribble"]
        if scribble.size and (int(scribble.min()) < 0 or int(scribble.max()) > UNLABELLED):
            raise ValueError(
                f"{path}: 'scribble' values must be in 0..{UNLABELLED}, got "
                f"[{int(scribble.min())}, {int(scribble.max())}]"
            )
        sample = {
            "image": arrays["image"].astype(np.float32, copy=False),
            "semseg_dense": arrays["label"].astype(np.uint8),
            "semseg_scribbles": np.where(scribble == UNLABELLED, IGNORE_INDEX, scribble).astype(
                np.uint8
            ),
            "index": index,
            "name": path.stem,
        }
        if self.cache:
            self._cached[index] = sample
        return dict(sample)


class ACDCVolumeDataset(Dataset):
    """Validation volumes of some patients at their original size.

    Items: ``image`` float32 1×Z×H×W, ``semseg_dense`` int64 Z×H×W, ``index`` and ``name``.
    """

    def __init__(self, root: str | Path, patients: Sequence[str]) -> None:
        self.root = Path(root)
        self.files = _patient_files(self.root, VOLUMES, _VOLUME_NAME, patients)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        arrays = _read(path, ("image", "label"))
        _check_shapes(path, arrays, rank=3)
        return {
            "image": torch.from_numpy(arrays["image"].astype(np.float32)).unsqueeze(0),
            "semseg_dense": torch.from_numpy(arrays["label"].astype(np.int64)),
            "index": index,
            "name": path.stem,
        }


# ------------------------------------------------------------------------------ data module
class ACDCDataModule(WeakSegmentationDataModule):
    """ACDC (WSL4MIS layout, one of its five folds) with dense labels and scribbles.

    Args:
        root: data root holding ``ACDC_training_slices`` and ``ACDC_training_volumes``.
        fold: WSL4MIS fold 1..5 (validation on patients 20(fold−1)+1 … 20·fold).
        image_size: side of the training input (slices are resized to it; WSL4MIS: 256).
        max_rotation_deg: largest angle of the small-rotation augmentation (WSL4MIS: 20).
        download: fetch missing files from the WSL4MIS repository (pinned commit), each checked
            against ``datasets/acdc_wsl4mis.json``.
        verify: check every file under ``root`` against the manifest at setup.
        cache: keep the training slices in memory after their first read.
        padding_label: label of the pixels a rotation pads (outside the field of view) in the
            dense labels and the scribbles: 0, background — what lies outside an MR field of view
            is air, and WSL4MIS's augmentation pads labels and scribbles with 0 too; the Valvano
            scribbles label background only in a ring around the heart, so without it nothing
            ever tells scribble-trained networks that dark air is background. 255 ignores them.
            The padded pixels stay invalid (``valid`` = 0) for the Gated CRF loss either way.
        batch_size: training batch size (WSL4MIS: 12).
        num_workers_validation: validation loader processes (volumes come one at a time).
        **kwargs: the other arguments of :class:`~gcrf.data.datamodule.WeakSegmentationDataModule`
            (``num_workers``, ``seed``); its ``augmentation`` follows from ``image_size`` and the
            validation batch size is 1 (whole volumes).

    Example:
        >>> dm = ACDCDataModule("/data/ACDC", fold=1)  # doctest: +SKIP
        >>> dm.setup("fit"); len(dm.train_dataset), len(dm.val_dataset)  # doctest: +SKIP
        (1512, 40)
    """

    num_classes = 4
    class_names = ACDC_CLASS_NAMES
    palette = ACDC_PALETTE
    # Validation: whole volumes, scored in 3D; the best checkpoint has the highest mean Dice.
    validation_kind = "volumes"
    monitor = "val/dice"
    #: The network input: 1-channel MR intensities in [0, 1], so a Gated CRF kernel names its
    #: appearance term ``"intensity"`` (σ in those units), e.g. ``{"weight": 1, "xy": 6,
    #: "intensity": 0.1}`` — WSL4MIS's kernel, which calls the same tensor ``"rgb"``.
    image_modality = "intensity"

    def __init__(
        self,
        root: str = "data/ACDC",
        fold: int = 1,
        image_size: int = 256,
        max_rotation_deg: float = 20.0,
        download: bool = False,
        verify: bool = False,
        cache: bool = False,
        padding_label: int = 0,
        batch_size: int = 12,
        num_workers_validation: int = 1,
        **kwargs: Any,
    ) -> None:
        acdc_fold(fold)  # validates
        super().__init__(
            augmentation=AugmentationConfig(crop_size=image_size),
            batch_size=batch_size,
            batch_size_validation=1,
            num_workers_validation=num_workers_validation,
            **kwargs,
        )
        self.root = Path(root)
        self.fold = fold
        self.image_size = image_size
        self.max_rotation_deg = max_rotation_deg
        self.download = download
        self.verify = verify
        self.cache = cache
        self.padding_label = padding_label
        #: The size at which the training module predicts validation slices.
        self.inference_size = (image_size, image_size)

    def prepare_data(self) -> None:
        if self.download:
            count = download_acdc(self.root)
            if count:
                logger.info("ACDC: downloaded %d files to %s", count, self.root)

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        # Downloading is prepare_data's job (once, on one process); here the layout is checked.
        if self.verify:
            logger.info("ACDC: %d files match the manifest", verify_acdc(self.root))
        train, val = acdc_fold(self.fold)
        return ACDCSliceDataset(self.root, train, self.cache), ACDCVolumeDataset(self.root, val)

    def build_transforms(self) -> tuple[Any, Any]:
        """Training: rotate/flip or small rotation, resize, image kept in [0, 1]. Validation:
        none (whole volumes at their original size)."""
        train = SampleTransform(
            self.augmentation,
            train=True,
            normalize=None,
            geometry=RandomRotateFlipResize(self.image_size, self.max_rotation_deg),
            padding_label=self.padding_label,
        )
        return train, None
