"""The fast training path (every raster resampled once, straight into the crop) against a
straightforward reference: warp the full image onto a canvas at least as large as the source, then
crop — for random draws of every augmentation at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchvision.transforms.v2 import functional as TF

from gcrf.conventions import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from gcrf.data.transforms import (
    AugmentationConfig,
    RandomGeometry,
    Resampler,
    SampleTransform,
    build_transform,
    to_unit_float,
)
from gcrf.data.weak_labels import rasterise_clicks, rasterise_scribbles

HEIGHT, WIDTH = 37, 51  # odd sizes, not multiples of anything
CONFIGS = {
    "all": AugmentationConfig(
        crop_size=48, scale_min=0.5, scale_max=2.0, tilt_max_deg=25, wiggle_max_ratio=0.15
    ),
    "crop_larger_than_image": AugmentationConfig(
        crop_size=80, scale_min=0.7, scale_max=1.3, tilt_max_deg=10, wiggle_max_ratio=0.05
    ),
}


def _sample(rng: np.random.Generator) -> dict:
    mask = rng.integers(0, 6, (HEIGHT, WIDTH), dtype=np.uint8)
    mask[rng.random((HEIGHT, WIDTH)) < 0.05] = IGNORE_INDEX
    return {
        "image": rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8),
        "semseg_dense": mask,
        "scribbles": [
            (1, rng.uniform(0, [WIDTH - 1, HEIGHT - 1], (6, 2)).astype(np.float32)),
            (3, rng.uniform(0, [WIDTH - 1, HEIGHT - 1], (4, 2)).astype(np.float32)),
        ],
        "clicks": [
            (c, rng.uniform(0, [WIDTH - 1, HEIGHT - 1], 2).astype(np.float32)) for c in range(5)
        ],
        "index": 0,
    }


def _reference_nearest(array: np.ndarray, forward: np.ndarray, crop: int, fill: int) -> np.ndarray:
    """Warp onto the whole canvas (≥ the source) pixel by pixel in float64, then crop."""
    canvas = (max(HEIGHT, crop), max(WIDTH, crop))
    inverse = np.linalg.inv(forward)
    out = np.full(canvas, fill, array.dtype)
    for r in range(canvas[0]):
        for c in range(canvas[1]):
            x, y, w = inverse @ (c + 0.5, r + 0.5, 1.0)
            col, row = int(np.floor(x / w)), int(np.floor(y / w))
            if 0 <= row < HEIGHT and 0 <= col < WIDTH:
                out[r, c] = array[row, col]
    return out[:crop, :crop]


def _reference_points(points: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Key points (index coordinates: pixel centres at integers) through the homography."""
    homogeneous = np.c_[points + 0.5, np.ones(len(points))] @ forward.T
    return homogeneous[:, :2] / homogeneous[:, 2:] - 0.5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_path_gives_the_labels_and_key_points_of_warping_the_full_image(name: str) -> None:
    config = CONFIGS[name]
    crop = config.crop_size
    transform = build_transform(config, train=True)
    rng = np.random.default_rng(7)
    for seed in range(10):
        sample = _sample(rng)
        torch.manual_seed(seed)
        out = transform(sample)
        torch.manual_seed(seed)  # the same draw, taken by hand
        forward = RandomGeometry(config).forward_homography(HEIGHT, WIDTH)

        dense = _reference_nearest(sample["semseg_dense"], forward, crop, IGNORE_INDEX)
        assert np.array_equal(out["semseg_dense"].numpy(), dense.astype(np.int64)), seed
        on_image = _reference_nearest(np.ones((HEIGHT, WIDTH), np.float32), forward, crop, 0)
        assert np.array_equal(out["valid"][0].numpy(), on_image), seed

        scribbles = [(c, _reference_points(p, forward)) for c, p in sample["scribbles"]]
        clicks = [(c, _reference_points(p[None], forward)[0]) for c, p in sample["clicks"]]
        width = config.stroke_width
        expected_scribbles = rasterise_scribbles(scribbles, (crop, crop), width)
        expected_clicks = rasterise_clicks(clicks, (crop, crop), width)
        assert torch.equal(out["semseg_scribbles"], expected_scribbles), seed
        assert torch.equal(out["semseg_clicks"], expected_clicks), seed


def test_fast_path_image_matches_torchvision_warping_the_padded_image() -> None:
    """The image: the old implementation (torchvision's perspective on the source padded to the
    canvas, then the crop) agrees wherever all four bilinear neighbours are on the image."""
    config = CONFIGS["all"]
    crop = config.crop_size
    transform = build_transform(config, train=True)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rng = np.random.default_rng(11)
    compared = 0
    for seed in range(10):
        sample = _sample(rng)
        torch.manual_seed(seed)
        out = transform(sample)
        torch.manual_seed(seed)
        forward = RandomGeometry(config).forward_homography(HEIGHT, WIDTH)
        image = torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255
        canvas = (max(HEIGHT, crop), max(WIDTH, crop))
        padded = TF.pad(image, [0, 0, canvas[1] - WIDTH, canvas[0] - HEIGHT], fill=0.0)
        inverse = np.linalg.inv(forward)
        coefficients = (inverse / inverse[2, 2]).reshape(-1)[:8].tolist()
        warped = TF.perspective(
            padded, None, None, TF.InterpolationMode.BILINEAR, fill=0.0, coefficients=coefficients
        )[:, :crop, :crop]
        inside = ndimage.binary_erosion(out["valid"][0].numpy().astype(bool), np.ones((3, 3)))
        fast = out["image"] * std + mean
        torch.testing.assert_close(
            fast[:, torch.from_numpy(inside)],
            warped[:, torch.from_numpy(inside)],
            atol=2e-4,
            rtol=0,
        )
        compared += int(inside.sum())
    assert compared > 1000


def test_resampler_reads_uint8_and_float_sources_alike() -> None:
    rng = np.random.default_rng(3)
    image = torch.from_numpy(rng.integers(0, 256, (3, 20, 30), dtype=np.uint8))
    forward = np.array([[1.3, 0.2, -4.0], [-0.15, 1.1, 2.5], [1e-3, -2e-3, 1.0]])
    resampler = Resampler(forward, (20, 30), (16, 24))
    from_uint8 = resampler.bilinear(image)
    from_float = resampler.bilinear(image.float() / 255)
    assert from_uint8.dtype == from_float.dtype == torch.float32
    torch.testing.assert_close(from_uint8, from_float, atol=1e-6, rtol=0)
    # A constant raster (an expanded scalar) gives what the same raster in memory gives.
    constant = torch.full((), 7, dtype=torch.uint8).expand(1, 20, 30)
    assert torch.equal(resampler.nearest(constant, 255), resampler.nearest(constant.clone(), 255))


def _naive_scribble(points: np.ndarray, size: tuple[int, int], class_id: int) -> np.ndarray:
    """Every segment sampled in full every <= 0.5 px, rounded, clipped to the canvas (width 1)."""
    labels = np.full(size, IGNORE_INDEX, np.int64)
    samples = [points[:1].astype(np.float64)]
    for a, b in zip(points[:-1].astype(np.float64), points[1:].astype(np.float64), strict=True):
        steps = max(1, int(np.ceil(2 * np.abs(b - a).max())))
        samples.append(a + (b - a) * (np.arange(1, steps + 1) / steps)[:, None])
    pixels = np.floor(np.concatenate(samples) + 0.5).astype(np.int64)
    inside = (pixels >= 0).all(1) & (pixels[:, 0] < size[1]) & (pixels[:, 1] < size[0])
    labels[pixels[inside, 1], pixels[inside, 0]] = class_id
    return labels


def test_scribble_rasterisation_clips_without_moving_the_samples() -> None:
    """Polylines stretched far beyond the canvas (as a warp leaves them) draw what full sampling
    draws: the clipping skips only samples that cannot land on the canvas."""
    rng = np.random.default_rng(5)
    size = (40, 56)
    for trial in range(30):
        spread = [10, 200, 5000][trial % 3]
        centre = np.array([28.0, 20.0])
        points = centre + rng.uniform(-spread, spread, (int(rng.integers(1, 8)), 2))
        if trial % 5 == 0:
            points[:, 1] = 7.25  # horizontal: parallel to two box edges
        drawn = rasterise_scribbles([(2, points.astype(np.float32))], size, 1).numpy()
        # float32 input, as in samples: the reference reads the same rounded vertices.
        expected = _naive_scribble(points.astype(np.float32), size, 2)
        assert np.array_equal(drawn, expected), trial


def test_uint8_reads_as_the_correctly_rounded_quotient() -> None:
    """The one uint8 → float conversion: ``x / 255`` rounded once from the float64 quotient, at
    every level; the pipeline's output image and the resampler's read are exactly that."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    reference = (levels.double() / 255).float()
    assert torch.equal(to_unit_float(levels), reference)
    validation = SampleTransform(AugmentationConfig(), train=False, normalize=None)
    assert torch.equal(validation({"image": levels[0]})["image"], reference)
    shift = np.array([[1.0, 0, -3], [0, 1.0, -5], [0, 0, 1.0]])  # integer shift: no interpolation
    shifted = Resampler(shift, (16, 16), (8, 8)).bilinear(levels)
    torch.testing.assert_close(shifted, reference[:, 5:13, 3:11], atol=1e-6, rtol=0)
    floats = torch.rand(2, 3, dtype=torch.float64)
    assert torch.equal(to_unit_float(floats), floats.float())  # floats are taken as they are
    with pytest.raises(TypeError, match="uint8 or floating"):
        to_unit_float(levels.to(torch.int16))
