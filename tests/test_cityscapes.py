"""Cityscapes: layout checks, train ids, the synthetic click generator and the data module.

Every test builds a tiny tree in ``tmp_path`` in the real layout and formats (RGB PNG images, 8-bit
``labelIds`` and 16-bit ``instanceIds`` PNGs).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from gcrf.data import IGNORE_INDEX
from gcrf.data.cityscapes import (
    CityscapesDataModule,
    click_sidecar_path,
    label_ids_to_train_ids,
    list_split,
    read_id_png,
)
from gcrf.data.cityscapes_clicks import (
    clicks_from_instance_ids,
    generate_clicks,
    image_seed,
    main,
)
from gcrf.data.transforms import AugmentationConfig

# The official labelId → trainId of cityscapesScripts' labels.py, ids 0..33, written out in full.
OFFICIAL_TRAIN_IDS = [
    255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255,
    5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18,
]  # fmt: skip
HEIGHT, WIDTH = 32, 64
# (split, city, number of images); train and val use different cities, as in Cityscapes.
CITIES = [
    ("train", "aachen", 3),
    ("train", "bochum", 2),
    ("val", "frankfurt", 2),
    ("val", "lindau", 1),
]
STRUCTURE_8 = ndimage.generate_binary_structure(2, 2)


def fake_instance_ids(shift: int = 0) -> np.ndarray:
    """A 32×64 instance-id map with every kind of region the click rule distinguishes."""
    ids = np.full((HEIGHT, WIDTH), 7, dtype=np.int32)  # road (train id 0), one component
    ids[:8] = 23  # sky (10)
    ids[8:16, 0:20] = 11  # building (2): two components
    ids[8:16, 40:64] = 11
    ids[20:28, 5 + shift : 15 + shift] = 26000  # car (13), cut in two by the pole below
    ids[18:30, 10 + shift] = 17  # pole (5), 12 pixels
    ids[18:30, 30:34] = 24001  # person (11), 48 pixels
    ids[18:30, 36:40] = 24  # person crowd (11): a region without instance id, 48 pixels
    ids[22:26, 45:55] = 29000  # caravan: instances but no train id
    ids[28:32, 56:64] = 0  # unlabeled
    ids[16:18, 60:64] = 4  # static
    ids[30, 20:22] = 8  # sidewalk (1): a 2-pixel crumb
    return ids


def label_ids_of(instance_ids: np.ndarray) -> np.ndarray:
    return np.where(instance_ids >= 1000, instance_ids // 1000, instance_ids).astype(np.uint8)


def make_tree(root: Path) -> dict[str, list[str]]:
    """Write the fake Cityscapes tree; returns the image names per split."""
    rng = np.random.default_rng(0)
    names: dict[str, list[str]] = {"train": [], "val": []}
    for split, city, count in CITIES:
        for k in range(count):
            name = f"{city}_{k:06d}_{19 + k:06d}"
            names[split].append(name)
            image_dir = root / "leftImg8bit" / split / city
            label_dir = root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image_dir / f"{name}_leftImg8bit.png")
            ids = fake_instance_ids(shift=len(names[split]) + k)
            Image.fromarray(label_ids_of(ids)).save(label_dir / f"{name}_gtFine_labelIds.png")
            # 16-bit grayscale, as Cityscapes stores instance ids.
            Image.fromarray(ids.astype(np.uint16)).save(
                label_dir / f"{name}_gtFine_instanceIds.png"
            )
            # Other gtFine files of the real packages, which the loader must ignore.
            (label_dir / f"{name}_gtFine_polygons.json").write_text("{}")
    return {split: sorted(values) for split, values in names.items()}


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "cityscapes"
    return root, make_tree(root)


def expected_regions(ids: np.ndarray, min_area: int, structure=STRUCTURE_8) -> list[np.ndarray]:
    """Boolean full-image masks of the regions that should get one click each."""
    table = dict(enumerate(OFFICIAL_TRAIN_IDS))
    regions = []
    for value in np.unique(ids).tolist():
        label_id = value // 1000 if value >= 1000 else value
        if table.get(label_id, 255) == 255:
            continue
        mask = ids == value
        if value >= 1000:
            regions.append(mask)
            continue
        components, count = ndimage.label(mask, structure)
        regions += [
            components == k for k in range(1, count + 1) if (components == k).sum() >= min_area
        ]
    return regions


def region_of(click: dict, regions: list[np.ndarray]) -> int:
    row, col = int(click["y"]), int(click["x"])
    assert (click["x"], click["y"]) == (col, row)  # pixel centres
    hits = [i for i, region in enumerate(regions) if region[row, col]]
    assert len(hits) == 1, f"click {click} lies in {len(hits)} expected regions"
    return hits[0]


# ------------------------------------------------------------------------------- labels, layout
def test_label_ids_map_to_the_official_train_ids() -> None:
    label_ids = np.arange(34).reshape(2, 17)
    assert label_ids_to_train_ids(label_ids).reshape(-1).tolist() == OFFICIAL_TRAIN_IDS
    assert label_ids_to_train_ids(label_ids).dtype == np.uint8
    # License plate (-1) and out-of-table values are ignored; the input is left as it was.
    odd = np.array([[-1, 34, 255, 26]])
    assert label_ids_to_train_ids(odd).tolist() == [[255, 255, 255, 13]]
    assert odd.tolist() == [[-1, 34, 255, 26]]


def test_instance_ids_png_is_read_at_16_bit(tmp_path: Path) -> None:
    ids = np.array([[0, 7, 24000], [26001, 33999, 65535]], dtype=np.uint16)
    Image.fromarray(ids).save(tmp_path / "x_gtFine_instanceIds.png")
    read = read_id_png(tmp_path / "x_gtFine_instanceIds.png")
    assert read.dtype == np.int32
    assert read.tolist() == ids.astype(np.int32).tolist()


def test_split_sizes_names_and_files(tree) -> None:
    root, names = tree
    train, val = list_split(root, "train"), list_split(root, "val")
    assert len(train) == 5 and len(val) == 3
    assert [r.name for r in train] == names["train"] and [r.name for r in val] == names["val"]
    record = val[0]
    assert (
        record.image == root / "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png"
    )
    assert record.label_ids.name == "frankfurt_000000_000019_gtFine_labelIds.png"
    assert record.instance_ids.name == "frankfurt_000000_000019_gtFine_instanceIds.png"
    with pytest.raises(ValueError, match="split must be one of"):
        list_split(root, "test")


def test_missing_layout_says_where_to_get_cityscapes(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        list_split(tmp_path / "nowhere", "train")
    message = str(info.value)
    for text in (
        "https://www.cityscapes-dataset.com/",
        "leftImg8bit_trainvaltest.zip",
        "gtFine_trainvaltest.zip",
        "leftImg8bit/train/<city>/<city>_<seq>_<frame>_leftImg8bit.png",
        "gtFine/train/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png",
        "gtFine/train/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png",
    ):
        assert text in message
    # A data module with a bad root fails at setup with the same message.
    with pytest.raises(FileNotFoundError, match=r"gtFine_trainvaltest\.zip"):
        CityscapesDataModule(str(tmp_path / "nowhere"), clicks=False).setup("fit")


def test_missing_annotation_file_is_named(tree) -> None:
    root, _ = tree
    missing = root / "gtFine/val/lindau/lindau_000000_000019_gtFine_instanceIds.png"
    missing.unlink()
    assert len(list_split(root, "val")) == 3  # the data module needs labelIds only
    with pytest.raises(FileNotFoundError, match=r"lindau_000000_000019_gtFine_instanceIds\.png"):
        list_split(root, "val", require_instances=True)


# -------------------------------------------------------------------------------- click rule
@pytest.mark.parametrize(
    ("min_area", "classes"),
    [(0, [0, 1, 2, 2, 5, 10, 11, 11, 13]), (64, [0, 2, 2, 10, 11, 13])],
)
def test_center_clicks_one_per_region_at_the_farthest_pixel(min_area, classes) -> None:
    ids = fake_instance_ids()
    clicks = clicks_from_instance_ids(ids, "center", min_area=min_area)
    # Hand count: road, sidewalk crumb, 2 buildings, pole, sky, person + crowd, car (in 2 pieces);
    # no click on caravan / unlabeled / static; min_area 64 drops the crumb, the pole and the crowd
    # but never an object.
    assert sorted(c["cls"] for c in clicks) == classes
    regions = expected_regions(ids, min_area)
    hit = sorted(region_of(c, regions) for c in clicks)
    assert hit == list(range(len(regions)))  # exactly one click per region
    table = dict(enumerate(OFFICIAL_TRAIN_IDS))
    for click in clicks:
        row, col = int(click["y"]), int(click["x"])
        value = int(ids[row, col])
        assert click["cls"] == table[value // 1000 if value >= 1000 else value]
        region = regions[region_of(click, regions)]
        distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        assert distance[row, col] == distance.max()
        # Ties go to the first farthest pixel in row-major order.
        assert (row, col) == np.unravel_index(int(np.argmax(distance)), region.shape)


def test_thing_instance_cut_by_occlusion_gets_one_click() -> None:
    ids = fake_instance_ids()
    car = ids == 26000
    assert ndimage.label(car, STRUCTURE_8)[1] == 2  # the pole cuts the car
    cars = [c for c in clicks_from_instance_ids(ids, min_area=0) if c["cls"] == 13]
    assert len(cars) == 1
    assert car[int(cars[0]["y"]), int(cars[0]["x"])]


def test_connectivity_of_stuff_components() -> None:
    ids = np.full((8, 8), 23, dtype=np.int32)  # sky
    ids[1:4, 1:4] = 7  # two road blocks touching at one corner only
    ids[4:7, 4:7] = 7
    road = [c for c in clicks_from_instance_ids(ids, min_area=0) if c["cls"] == 0]
    assert len(road) == 1
    road4 = [c for c in clicks_from_instance_ids(ids, connectivity=4, min_area=0) if c["cls"] == 0]
    assert sorted((c["x"], c["y"]) for c in road4) == [(2.0, 2.0), (5.0, 5.0)]


def test_random_placement_is_inside_and_seeded() -> None:
    ids = fake_instance_ids()
    regions = expected_regions(ids, 0)

    def draw(seed: int) -> list[dict]:
        rng = np.random.default_rng(image_seed("aachen_000000_000019", seed))
        return clicks_from_instance_ids(ids, "random", rng, min_area=0)

    first, again, other = draw(0), draw(0), draw(1)
    assert first == again
    assert [c["cls"] for c in first] == [c["cls"] for c in other]
    assert [(c["x"], c["y"]) for c in first] != [(c["x"], c["y"]) for c in other]
    for clicks in (first, other):
        assert sorted(region_of(c, regions) for c in clicks) == list(range(len(regions)))
    with pytest.raises(ValueError, match="needs rng"):
        clicks_from_instance_ids(ids, "random")


def test_bad_arguments_are_rejected() -> None:
    ids = fake_instance_ids()
    with pytest.raises(ValueError, match="placement"):
        clicks_from_instance_ids(ids, "middle")
    with pytest.raises(ValueError, match="connectivity"):
        clicks_from_instance_ids(ids, connectivity=6)
    with pytest.raises(ValueError, match="min_area"):
        clicks_from_instance_ids(ids, min_area=-1)
    with pytest.raises(ValueError, match="instance_ids"):
        clicks_from_instance_ids(ids.astype(np.float32))


# -------------------------------------------------------------------------------- generator
def test_cli_writes_deterministic_verified_files(tree, capsys) -> None:
    root, names = tree
    assert main(["--root", str(root), "--workers", "0"]) == 0
    train, val = root / "gcrf_clicks_train.json", root / "gcrf_clicks_val.json"
    first = (train.read_bytes(), val.read_bytes())
    content = json.loads(val.read_bytes())
    assert list(content) == names["val"]
    for name, clicks in content.items():
        assert all(set(c) == {"x", "y", "cls"} for c in clicks)
        city = name.split("_")[0]
        ids = read_id_png(root / f"gtFine/val/{city}/{name}_gtFine_instanceIds.png")
        assert clicks == clicks_from_instance_ids(ids)  # center placement, default min area
    meta = json.loads(click_sidecar_path(val).read_text())
    assert meta["placement"] == "center" and meta["seed"] == 0 and meta["connectivity"] == 8
    assert meta["version"] >= 1 and meta["splits"] == ["val"] and meta["images"] == 3
    assert meta["clicks"] == sum(len(c) for c in content.values())
    assert meta["sha256"] != json.loads(click_sidecar_path(train).read_text())["sha256"]
    # A second run, and a run over two processes, write identical bytes.
    main(["--root", str(root), "--workers", "0"])
    assert (train.read_bytes(), val.read_bytes()) == first
    main(["--root", str(root), "--workers", "2"])
    assert (train.read_bytes(), val.read_bytes()) == first
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--placement" in capsys.readouterr().out
    # jsonargparse: a bad choice is refused with the argument's name.
    with pytest.raises(SystemExit):
        main(["--root", str(root), "--placement", "middle"])
    assert "placement" in capsys.readouterr().err


def test_random_placement_files_depend_on_seed_not_on_order(tree) -> None:
    root, _ = tree
    out = root / "random"

    def run(seed: int, output: str, splits: list[str]) -> None:
        main(["--root", str(root), "--output", output, "--splits", f"[{', '.join(splits)}]",
              "--seed", str(seed), "--placement", "random", "--workers", "0"])  # fmt: skip

    run(0, f"{out}/s0_{{split}}.json", ["train", "val"])
    run(0, f"{out}/again_{{split}}.json", ["val"])
    run(1, f"{out}/s1_{{split}}.json", ["val"])
    run(0, f"{out}/both.json", ["val", "train"])  # one file for both splits, other order
    s0 = json.loads((out / "s0_val.json").read_bytes())
    assert (out / "again_val.json").read_bytes() == (out / "s0_val.json").read_bytes()
    s1 = json.loads((out / "s1_val.json").read_bytes())
    assert s0.keys() == s1.keys() and s0 != s1
    both = json.loads((out / "both.json").read_bytes())
    assert both == {**json.loads((out / "s0_train.json").read_bytes()), **s0}
    assert json.loads(click_sidecar_path(out / "both.json").read_text())["splits"] == [
        "val",
        "train",
    ]


# ------------------------------------------------------------------------------- data module
def _module(root: Path, **kwargs) -> CityscapesDataModule:
    defaults = dict(
        augmentation=AugmentationConfig(crop_size=32),
        batch_size=2,
        batch_size_validation=3,
        num_workers=0,
        num_workers_validation=0,
    )
    return CityscapesDataModule(str(root), **{**defaults, **kwargs})


def test_datamodule_raw_samples(tree) -> None:
    root, names = tree
    generate_clicks(root, workers=0, min_area=0)
    module = _module(root)
    module.setup("fit")
    assert module.num_classes == 19 and len(module.class_names) == 19
    assert module.palette.shape == (19, 3) and module.palette.dtype == torch.uint8
    assert len(module.train_raw) == 5 and len(module.val_raw) == 3
    written = json.loads((root / "gcrf_clicks_train.json").read_bytes())
    for index, name in enumerate(names["train"]):
        sample = module.train_raw[index]
        assert sample["image"].mode == "RGB" and sample["image"].size == (WIDTH, HEIGHT)
        dense = sample["semseg_dense"]
        assert dense.dtype == np.uint8 and dense.shape == (HEIGHT, WIDTH)
        city = name.split("_")[0]
        label_ids = np.asarray(Image.open(root / f"gtFine/train/{city}/{name}_gtFine_labelIds.png"))
        assert dense.tolist() == np.asarray(OFFICIAL_TRAIN_IDS + [255] * 222)[label_ids].tolist()
        assert sample["scribbles"] == [] and sample["index"] == index
        got = [(c, p.dtype, p.shape, p.tolist()) for c, p in sample["clicks"]]
        assert got == [(e["cls"], np.float32, (2,), [e["x"], e["y"]]) for e in written[name]]
        labels = module.train_raw.load_labels(index)
        assert "image" not in labels and tuple(labels["size"]) == (HEIGHT, WIDTH)
    clicks_per_class = torch.zeros(19, dtype=torch.float64)
    for entries in written.values():
        for entry in entries:
            clicks_per_class[entry["cls"]] += 1
    assert module.label_histogram("semseg_clicks").tolist() == clicks_per_class.tolist()


def test_validation_batch_follows_the_contract(tree) -> None:
    root, names = tree
    generate_clicks(root, workers=0)
    module = _module(root)
    batch = next(iter(module.val_dataloader()))
    assert batch["image"].shape == (3, 3, HEIGHT, WIDTH) and batch["image"].dtype == torch.float32
    for key in ("semseg_dense", "semseg_scribbles", "semseg_clicks"):
        assert batch[key].shape == (3, HEIGHT, WIDTH) and batch[key].dtype == torch.int64
    assert batch["valid"].shape == (3, 1, HEIGHT, WIDTH) and bool((batch["valid"] == 1).all())
    assert bool((batch["semseg_scribbles"] == IGNORE_INDEX).all())
    assert batch["index"].tolist() == [0, 1, 2]
    written = json.loads((root / "gcrf_clicks_val.json").read_bytes())
    for index, name in enumerate(names["val"]):
        clicks = batch["semseg_clicks"][index]
        assert len(written[name]) > 0
        assert int((clicks != IGNORE_INDEX).sum()) == len(written[name])
        for entry in written[name]:
            assert int(clicks[int(entry["y"]), int(entry["x"])]) == entry["cls"]
            # Clicks agree with the dense labels they were generated from.
            assert (
                int(batch["semseg_dense"][index, int(entry["y"]), int(entry["x"])]) == entry["cls"]
            )
    train = next(iter(module.train_dataloader()))
    assert train["image"].shape == (2, 3, 32, 32) and train["semseg_clicks"].shape == (2, 32, 32)


def test_full_supervision_needs_no_click_file(tree) -> None:
    root, _ = tree
    module = _module(root, clicks=False)
    module.setup("fit")
    assert all(module.val_raw[i]["clicks"] == [] for i in range(3))
    default = CityscapesDataModule(str(root), clicks=False)
    assert default.augmentation.crop_size == 512 and not default.augmentation.validation_center_crop


def test_missing_click_file_gives_the_command(tree) -> None:
    root, _ = tree
    with pytest.raises(FileNotFoundError) as info:
        _module(root).setup("fit")
    assert f"python -m gcrf.data.cityscapes_clicks --root {root} --splits [train]" in str(
        info.value
    )
    # A sidecar is required too.
    generate_clicks(root, workers=0)
    click_sidecar_path(root / "gcrf_clicks_val.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"gcrf_clicks_val\.json\.meta\.json"):
        _module(root).setup("fit")


def test_published_click_file_is_read_as_it_is(tree, tmp_path) -> None:
    """The published ``cityscapes_synthetic_clicks.json``: label ids, one file, no sidecar."""
    root, names = tree
    # Per image: a car (26 → 13), a road (7 → 0), ground (6, no train id) and a license
    # plate (-1): the last two are dropped, as the published loader drops them.
    content = {
        name: [
            {"cls": 26, "x": 3.0 + k, "y": 4.0},
            {"cls": 6, "x": 1.0, "y": 1.0},
            {"cls": 7, "x": 5.5, "y": 2.25 + k},
            {"cls": -1, "x": 0.0, "y": 0.0},
        ]
        for split in ("train", "val")
        for k, name in enumerate(names[split])
    }
    published = tmp_path / "cityscapes_synthetic_clicks.json"
    published.write_text(json.dumps(content))
    module = _module(root, clicks_file=str(published))
    assert module.resolved_clicks_format() == "published"
    module.setup("fit")
    for split, raw in (("train", module.train_raw), ("val", module.val_raw)):
        for index, name in enumerate(names[split]):
            got = [(c, p.tolist()) for c, p in raw[index]["clicks"]]
            entries = content[name]
            assert got == [
                (13, [entries[0]["x"], entries[0]["y"]]),
                (0, [entries[2]["x"], entries[2]["y"]]),
            ]
    # A renamed copy is read the same way when asked for.
    renamed = tmp_path / "clicks.json"
    renamed.write_bytes(published.read_bytes())
    again = _module(root, clicks_file=str(renamed), clicks_format="published")
    again.setup("fit")
    assert [c for c, _ in again.val_raw[0]["clicks"]] == [13, 0]
    # Without the flag, a file of another name is a gcrf file, which needs its sidecar.
    with pytest.raises(FileNotFoundError, match=r"clicks\.json\.meta\.json"):
        _module(root, clicks_file=str(renamed)).setup("fit")


def test_published_click_file_errors(tree, tmp_path) -> None:
    root, names = tree
    path = tmp_path / "cityscapes_synthetic_clicks.json"
    everything = [*names["train"], *names["val"]]
    path.write_text(json.dumps({n: [{"cls": 26, "x": 1, "y": 1}] for n in everything[1:]}))
    with pytest.raises(ValueError, match=rf"no entry for 1 .*{everything[0]}"):
        _module(root, clicks_file=str(path)).setup("fit")
    path.write_text(json.dumps({n: [{"cls": 40, "x": 1, "y": 1}] for n in everything}))
    with pytest.raises(ValueError, match="class 40, which is no Cityscapes label id"):
        _module(root, clicks_file=str(path)).setup("fit")
    with pytest.raises(ValueError, match="clicks_format must be one of"):
        _module(root, clicks_format="voc")


def _edit_click_file(path: Path, edit, update_sidecar: bool) -> None:
    """Rewrite a generated click file through ``edit(content)``, its sidecar's sha256 optionally."""
    content = json.loads(path.read_bytes())
    edit(content)
    data = json.dumps(content, separators=(",", ":")).encode()
    path.write_bytes(data)
    if update_sidecar:
        sidecar = click_sidecar_path(path)
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "sha256": hashlib.sha256(data).hexdigest()}))


def test_tampered_click_file_is_rejected(tree) -> None:
    root, _ = tree
    generate_clicks(root, workers=0)

    def move_first_click(content):
        first = next(name for name in content if content[name])
        content[first][0]["x"] += 1

    _edit_click_file(root / "gcrf_clicks_train.json", move_first_click, update_sidecar=False)
    with pytest.raises(ValueError, match=r"gcrf_clicks_train\.json.*sha256"):
        _module(root).setup("fit")


def test_click_file_missing_an_image_is_rejected(tree) -> None:
    root, names = tree
    generate_clicks(root, workers=0)
    _edit_click_file(
        root / "gcrf_clicks_val.json",
        lambda content: content.pop(names["val"][-1]),
        update_sidecar=True,
    )
    with pytest.raises(
        ValueError, match=rf"gcrf_clicks_val\.json has no entry.*{names['val'][-1]}"
    ):
        _module(root).setup("fit")


def test_gzip_single_file_for_both_splits(tree) -> None:
    root, _ = tree
    output = str(root / "clicks.json.gz")
    generate_clicks(root, output=output, workers=0)
    data = Path(output).read_bytes()
    generate_clicks(root, output=output, workers=0)
    assert Path(output).read_bytes() == data
    assert data[4:8] == bytes(4)  # no timestamp in the gzip header (MTIME = 0)
    meta = json.loads(click_sidecar_path(output).read_text())
    assert meta["sha256"] == hashlib.sha256(gzip.decompress(data)).hexdigest()
    module = _module(root, clicks_file=output)
    module.setup("fit")
    assert len(module.train_raw[0]["clicks"]) > 0 and len(module.val_raw[0]["clicks"]) > 0
