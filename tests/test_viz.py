"""gcrf.viz: colours, normalisation, overlays and grids checked pixel by pixel."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from gcrf import viz
from gcrf.conventions import IMAGENET_MEAN, IMAGENET_STD
from gcrf.data.palettes import IGNORE_COLOR
from gcrf.data.transforms import AugmentationConfig, SampleTransform

PALETTE = torch.tensor([[0, 0, 0], [128, 0, 0], [0, 128, 0], [10, 20, 30]], dtype=torch.uint8)


# ----------------------------------------------------------------------------------- colour maps
def test_colorize_labels_uses_palette_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 7, 9), generator=generator)
    labels[0, 3, 4] = 255
    labels[1, 0, :] = 255
    rgb = viz.colorize_labels(labels, PALETTE)
    assert rgb.dtype == torch.uint8 and rgb.shape == (2, 3, 7, 9)
    for n in range(2):
        for row in range(7):
            for col in range(9):
                label = int(labels[n, row, col])
                expected = IGNORE_COLOR if label == 255 else tuple(PALETTE[label].tolist())
                assert tuple(rgb[n, :, row, col].tolist()) == expected


def test_colorize_labels_single_map_custom_ignore_and_inputs_untouched() -> None:
    labels = torch.tensor([[0, 1], [7, 3]])
    before = labels.clone()
    rgb = viz.colorize_labels(labels, PALETTE.tolist(), ignore_index=7, ignore_color=(1, 2, 3))
    assert rgb.shape == (3, 2, 2)
    assert rgb[:, 1, 0].tolist() == [1, 2, 3]
    assert rgb[:, 1, 1].tolist() == [10, 20, 30]
    assert torch.equal(labels, before)
    # A singleton channel is accepted.
    assert torch.equal(
        viz.colorize_labels(labels[None, None], PALETTE, ignore_index=7)[0, :, 0, 1], PALETTE[1]
    )


def test_ignore_colour_is_not_a_palette_colour() -> None:
    # The default ignore colour must stay distinct from the colours of real classes.
    assert list(IGNORE_COLOR) not in PALETTE.tolist()


@pytest.mark.parametrize(
    ("labels", "palette", "error"),
    [
        (torch.tensor([[0, 4]]), PALETTE, ValueError),  # label beyond the palette
        (torch.tensor([[-1, 0]]), PALETTE, ValueError),  # negative label
        (torch.zeros(2, 2), PALETTE, TypeError),  # float labels
        (np.zeros((2, 2), dtype=np.int64), PALETTE, TypeError),  # numpy, not torch
        (torch.zeros(2, 2, 2, 2, 2, dtype=torch.long), PALETTE, ValueError),  # rank 5
        (torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, 4, dtype=torch.uint8), ValueError),
        (torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, 3), TypeError),  # float palette
    ],
)
def test_colorize_labels_rejects_bad_input(labels, palette, error) -> None:
    with pytest.raises(error):
        viz.colorize_labels(labels, palette)


def test_colorize_labels_error_names_the_labels_found() -> None:
    with pytest.raises(ValueError, match=r"found \[4, 9\]"):
        viz.colorize_labels(torch.tensor([[0, 4, 9]]), PALETTE)


def test_overlay_labels_leaves_unlabelled_pixels_alone() -> None:
    image = torch.randint(
        0, 256, (3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    labels = torch.full((5, 6), 255)
    labels[2, 3] = 1
    out = viz.overlay_labels(image, labels, PALETTE, alpha=0.5)
    mask = labels != 255
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    expected = ((image[:, 2, 3].float() / 255 * 0.5 + PALETTE[1].float() / 255 * 0.5) * 255).round()
    assert torch.equal(out[:, 2, 3], expected.to(torch.uint8))
    with pytest.raises(ValueError, match="labels must match image"):
        viz.overlay_labels(image, labels[:4], PALETTE)
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay_labels(image, labels, PALETTE, alpha=1.5)


def test_dilate_labels_grows_clicks_and_smallest_class_wins() -> None:
    clicks = torch.full((2, 7, 8), 255)
    clicks[0, 1, 1] = 3
    clicks[0, 1, 3] = 1  # squares of 3 and 1 overlap in column 2
    clicks[1, 6, 7] = 2  # a corner: the square is cut by the border
    before = clicks.clone()
    grown = viz.dilate_labels(clicks, size=3)
    # Reference, written here: for every unlabelled pixel, the smallest label in its 3×3 square.
    expected = clicks.clone()
    for n in range(2):
        for row in range(7):
            for col in range(8):
                if clicks[n, row, col] != 255:
                    continue
                square = clicks[n, max(0, row - 1) : row + 2, max(0, col - 1) : col + 2]
                expected[n, row, col] = square.min()
    assert torch.equal(grown, expected)
    assert grown[0, 1, 2] == 1 and grown[0, 0, 0] == 3 and grown[1, 5, 6] == 2
    assert (grown != 255).sum() == 15 + 4  # two 3×3 squares sharing a column, a 2×2 corner
    assert torch.equal(clicks, before)
    assert torch.equal(viz.dilate_labels(clicks[0], size=1), clicks[0])
    with pytest.raises(ValueError, match="odd"):
        viz.dilate_labels(clicks, size=2)
    with pytest.raises(ValueError, match="exceed"):
        viz.dilate_labels(torch.tensor([[300, 255]]))


# ------------------------------------------------------------------------------- normalisation
def test_denormalize_round_trip_and_reference() -> None:
    image = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    normalised = (image - mean) / std  # the reference, written here
    back = viz.denormalize_image(normalised)
    assert back.dtype == torch.float64
    assert torch.allclose(back, image, atol=1e-12)
    # uint8 through the data pipeline's normalisation and back to the same uint8.
    image_u8 = (image[0] * 255).round().to(torch.uint8)
    pipeline = SampleTransform(AugmentationConfig(), train=False)
    network_input = pipeline({"image": image_u8})["image"]
    assert torch.equal(viz.to_uint8_image(viz.denormalize_image(network_input)), image_u8)


def test_denormalize_clamps_unless_asked_not_to() -> None:
    far = torch.full((3, 2, 2), 10.0)
    assert viz.denormalize_image(far).max().item() == 1.0
    assert viz.denormalize_image(far, clamp=False).min().item() > 1.0


def test_denormalize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"3×H×W"):
        viz.denormalize_image(torch.zeros(4, 5, 5))
    with pytest.raises(TypeError, match="floating"):
        viz.denormalize_image(torch.zeros(3, 5, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="std"):
        viz.denormalize_image(torch.zeros(3, 5, 5), std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="mean and std"):
        viz.denormalize_image(torch.zeros(3, 5, 5), mean=(0.5, 0.5))


def test_to_uint8_image_rounds_and_clips() -> None:
    image = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 5).expand(3, 1, 5)
    assert viz.to_uint8_image(image)[0, 0].tolist() == [0, 0, 128, 255, 255]


# ------------------------------------------------------------------------------------ heat maps
def test_heatmap_endpoints_and_monotone() -> None:
    values = torch.linspace(0, 2, 50).view(1, 50)
    rgb = viz.heatmap(values).int()
    assert rgb[:, 0, 0].tolist() == [0, 0, 0]
    assert rgb[:, 0, -1].tolist() == [255, 255, 255]
    assert (rgb.sum(0)[0].diff() >= 0).all()  # brighter with larger values
    assert viz.heatmap(torch.zeros(3, 3)).max().item() == 0  # a zero map stays black
    with pytest.raises(ValueError, match="non-negative"):
        viz.heatmap(torch.tensor([[-1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        viz.heatmap(torch.tensor([[float("nan")]]))


def test_affinity_overlay_range_and_zero_affinity_keeps_the_image() -> None:
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(3, 8, 12, generator=generator)
    affinity = torch.zeros(4, 6)
    affinity[1, 2] = 3.0
    affinity[2, 2] = 0.3
    out = viz.affinity_overlay(image, affinity, alpha=1.0, gamma=1.0)
    assert out.dtype == torch.uint8 and out.shape == (3, 8, 12)
    # Zero affinity: the image unchanged. The map is upsampled ×2 with nearest neighbours.
    touched = torch.zeros(8, 12, dtype=torch.bool)
    touched[2:6, 4:6] = True
    assert torch.equal(out[:, ~touched], viz.to_uint8_image(image)[:, ~touched])
    # The maximum with alpha = 1 is pure white; the weaker pixel is a blend.
    assert out[:, 2:4, 4:6].eq(255).all()
    v = 0.1  # 0.3 / 3.0
    hot = torch.tensor([min(1.0, 3 * v), 0.0, 0.0])
    expected = ((image[:, 4, 4] * (1 - v) + hot * v) * 255).round().to(torch.uint8)
    assert torch.equal(out[:, 4, 4], expected)
    # vmax fixes the scale: half of vmax is not white.
    half = viz.affinity_overlay(image, affinity, alpha=1.0, vmax=6.0)
    assert not half[:, 2, 4].eq(255).all()


def test_affinity_overlay_batch_and_bad_input() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = viz.affinity_overlay(images, torch.rand(2, 1, 4, 4))
    assert out.shape == (2, 3, 4, 4)
    # A batch of one image with a 1×h×w map (the TensorBoard grid of a single observed sample).
    single_map = torch.rand(1, 4, 4)
    one = viz.affinity_overlay(images[:1], single_map, alpha=1.0)
    assert one.shape == (1, 3, 4, 4)
    assert torch.equal(one[0], viz.affinity_overlay(images[0], single_map[0], alpha=1.0))
    with pytest.raises(ValueError, match="integer fraction"):
        viz.affinity_overlay(images[0], torch.rand(3, 3))
    with pytest.raises(ValueError, match="one map per image"):
        viz.affinity_overlay(images, torch.rand(3, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        viz.affinity_overlay(images[0], torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="gamma"):
        viz.affinity_overlay(images[0], torch.rand(4, 4), gamma=0)


def test_affinity_around_pixel_matches_contract_layout() -> None:
    radius, h, w = 2, 6, 7
    diameter = 2 * radius + 1
    generator = torch.Generator().manual_seed(4)
    window = torch.rand(2, diameter * diameter, h, w, generator=generator)
    for pixel in [(0, 0), (3, 4), (5, 6), (2, 1)]:
        out = viz.affinity_around_pixel(window, pixel)
        assert out.shape == (2, h, w)
        # Reference: loop over the offsets in row-major order, j = i + offset.
        expected = torch.zeros(2, h, w)
        o = 0
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                row, col = pixel[0] + dy, pixel[1] + dx
                if 0 <= row < h and 0 <= col < w:
                    expected[:, row, col] = window[:, o, pixel[0], pixel[1]]
                o += 1
        assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("shape", "pixel"),
    [
        ((1, 8, 4, 4), (0, 0)),
        ((1, 4, 4, 4), (0, 0)),
        ((9, 4, 4), (0, 0)),
        ((1, 9, 4, 4), (4, 0)),
        ((1, 9, 4, 4), (0.5, 1)),
    ],
)
def test_affinity_around_pixel_rejects_bad_input(shape, pixel) -> None:
    with pytest.raises(ValueError):
        viz.affinity_around_pixel(torch.zeros(shape), pixel)


# ---------------------------------------------------------------------------------------- grids
def test_make_grid_layout_row_major_with_padding() -> None:
    cells = [torch.full((3, 4, 5), 10 * (k + 1), dtype=torch.uint8) for k in range(5)]
    grid = viz.make_grid(cells, ncols=2, padding=1, pad_value=7)
    assert grid.dtype == torch.uint8
    assert grid.shape == (3, 3 * (4 + 1) + 1, 2 * (5 + 1) + 1)
    for k in range(5):
        top, left = 1 + (k // 2) * 5, 1 + (k % 2) * 6
        assert grid[:, top : top + 4, left : left + 5].eq(10 * (k + 1)).all()
    assert grid[:, 0, :].eq(7).all() and grid[:, :, 0].eq(7).all()
    assert grid[:, 11:15, 7:12].eq(7).all()  # the empty sixth cell


def test_make_grid_accepts_batch_tensor_and_grey_maps() -> None:
    batch = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    grid = viz.make_grid(batch, padding=0)
    assert grid.shape == (3, 4, 12)
    assert torch.equal(grid[:, :, 4:8], batch[1])
    grey = viz.make_grid([torch.full((4, 4), 9, dtype=torch.uint8)], padding=0)
    assert grey.shape == (3, 4, 4) and grey.eq(9).all()


@pytest.mark.parametrize(
    ("images", "kwargs", "error"),
    [
        ([], {}, ValueError),
        ([torch.zeros(3, 4, 4)], {}, TypeError),  # float, not uint8
        (
            [torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 4, 5, dtype=torch.uint8)],
            {},
            ValueError,
        ),
        ([torch.zeros(3, 4, 4, dtype=torch.uint8)], {"ncols": 0}, ValueError),
        ([torch.zeros(3, 4, 4, dtype=torch.uint8)], {"padding": -1}, ValueError),
        ("abc", {}, TypeError),
    ],
)
def test_make_grid_rejects_bad_input(images, kwargs, error) -> None:
    with pytest.raises(error):
        viz.make_grid(images, **kwargs)


# ----------------------------------------------------------------------------------- matplotlib
def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, gcrf.viz; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_show_images_draws_every_panel() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [
        torch.zeros(3, 4, 4, dtype=torch.uint8),
        torch.rand(3, 4, 4),
        np.zeros((4, 4, 3), dtype=np.uint8),
        torch.rand(4, 4),
    ]
    fig = viz.show_images(images, titles=["a", "b", "c", "d"], ncols=3)
    try:
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title() for ax in panels] == ["a", "b", "c", "d"]
        assert all(len(ax.images) == 1 for ax in panels)
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="titles"):
        viz.show_images(images, titles=["a"])
    with pytest.raises(TypeError, match="list of images"):
        viz.show_images(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="H×W×3"):
        viz.show_images([np.zeros((4, 4, 5))])
