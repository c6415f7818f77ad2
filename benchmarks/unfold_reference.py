"""The published Gated CRF loss formulation (Obukhov et al., 2019), written out: the one home of it.

The baseline of ``python -m benchmarks.loss`` and the reference of ``tests/test_loss_published.py``,
not part of the library: it materialises the N×C×(2r+1)²×h×w unfolded tensors (``F.unfold`` over the
window), so its memory grows with the window. Same mathematics as the published
``ModelLossSemsegGatedCRF``: features zero-padded at the border, kernels towards out-of-image pixels
kept in ``Σ K``, masks multiplied in, loss ``(Σ K − Σ K·y_j·y_i) / D`` (Potts) or the intent of its
broken compatibility branch. Known, deliberate difference of gcrf
(docs/math.md#published-differences): without ``mask_src`` the published value is larger by a
y-independent constant; with ``mask_src`` they agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["published_gated_crf", "unfold_gated_crf_loss", "unfold_peak_bytes_estimate"]


def published_gated_crf(
    y: Tensor,
    kernels_desc: Sequence[Mapping[str, float]],
    radius: int,
    sample: Mapping[str, Tensor] | Tensor,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    compatibility: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The published loss and its gated N×1×d×d×h×w kernels, in ``y``'s dtype.

    ``sample`` is a dict of modalities, or — as the copies of the published class in WSL4MIS and
    its derivatives read it — one tensor used for every modality other than ``"xy"``.

    Shape:
        y: N×C×h×w; sample[m]: N×D×H×W; masks: N×1×H×W. Returns (scalar, N×1×d×d×h×w).
    """
    n, c, h, w = y.shape
    d = 2 * radius + 1

    def unfold(t: Tensor) -> Tensor:
        return F.unfold(t, d, 1, radius).view(n, t.shape[1], d, d, h, w)

    def resize_fix_mask(mask: Tensor) -> Tensor:
        mask = F.adaptive_avg_pool2d(mask.to(y.dtype), (h, w))
        mask = torch.where(torch.isnan(mask), 0.0, mask)
        return torch.where(mask < 1.0, 0.0, mask)

    mesh = torch.stack(
        torch.meshgrid(
            torch.arange(w, dtype=y.dtype, device=y.device),
            torch.arange(h, dtype=y.dtype, device=y.device),
            indexing="xy",
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
                source = sample if isinstance(sample, Tensor) else sample[modality]
                feature = F.adaptive_avg_pool2d(source.to(y.dtype), (h, w))
            features.append(feature / sigma)
        k = unfold(torch.cat(features, dim=1))
        k = k - k[:, :, radius, radius].view(n, -1, 1, 1, h, w)
        k = (-0.5 * k**2).sum(dim=1, keepdim=True).exp()
        k[:, :, radius, radius] = 0
        k = desc["weight"] * k
        kernels = k if kernels is None else kernels + k
    denom = torch.tensor(float(n * h * w), dtype=y.dtype, device=y.device)
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


def unfold_gated_crf_loss(
    probs: Tensor,
    kernels_desc: Sequence[Mapping[str, float]],
    radius: int,
    sample: Mapping[str, Tensor] | Tensor,
    mask_src: Tensor | None = None,
) -> Tensor:
    """Published Gated CRF loss value (Potts), differentiable w.r.t. ``probs`` (the benchmark's
    baseline: :func:`published_gated_crf` without the kernels).

    Shape:
        probs: N×C×h×w; sample[m]: N×D×H×W; mask_src: N×1×H×W. Returns a scalar.
    """
    return published_gated_crf(probs, kernels_desc, radius, sample, mask_src)[0]


def unfold_peak_bytes_estimate(n: int, c: int, h: int, w: int, radius: int) -> int:
    """Rough extra peak memory of one forward+backward of :func:`unfold_gated_crf_loss` (fp32).

    Dominated by N×C×(2r+1)²×h×w float32 tensors (unfolded probs, their product with the kernels,
    their gradients): about 2.5 of them alive at once, measured on the 8×21×64×64 case (~0.8 GB).
    """
    return int(2.5 * 4 * n * c * (2 * radius + 1) ** 2 * h * w)
