"""gcrf.loss (the front end: resizing, features, positions, gates, D, μ̂) against the naive float64
reference of tests/loss_reference.py, values and gradients. The backends themselves run the
contract suite, tests/test_backend_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gcrf.loss import GatedCRFLoss, gated_crf_loss
from tests.loss_reference import (
    naive_gated_crf_loss,
)

RGBXY = [{"weight": 1.0, "xy": 3.0, "rgb": 0.5}]


def _probs(n: int, c: int, *spatial: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, c, *spatial, generator=g, dtype=torch.float64), 1).to(dtype)


def _rand(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64)


def _mask(n: int, *spatial: int, seed: int = 2) -> torch.Tensor:
    """A gate with zeros, fractional values (area-resize edges) and NaN, as real masks have."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(n, 1, *spatial, generator=g) > 0.25).float()
    m[..., 0, 0] = float("nan")
    m[..., -1, -1] = 0.5
    return m


def _check(
    probs: torch.Tensor, features: dict, kernels: list, radius: int, upstream: float = 1.0, **kw
):
    """Our value and gradient (fp64) equal the naive reference's."""
    ours_in = probs.detach().clone().requires_grad_(True)
    ref_in = probs.detach().clone().requires_grad_(True)
    ours = gated_crf_loss(ours_in, features, kernels, radius, **kw)
    ref = naive_gated_crf_loss(ref_in, features, kernels, radius, **kw)
    (ours * upstream).backward()
    (ref * upstream).backward()
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-9, atol=1e-12)
    return ours


@pytest.mark.parametrize("radius", [1, 2, 3, 4, 5])
def test_radius_odd_size(radius: int) -> None:
    probs = _probs(1, 2, 13, 17)
    _check(probs, {"rgb": _rand(1, 3, 13, 17)}, RGBXY, radius)


@pytest.mark.parametrize(("n", "c"), [(1, 1), (3, 5), (3, 2)])
def test_batch_and_classes(n: int, c: int) -> None:
    probs = _probs(n, c, 7, 9, seed=n + c)
    _check(probs, {"rgb": _rand(n, 3, 7, 9)}, RGBXY, 2, upstream=-2.5)


@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("masks", ["none", "src", "dst", "both"])
def test_masks_and_ratio(masks: str, ratio: int) -> None:
    h, w = 5, 7
    probs = _probs(2, 3, h, w, seed=ratio)
    kw = {}
    if masks in ("src", "both"):
        kw["mask_src"] = _mask(2, h * ratio, w * ratio, seed=3)
    if masks in ("dst", "both"):
        kw["mask_dst"] = _mask(2, h * ratio, w * ratio, seed=4)
    _check(probs, {"rgb": _rand(2, 3, h * ratio, w * ratio)}, RGBXY, 2, upstream=3.7, **kw)


def test_two_kernels_two_modalities_custom_downsampler() -> None:
    kernels = [
        {"weight": 0.7, "xy": 2.0, "rgb": 0.3, "depth": 0.2},
        {"weight": 0.3, "xy": 4.0},
        {"weight": 0.5, "depth": 0.1},
    ]
    features = {"rgb": _rand(2, 3, 12, 14, seed=5), "depth": _rand(2, 1, 12, 14, seed=6)}
    probs = _probs(2, 4, 6, 7, seed=7)
    _check(
        probs,
        features,
        kernels,
        3,
        downsamplers={"depth": F.adaptive_max_pool2d},
        mask_src=_mask(2, 12, 14),
    )


@pytest.mark.parametrize("masks", ["none", "both"])
def test_compatibility(masks: str) -> None:
    c = 4
    mu = _rand(c, c, seed=8) * (1 - torch.eye(c, dtype=torch.float64))
    probs = _probs(2, c, 6, 5, seed=9)
    kw = {}
    if masks == "both":
        kw = {"mask_src": _mask(2, 6, 5, seed=10), "mask_dst": _mask(2, 6, 5, seed=11)}
    _check(probs, {"rgb": _rand(2, 3, 6, 5)}, RGBXY, 2, upstream=0.3, compatibility=mu, **kw)


def test_compatibility_potts_matrix_equals_potts() -> None:
    """μ = 1 − I gives μ̂ = μ, and y_iᵀ μ̂ y_j = 1 − ⟨y_i, y_j⟩ for probability vectors."""
    c = 3
    probs = _probs(1, c, 6, 6, seed=12)
    features = {"rgb": _rand(1, 3, 6, 6)}
    potts = gated_crf_loss(probs, features, RGBXY, 2)
    mu = 1.0 - torch.eye(c, dtype=torch.float64)
    general = gated_crf_loss(probs, features, RGBXY, 2, compatibility=mu)
    torch.testing.assert_close(potts, general, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("radius", [1, 2])
def test_volume_anisotropic_spacing(radius: int) -> None:
    kernels = [{"weight": 1.0, "xyz": 2.0, "ct": 0.4}, {"weight": 0.5, "xyz": 1.5}]
    probs = _probs(2, 3, 3, 4, 5, seed=13)
    features = {"ct": _rand(2, 1, 3, 8, 10, seed=14)}  # ratio (1, 2, 2)
    _check(
        probs,
        features,
        kernels,
        radius,
        upstream=1.9,
        spacing=(2.5, 0.7, 0.7),
        mask_src=_mask(2, 3, 8, 10),
    )


def test_spacing_2d_and_position_only_kernel() -> None:
    probs = _probs(1, 2, 6, 8, seed=15)
    kernels = [{"weight": 1.0, "xy": 1.3}]
    _check(probs, {}, kernels, 3, spacing=(1.0, 0.5))
    _check(probs, {}, kernels, 3)
    # No feature map: the input resolution (for spacing) comes from the mask, here 2× the prediction.
    _check(probs, {}, kernels, 3, spacing=(1.0, 0.5), mask_src=_mask(1, 12, 16))


def test_single_pixel_and_thin_images() -> None:
    """Windows larger than the image: neighbours outside are absent; a 1×1 image has none."""
    assert gated_crf_loss(_probs(1, 3, 1, 1), {"rgb": _rand(1, 3, 1, 1)}, RGBXY, 3).item() == 0.0
    _check(_probs(2, 3, 1, 6), {"rgb": _rand(2, 3, 1, 6)}, RGBXY, 4)
    _check(_probs(1, 2, 2, 2, 2), {}, [{"weight": 1.0, "xyz": 1.0}], 3)


def test_float32_matches_reference() -> None:
    probs = _probs(2, 5, 9, 11, dtype=torch.float32).requires_grad_(True)
    features = {"rgb": _rand(2, 3, 18, 22).float()}
    mask = _mask(2, 18, 22)
    ours = gated_crf_loss(probs, features, RGBXY, 3, mask_src=mask)
    ours.backward()
    assert ours.dtype == torch.float32 and probs.grad.dtype == torch.float32
    ref_in = probs.detach().double().requires_grad_(True)
    ref = naive_gated_crf_loss(ref_in, features, RGBXY, 3, mask_src=mask)
    ref.backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.grad.double(), ref_in.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_probs(dtype: torch.dtype) -> None:
    probs32 = _probs(2, 5, 8, 8, dtype=torch.float32)
    features = {"rgb": _rand(2, 3, 16, 16).float()}
    low = probs32.to(dtype).requires_grad_(True)
    ours = gated_crf_loss(low, features, RGBXY, 2)
    ours.backward()
    assert ours.dtype == torch.float32 and low.grad.dtype == dtype
    # Accumulation is fp32: the only error is the rounding of the inputs themselves.
    exact_in = low.detach().double().requires_grad_(True)
    exact = naive_gated_crf_loss(exact_in, features, RGBXY, 2)
    exact.backward()
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(low.grad.double(), exact_in.grad, rtol=2e-2, atol=1e-4)


def test_gradcheck_fp64() -> None:
    features = {"rgb": _rand(1, 3, 4, 5)}
    mu = _rand(3, 3, seed=16) * (1 - torch.eye(3, dtype=torch.float64))
    kw = {"mask_src": _mask(1, 4, 5, seed=17), "mask_dst": _mask(1, 4, 5, seed=18)}
    for compatibility in (None, mu):
        probs = _probs(1, 3, 4, 5).requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda p, c=compatibility: gated_crf_loss(p, features, RGBXY, 2, compatibility=c, **kw),
            (probs,),
        )


def test_inputs_not_modified() -> None:
    probs = _probs(2, 3, 6, 6, dtype=torch.float32).requires_grad_(True)
    rgb = _rand(2, 3, 12, 12).float()
    m_src, m_dst = _mask(2, 12, 12, seed=23), _mask(2, 6, 6, seed=24)
    mu = _rand(3, 3).float() * (1 - torch.eye(3))
    originals = [t.detach().clone() for t in (probs, rgb, m_src, m_dst, mu)]
    loss_fn = GatedCRFLoss(RGBXY, radius=2, compatibility=mu)
    loss_fn(probs, {"rgb": rgb}, mask_src=m_src, mask_dst=m_dst).backward()
    gated_crf_loss(probs, {"rgb": rgb}, RGBXY, 2, mask_src=m_src, mask_dst=m_dst).backward()
    for before, after in zip(originals, (probs, rgb, m_src, m_dst, mu), strict=True):
        torch.testing.assert_close(after.detach(), before, rtol=0, atol=0, equal_nan=True)


def test_module_equals_functional_and_bool_masks() -> None:
    probs = _probs(2, 4, 8, 8, dtype=torch.float32)
    rgb = _rand(2, 3, 16, 16).float()
    mask = torch.rand(2, 1, 16, 16) > 0.4
    loss_fn = GatedCRFLoss(RGBXY, radius=3)
    a = loss_fn(probs, {"rgb": rgb, "unused": "ignored"}, mask_src=mask)
    b = gated_crf_loss(probs, {"rgb": rgb}, RGBXY, 3, mask_src=mask.float())
    assert torch.equal(a, b)
    assert "radius=3" in repr(loss_fn)


def test_all_masked_denominator_is_one() -> None:
    """D = max(1, Σ m): an all-zero gate gives loss 0, not NaN."""
    probs = _probs(1, 3, 6, 6, dtype=torch.float32)
    zero = torch.zeros(1, 1, 6, 6)
    loss = gated_crf_loss(probs, {"rgb": _rand(1, 3, 6, 6).float()}, RGBXY, 2, mask_dst=zero)
    assert loss.item() == 0.0


def test_triton_backend_dispatch_matches_torch() -> None:
    """backend="triton" (Triton's CPU interpreter here) gives the torch backend's value and grad."""
    import os

    from gcrf.loss import available_backends

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    probs = _probs(1, 3, 5, 7, dtype=torch.float32)
    if not {s.name: s for s in available_backends(probs, 2)}["triton"].usable:
        pytest.skip("the Triton backend is not importable here")
    features = {"rgb": _rand(1, 3, 10, 14).float()}
    mu = _rand(3, 3).float() * (1 - torch.eye(3))
    kw = {"mask_src": _mask(1, 10, 14, seed=3), "mask_dst": _mask(1, 10, 14, seed=4)}
    results = []
    for backend in ("torch", "triton"):
        p = probs.clone().requires_grad_(True)
        loss = gated_crf_loss(p, features, RGBXY, 2, compatibility=mu, backend=backend, **kw)
        loss.backward()
        results.append((loss.detach(), p.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


def test_compatibility_zero_row_and_single_class() -> None:
    """An all-zero row of μ stays zero in μ̂ (no NaN); C = 1 with μ = [[0]] gives loss 0."""
    mu = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.0]], dtype=torch.float64)
    _check(_probs(1, 3, 5, 6, seed=25), {"rgb": _rand(1, 3, 5, 6)}, RGBXY, 2, compatibility=mu)
    one = gated_crf_loss(
        _probs(1, 1, 4, 4), {"rgb": _rand(1, 3, 4, 4)}, RGBXY, 2, compatibility=torch.zeros(1, 1)
    )
    assert one.item() == 0.0
