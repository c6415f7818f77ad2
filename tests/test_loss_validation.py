"""Bad input to gcrf.loss raises ValueError/TypeError naming the argument and showing what came in;
backend choice; gaussian_affinity / kernels_vis; torch.compile."""

from __future__ import annotations

import logging

import pytest
import torch

from gcrf.loss import (
    GatedCRFLoss,
    ModelLossSemsegGatedCRF,
    available_backends,
    choose_backend,
    gated_crf_loss,
    gaussian_affinity,
    kernels_vis,
)
from gcrf.loss.torch_backend import window_offsets
from tests.loss_reference import naive_gated_crf_loss

KERNELS = [{"weight": 1.0, "xy": 6.0, "rgb": 0.1}]


def _inputs():
    probs = torch.softmax(torch.randn(2, 3, 8, 8), dim=1)
    return probs, {"rgb": torch.rand(2, 3, 16, 16)}


def _call(**overrides):
    probs, features = _inputs()
    kwargs = {"probs": probs, "features": features, "kernels": KERNELS, "radius": 2}
    kwargs.update(overrides)
    return gated_crf_loss(**kwargs)


BAD = [
    # (overrides, exception, text the message must contain)
    ({"probs": torch.rand(3, 8, 8)}, ValueError, "3 dimensions"),
    ({"probs": torch.rand(1, 2, 3, 4, 5, 6)}, ValueError, "6 dimensions"),
    ({"probs": torch.randint(0, 2, (2, 3, 8, 8))}, TypeError, "torch.int64"),
    ({"probs": [[0.5]]}, TypeError, "list"),
    ({"features": {"rgb": torch.rand(3, 3, 16, 16)}}, ValueError, "batch size 3"),
    ({"features": {"rgb": torch.rand(2, 3, 16)}}, ValueError, "(2, 3, 16)"),
    ({"features": {"rgb": torch.rand(2, 3, 12, 12)}}, ValueError, "integer multiple"),
    ({"features": {"rgb": torch.rand(2, 3, 16, 24)}}, ValueError, "aspect ratio"),
    ({"features": {"rgb": torch.randint(0, 255, (2, 3, 16, 16))}}, TypeError, "torch.int64"),
    ({"features": {"rgb": torch.rand(2, 3, 16, 16, requires_grad=True)}}, ValueError, ".detach()"),
    ({"features": {"rgb": torch.full((2, 3, 16, 16), float("nan"))}}, ValueError, "NaN"),
    ({"features": {"depth": torch.rand(2, 1, 16, 16)}}, ValueError, "'rgb'"),
    ({"features": torch.rand(2, 3, 16, 16)}, TypeError, "Tensor"),
    ({"features": {"rgb": "image.png"}}, TypeError, "str"),
    ({"kernels": [{"weight": 1.0, "xy": 0.0, "rgb": 0.1}]}, ValueError, "'xy'"),
    ({"kernels": [{"weight": 1.0, "xy": 6.0, "rgb": -0.1}]}, ValueError, "-0.1"),
    ({"kernels": [{"weight": -1.0, "xy": 6.0}]}, ValueError, "-1.0"),
    ({"kernels": [{"xy": 6.0}]}, ValueError, "no 'weight'"),
    ({"kernels": [{"weight": 1.0}]}, ValueError, "no modality"),
    ({"kernels": [{"weight": 1.0, "xyz": 2.0}]}, ValueError, "use 'xy'"),
    ({"kernels": [{"weight": 1.0, "xy": "6"}]}, TypeError, "'6'"),
    ({"kernels": {"weight": 1.0, "xy": 6.0}}, TypeError, "dict"),
    ({"kernels": []}, ValueError, "empty"),
    ({"radius": 0}, ValueError, "radius"),
    ({"radius": 2.5}, TypeError, "2.5"),
    ({"radius": True}, TypeError, "radius"),
    ({"compatibility": torch.zeros(2, 2)}, ValueError, "3×3"),
    ({"compatibility": torch.zeros(3, 4)}, ValueError, "(3, 4)"),
    ({"compatibility": -(1 - torch.eye(3))}, ValueError, ">= 0"),
    ({"compatibility": torch.ones(3, 3)}, ValueError, "zero diagonal"),
    ({"compatibility": (1 - torch.eye(3)).long()}, TypeError, "torch.int64"),
    ({"mask_src": torch.ones(2, 2, 16, 16)}, ValueError, "mask_src must have 1 channel"),
    ({"mask_dst": torch.ones(1, 1, 16, 16)}, ValueError, "mask_dst batch size 1"),
    ({"mask_dst": torch.ones(2, 1, 10, 10)}, ValueError, "mask_dst spatial size (10, 10)"),
    ({"mask_src": torch.ones(2, 1, 16, 16, dtype=torch.int32)}, TypeError, "torch.int32"),
    ({"spacing": (1.0,)}, ValueError, "spacing"),
    ({"spacing": (1.0, 0.0)}, ValueError, "spacing[1]"),
    ({"downsamplers": {"rgb": lambda t, s: t}}, ValueError, "downsamplers['rgb']"),
    ({"downsamplers": {"rgb": 3}}, TypeError, "downsamplers['rgb']"),
    ({"backend": "cuda"}, ValueError, "'cuda'"),
]


@pytest.mark.parametrize(("overrides", "error", "text"), BAD, ids=[b[2] for b in BAD])
def test_bad_input(overrides: dict, error: type, text: str) -> None:
    with pytest.raises(error) as info:
        _call(**overrides)
    assert text in str(info.value)


def test_devices_differ_meta() -> None:
    """A feature map on another device than probs (meta stands in for a second device)."""
    probs, _ = _inputs()
    with pytest.raises(ValueError, match="is on meta but probs are on cpu"):
        gated_crf_loss(probs, {"rgb": torch.rand(2, 3, 16, 16, device="meta")}, KERNELS, 2)
    with pytest.raises(ValueError, match="mask_src is on meta"):
        gated_crf_loss(
            probs,
            {"rgb": torch.rand(2, 3, 16, 16)},
            KERNELS,
            2,
            mask_src=torch.ones(2, 1, 8, 8, device="meta"),
        )


def test_module_validates_configuration_at_init() -> None:
    with pytest.raises(ValueError, match="radius"):
        GatedCRFLoss(KERNELS, radius=-1)
    with pytest.raises(ValueError, match="zero diagonal"):
        GatedCRFLoss(KERNELS, compatibility=torch.ones(3, 3))
    with pytest.raises(ValueError, match="backend"):
        GatedCRFLoss(KERNELS, backend="numpy")
    with pytest.raises(ValueError, match="spacing"):
        GatedCRFLoss([{"weight": 1.0, "xyz": 1.0}], spacing=(1.0, 1.0))(
            torch.rand(1, 2, 3, 4, 5), {}
        )


def test_drop_in_bad_input() -> None:
    probs, features = _inputs()
    loss = ModelLossSemsegGatedCRF()
    with pytest.raises(ValueError, match="multiple of the prediction size"):
        loss(probs, KERNELS, 2, features, 16, 20)
    with pytest.raises(ValueError, match="GatedCRFLoss for volumes"):
        loss(torch.rand(2, 3, 4, 8, 8), KERNELS, 2, features, 16, 16)
    with pytest.raises(ValueError, match="'rgb'"):
        loss(probs, KERNELS, 2, {"image": features["rgb"]}, 16, 16)
    with pytest.raises(TypeError, match="height_input"):
        loss(probs, KERNELS, 2, features, 16.0, 16)


def test_choose_backend(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    probs = torch.rand(1, 2, 4, 4)
    with caplog.at_level(logging.DEBUG, logger="gcrf.loss.backends"):
        assert choose_backend("auto", probs, 2) == "torch"
    assert "not CUDA" in caplog.text
    assert choose_backend("torch", probs, 3) == "torch"
    with pytest.raises(ValueError, match="spatial rank 4"):
        choose_backend("torch", probs, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend=.triton. cannot run: .*CUDA"):
        choose_backend("triton", probs, 2)
    statuses = {s.name: s for s in available_backends(probs, 2)}
    assert statuses["torch"].usable and not statuses["triton"].usable
    assert "CUDA" in statuses["triton"].reason


def test_triton_import_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import gcrf.loss.backends as backends

    def broken(name: str):
        raise ImportError("no triton here")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends.importlib, "import_module", broken)
    monkeypatch.setattr(backends, "_TRITON_IMPORT", {})
    with pytest.raises(ValueError, match=r"cannot import gcrf\.kernels\.gated_crf"):
        choose_backend("triton", torch.rand(1, 2, 4, 4), 2)


def test_gaussian_affinity_dense_and_pixels() -> None:
    torch.manual_seed(0)
    image = torch.rand(1, 3, 9, 10, dtype=torch.float64)
    kernels = [{"weight": 1.0, "xy": 2.0, "rgb": 0.3}]
    dense = gaussian_affinity({"rgb": image}, kernels, radius=2)
    assert dense.shape == (1, 25, 9, 10) and dense.dtype == torch.float64
    patches = gaussian_affinity({"rgb": image}, kernels, radius=2, pixels=[(4, 5), (0, 9)])
    assert patches.shape == (1, 2, 5, 5)
    assert patches[0, 0, 2, 2] == 0  # the centre is not its own neighbour
    assert torch.all(patches[0, 1, :2] == 0) and torch.all(patches[0, 1, :, 3:] == 0)  # outside
    # K between (4, 5) and its neighbour (3, 7): explicit formula.
    f = image[0, :, :, :] / 0.3
    expected = torch.exp(-0.5 * (((f[:, 4, 5] - f[:, 3, 7]) ** 2).sum() + (1 + 4) / 4.0))
    torch.testing.assert_close(patches[0, 0, 1, 4], expected)
    # Symmetry: K_ij = K_ji, so the window of (3, 7) holds the same value at the mirrored offset.
    back = gaussian_affinity({"rgb": image}, kernels, radius=2, pixels=[(3, 7)])
    torch.testing.assert_close(back[0, 0, 3, 0], expected)
    # Position-only kernel without features needs the size; a volume gives (2r+1)^3 patches.
    xyz = gaussian_affinity(
        {}, [{"weight": 1.0, "xyz": 1.0}], 1, size=(3, 3, 3), pixels=[(1, 1, 1)]
    )
    assert xyz.shape == (1, 1, 3, 3, 3)
    torch.testing.assert_close(xyz[0, 0, 1, 1, 2].item(), torch.exp(torch.tensor(-0.5)).item())
    with pytest.raises(ValueError, match="pixels"):
        gaussian_affinity({"rgb": image}, kernels, radius=2, pixels=[(9, 0)])
    with pytest.raises(ValueError, match="size is required"):
        gaussian_affinity({}, [{"weight": 1.0, "xy": 1.0}], 1)


def test_affinity_is_what_the_loss_weighs() -> None:
    """Σ over the dense affinity of G·K·(1 − ⟨y_i, y_j⟩) is the loss (one concept, one home)."""
    torch.manual_seed(1)
    image = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    probs = torch.softmax(torch.randn(2, 3, 6, 6, dtype=torch.float64), 1)
    mask = (torch.rand(2, 1, 12, 12) > 0.3).double()
    dense = gaussian_affinity({"rgb": image}, KERNELS, 2, size=(6, 6), mask_src=mask)
    total = torch.zeros((), dtype=torch.float64)
    for o, (dy, dx) in enumerate(window_offsets(2, 2)):
        shifted = torch.roll(probs, shifts=(-dy, -dx), dims=(2, 3))  # wrap is gated off by 0 K
        total += (dense[:, o] * (1 - (probs * shifted).sum(1))).sum()
    expected = naive_gated_crf_loss(probs, {"rgb": image}, KERNELS, 2, mask_src=mask)
    mask_small = (torch.nn.functional.adaptive_avg_pool2d(mask, (6, 6)) >= 1).sum()
    torch.testing.assert_close(total / mask_small, expected, rtol=1e-10, atol=1e-12)


def test_kernels_vis_layout() -> None:
    r, d = 1, 3
    affinity = torch.zeros(1, 9, 5, 7)
    affinity[0, 2, 1, 4] = 1.0  # pixel (1, 4) = tile (0, 1), offset (-1, +1)
    vis = kernels_vis(affinity, r, (10, 14))
    assert vis.shape == (1, 1, 10, 14)
    assert vis[0, 0, 0:2, 2 * (d + 2) : 2 * (d + 3)].eq(1).all()
    assert vis.sum() == 4  # the one entry, upscaled 2×2
    with pytest.raises(ValueError, match="N×9×h×w"):
        kernels_vis(torch.zeros(1, 8, 5, 5), 1, (5, 5))


def test_torch_compile_fullgraph() -> None:
    """The core path traces without graph breaks (value checks are skipped while compiling)."""
    loss_fn = GatedCRFLoss(KERNELS, radius=1)
    probs, features = _inputs()
    mask = torch.ones(2, 1, 16, 16)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    p1 = probs.clone().requires_grad_(True)
    p2 = probs.clone().requires_grad_(True)
    a = compiled(p1, features, mask_src=mask)
    b = loss_fn(p2, features, mask_src=mask)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(p1.grad, p2.grad)
