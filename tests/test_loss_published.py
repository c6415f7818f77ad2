"""Equivalence with the published Gated CRF loss (Obukhov et al., 2019) and the drop-in class.

``published_gated_crf`` is the published unfold formulation, written out once in
``benchmarks/unfold_reference.py`` (also the benchmark's baseline). Known, deliberate difference
(docs/math.md#published-differences): without ``mask_src`` its value is larger by a y-independent
constant; with ``mask_src`` they agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.unfold_reference import published_gated_crf
from gcrf.loss import GatedCRFLoss, ModelLossSemsegGatedCRF, gated_crf_loss

KERNELS = [{"weight": 1, "xy": 6, "rgb": 0.1}]  # the published training default


def _setup(seed: int = 0, n: int = 2, c: int = 4, h: int = 12, w: int = 10, ratio: int = 4):
    g = torch.Generator().manual_seed(seed)
    y = torch.softmax(torch.randn(n, c, h, w, generator=g, dtype=torch.float64), dim=1)
    rgb = torch.randn(n, 3, h * ratio, w * ratio, generator=g, dtype=torch.float64) * 0.2
    valid = torch.ones(n, 1, h * ratio, w * ratio, dtype=torch.float64)
    valid[0, :, :, -9:] = 0  # padding from augmentation, as the published `validity`
    return y, rgb, valid


def _value_and_grad(function, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = y.detach().clone().requires_grad_(True)
    value = function(y)
    (grad,) = torch.autograd.grad(value, y)
    return value.detach(), grad


def test_equal_with_mask_src() -> None:
    y, rgb, valid = _setup()
    for radius, mask_dst in ((5, None), (2, valid.flip(-1))):
        ours = _value_and_grad(
            lambda p, r=radius, m=mask_dst: gated_crf_loss(
                p, {"rgb": rgb}, KERNELS, r, mask_src=valid, mask_dst=m
            ),
            y,
        )
        theirs = _value_and_grad(
            lambda p, r=radius, m=mask_dst: published_gated_crf(
                p, KERNELS, r, {"rgb": rgb}, mask_src=valid, mask_dst=m
            )[0],
            y,
        )
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)


def test_equal_with_compatibility() -> None:
    y, rgb, valid = _setup(seed=1)
    mu = torch.rand(4, 4, dtype=torch.float64) * (1 - torch.eye(4, dtype=torch.float64))
    ours = _value_and_grad(
        lambda p: gated_crf_loss(p, {"rgb": rgb}, KERNELS, 3, mask_src=valid, compatibility=mu), y
    )
    theirs = _value_and_grad(
        lambda p: published_gated_crf(p, KERNELS, 3, {"rgb": rgb}, valid, None, mu)[0], y
    )
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)


def test_without_mask_src_only_a_constant_differs() -> None:
    y, rgb, _ = _setup(seed=2)
    y2, _, _ = _setup(seed=3)
    differences = []
    for probs in (y, y2):
        ours = _value_and_grad(lambda p: gated_crf_loss(p, {"rgb": rgb}, KERNELS, 5), probs)
        theirs = _value_and_grad(
            lambda p: published_gated_crf(p, KERNELS, 5, {"rgb": rgb})[0], probs
        )
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)
        differences.append(theirs[0] - ours[0])
    # The published value counts kernels towards zero-padded out-of-image pixels: a positive
    # constant that does not depend on y.
    assert differences[0] > 1e-3
    torch.testing.assert_close(differences[0], differences[1], rtol=1e-10, atol=1e-12)


def test_drop_in_with_published_training_batch() -> None:
    """The call of the published training_step, with its batch dict, switched by one import."""
    y, rgb, valid = _setup(seed=4, n=2, c=21, h=16, w=16)
    batch = {
        "rgb": rgb.float(),
        "semseg_dense": torch.randint(0, 21, (2, 1, 64, 64)),
        "semseg_scribbles": torch.full((2, 1, 64, 64), 255),
        "validity": valid.float(),
        "id": ["2007_000032", "2007_000039"],
    }
    before = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    y_hat_softmax = y.float().requires_grad_(True)
    loss_gatedcrf = ModelLossSemsegGatedCRF()
    out_gatedcrf = loss_gatedcrf(
        y_hat_softmax,
        KERNELS,
        5,
        batch,
        batch["rgb"].shape[2],
        batch["rgb"].shape[3],
        mask_src=batch["validity"],
        out_kernels_vis=True,
    )
    out_gatedcrf["loss"].backward()
    assert set(out_gatedcrf) == {"loss", "kernels_vis"}

    expected, kernels = published_gated_crf(
        y.float(), KERNELS, 5, {"rgb": batch["rgb"]}, mask_src=batch["validity"]
    )
    torch.testing.assert_close(out_gatedcrf["loss"].detach(), expected, rtol=1e-5, atol=1e-6)
    assert y_hat_softmax.grad is not None and torch.isfinite(y_hat_softmax.grad).all()

    # kernels_vis: the published tiling of the gated kernels of every (2r+1)-th pixel.
    d, r = 11, 5
    vis = kernels[:, :, :, :, r::d, r::d]
    th, tw = vis.shape[-2:]
    vis = vis.permute(0, 1, 4, 2, 5, 3).reshape(2, 1, d * th, d * tw)[:, :, :16, :16]
    vis = F.pad(vis, [0, 16 - vis.shape[3], 0, 16 - vis.shape[2]])
    vis = F.interpolate(vis, (64, 64), mode="nearest")
    assert out_gatedcrf["kernels_vis"].shape == (2, 1, 64, 64)
    torch.testing.assert_close(out_gatedcrf["kernels_vis"], vis, rtol=1e-5, atol=1e-6)

    for key, tensor in before.items():
        assert torch.equal(batch[key], tensor), f"batch[{key!r}] was modified"
    no_vis = loss_gatedcrf(y.float(), KERNELS, 5, batch, 64, 64, mask_src=batch["validity"])
    assert no_vis["kernels_vis"] is None


def test_drop_in_equals_module() -> None:
    y, rgb, valid = _setup(seed=5)
    module = GatedCRFLoss(KERNELS, radius=3)
    a = module(y, {"rgb": rgb}, mask_src=valid)
    b = ModelLossSemsegGatedCRF()(y, KERNELS, 3, {"rgb": rgb}, 48, 40, mask_src=valid)["loss"]
    assert torch.equal(a, b)


def test_wsl4mis_call_with_the_image_tensor_as_sample() -> None:
    """WSL4MIS and its derivatives call their copy of the class with the 1-channel image batch as
    ``sample``, at full resolution, without gates; the drop-in gives that call its meaning."""
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 1, 20, 18, generator=g, dtype=torch.float64)  # [0, 1] intensities
    logits = torch.randn(3, 4, 20, 18, generator=g, dtype=torch.float64, requires_grad=True)
    outputs_soft = torch.softmax(logits, dim=1)
    before = image.clone()
    kernels = [{"weight": 1, "xy": 6, "rgb": 0.1}]
    out = ModelLossSemsegGatedCRF()(outputs_soft, kernels, 5, image, 20, 18)["loss"]
    # Published formula on the tensor; without mask_src it carries the published constant
    # Σ K towards out-of-image pixels (docs/math.md#published-differences), so compare gradients,
    # and values up to that term.
    expected, _ = published_gated_crf(outputs_soft, kernels, 5, image)
    (grad,) = torch.autograd.grad(out, logits, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert torch.equal(image, before)
    # With the image's validity as mask_src the values agree too.
    valid = torch.ones(3, 1, 20, 18, dtype=torch.float64)
    gated = ModelLossSemsegGatedCRF()(outputs_soft, kernels, 5, image, 20, 18, mask_src=valid)
    expected_gated, _ = published_gated_crf(outputs_soft, kernels, 5, image, mask_src=valid)
    torch.testing.assert_close(gated["loss"], expected_gated, rtol=1e-10, atol=1e-12)
    # The tensor stands for every non-position modality: the same as passing it by name.
    by_name = ModelLossSemsegGatedCRF()(outputs_soft, kernels, 5, {"rgb": image}, 20, 18)
    assert torch.equal(out, by_name["loss"])


def test_sample_of_another_type_is_rejected() -> None:
    y = torch.softmax(torch.randn(1, 2, 4, 4), 1)
    with pytest.raises(TypeError, match="sample must be a dict of modalities or an N×D×H×W tensor"):
        ModelLossSemsegGatedCRF()(y, KERNELS, 1, [torch.rand(1, 1, 4, 4)], 4, 4)
