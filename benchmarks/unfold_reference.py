"""The published Gated CRF loss formulation (Obukhov et al., 2019), re-implemented for benchmarking.

This is the baseline of ``python -m benchmarks.loss``, not part of the library: it materialises the
N×C×(2r+1)²×h×w unfolded tensors (``F.unfold`` over the window), so its memory grows with the window.
Same mathematics as the published ``ModelLossSemsegGatedCRF`` (Potts, features zero-padded at the
border, kernels summed including out-of-image ones, masks multiplied in); the compatibility branch is
left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["unfold_gated_crf_loss", "unfold_peak_bytes_estimate"]


def _unfold(tensor: Tensor, radius: int) -> Tensor:
    n, c, h, w = tensor.shape
    diameter = 2 * radius + 1
    return F.unfold(tensor, diameter, 1, radius).view(n, c, diameter, diameter, h, w)


def _mesh(n: int, h: int, w: int, device: torch.device) -> Tensor:
    x = torch.arange(w, dtype=torch.float32, device=device).view(1, 1, 1, w).expand(n, 1, h, w)
    y = torch.arange(h, dtype=torch.float32, device=device).view(1, 1, h, 1).expand(n, 1, h, w)
    return torch.cat((x, y), dim=1)


def unfold_gated_crf_loss(
    probs: Tensor,
    kernels_desc: Sequence[Mapping[str, float]],
    radius: int,
    sample: Mapping[str, Tensor],
    mask_src: Tensor | None = None,
) -> Tensor:
    """Published Gated CRF loss value (Potts), differentiable w.r.t. ``probs``.

    Shape:
        probs: N×C×h×w; sample[m]: N×D×H×W; mask_src: N×1×H×W. Returns a scalar.
    """
    n, c, h, w = probs.shape
    kernels = None
    for desc in kernels_desc:
        features = []
        for modality, sigma in desc.items():
            if modality == "weight":
                continue
            if modality == "xy":
                feature = _mesh(n, h, w, probs.device)
            else:
                feature = F.adaptive_avg_pool2d(sample[modality], (h, w))
            features.append(feature / sigma)
        unfolded = _unfold(torch.cat(features, dim=1), radius)
        unfolded = unfolded - unfolded[:, :, radius, radius].unsqueeze(2).unsqueeze(2)
        kernel = (-0.5 * unfolded**2).sum(dim=1, keepdim=True).exp()
        kernel[:, :, radius, radius] = 0
        kernel = desc["weight"] * kernel
        kernels = kernel if kernels is None else kernels + kernel
    denominator = torch.tensor(float(n * h * w), device=probs.device)
    if mask_src is not None:
        mask = F.adaptive_avg_pool2d(mask_src, (h, w))
        mask = torch.nan_to_num(mask, nan=0.0)
        mask = torch.where(mask < 1.0, 0.0, mask)
        denominator = mask.sum().clamp(min=1)
        kernels = kernels * _unfold(mask, radius)
    diameter = 2 * radius + 1
    product = (kernels * _unfold(probs, radius)).view(n, c, diameter**2, h, w).sum(dim=2)
    loss = kernels.sum() - (product * probs).sum()
    return loss / denominator


def unfold_peak_bytes_estimate(n: int, c: int, h: int, w: int, radius: int) -> int:
    """Rough extra peak memory of one forward+backward of :func:`unfold_gated_crf_loss` (fp32).

    Dominated by N×C×(2r+1)²×h×w float32 tensors (unfolded probs, their product with the kernels,
    their gradients): about 2.5 of them alive at once, measured on the 8×21×64×64 case (~0.8 GB).
    """
    return int(2.5 * 4 * n * c * (2 * radius + 1) ** 2 * h * w)
