"""gcrf.data.synthetic: deterministic procedural scenes whose weak labels never contradict the masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from gcrf.data.palettes import synthetic_palette
from gcrf.data.synthetic import (
    ProceduralScenes,
    SceneConfig,
    SyntheticDataModule,
    generate_scene,
    synthetic_augmentation,
    synthetic_class_names,
)

CONFIG = SceneConfig(image_size=64, num_classes=4)
NUM_SCENES = 40


def _scenes(seed: int = 0, count: int = NUM_SCENES) -> list[dict]:
    return [generate_scene(CONFIG, seed, i) for i in range(count)]


def _assert_scenes_equal(a: dict, b: dict) -> None:
    assert np.array_equal(a["image"], b["image"])
    assert np.array_equal(a["semseg_dense"], b["semseg_dense"])
    for key in ("scribbles", "clicks"):
        assert len(a[key]) == len(b[key])
        for (ca, pa), (cb, pb) in zip(a[key], b[key], strict=True):
            assert ca == cb and np.array_equal(pa, pb)


# ------------------------------------------------------------------------------ determinism
def test_same_seed_and_index_give_identical_scenes() -> None:
    for index in (0, 7, 123):
        _assert_scenes_equal(generate_scene(CONFIG, 3, index), generate_scene(CONFIG, 3, index))


def test_items_do_not_depend_on_access_order_or_cache() -> None:
    cached = ProceduralScenes(16, CONFIG, seed=5, cache=True)
    fresh = ProceduralScenes(16, CONFIG, seed=5)
    for index in (9, 2, 15, 9):
        _assert_scenes_equal(cached[index], fresh[index])
    # An item is the same whether or not others were generated before it.
    _assert_scenes_equal(ProceduralScenes(16, CONFIG, seed=5)[9], cached[9])


def test_different_seeds_or_indices_give_different_scenes() -> None:
    a = generate_scene(CONFIG, 0, 0)
    assert not np.array_equal(a["image"], generate_scene(CONFIG, 1, 0)["image"])
    assert not np.array_equal(a["image"], generate_scene(CONFIG, 0, 1)["image"])


def test_scene_types_and_ranges() -> None:
    scene = generate_scene(CONFIG, 0, 0)
    assert scene["image"].dtype == np.float32 and scene["image"].shape == (64, 64, 3)
    assert scene["image"].min() >= 0 and scene["image"].max() <= 1
    assert scene["semseg_dense"].dtype == np.int64
    assert set(np.unique(scene["semseg_dense"])) <= set(range(CONFIG.num_classes))
    for class_id, points in scene["scribbles"] + scene["clicks"]:
        assert 0 <= class_id < CONFIG.num_classes
        assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 2


# ----------------------------------------------------------------------------- weak labels
def test_weak_label_points_keep_the_margin_from_every_boundary() -> None:
    # Every scribble / click point lies inside its class region, at least `scribble_margin` px
    # (minus rounding) from any pixel of another class and from the image border.
    for scene in _scenes():
        mask = scene["semseg_dense"]
        for class_id, points in scene["scribbles"] + scene["clicks"]:
            region = np.pad(mask == class_id, 1, constant_values=False)
            distance = ndimage.distance_transform_edt(region)[1:-1, 1:-1]
            rows = np.rint(points[:, 1]).astype(int)
            cols = np.rint(points[:, 0]).astype(int)
            assert (mask[rows, cols] == class_id).all()
            assert distance[rows, cols].min() >= CONFIG.scribble_margin - 1e-6


def test_rasterised_weak_labels_never_disagree_with_the_dense_mask() -> None:
    datamodule = SyntheticDataModule(
        image_size=64,
        train_length=NUM_SCENES,
        val_length=4,
        augmentation=synthetic_augmentation(64, stroke_width=3),
    )
    datamodule.setup("fit")
    disagreements = 0
    for index in range(NUM_SCENES):
        item = datamodule.train_dataset[index]  # random flips move labels and mask together
        dense = item["semseg_dense"]
        for key in ("semseg_scribbles", "semseg_clicks"):
            labelled = item[key] != 255
            assert labelled.any()
            disagreements += int((item[key][labelled] != dense[labelled]).sum())
    assert disagreements == 0


def test_weak_label_coverage() -> None:
    """Scribbles reach almost every object and cover a few % of the pixels; clicks one point each.

    Measured on 40 scenes of 64×64 with stroke width 1: scribbles label
    about 2.5 % of the pixels and ≥ 90 % of the visible object parts; clicks about 0.1 %.
    """
    datamodule = SyntheticDataModule(
        image_size=64,
        train_length=NUM_SCENES,
        val_length=4,
        augmentation=synthetic_augmentation(64, reflect=False),
    )
    datamodule.setup("fit")
    scribble_pixels = click_pixels = total_pixels = 0
    parts = parts_with_scribble = 0
    for index in range(NUM_SCENES):
        item = datamodule.train_dataset[index]
        scribbles, clicks = item["semseg_scribbles"], item["semseg_clicks"]
        scribble_pixels += int((scribbles != 255).sum())
        click_pixels += int((clicks != 255).sum())
        total_pixels += scribbles.numel()
        instances = datamodule.train_raw[index]["instances"]
        for instance_id in np.unique(instances)[1:]:
            labelled, count = ndimage.label(instances == instance_id)
            for part in range(1, count + 1):
                region = torch.from_numpy(labelled == part)
                if region.sum() < 40:  # slivers left by occlusion cannot hold a stroke
                    continue
                parts += 1
                parts_with_scribble += int((scribbles[region] != 255).any())
        # The background is scribbled in every scene.
        assert (scribbles == 0).any()
    scribble_ratio = scribble_pixels / total_pixels
    click_ratio = click_pixels / total_pixels
    assert 0.01 < scribble_ratio < 0.06, scribble_ratio
    assert 0.0003 < click_ratio < 0.005, click_ratio
    assert parts_with_scribble / parts >= 0.9, (parts_with_scribble, parts)


def test_every_boundary_band_is_unlabelled() -> None:
    # Pixels within 2 px of another class carry no weak label (vertices keep 3 px; the rasterised
    # stroke between two vertices may cut a corner by < 1 px): the band CE on scribbles cannot see.
    datamodule = SyntheticDataModule(
        image_size=64,
        train_length=10,
        val_length=4,
        augmentation=synthetic_augmentation(64, reflect=False),
    )
    datamodule.setup("fit")
    for index in range(10):
        item = datamodule.train_dataset[index]
        dense = item["semseg_dense"].numpy()
        distance = np.full(dense.shape, np.inf)
        for c in np.unique(dense):
            inside = dense == c
            distance[inside] = ndimage.distance_transform_edt(inside)[inside]
        band = distance <= 2
        assert band.sum() > 0
        assert (item["semseg_scribbles"].numpy()[band] == 255).all()
        assert (item["semseg_clicks"].numpy()[band] == 255).all()


# -------------------------------------------------------------------------- task properties
def test_pixel_colour_alone_does_not_give_the_class() -> None:
    # A per-pixel colour classifier (one Gaussian per class, fit on other scenes) is far from
    # perfect on object pixels: the class needs shape and context.
    train, test = _scenes(0, 60), _scenes(1, 30)

    def pixels(scenes: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        colours = np.concatenate([s["image"].reshape(-1, 3) for s in scenes])
        labels = np.concatenate([s["semseg_dense"].reshape(-1) for s in scenes])
        return colours.astype(np.float64), labels

    colours, labels = pixels(train)
    scores = []
    test_colours, test_labels = pixels(test)
    for c in range(CONFIG.num_classes):
        x = colours[labels == c]
        mean, cov = x.mean(0), np.cov(x.T) + 1e-6 * np.eye(3)
        diff = test_colours - mean
        maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        scores.append(-0.5 * maha - 0.5 * np.log(np.linalg.det(cov)) + np.log((labels == c).mean()))
    predicted = np.argmax(np.stack(scores, 1), 1)
    objects = test_labels > 0
    accuracy = (predicted[objects] == test_labels[objects]).mean()
    assert accuracy < 0.8, accuracy


def test_object_boundaries_are_image_edges() -> None:
    # Colour differences across class boundaries are much larger than inside regions.
    across, inside = [], []
    for scene in _scenes(2, 20):
        image, mask = scene["image"].astype(np.float64), scene["semseg_dense"]
        diff = np.linalg.norm(image[:, 1:] - image[:, :-1], axis=-1)
        boundary = mask[:, 1:] != mask[:, :-1]
        across.append(diff[boundary])
        inside.append(diff[~boundary])
    assert np.median(np.concatenate(across)) > 4 * np.median(np.concatenate(inside))


# ---------------------------------------------------------------------------------- module
def test_datamodule_batches_follow_the_sample_contract() -> None:
    datamodule = SyntheticDataModule(
        num_classes=3,
        image_size=32,
        train_length=6,
        val_length=4,
        batch_size=2,
        batch_size_validation=4,
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (2, 3, 32, 32)
    for key in ("semseg_dense", "semseg_scribbles", "semseg_clicks"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (2, 32, 32)
    assert batch["valid"].dtype == torch.float32 and batch["valid"].shape == (2, 1, 32, 32)
    assert batch["index"].shape == (2,)
    val = next(iter(datamodule.val_dataloader()))
    assert val["image"].shape == (4, 3, 32, 32)
    assert datamodule.num_classes == 3
    assert datamodule.class_names == ("background", "disc", "rectangle")
    assert datamodule.palette.shape == (3, 3) and datamodule.palette.dtype == torch.uint8
    # Validation scenes differ from training scenes.
    assert not torch.equal(datamodule.val_dataset[0]["image"], datamodule.train_dataset[0]["image"])


def test_label_histogram_counts_the_labels_of_the_modality() -> None:
    datamodule = SyntheticDataModule(
        image_size=32,
        train_length=5,
        val_length=2,
        augmentation=synthetic_augmentation(32, reflect=False),
    )
    datamodule.setup("fit")
    for modality in ("semseg_dense", "semseg_scribbles"):
        expected = torch.zeros(datamodule.num_classes, dtype=torch.float64)
        for index in range(5):
            labels = datamodule.train_dataset[index][modality]
            for c in range(datamodule.num_classes):
                expected[c] += int((labels == c).sum())
        assert torch.equal(datamodule.label_histogram(modality), expected)


def test_names_and_palette() -> None:
    assert synthetic_class_names(4) == ("background", "disc", "rectangle", "triangle")
    palette = synthetic_palette(4)
    assert palette.dtype == torch.uint8 and palette[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in palette.tolist()}) == 4
    # The palette shows each class in the colour the generator draws its objects around.
    sums, counts = np.zeros((4, 3)), np.zeros(4)
    for scene in _scenes(count=20):
        for c in range(1, 4):
            pixels = scene["image"][scene["semseg_dense"] == c].astype(np.float64)
            sums[c] += pixels.sum(0)
            counts[c] += len(pixels)
    means = sums[1:] / counts[1:, None]
    assert np.abs(means - palette[1:].double().numpy() / 255).max() < 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 8}, "image_size"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 9}, "num_classes"),
        ({"objects_min": 3, "objects_max": 2}, "objects_min"),
        ({"object_size_max": 0.6}, "object_size"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"scribble_margin": 0.5}, "scribble_margin"),
    ],
)
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SceneConfig(**kwargs)


def test_bad_arguments_raise() -> None:
    with pytest.raises(TypeError, match="config"):
        generate_scene({"image_size": 32}, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index"):
        generate_scene(CONFIG, 0, -1)
    with pytest.raises(ValueError, match="length"):
        ProceduralScenes(0)
    with pytest.raises(IndexError):
        ProceduralScenes(3, CONFIG)[3]
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticDataModule(batch_size=0)
