"""The shared data module: CE class weights, label maps of raw samples, the loader plumbing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gcrf.data import WeakSegmentationDataModule, class_weights
from gcrf.data.datamodule import label_map
from gcrf.data.transforms import AugmentationConfig


def test_class_weights_follow_the_enet_formula() -> None:
    counts = [700.0, 200.0, 100.0, 0.0]
    total = sum(counts)
    raw = [1.0 / math.log(1.10 + c / total) for c in counts]
    expected = [r / sum(raw) for r in raw]
    weights = class_weights(torch.tensor(counts))
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    # Rarer classes weigh more; an absent class weighs most.
    assert weights[3] > weights[2] > weights[1] > weights[0]


@pytest.mark.parametrize(
    ("histogram", "match"),
    [([], "non-empty"), ([[1.0, 2.0]], "1-D"), ([1.0, -1.0], ">= 0"), ([0.0, 0.0], "no labelled")],
)
def test_class_weights_reject_bad_histograms(histogram, match) -> None:
    with pytest.raises(ValueError, match=match):
        class_weights(histogram)


class _Raw(torch.utils.data.Dataset):
    """Two raw samples of 6×8: one dense mask, one scribble, one click each."""

    def __init__(self) -> None:
        self.loaded_images = 0

    def __len__(self) -> int:
        return 2

    def load_labels(self, index: int) -> dict:
        dense = np.zeros((6, 8), dtype=np.uint8)
        dense[:, 4:] = 1
        dense[0, 0] = 255
        return {
            "size": (6, 8),
            "semseg_dense": dense,
            "scribbles": [(1, np.array([[5.0, 1.0], [5.0, 4.0]], np.float32))],
            "clicks": [(0, np.array([1.0, 1.0], np.float32))],
            "index": index,
        }

    def __getitem__(self, index: int) -> dict:
        self.loaded_images += 1
        sample = self.load_labels(index)
        sample["image"] = np.full((6, 8, 3), 100, dtype=np.uint8)
        return sample


class _Module(WeakSegmentationDataModule):
    num_classes = 2
    class_names = ("a", "b")
    palette = torch.tensor([[0, 0, 0], [255, 255, 255]], dtype=torch.uint8)

    def build_datasets(self):
        return _Raw(), _Raw()


def test_label_histogram_uses_labels_only_and_counts_every_modality() -> None:
    module = _Module(AugmentationConfig(crop_size=8), batch_size=2, num_workers=0)
    module.setup("fit")
    assert module.label_histogram("semseg_dense").tolist() == [2 * 23.0, 2 * 24.0]
    assert module.label_histogram("semseg_scribbles").tolist() == [0.0, 2 * 4.0]
    assert module.label_histogram("semseg_clicks").tolist() == [2 * 1.0, 0.0]
    assert module.train_raw.loaded_images == 0  # no image was decoded for the histogram
    with pytest.raises(ValueError, match="modality"):
        module.label_histogram("semseg_points")


def test_loaders_serve_contract_batches() -> None:
    module = _Module(
        AugmentationConfig(crop_size=8),
        batch_size=2,
        batch_size_validation=2,
        num_workers=0,
        num_workers_validation=0,
    )
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["valid"].shape == (2, 1, 8, 8)
    val = next(iter(module.val_dataloader()))
    # Validation keeps the raw geometry: the dense mask comes back unchanged.
    assert torch.equal(val["semseg_dense"][0], label_map(_Raw().load_labels(0), "semseg_dense"))


@pytest.mark.parametrize(("name", "value"), [("batch_size", 0), ("num_workers", -1)])
def test_bad_loader_settings(name, value) -> None:
    with pytest.raises(ValueError, match=name):
        _Module(**{name: value})
    with pytest.raises(TypeError, match="augmentation"):
        _Module(augmentation={"crop_size": 8})


def test_image_file_dataset_reads_the_image_and_checks_its_size(tmp_path) -> None:
    from PIL import Image

    from gcrf.data.datamodule import ImageFileDataset

    Image.fromarray(np.full((5, 7, 3), 40, np.uint8)).save(tmp_path / "a.png")

    class Files(ImageFileDataset):
        def __init__(self, label_size):
            self.label_size = label_size

        def load_labels(self, index):
            return {"size": self.label_size, "semseg_dense": np.zeros(self.label_size), "index": 0}

        def image_path(self, index):
            return tmp_path / "a.png"

    sample = Files((5, 7))[0]
    assert "size" not in sample and sample["image"].mode == "RGB"
    assert sample["image"].size == (7, 5)
    with pytest.raises(
        ValueError, match=r"a\.png: image size \(h, w\) \(5, 7\) differs .*\(7, 5\)"
    ):
        Files((7, 5))[0]
