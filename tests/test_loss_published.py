"""Equivalence with the published Gated CRF loss (Obukhov et al., 2019) and the drop-in class.

``published_gated_crf`` below is the published unfold formulation, written out: features padded
with zeros, kernels towards out-of-image pixels kept in ``Σ K``, masks multiplied in, loss
``(Σ K − Σ K·y_j·y_i) / D``. Known, deliberate difference (README): without ``mask_src`` its value
is larger by a y-independent constant; with ``mask_src`` they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gcrf.loss import GatedCRFLoss, ModelLossSemsegGatedCRF, gated_crf_loss

KERNELS = [{"weight": 1, "xy": 6, "rgb": 0.1}]  # the published training default


def published_gated_crf(
    y: torch.Tensor,
    kernels_desc: list,
    radius: int,
    sample: dict,
    mask_src: torch.Tensor | None = None,
    mask_dst: torch.Tensor | None = None,
    compatibility: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published loss (and its gated N×1×d×d×h×w kernels) in y's dtype."""
    n, c, h, w = y.shape
    d = 2 * radius + 1

    def unfold(t: torch.Tensor) -> torch.Tensor:
        return F.unfold(t, d, 1, radius).view(n, t.shape[1], d, d, h, w)

    def resize_fix_mask(mask: torch.Tensor) -> torch.Tensor:
        mask = F.adaptive_avg_pool2d(mask.to(y.dtype), (h, w))
        mask = torch.where(torch.isnan(mask), 0.0, mask)
        return torch.where(mask < 1.0, 0.0, mask)

    mesh = torch.stack(
        torch.meshgrid(
            torch.arange(w, dtype=y.dtype), torch.arange(h, dtype=y.dtype), indexing="xy"
        )
    ).expand(n, 2, h, w)
    kernels = None
    for desc in kernels_desc:
        features = []
        for modality, sigma in desc.items():
            if modality == "weight":
                continue
            if modality == "xy":
                feature = mesh
            else:
                feature = F.adaptive_avg_pool2d(sample[modality].to(y.dtype), (h, w))
            features.append(feature / sigma)
        features = torch.cat(features, dim=1)
        k = unfold(features)
        k = k - k[:, :, radius, radius].view(n, -1, 1, 1, h, w)
        k = (-0.5 * k**2).sum(dim=1, keepdim=True).exp()
        k[:, :, radius, radius] = 0
        k = desc["weight"] * k
        kernels = k if kernels is None else kernels + k
    denom = torch.tensor(float(n * h * w), dtype=y.dtype)
    if mask_src is not None:
        m = resize_fix_mask(mask_src)
        denom = m.sum().clamp(min=1)
        kernels = kernels * unfold(m)
    if mask_dst is not None:
        m = resize_fix_mask(mask_dst)
        denom = m.sum().clamp(min=1)
        kernels = kernels * m.view(n, 1, 1, 1, h, w)
    product = (kernels * unfold(y)).view(n, c, d * d, h, w).sum(dim=2)
    if compatibility is None:
        loss = kernels.sum() - (product * y).sum()
    else:
        # The published branch crashes on `compatibility.diag.sum()`; this is its intent.
        compat = (c - 1) * F.normalize(compatibility.to(y.dtype), p=1, dim=1)
        y_c = y.permute(1, 0, 2, 3).reshape(c, -1)
        product_c = product.permute(0, 2, 3, 1).reshape(-1, c)
        loss = (compat * (y_c @ product_c)).sum()
    return loss / denom, kernels


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
