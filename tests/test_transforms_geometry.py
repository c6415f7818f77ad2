"""gcrf.data.transforms: image, masks, validity and weak-label geometry move together."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from gcrf.conventions import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from gcrf.data.transforms import (
    AugmentationConfig,
    build_transform,
)
from gcrf.data.weak_labels import rasterise_scribbles

HEIGHT, WIDTH = 48, 56
DOT_X, DOT_Y = 30, 20  # click at the centre of a 3×3 white square
CLICK_CLASS = 4
SEEDS = range(24)
# Identity geometry: each test switches on one augmentation. The crop is larger than any
# scaled/rotated image so that only the crop test (and the combined one) can lose the dot.
BASE = {"crop_size": 96, "scale_min": 1.0, "scale_max": 1.0, "reflect": False}
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _dot_sample() -> dict:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[DOT_Y - 1 : DOT_Y + 2, DOT_X - 1 : DOT_X + 2] = 255
    return {
        "image": image,
        "semseg_dense": None,
        "scribbles": [],
        "clicks": [(CLICK_CLASS, np.array([DOT_X, DOT_Y], np.float32))],
        "index": 0,
    }


def _brightness(out: dict) -> np.ndarray:
    """Denormalised grey level in [0, 1] (0 on padded pixels)."""
    image = (out["image"] * _STD + _MEAN) * out["valid"]
    return image.mean(0).numpy()


def _run(config: AugmentationConfig, sample: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    return build_transform(config, train=True)(sample)


def _check_dot_and_click(config: AugmentationConfig, min_kept: float) -> list[dict]:
    """Assert the click pixel sits on the dot's centroid in every draw that keeps the click.

    Returns the outputs of the draws that kept it (for augmentation-specific checks).
    """
    sample = _dot_sample()
    kept, errors = [], []
    for seed in SEEDS:
        out = _run(config, sample, seed)
        clicks = out["semseg_clicks"].numpy()
        bright = _brightness(out)
        hits = np.argwhere(clicks != IGNORE_INDEX)
        if len(hits) == 0:
            # Cropped away: at most a sliver (one column/row of the dot) may remain.
            assert bright.sum() < 4.5, f"seed {seed}: click lost but the dot is still there"
            continue
        assert len(hits) == 1, f"seed {seed}: stroke_width=1 click covers {len(hits)} pixels"
        assert clicks[tuple(hits[0])] == CLICK_CLASS
        kept.append(out)
        row, col = hits[0]
        size = clicks.shape[0]
        if min(row, col) < 2 or max(row, col) > size - 3:
            continue  # the dot may be partially cropped: its centroid is biased
        assert bright[row, col] >= 0.3 * bright.max(), f"seed {seed}: click off the dot"
        weights = np.where(bright > 0.1 * bright.max(), bright, 0.0)
        rows, cols = np.indices(bright.shape)
        centroid = np.array(
            [(weights * rows).sum() / weights.sum(), (weights * cols).sum() / weights.sum()]
        )
        error = centroid - hits[0]
        assert np.abs(error).max() <= 1.0, f"seed {seed}: click {hits[0]}, dot at {centroid}"
        errors.append(error)
    assert len(kept) >= min_kept * len(SEEDS), f"only {len(kept)}/{len(SEEDS)} draws kept the dot"
    # A half-pixel convention mismatch between the image and key-point kernels would show up as a
    # systematic offset: rounding alone averages out over draws.
    assert len(errors) >= 8
    assert np.abs(np.mean(errors, axis=0)).max() < 0.3, np.mean(errors, axis=0)
    return kept


def _valid_centroid_to_dot_angle(out: dict) -> float:
    """Direction (degrees) from the centre of the valid region to the click."""
    valid = out["valid"][0].numpy()
    rows, cols = np.nonzero(valid)
    row, col = np.argwhere(out["semseg_clicks"].numpy() != IGNORE_INDEX)[0]
    return math.degrees(math.atan2(row - rows.mean(), col - cols.mean()))


# --------------------------------------------------------------------- clicks follow the image
@pytest.mark.parametrize("scale", [1.5, 0.7])
def test_click_follows_dot_under_scale(scale: float) -> None:
    config = AugmentationConfig(**{**BASE, "scale_min": scale, "scale_max": scale})
    kept = _check_dot_and_click(config, min_kept=0.9)
    for out in kept:  # the scale really was applied
        area = float(out["valid"].sum())
        assert area == pytest.approx(scale**2 * HEIGHT * WIDTH, rel=0.06)


def test_click_follows_dot_under_rotation() -> None:
    kept = _check_dot_and_click(AugmentationConfig(**BASE, tilt_max_deg=30), min_kept=0.9)
    unrotated = _valid_centroid_to_dot_angle(_run(AugmentationConfig(**BASE), _dot_sample(), 0))
    turns = [abs(_valid_centroid_to_dot_angle(out) - unrotated) for out in kept]
    # the dot is only ~4 px from the image centre: pixel rounding adds up to ~10 degrees
    assert 10 < max(turns) < 30 + 10


def test_click_follows_dot_under_perspective_wiggle() -> None:
    config = AugmentationConfig(**BASE, wiggle_max_ratio=0.2)
    kept = _check_dot_and_click(config, min_kept=0.7)
    areas = [float(out["valid"].sum()) for out in kept]
    assert max(areas) - min(areas) > 0.05 * HEIGHT * WIDTH  # the warp really changed shapes


def test_click_follows_dot_under_flip() -> None:
    config = AugmentationConfig(**{**BASE, "reflect": True})
    kept = _check_dot_and_click(config, min_kept=0.9)
    flipped = 0
    for out in kept:
        cols = np.nonzero(out["valid"][0].numpy().any(0))[0]
        col = np.argwhere(out["semseg_clicks"].numpy() != IGNORE_INDEX)[0][1]
        offset = col - cols.min()  # 30 unflipped, 56 - 1 - 30 = 25 flipped
        assert abs(offset - DOT_X) <= 1 or abs(offset - (WIDTH - 1 - DOT_X)) <= 1
        flipped += offset < (DOT_X + WIDTH - 1 - DOT_X) / 2
    assert 0 < flipped < len(kept), f"{flipped}/{len(kept)} flipped: both outcomes must occur"


def test_click_follows_dot_under_crop() -> None:
    # A 24-px window over a 48×56 image: the dot leaves the crop in a good share of draws.
    config = AugmentationConfig(**{**BASE, "crop_size": 24})
    kept = _check_dot_and_click(config, min_kept=0.4)
    assert len(kept) < len(SEEDS), "the crop never removed the dot: the test is not exercised"
    for out in kept:
        assert out["image"].shape == (3, 24, 24)
        assert float(out["valid"].min()) == 1.0  # a crop inside the image needs no padding


def test_click_follows_dot_under_all_augmentations() -> None:
    config = AugmentationConfig(
        crop_size=40,
        scale_min=0.7,
        scale_max=1.5,
        tilt_max_deg=30,
        wiggle_max_ratio=0.2,
        reflect=True,
    )
    _check_dot_and_click(config, min_kept=0.5)


# ----------------------------------------------------------------- scribbles follow the image
@pytest.mark.parametrize(
    "overrides",
    [
        {"scale_min": 0.7, "scale_max": 1.5},
        {"tilt_max_deg": 30},
        {"wiggle_max_ratio": 0.2, "reflect": True},
        {
            "crop_size": 40,
            "scale_min": 0.7,
            "scale_max": 1.5,
            "tilt_max_deg": 30,
            "wiggle_max_ratio": 0.2,
            "reflect": True,
        },
    ],
)
def test_scribble_stays_on_bright_line(overrides: dict) -> None:
    polyline = np.array([[6, 8], [40, 30], [50, 10], [20, 42]], np.float32)
    line = rasterise_scribbles([(1, polyline)], (HEIGHT, WIDTH), 1).numpy() != IGNORE_INDEX
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[line] = 255
    sample = {"image": image, "scribbles": [(2, polyline)], "clicks": [], "index": 0}
    config = AugmentationConfig(**{**BASE, **overrides})
    checked = 0
    for seed in range(8):
        out = _run(config, sample, seed)
        scribble = out["semseg_scribbles"].numpy()
        assert set(np.unique(scribble)) <= {2, IGNORE_INDEX}
        pixels = scribble == 2
        if pixels.sum() < 10:
            continue
        near_bright = ndimage.binary_dilation(_brightness(out) > 0.2, np.ones((3, 3), bool))
        fraction = near_bright[pixels].mean()
        assert fraction >= 0.9, f"seed {seed}: only {fraction:.2f} of the scribble on the line"
        checked += 1
    assert checked >= 4


# ------------------------------------------------------------------------------------ padding
def test_padding_is_invalid_ignored_and_black() -> None:
    height, width, crop = 20, 24, 40
    rng = np.random.default_rng(0)
    image = rng.integers(60, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (height, width), dtype=np.uint8)
    sample = {"image": image, "semseg_dense": mask, "index": 3}
    config = AugmentationConfig(**{**BASE, "crop_size": crop})
    for seed in range(6):
        out = _run(config, sample, seed)
        valid = out["valid"]
        assert valid.shape == (1, crop, crop) and valid.dtype == torch.float32
        assert set(torch.unique(valid).tolist()) == {0.0, 1.0}
        inside = valid[0].bool().numpy()
        # scale 1, no rotation: the image is a translated height×width rectangle
        assert inside.sum() == pytest.approx(height * width, abs=2)
        rows, cols = np.nonzero(inside)
        box = inside[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and abs(box.shape[0] - height) <= 1 and abs(box.shape[1] - width) <= 1
        dense = out["semseg_dense"].numpy()
        assert (dense[~inside] == IGNORE_INDEX).all()
        assert (dense[inside] != IGNORE_INDEX).all()
        assert (out["image"][:, ~torch.from_numpy(inside)] == 0).all()
        # every real pixel is at least as bright as the darkest input value (bilinear of >= 60)
        assert (_brightness(out)[ndimage.binary_erosion(inside)] > 50 / 255).all()
        assert out["index"] == 3


# ---------------------------------------------------------------------------- validation path
def _shifted(array: np.ndarray, dy: int, dx: int, size: int, fill: int) -> np.ndarray:
    """out[r, c] = array[r + dy, c + dx], ``fill`` outside."""
    out = np.full((size, size, *array.shape[2:]), fill, array.dtype)
    for r in range(size):
        for c in range(size):
            if 0 <= r + dy < array.shape[0] and 0 <= c + dx < array.shape[1]:
                out[r, c] = array[r + dy, c + dx]
    return out


@pytest.mark.parametrize("size", [30, 25, 11, 22])
def test_validation_center_crop_is_an_exact_integer_shift(size: int) -> None:
    height, width = 20, 24  # 22 pads rows and crops columns
    rng = np.random.default_rng(size)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, 7, (height, width), dtype=np.uint8)
    mask[0, 0] = IGNORE_INDEX
    clicks = [(1, np.array([10.2, 9.7], np.float32)), (3, np.array([[12.0, 11.0]], np.float32))]
    sample = {"image": image, "semseg_dense": mask, "scribbles": None, "clicks": clicks}
    config = AugmentationConfig(validation_center_crop=True, validation_center_crop_size=size)
    out = build_transform(config, train=False)(sample)

    dense = out["semseg_dense"].numpy()
    assert dense.shape == (size, size) and out["semseg_dense"].dtype == torch.int64
    # "Centre" leaves one free rounding choice per axis when the size difference is odd.
    candidates = [
        (dy, dx)
        for dy in {math.floor((height - size) / 2), math.ceil((height - size) / 2)}
        for dx in {math.floor((width - size) / 2), math.ceil((width - size) / 2)}
    ]
    matches = [d for d in candidates if np.array_equal(dense, _shifted(mask, *d, size, 255))]
    assert len(matches) == 1, f"dense mask is no centred integer shift of the input ({candidates})"
    dy, dx = matches[0]

    valid = out["valid"][0].numpy()
    assert np.array_equal(valid, _shifted(np.ones((height, width), np.float32), dy, dx, size, 0))
    expected_image = torch.from_numpy(_shifted(image, dy, dx, size, 0)).permute(2, 0, 1) / 255.0
    expected_image = (expected_image - _MEAN) / _STD * torch.from_numpy(valid)
    torch.testing.assert_close(out["image"], expected_image, atol=1e-5, rtol=0)

    expected_clicks = np.full((size, size), IGNORE_INDEX, np.int64)
    for class_id, (x, y) in ((1, (10, 10)), (3, (12, 11))):  # rounded input pixels
        if 0 <= y - dy < size and 0 <= x - dx < size:
            expected_clicks[y - dy, x - dx] = class_id
    assert np.array_equal(out["semseg_clicks"].numpy(), expected_clicks)
    assert (out["semseg_scribbles"].numpy() == IGNORE_INDEX).all()


def test_validation_without_crop_keeps_the_sample_geometry() -> None:
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 7, (HEIGHT, WIDTH), dtype=np.uint8)
    sample = {**_dot_sample(), "semseg_dense": mask}
    out = build_transform(AugmentationConfig(crop_size=16), train=False)(sample)
    assert np.array_equal(out["semseg_dense"].numpy(), mask.astype(np.int64))
    assert bool((out["valid"] == 1).all())
    assert np.argwhere(out["semseg_clicks"].numpy() != IGNORE_INDEX).tolist() == [[DOT_Y, DOT_X]]


# ------------------------------------------------------------------------- nearest for masks
def test_dense_mask_is_resampled_by_nearest_neighbour() -> None:
    rng = np.random.default_rng(2)
    values = np.array([0, 3, 7, 12], np.uint8)
    mask = values[rng.integers(0, 4, (HEIGHT, WIDTH))]
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    config = AugmentationConfig(
        crop_size=64, scale_min=0.6, scale_max=1.7, tilt_max_deg=30, wiggle_max_ratio=0.2
    )
    seen: set[int] = set()
    for seed in range(8):
        dense = _run(config, {"image": image, "semseg_dense": mask}, seed)["semseg_dense"]
        assert dense.dtype == torch.int64
        seen |= set(torch.unique(dense).tolist())
    assert seen <= {0, 3, 7, 12, IGNORE_INDEX}, seen
    assert {0, 3, 7, 12} <= seen


# -------------------------------------------------------------------------- inputs untouched
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_inputs_are_not_modified(train: bool, as_tensor: bool) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (HEIGHT, WIDTH), dtype=np.uint8)
    scribble = np.array([[3.0, 4.0], [30.0, 20.0], [50.0, 40.0]], np.float32)
    click = np.array([12.5, 7.25], np.float32)
    if as_tensor:
        image = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        mask, scribble, click = (torch.from_numpy(a) for a in (mask, scribble, click))
    sample = {
        "image": image,
        "semseg_dense": mask,
        "scribbles": [(1, scribble)],
        "clicks": [(2, click)],
        "index": 5,
    }
    before = {
        "image": image.clone() if as_tensor else image.copy(),
        "semseg_dense": mask.clone() if as_tensor else mask.copy(),
        "scribble": scribble.clone() if as_tensor else scribble.copy(),
        "click": click.clone() if as_tensor else click.copy(),
    }
    config = AugmentationConfig(
        crop_size=64,
        tilt_max_deg=20,
        wiggle_max_ratio=0.1,
        validation_center_crop=True,
        validation_center_crop_size=40,
        scribble_length_ratio=0.5,
    )
    torch.manual_seed(0)
    build_transform(config, train=train)(sample)
    assert set(sample) == {"image", "semseg_dense", "scribbles", "clicks", "index"}
    assert sample["scribbles"][0][1] is scribble and sample["clicks"][0][1] is click
    for key, value in (("image", image), ("semseg_dense", mask)):
        assert sample[key] is value
    for name, now in (
        ("image", image),
        ("semseg_dense", mask),
        ("scribble", scribble),
        ("click", click),
    ):
        assert np.array_equal(np.asarray(now), np.asarray(before[name])), f"{name} was modified"
