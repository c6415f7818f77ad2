"""Pascal VOC 2012 + SBD: split composition, annotation joins and checks on fake trees in the real
layouts and formats; the real click files shipped in datasets/voc_clicks."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from gcrf.data import voc
from gcrf.data.palettes import VOC_PALETTE
from gcrf.data.transforms import AugmentationConfig
from gcrf.data.weak_labels import rasterise_clicks

HEIGHT, WIDTH = 40, 48
VOC_TRAIN = ["2007_000032", "2007_000039"]
VOC_VAL = ["2007_000033", "2007_000042"]
# SBD lists overlap VOC on purpose: 2007_000032 (VOC train: VOC's label wins) and 2007_000033
# (VOC val: never in the training set).
SBD_TRAIN = ["2008_000002", "2007_000032", "2007_000033"]
SBD_VAL = ["2008_000003"]


def _dense(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    labels[5:25, 8:30] = rng.integers(1, 21)
    labels[24, 8:30] = 255  # VOC's boundary band
    return labels


def _save_png(labels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(labels, mode="P")
    image.putpalette(VOC_PALETTE.flatten().tolist() + [224, 224, 192] * (256 - 21))
    image.save(path)


def _save_mat(labels: np.ndarray, path: Path) -> None:
    # The SBD GTcls struct: Segmentation, Boundaries, CategoriesPresent.
    scipy.io.savemat(
        path,
        {
            "GTcls": {
                "Segmentation": labels,
                "Boundaries": np.zeros((20, 1), dtype=object),
                "CategoriesPresent": np.unique(labels[(labels > 0) & (labels < 255)]),
            }
        },
    )


def _save_jpeg(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def scribble_xml(name: str, polygons: list[tuple[str, list[tuple[int, int]]]]) -> bytes:
    body = "".join(
        f"<polygon><tag>{tag}</tag>"
        + "".join(f"<point><X>{x}</X><Y>{y}</Y></point>" for x, y in points)
        + "</polygon>"
        for tag, points in polygons
    )
    return (
        f"<annotation><filename>{name}.jpg</filename><size><width>{WIDTH}</width>"
        f"<height>{HEIGHT}</height></size>{body}</annotation>"
    ).encode()


def make_voc_tree(root: Path) -> dict[str, np.ndarray]:
    """VOC 2012 + SBD + ScribbleSup zip + a click folder under ``root``; returns the dense labels
    every loader must produce (VOC's where both exist)."""
    devkit = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (devkit / folder).mkdir(parents=True)
    sbd = root / "SBD"
    for folder in ("img", "cls"):
        (sbd / folder).mkdir(parents=True)
    expected: dict[str, np.ndarray] = {}
    for k, name in enumerate(VOC_TRAIN + VOC_VAL):
        _save_jpeg(devkit / "JPEGImages" / f"{name}.jpg", k)
        expected[name] = _dense(k)
        _save_png(expected[name], devkit / "SegmentationClass" / f"{name}.png")
    for k, name in enumerate(SBD_TRAIN + SBD_VAL):
        labels = _dense(100 + k)
        _save_mat(labels, sbd / "cls" / f"{name}.mat")
        _save_jpeg(sbd / "img" / f"{name}.jpg", 100 + k)
        expected.setdefault(name, labels)
    (devkit / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (devkit / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_VAL) + "\n")
    (sbd / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (sbd / "val.txt").write_text("\n".join(SBD_VAL) + "\n")

    # ScribbleSup: every image but 2008_000003 has a scribble file.
    with zipfile.ZipFile(root / "scribble_annotation.zip", "w") as archive:
        for name in sorted(expected):
            if name == "2008_000003":
                continue
            polygons = [("background", [(2, 2), (2, 30)]), ("cat", [(10, 10), (20, 10)])]
            archive.writestr(f"pascal_2012/{name}.xml", scribble_xml(name, polygons))

    # Clicks in the shipped format; 2007_000039 has none.
    clicks_dir = root / "clicks"
    clicks_dir.mkdir()
    fg = {n: [{"x": 12.0, "y": 9.0, "cls": 8, "rank": 1}] for n in expected if n != "2007_000039"}
    bg = {n: [{"x": 40.0, "y": 35.0, "cls": 0}] for n in expected if n != "2007_000039"}
    files = {}
    for key, content in (("foreground", fg), ("background", bg)):
        raw = json.dumps(content).encode()
        (clicks_dir / f"{key}.json.gz").write_bytes(gzip.compress(raw))
        files[key] = {"file": f"{key}.json.gz", "sha256": hashlib.sha256(raw).hexdigest()}
    (clicks_dir / "manifest.json").write_text(json.dumps({"files": files}))
    return expected


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "voc"
    return root, make_voc_tree(root)


def module(root: Path, **kwargs) -> voc.VOCDataModule:
    settings = {
        "root": str(root),
        "clicks_dir": str(root / "clicks"),
        "augmentation": AugmentationConfig(crop_size=32, validation_center_crop=False),
        "batch_size": 2,
        "batch_size_validation": 1,
        "num_workers": 0,
        "num_workers_validation": 0,
    }
    settings.update(kwargs)
    return voc.VOCDataModule(**settings)


# ------------------------------------------------------------------------------- fake trees
def test_split_composition_and_voc_labels_win(tree) -> None:
    root, expected = tree
    splits = voc.voc_sbd_splits(root)
    train = [r.name for r in splits["train"]]
    # VOC train ∪ SBD train ∪ SBD val − VOC val, no duplicates.
    assert train == sorted({*VOC_TRAIN, *SBD_TRAIN, *SBD_VAL} - set(VOC_VAL))
    assert [r.name for r in splits["val"]] == sorted(VOC_VAL)
    kinds = {r.name: r.label_kind for r in splits["train"]}
    assert kinds == {
        "2007_000032": "png",
        "2007_000039": "png",
        "2008_000002": "mat",
        "2008_000003": "mat",
    }
    # SBD images come from SBD's img folder when VOC has none.
    assert {r.name: r.image.parent.name for r in splits["train"]}["2008_000002"] == "img"
    assert [r.name for r in voc.voc_sbd_splits(root, sbd=False)["train"]] == sorted(VOC_TRAIN)

    dm = module(root)
    dm.setup("fit")
    for dataset in (dm.train_raw, dm.val_raw):
        for index, record in enumerate(dataset.records):
            sample = dataset[index]
            np.testing.assert_array_equal(np.asarray(sample["semseg_dense"]), expected[record.name])
            assert sample["image"].size == (WIDTH, HEIGHT)


def test_sbd_labels_read_like_torchvision(tree) -> None:
    from torchvision.datasets import SBDataset

    root, _ = tree
    reference = SBDataset(str(root / "SBD"), image_set="train", mode="segmentation")
    records = {r.name: r for r in voc.voc_sbd_splits(root)["train"]}
    for index, name in enumerate(SBD_TRAIN):
        _, target = reference[index]
        mat = voc.VOCRecord(name, Path(), root / "SBD" / "cls" / f"{name}.mat", "mat")
        np.testing.assert_array_equal(voc._read_label(mat), np.asarray(target))
        if name in records and records[name].label_kind == "mat":
            np.testing.assert_array_equal(voc._read_label(records[name]), np.asarray(target))


def test_weak_labels_join_by_name_and_missing_ones_are_empty(tree, caplog) -> None:
    root, _ = tree
    dm = module(root)
    with caplog.at_level(logging.INFO, logger="gcrf.data.voc"):
        dm.setup("fit")
    by_name = {r.name: i for i, r in enumerate(dm.train_raw.records)}
    sample = dm.train_raw[by_name["2007_000032"]]
    assert [c for c, _ in sample["clicks"]] == [8, 0]
    np.testing.assert_allclose(sample["clicks"][0][1], [12.0, 9.0])
    assert [c for c, _ in sample["scribbles"]] == [0, 8]
    np.testing.assert_allclose(sample["scribbles"][1][1], [[10, 10], [20, 10]])
    # Missing annotations: empty lists, all-ignore maps, counted in the log.
    assert dm.train_raw[by_name["2007_000039"]]["clicks"] == []
    assert dm.train_raw[by_name["2008_000003"]]["scribbles"] == []
    assert dm.train_raw.missing() == {"clicks": 1, "scribbles": 1}
    assert "without clicks: 1; without scribbles: 1" in caplog.text
    val = dm.val_dataset[0]  # the whole pipeline, validation path (no augmentation)
    assert val["semseg_clicks"][9, 12] == 8 and val["semseg_clicks"][35, 40] == 0
    assert int((val["semseg_clicks"] != 255).sum()) == 2
    assert val["semseg_scribbles"][10, 10:21].tolist() == [8] * 11
    # A whole training batch follows the contract.
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["valid"].shape == (2, 1, 32, 32)
    for key in ("semseg_dense", "semseg_scribbles", "semseg_clicks"):
        assert batch[key].dtype == torch.int64
    # Histograms come from the labels alone.
    assert dm.label_histogram("semseg_clicks").tolist()[:1] == [3.0]
    assert dm.label_histogram("semseg_clicks")[8] == 3.0


def test_without_scribbles_no_archive_is_needed(tree) -> None:
    root, _ = tree
    (root / "scribble_annotation.zip").unlink()
    dm = module(root, scribbles=False)
    dm.setup("fit")
    assert dm.train_raw.missing()["scribbles"] == len(dm.train_raw)


def test_missing_layout_says_what_to_download(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"VOCtrainval_11-May-2012\.tar") as info:
        voc.voc_sbd_splits(tmp_path)
    assert "download=True" in str(info.value) and str(tmp_path) in str(info.value)


def test_click_manifest_mismatch_is_a_clear_error(tree) -> None:
    root, _ = tree
    manifest = json.loads((root / "clicks" / "manifest.json").read_text())
    manifest["files"]["background"]["sha256"] = "0" * 64
    (root / "clicks" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"background\.json\.gz.*expected 0{64}"):
        voc.load_voc_clicks(root / "clicks")


def _manifest(tmp_path: Path, sha256: str | None) -> Path:
    entry = json.loads((voc.DATASETS_DIR / "scribblesup.json").read_text())
    entry["sha256"] = sha256
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(entry))
    return path


def test_scribble_archive_is_verified_against_the_manifest(tree, tmp_path) -> None:
    root, _ = tree
    digest = hashlib.sha256((root / "scribble_annotation.zip").read_bytes()).hexdigest()
    assert voc.ensure_scribbles(root, manifest=_manifest(tmp_path, digest)).is_file()
    with pytest.raises(ValueError, match=rf"sha256 {digest}.*expects f{{64}}"):
        voc.ensure_scribbles(root, manifest=_manifest(tmp_path, "f" * 64))


def test_offline_machine_gets_the_url_and_the_place(tmp_path, monkeypatch) -> None:
    url = json.loads((voc.DATASETS_DIR / "scribblesup.json").read_text())["url"]
    with pytest.raises(FileNotFoundError) as info:
        voc.ensure_scribbles(tmp_path, download=False)
    assert url in str(info.value) and str(tmp_path / "scribble_annotation.zip") in str(info.value)

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="could not download") as info:
        voc.ensure_scribbles(tmp_path, download=True)
    assert url in str(info.value) and "name resolution" in str(info.value)


def test_scribbles_are_read_from_inside_the_zip(tree) -> None:
    root, _ = tree
    scribbles = voc.load_scribbles(root / "scribble_annotation.zip")
    assert len(scribbles) == len({*VOC_TRAIN, *VOC_VAL, *SBD_TRAIN, *SBD_VAL}) - 1  # one missing
    only = voc.load_scribbles(root / "scribble_annotation.zip", ["2007_000033"])
    assert list(only) == ["2007_000033"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pascal_2012/x.xml", b"<annotation><size/></annotation>")
    (root / "bad.zip").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"pascal_2012/x\.xml"):
        voc.load_scribbles(root / "bad.zip")


def test_published_scribbles_zip_is_read_as_it_is(tree, tmp_path) -> None:
    """``datasets/voc_scribbles.zip`` of the published repository: ``<image>.xml`` at the root."""
    root, _ = tree
    reference = voc.load_scribbles(root / "scribble_annotation.zip")
    published = tmp_path / "voc_scribbles.zip"
    with (
        zipfile.ZipFile(root / "scribble_annotation.zip") as source,
        zipfile.ZipFile(published, "w") as archive,
    ):
        for member in source.namelist():
            archive.writestr(Path(member).name, source.read(member))
        archive.writestr("__MACOSX/._2007_000033.xml", b"\x00\x05\x16\x07 resource fork")
    (root / "scribble_annotation.zip").unlink()  # not needed, not downloaded
    dm = module(root, scribbles_file=str(published))
    dm.setup("fit")
    by_name = {r.name: i for i, r in enumerate(dm.train_raw.records)}
    assert set(dm.train_raw.scribbles) == set(reference)
    for name, expected in reference.items():
        got = dm.train_raw.scribbles[name]
        assert [c for c, _ in got] == [c for c, _ in expected]
        for (_, points), (_, want) in zip(got, expected, strict=True):
            np.testing.assert_array_equal(points, want)
    name = next(n for n in by_name if n in reference)
    assert [c for c, _ in dm.train_raw[by_name[name]]["scribbles"]] == [0, 8]


def test_scribble_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.zip"):
        voc.load_scribbles(tmp_path / "nowhere.zip")
    (tmp_path / "plain.zip").write_text("not a zip")
    with pytest.raises(ValueError, match=r"plain\.zip is not a zip"):
        voc.load_scribbles(tmp_path / "plain.zip")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("readme.txt", "no scribbles here")
    with pytest.raises(ValueError, match=r"empty\.zip holds no ScribbleSup \.xml.*readme\.txt"):
        voc.load_scribbles(tmp_path / "empty.zip")


def test_scribble_download_is_hash_checked_on_the_way_in(tree, tmp_path) -> None:
    """torch.hub's transfer with the manifest's sha256: a wrong file never lands in place."""
    root, _ = tree
    remote = tmp_path / "remote" / "scribble_annotation.zip"
    remote.parent.mkdir()
    remote.write_bytes((root / "scribble_annotation.zip").read_bytes())
    digest = hashlib.sha256(remote.read_bytes()).hexdigest()
    entry = json.loads(_manifest(tmp_path, digest).read_text())
    entry["url"] = remote.as_uri()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(entry))
    target = tmp_path / "data"
    placed = voc.ensure_scribbles(target, download=True, manifest=good)
    assert placed == target / "scribble_annotation.zip"
    assert placed.read_bytes() == remote.read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**entry, "sha256": "0" * 64}))
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(ValueError, match=rf"has sha256 {digest}, the manifest expects 0{{64}}"):
        voc.ensure_scribbles(elsewhere, download=True, manifest=bad)
    assert not (elsewhere / "scribble_annotation.zip").exists()
    assert list(elsewhere.iterdir()) == []  # no partial file left behind


# ------------------------------------------------------------------------ real click files
@pytest.fixture(scope="module")
def real_clicks() -> dict[str, dict]:
    folder = voc.DATASETS_DIR / "voc_clicks"
    manifest = json.loads((folder / "manifest.json").read_text())
    return {
        key: json.loads(gzip.decompress((folder / entry["file"]).read_bytes()))
        for key, entry in manifest["files"].items()
    }


def test_real_click_files_counts_and_classes(real_clicks) -> None:
    fg, bg = real_clicks["foreground"], real_clicks["background"]
    assert len(fg) == 12_180 and sum(len(v) for v in fg.values()) == 32_697
    assert len(bg) == 12_031 and sum(len(v) for v in bg.values()) == 32_614
    assert sum(not v for v in fg.values()) == 20 and sum(not v for v in bg.values()) == 25
    assert len(set(fg) - set(bg)) == 149 and not set(bg) - set(fg)  # 149 without a bg entry
    fg_classes = Counter(c["cls"] for v in fg.values() for c in v)
    bg_classes = Counter(c["cls"] for v in bg.values() for c in v)
    assert set(fg_classes) == set(range(1, 21))  # every object class, never background
    assert set(bg_classes) == {0}
    assert fg_classes.most_common(1)[0][0] == 15  # "person", VOC's most frequent class
    assert all(c["x"] >= 0 and c["y"] >= 0 for v in fg.values() for c in v)


def test_real_clicks_load_verified_and_rasterise_in_place(real_clicks) -> None:
    merged = voc.load_voc_clicks()
    assert len(merged) == len(set(real_clicks["foreground"]) | set(real_clicks["background"]))
    name = next(n for n, v in real_clicks["foreground"].items() if len(v) >= 2)
    clicks = merged[name]
    assert len(clicks) == len(real_clicks["foreground"][name]) + len(
        real_clicks["background"].get(name, [])
    )
    labels = rasterise_clicks(clicks, (500, 500), stroke_width=1)
    for class_id, (x, y) in clicks:
        assert labels[round(float(y)), round(float(x))] == class_id
    assert int((labels != 255).sum()) <= len(clicks)


def test_shipped_files_match_the_provenance_checksums() -> None:
    folder = voc.DATASETS_DIR / "voc_clicks"
    expected = {
        "voc_whats_the_point.json.gz": "0ad942dc53197a1d7ce549000414adea39ac688d6c4ae7a1af27830469c73dc6",
        "voc_whats_the_point_bg_from_scribbles.json.gz": "45fdf2eff36a0ffc56a889efab2ca40788f074f8372dde4e8f81951bc7c79952",
    }
    for file, digest in expected.items():
        assert hashlib.sha256(gzip.decompress((folder / file).read_bytes())).hexdigest() == digest
