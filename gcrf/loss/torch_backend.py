"""PyTorch backend of the Gated CRF pairwise core (docs/CONTRACTS.md §1), for CPU and any device.

The whole loss reduces to one windowed, gated Gaussian filter (DESIGN §2). For the neighbourhood
``W(i)`` (the (2r+1)^k window around ``i``, ``j ≠ i``, ``j`` inside the image), the gate
``G_ij = m_dst(i) · m_src(j)`` and the kernel

    K_ij = Σ_k w_k · exp(−½ (‖f_k(i) − f_k(j)‖² + Σ_a (δ_a · s_k[a])²)),   δ = j − i,

the core returns ``S = Σ_n Σ_i Σ_{j∈W(i)} G_ij K_ij φ(y_i, y_j)`` with ``φ = 1 − ⟨y_i, y_j⟩``
(Potts) or ``φ = y_iᵀ μ̂ y_j``.

Algorithm. The loop runs over window *offsets* δ, not pixels: for one δ, every pair (i, j = i + δ)
lives in two shifted slices of the same tensors (``i`` in slice ``a``, ``j`` in slice ``b``; no
padding, so out-of-image neighbours never appear). K is symmetric (``K_ij = K_ji``) and
``j ∈ W(i) ⇔ i ∈ W(j)``, so only the half of the offsets after the centre (row-major) is visited and
each unordered pair {i, j} is handled once, with both gates ``G_ij`` and ``G_ji``. The position term
depends on δ only, so it is a scalar per kernel per offset folded into the kernel's weight.

Gradient. The derivative of S w.r.t. y is the same filter with both gate directions:

    Potts: ∂S/∂y_i = −Σ_j (G_ij + G_ji) K_ij y_j
    μ̂:     ∂S/∂y_i =  Σ_j K_ij (G_ij μ̂ y_j + G_ji μ̂ᵀ y_j)

and S itself follows from the same accumulator ``M`` (one buffer the size of ``probs``):

    Potts: M_i = Σ_j (G_ij + G_ji) K_ij y_j,  S = Σ_ij G_ij K_ij − ½ Σ_i ⟨y_i, M_i⟩,  ∂S/∂y = −M
    μ̂:     M_i = ∂S/∂y_i,                     S = ½ Σ_i ⟨y_i, M_i⟩  (S is a quadratic form in y)

So, as Liger-Kernel's fused cross-entropy does, the gradient is produced during the forward sweep,
from the K computed there, and saved (one probs-sized buffer); the backward only scales it by the
upstream gradient. K itself is never stored: memory is O(N·C·|S|), independent of the radius. When
no gradient is needed the sweep updates only the ``a`` side of each pair (half the work) and
``S = Σ G K − ⟨y, M_a⟩`` (Potts) or ``⟨y, M_a⟩`` (μ̂).

Accumulation is in float32 (float64 for float64 probabilities). Every reduction is a plain torch
reduction in a fixed order, so results are bitwise reproducible run to run on the same machine.
The offset loop is plain Python over a fixed list: ``torch.compile`` unrolls it without graph breaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gcrf.kernels.window import GatedWindow, PairwiseInputs, accumulation_dtype

__all__ = [
    "GatedWindow",
    "PairwiseInputs",
    "gated_crf_pairwise_sum",
    "window_affinity",
    "window_offsets",
]


def window_offsets(radius: int, spatial_rank: int) -> list[tuple[int, ...]]:
    """All offsets of the (2r+1)^k window in row-major order, each axis from −r to r.

    Example:
        >>> window_offsets(1, 2)[:4]
        [(-1, -1), (-1, 0), (-1, 1), (0, -1)]
    """
    # Built without itertools.product, which torch.compile (torch 2.8) cannot trace.
    axis = range(-radius, radius + 1)
    offsets: list[tuple[int, ...]] = [()]
    for _ in range(spatial_rank):
        offsets = [(*offset, delta) for offset in offsets for delta in axis]
    return offsets


def _pair_slices(
    offset: Sequence[int], spatial_shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Index tuples selecting all pixels ``i`` with ``i + offset`` inside (a) and those ``j`` (b).

    Returns None when no pixel has its neighbour at this offset inside the image.
    """
    side_i: list[slice] = [slice(None), slice(None)]
    side_j: list[slice] = [slice(None), slice(None)]
    for delta, length in zip(offset, spatial_shape, strict=True):
        if abs(delta) >= length:
            return None
        if delta >= 0:
            side_i.append(slice(0, length - delta))
            side_j.append(slice(delta, length))
        else:
            side_i.append(slice(-delta, length))
            side_j.append(slice(0, length + delta))
    return tuple(side_i), tuple(side_j)


def _offset_coefficients(
    offset: Sequence[int],
    kernel_weights: Sequence[float],
    kernel_pos_scales: Sequence[Sequence[float]],
) -> list[float]:
    """Per kernel: ``w_k · exp(−½ Σ_a (δ_a s_k[a])²)``, the offset-only part of K."""
    coefficients = []
    for weight, scales in zip(kernel_weights, kernel_pos_scales, strict=True):
        squared = sum((d * s) ** 2 for d, s in zip(offset, scales, strict=True))
        coefficients.append(float(weight) * math.exp(-0.5 * squared))
    return coefficients


def _offset_kernel(
    features: Tensor,
    side_i: tuple[slice, ...],
    side_j: tuple[slice, ...],
    kernel_slices: Sequence[tuple[int, int]],
    coefficients: Sequence[float],
) -> Tensor | float:
    """K_ij for all pairs (i in ``side_i``, j = i + δ in ``side_j``): N×1×region, or a float.

    A float is returned when no kernel with a non-zero coefficient has feature channels (K then
    depends on the offset only).
    """
    constant = 0.0
    kernel: Tensor | None = None
    squared: Tensor | None = None
    for (start, stop), coefficient in zip(kernel_slices, coefficients, strict=True):
        if coefficient == 0.0:
            continue
        if start == stop:
            constant += coefficient
            continue
        if squared is None:
            # One difference over all feature channels, shared by every kernel.
            squared = torch.sub(features[side_i], features[side_j]).square_()
        term = squared[:, start:stop].sum(dim=1, keepdim=True).mul_(-0.5).exp_()
        if coefficient != 1.0:
            term = term.mul_(coefficient)
        kernel = term if kernel is None else kernel.add_(term)
    if kernel is None:
        return constant
    if constant != 0.0:
        kernel = kernel.add_(constant)
    return kernel


def _as_region_tensor(
    kernel: Tensor | float, reference: Tensor, side: tuple[slice, ...], dtype: torch.dtype
) -> Tensor:
    """Turn a constant kernel into an N×1×region tensor (rare: kernels without feature channels)."""
    if isinstance(kernel, Tensor):
        return kernel
    shape = (reference.shape[0], 1, *reference[side].shape[2:])
    return torch.full(shape, kernel, dtype=dtype, device=reference.device)


def _sweep(
    probs: Tensor,
    features: Tensor,
    kernel_slices: Sequence[tuple[int, int]],
    kernel_weights: Sequence[float],
    kernel_pos_scales: Sequence[Sequence[float]],
    radius: int,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
    compatibility: Tensor | None,
    both_sides: bool,
) -> tuple[Tensor, Tensor]:
    """One sweep over the half window. Returns (S, ∂S/∂y) or (S, M_a) when ``both_sides`` is False.

    ``probs`` is already in the accumulation dtype; see the module docstring for the algebra.
    """
    acc = probs.dtype
    spatial_shape = tuple(probs.shape[2:])
    offsets = window_offsets(radius, len(spatial_shape))
    half = offsets[len(offsets) // 2 + 1 :]
    gated = mask_src is not None or mask_dst is not None
    m_src = None if mask_src is None else mask_src.to(acc)
    m_dst = None if mask_dst is None else mask_dst.to(acc)

    if compatibility is None:
        fields = None
    else:
        mu = compatibility.to(acc)
        # z = μ̂ y and u = μ̂ᵀ y per pixel (channel mixing on dim 1).
        z = torch.einsum("cd,nd...->nc...", mu, probs)
        u = torch.einsum("dc,nd...->nc...", mu, probs)
        if gated:
            # A_ab z_b + A_ba u_b = K (m_dst(a) · (m_src z)_b + m_src(a) · (m_dst u)_b)
            z_src = z if m_src is None else z * m_src
            u_dst = u if m_dst is None else u * m_dst
            fields = (z_src, u_dst)
        else:
            fields = (z + u,)

    message = torch.zeros_like(probs)
    gate_sums: list[Tensor] = []
    for offset in half:
        sides = _pair_slices(offset, spatial_shape)
        if sides is None:
            continue
        side_i, side_j = sides
        coefficients = _offset_coefficients(offset, kernel_weights, kernel_pos_scales)
        if not any(coefficients):
            continue
        kernel = _as_region_tensor(
            _offset_kernel(features, side_i, side_j, kernel_slices, coefficients),
            probs,
            side_i,
            acc,
        )
        if compatibility is None:
            # Potts: w = (G_ij + G_ji) K_ij, the weight of the unordered pair.
            if m_src is None and m_dst is None:
                weight = kernel * 2.0
            elif m_dst is None:
                weight = torch.add(m_src[side_i], m_src[side_j]).mul_(kernel)
            elif m_src is None:
                weight = torch.add(m_dst[side_i], m_dst[side_j]).mul_(kernel)
            else:
                gate = torch.mul(m_dst[side_i], m_src[side_j])
                weight = gate.addcmul_(m_dst[side_j], m_src[side_i]).mul_(kernel)
            gate_sums.append(weight.sum())
            message[side_i].addcmul_(probs[side_j], weight)
            if both_sides:
                message[side_j].addcmul_(probs[side_i], weight)
        elif not gated:
            message[side_i].addcmul_(fields[0][side_j], kernel)
            if both_sides:
                message[side_j].addcmul_(fields[0][side_i], kernel)
        else:
            z_src, u_dst = fields
            k_dst_i = kernel if m_dst is None else kernel * m_dst[side_i]
            k_src_i = kernel if m_src is None else kernel * m_src[side_i]
            message[side_i].addcmul_(z_src[side_j], k_dst_i).addcmul_(u_dst[side_j], k_src_i)
            if both_sides:
                k_dst_j = kernel if m_dst is None else kernel * m_dst[side_j]
                k_src_j = kernel if m_src is None else kernel * m_src[side_j]
                message[side_j].addcmul_(z_src[side_i], k_dst_j).addcmul_(u_dst[side_i], k_src_j)

    dot = torch.sum(probs * message)
    if compatibility is None:
        gate_total = torch.stack(gate_sums).sum() if gate_sums else probs.new_zeros(())
        # Each unordered pair's weight was summed once but holds both ordered pairs.
        if both_sides:
            return gate_total - 0.5 * dot, message.neg_()
        return gate_total - dot, message
    if both_sides:
        return 0.5 * dot, message
    return dot, message


class _PairwiseSum(torch.autograd.Function):
    """S of docs/CONTRACTS.md §1 with its gradient computed in the same sweep (module docstring)."""

    @staticmethod
    def forward(
        ctx,
        probs: Tensor,
        features: Tensor,
        kernel_slices: tuple[tuple[int, int], ...],
        kernel_weights: tuple[float, ...],
        kernel_pos_scales: tuple[tuple[float, ...], ...],
        radius: int,
        mask_src: Tensor | None,
        mask_dst: Tensor | None,
        compatibility: Tensor | None,
    ) -> Tensor:
        acc = accumulation_dtype(probs.dtype)
        needs_grad = ctx.needs_input_grad[0]
        total, grad = _sweep(
            probs.to(acc),
            features.to(acc),
            kernel_slices,
            kernel_weights,
            kernel_pos_scales,
            radius,
            mask_src,
            mask_dst,
            compatibility,
            both_sides=needs_grad,
        )
        if needs_grad:
            ctx.save_for_backward(grad)
        ctx.probs_dtype = probs.dtype
        return total

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: a second derivative would be wrong
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        grad_probs = (grad * grad_out.to(grad.dtype)).to(ctx.probs_dtype)
        return grad_probs, None, None, None, None, None, None, None, None


def gated_crf_pairwise_sum(inputs: PairwiseInputs) -> Tensor:
    """Gated pairwise sum ``S`` of the Gated CRF loss (docs/CONTRACTS.md §1), PyTorch backend.

    ``S = Σ_n Σ_i Σ_{j ∈ W(i)} G_ij K_ij φ(y_i, y_j)`` with ``φ = 1 − ⟨y_i, y_j⟩`` (Potts) or
    ``y_iᵀ μ̂ y_j`` (module docstring). The inputs checked their own consistency when built.
    Differentiable w.r.t. ``inputs.probs`` only.

    Args:
        inputs: probabilities, the gated window (features already divided by σ, kernel tables,
            radius, 0/1 gates) and the normalised compatibility μ̂ or None.

    Shape:
        probs: N×C×*S with S = (h, w) or (d, h, w); features: N×F×*S; masks: N×1×*S.

    Returns:
        0-dim tensor, float32 (float64 for float64 probs).

    Example:
        >>> y = torch.softmax(torch.randn(1, 3, 8, 8), 1)
        >>> window = GatedWindow(torch.randn(1, 3, 8, 8), ((0, 3),), (1.0,), ((1 / 6, 1 / 6),), 2)
        >>> s = gated_crf_pairwise_sum(PairwiseInputs(y, window))
    """
    window = inputs.window
    return _PairwiseSum.apply(
        inputs.probs,
        window.features,
        window.kernel_slices,
        window.kernel_weights,
        window.kernel_pos_scales,
        window.radius,
        window.mask_src,
        window.mask_dst,
        inputs.compatibility,
    )


def window_affinity(window: GatedWindow) -> Tensor:
    """Gated affinity ``G_ij · K_ij`` of every pixel to every window offset (CONTRACTS §1).

    Args:
        window: the gated window (features already divided by σ, kernel tables, radius, gates).

    Shape:
        features: N×F×*S → returns N×(2r+1)^k×*S (k = len(S)); entry ``[n, o, i]`` is for
        ``j = i + offset_o`` with offsets in row-major order (:func:`window_offsets`); 0 where ``j``
        is outside the image or ``j == i``.

    Returns:
        float32 tensor (float64 for float64 features).

    Example:
        >>> window = GatedWindow(torch.randn(1, 3, 8, 8), ((0, 3),), (1.0,), ((0.0, 0.0),), 1)
        >>> window_affinity(window).shape
        torch.Size([1, 9, 8, 8])
    """
    features, radius = window.features, window.radius
    kernel_slices, kernel_weights = window.kernel_slices, window.kernel_weights
    kernel_pos_scales = window.kernel_pos_scales
    mask_src, mask_dst = window.mask_src, window.mask_dst
    acc = accumulation_dtype(features.dtype)
    features = features.to(acc)
    spatial_shape = tuple(features.shape[2:])
    offsets = window_offsets(int(radius), len(spatial_shape))
    count = len(offsets)
    out = features.new_zeros((features.shape[0], count, *spatial_shape))
    m_src = None if mask_src is None else mask_src.to(acc)
    m_dst = None if mask_dst is None else mask_dst.to(acc)
    for index in range(count // 2 + 1, count):
        offset = offsets[index]
        sides = _pair_slices(offset, spatial_shape)
        if sides is None:
            continue
        side_i, side_j = sides
        coefficients = _offset_coefficients(offset, kernel_weights, kernel_pos_scales)
        kernel = _as_region_tensor(
            _offset_kernel(features, side_i, side_j, kernel_slices, coefficients),
            features,
            side_i,
            acc,
        )
        # [o, i] holds G_ij K_ij with j = i + δ; the mirrored offset −δ (index count−1−o) at j holds
        # G_ji K_ji = m_dst(j) m_src(i) K_ij.
        forward_gate = kernel
        backward_gate = kernel
        if m_dst is not None:
            forward_gate = forward_gate * m_dst[side_i]
            backward_gate = backward_gate * m_dst[side_j]
        if m_src is not None:
            forward_gate = forward_gate * m_src[side_j]
            backward_gate = backward_gate * m_src[side_i]
        out[:, index : index + 1][side_i] = forward_gate
        mirror = count - 1 - index
        out[:, mirror : mirror + 1][side_j] = backward_gate
    return out
