"""The shared data module: CE class weights, label maps of raw samples, the loader plumbing, the\nbase arguments every data module forwards to it."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentError

from gcrf.data import WeakSegmentationDataModule, class_weights
from gcrf.data.datamodule import label_map
from gcrf.data.transforms import AugmentationConfig, build_transform


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


# ------------------------------------------------------------------------- the scribble rule
def test_scribbles_are_read_one_way_by_the_pipeline_and_the_histogram() -> None:
    """A sample gives scribbles as polylines or as a label map: both paths read either form
    alike and refuse a sample that gives both."""
    image = np.zeros((4, 6, 3), np.uint8)
    polylines = [(2, np.array([[1.0, 1.0], [4.0, 1.0]], np.float32))]
    raster = np.full((4, 6), 255, np.uint8)
    raster[1, 1:5] = 2  # the pixels that polyline covers with a 1-pixel pen, written by hand
    validation = build_transform(AugmentationConfig(), train=False)
    for sample in (
        {"image": image, "scribbles": polylines},
        {"image": image, "semseg_scribbles": raster},
    ):
        assert validation(sample)["semseg_scribbles"].tolist() == raster.tolist()
        assert label_map(sample, "semseg_scribbles").tolist() == raster.tolist()
    both = {"image": image, "scribbles": polylines, "semseg_scribbles": raster}
    with pytest.raises(ValueError, match="not both"):
        validation(both)
    with pytest.raises(ValueError, match="not both"):
        label_map(both, "semseg_scribbles")
    with pytest.raises(ValueError, match="semseg_scribbles must be"):
        label_map({"image": image, "semseg_scribbles": raster[:3]}, "semseg_scribbles")


# ------------------------------------------------------- the base arguments on the command line
_AUGMENTATION = dataclasses.asdict(AugmentationConfig())


def _defaults(**changed):
    """The base arguments' defaults, as a subclass sees them after changing some."""
    base = {
        "augmentation": _AUGMENTATION,
        "batch_size": 8,
        "batch_size_validation": 8,
        "num_workers": 4,
        "num_workers_validation": 4,
        "seed": 0,
    }
    return {key: value for key, value in {**base, **changed}.items() if value != "fixed"}


#: Every data module's view of the base arguments: its own defaults where it changes one, "fixed"
#: where it sets one itself (off the command line).
DATA_MODULES = {
    "gcrf.data.synthetic.SyntheticDataModule": _defaults(
        augmentation=None, batch_size_validation=64, num_workers=0, num_workers_validation=0
    ),
    "gcrf.data.voc.VOCDataModule": _defaults(
        augmentation={**_AUGMENTATION, "validation_center_crop": True}
    ),
    "gcrf.data.cityscapes.CityscapesDataModule": _defaults(
        batch_size_validation=2, num_workers_validation=2
    ),
    "gcrf.data.acdc.ACDCDataModule": _defaults(
        augmentation="fixed", batch_size_validation="fixed", batch_size=12, num_workers_validation=1
    ),
}


#: The base arguments' help (the base class's docstring); a subclass that gives one its own
#: default documents it in its own words.
BASE_HELP = {
    "batch_size": "training batch size",
    "batch_size_validation": "validation batch size",
    "num_workers": "training loader processes",
    "num_workers_validation": "validation loader processes",
    "seed": "seed of the training shuffle",
}


def _class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", sorted(DATA_MODULES))
def test_forwarded_base_arguments_are_typed_arguments_of_the_cli(path) -> None:
    """jsonargparse follows ``super().__init__(**kwargs)``: LightningCLI's parser has every base
    argument with its type, default and help, and a value given there reaches the object."""
    from lightning.pytorch.cli import LightningArgumentParser

    expected = DATA_MODULES[path]
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(_class(path), "data")
    defaults = parser.get_defaults().data
    for name in ("augmentation", "batch_size_validation"):
        assert (name in defaults) == (name in expected), name
    for name, value in expected.items():
        got = defaults[name]
        assert (got.as_dict() if hasattr(got, "as_dict") else got) == value, name
    helps = {action.dest: action.help for action in parser._actions}
    own = inspect.signature(_class(path).__init__).parameters  # the ones it gives a default
    for name, text in BASE_HELP.items():
        if name in expected:  # forwarded: the base's help; given a default here: its own
            assert helps[f"data.{name}"].startswith(text) or (name in own and helps[f"data.{name}"])
    with pytest.raises(ArgumentError, match="batch_size"):
        parser.parse_args(["--data.batch_size=two"])
    config = parser.parse_args(["--data.batch_size=3", "--data.num_workers=1", "--data.seed=5"])
    # ``instantiate`` since jsonargparse 4.49 (``instantiate_classes`` before, deprecated since)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    module = instantiate(config).data
    assert (module.batch_size, module.num_workers, module.seed) == (3, 1, 5)
    assert module.batch_size_validation == expected.get("batch_size_validation", 1)


@pytest.mark.parametrize(
    ("recipe", "path"),
    [
        ("synthetic", "gcrf.data.synthetic.SyntheticDataModule"),
        ("voc_clicks", "gcrf.data.voc.VOCDataModule"),
        ("cityscapes_clicks", "gcrf.data.cityscapes.CityscapesDataModule"),
        ("acdc_scribbles", "gcrf.data.acdc.ACDCDataModule"),
    ],
)
def test_print_config_shows_the_forwarded_base_arguments(recipe, path, capsys) -> None:
    main = importlib.import_module(f"recipes.{recipe}").main
    with pytest.raises(SystemExit):
        main(["--print_config"], run=False)
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert set(DATA_MODULES[path]) <= set(data)
    fixed = {"augmentation", "batch_size_validation"} - set(DATA_MODULES[path])
    assert fixed.isdisjoint(data)
