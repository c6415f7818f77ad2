"""The unfold formulations of the windowed CRF: the one home of each, the benchmarks' baselines.

Both materialise the window: every neighbour of every pixel is copied into an
N×C×(2r+1)^q×|Ω| tensor (``F.unfold``), so their memory grows with the window — the wall gcrf
removes. Not part of the library.

- :func:`published_gated_crf` / :func:`unfold_gated_crf_loss`: the published Gated CRF loss
  (Obukhov et al., 2019), the baseline of ``python -m benchmarks.loss`` and the reference of
  ``tests/test_loss_published.py``. Same mathematics as the published ``ModelLossSemsegGatedCRF``:
  features zero-padded at the border, kernels towards out-of-image pixels kept in ``Σ K``, masks
  multiplied in, loss ``(Σ K − Σ K·y_j·y_i) / D`` (Potts) or the intent of its broken
  compatibility branch. Known, deliberate difference of gcrf (docs/math.md#published-differences):
  without ``mask_src`` the published value is larger by a y-independent constant; with
  ``mask_src`` they agree.
- :func:`unfold_mean_field_crf`: mean-field refinement on the same kernel (docs/math.md#mean-field)
  the way ConvCRF (Teichmann & Cipolla, 2019) computes it: the gated kernel unfolded once
  (N×(2r+1)^q×|Ω|), then per iteration the probabilities unfolded (N×C×(2r+1)^q×|Ω|), multiplied
  by the kernel and summed over the window. 2D through ``F.unfold``, 3D by padding and
  ``Tensor.unfold`` along each axis (the same copy). The baseline of ``python -m benchmarks.crf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "published_gated_crf",
    "unfold_crf_peak_bytes_estimate",
    "unfold_gated_crf_loss",
    "unfold_mean_field_crf",
    "unfold_peak_bytes_estimate",
]


def _unfold_window(t: Tensor, radius: int) -> Tensor:
    """N×D×*Ω → N×D×(2r+1)^q×|Ω|: every pixel's window neighbours, zero outside the image."""
    n, channels, *spatial = t.shape
    d = 2 * radius + 1
    if len(spatial) == 2:
        return F.unfold(t, d, padding=radius).view(n, channels, d * d, -1)
    view = F.pad(t, [radius] * 6)
    for axis in (2, 3, 4):
        view = view.unfold(axis, d, 1)  # N×D×d′×h′×w′×d×d×d, a view of the padded volume
    return view.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(n, channels, d**3, -1)


def _positions(like: Tensor, scale: Sequence[float]) -> Tensor:
    """N×k×*Ω pixel coordinates (tensor axis order) times a per-axis scale, in ``like``'s dtype."""
    n, _, *size = like.shape
    axes = [torch.arange(s, dtype=like.dtype, device=like.device) for s in size]
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([a * f for a, f in zip(grid, scale, strict=True)]).expand(n, -1, *size)


def _window_kernel(
    kernels_desc: Sequence[Mapping[str, float]],
    positions: Tensor,
    modality: Callable[[str], Tensor],
    radius: int,
) -> Tensor:
    """``Σ_k w_k exp(−½‖f_k(j) − f_k(i)‖²)`` for every window offset, N×(2r+1)^q×|Ω|, 0 at the
    centre; features zero-padded at the border (kernels towards out-of-image pixels are kept).

    ``f_k`` is the concatenation of the kernel's modalities over their σ, ``positions`` for
    ``"xy"`` / ``"xyz"``, ``modality(name)`` (at the prediction size) for the others.
    """
    kernel = None
    for desc in kernels_desc:
        chunks = [
            (positions if name in ("xy", "xyz") else modality(name)) / sigma
            for name, sigma in desc.items()
            if name != "weight"
        ]
        f = torch.cat(chunks, dim=1)
        distance = (_unfold_window(f, radius) - f.flatten(2)[:, :, None]).square().sum(1)
        k = desc["weight"] * (-0.5 * distance).exp()
        kernel = k if kernel is None else kernel + k
    kernel[:, kernel.shape[1] // 2] = 0
    return kernel


def _binary_gate(mask: Tensor, size: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A gate as the published code fixes it: area-resized, NaN → 0, every value < 1 → 0."""
    pool = F.adaptive_avg_pool2d if len(size) == 2 else F.adaptive_avg_pool3d
    mask = pool(mask.to(dtype), tuple(size))
    mask = torch.where(torch.isnan(mask), 0.0, mask)
    return torch.where(mask < 1.0, 0.0, mask)


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
        return _unfold_window(t, radius).view(n, t.shape[1], d, d, h, w)

    def modality(name: str) -> Tensor:
        source = sample if isinstance(sample, Tensor) else sample[name]
        return F.adaptive_avg_pool2d(source.to(y.dtype), (h, w))

    mesh = _positions(y, (1.0, 1.0))
    kernels = _window_kernel(kernels_desc, mesh, modality, radius).view(n, 1, d, d, h, w)
    denom = torch.tensor(float(n * h * w), dtype=y.dtype, device=y.device)
    if mask_src is not None:
        m = _binary_gate(mask_src, (h, w), y.dtype)
        denom = m.sum().clamp(min=1)
        kernels = kernels * unfold(m)
    if mask_dst is not None:
        m = _binary_gate(mask_dst, (h, w), y.dtype)
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


def unfold_mean_field_crf(
    logits: Tensor,
    features: Mapping[str, Tensor],
    kernels: Sequence[Mapping[str, float]],
    radius: int,
    iterations: int = 5,
    compatibility: Tensor | None = None,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    spacing: Sequence[float] | None = None,
) -> Tensor:
    """Mean-field refinement of ``logits`` on the windowed Gated CRF kernel, by unfolding.

    ``Q⁰ = softmax(U)``; ``M^t_i = Σ_{j∈W(i), j≠i, j inside} G_ij K_ij Q^{t−1}_j``;
    ``Ũ^t = U − μ M^t``; ``Q^t = softmax(Ũ^t)``; returns ``Ũ^T`` (``U`` itself for T = 0). μ is
    ``compatibility`` as given (Potts ``1 − I`` by default, not normalised). Features and masks at
    an integer multiple of the logits' size are area-resized to it (masks then: NaN → 0, < 1 → 0);
    ``xy`` / ``xyz`` positions are in logits pixels, times ``spacing`` · the input/logits ratio per
    axis when ``spacing`` is given. Computed in ``logits``' dtype, differentiable w.r.t. ``logits``.

    Shape:
        logits: N×C×*Ω (Ω = (h, w) or (d, h, w)); features[m]: N×D×*Ω_in; masks: N×1×*Ω_in.
        Returns N×C×*Ω.
    """
    n, c, *spatial = logits.shape
    size = tuple(spatial)
    dtype = logits.dtype
    pool = F.adaptive_avg_pool2d if len(size) == 2 else F.adaptive_avg_pool3d

    def modality(name: str) -> Tensor:
        t = features[name].to(dtype)
        return t if tuple(t.shape[2:]) == size else pool(t, size)

    inputs = [features[m] for k in kernels for m in k if m not in ("weight", "xy", "xyz")]
    inputs += [m for m in (mask_src, mask_dst) if m is not None]
    ratio = [i // s for i, s in zip(inputs[0].shape[2:], size, strict=True)] if inputs else None
    if spacing is None:
        scale = [1.0] * len(size)
    else:
        scale = [s * r for s, r in zip(spacing, ratio or [1] * len(size), strict=True)]
    kernel = _window_kernel(kernels, _positions(logits, scale), modality, radius)
    if mask_src is not None:
        kernel = kernel * _unfold_window(_binary_gate(mask_src, size, dtype), radius)[:, 0]
    if mask_dst is not None:
        kernel = kernel * _binary_gate(mask_dst, size, dtype).flatten(2)
    mu = (
        1.0 - torch.eye(c, dtype=dtype, device=logits.device)
        if compatibility is None
        else compatibility.to(dtype)
    )
    unary = logits.flatten(2)
    refined = unary
    q = torch.softmax(unary, dim=1)
    for _ in range(iterations):
        # ConvCRF: the unfolded probabilities times the kernel, summed over the window.
        message = (_unfold_window(q.view(n, c, *size), radius) * kernel[:, None]).sum(2)
        refined = unary - torch.einsum("lk,nks->nls", mu, message)
        q = torch.softmax(refined, dim=1)
    return refined.view(n, c, *size)


def unfold_crf_peak_bytes_estimate(
    n: int, c: int, spatial: Sequence[int], radius: int, num_features: int, grad: bool
) -> int:
    """Rough extra peak memory of :func:`unfold_mean_field_crf` (fp32), forward or forward+backward.

    Dominated by N×C×(2r+1)^q×|Ω| tensors (the unfolded probabilities and their product with the
    kernel) and, while the kernel is built, the N×F×(2r+1)^q×|Ω| unfolded features.
    """
    window = (2 * radius + 1) ** len(spatial)
    pixels = n * window * math.prod(spatial)
    return int(4 * pixels * ((3 if grad else 2) * c + num_features + 2))
