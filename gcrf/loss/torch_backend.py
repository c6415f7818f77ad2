"""PyTorch backend of the Gated CRF core (docs/CONTRACTS.md §1), for CPU and any device.

The core is one windowed, gated Gaussian filter, the message of docs/math.md#message. This module
gives the pairwise sum ``S`` of the loss (docs/math.md#loss) with its gradient, the window affinity
``G_ij K_ij`` and the message ``M`` of a field.

Algorithm. The loop runs over window *offsets* δ, not pixels: for one δ, every pair (i, j = i + δ)
lives in two shifted slices of the same tensors (``i`` in slice ``a``, ``j`` in slice ``b``; no
padding, so out-of-image neighbours never appear). The affinity is symmetric (``K_ij = K_ji``) and
``j ∈ W(i) ⇔ i ∈ W(j)``, so only the half of the offsets after the centre (row-major) is visited and
each unordered pair {i, j} is handled once, with both gates ``G_ij`` and ``G_ji``. The position term
depends on δ only, so it is a scalar per kernel per offset folded into the kernel's weight.

Gradient of ``S``. As docs/math.md#message derives, ``∂S/∂y`` is the same filter with both gate
directions and ``S`` follows from that message, so the gradient is produced during the forward sweep
(one probs-sized buffer, saved) and the backward only scales it by the upstream gradient, as
Liger-Kernel's fused cross-entropy does. When no gradient is needed the sweep updates only the ``i``
side of each pair (half the work). The affinity is never stored: memory is O(N·C·|Ω|), independent
of the radius. The message op's backward is the message of the upstream gradient with the gate
transposed (masks swapped), computed by the same sweep.

Accumulation is in float32 (float64 for float64 inputs), with subnormal values flushed to zero
(:func:`_flush`: they cost a CPU tens of times the time of normal numbers and are below the
precision of every sum). Every reduction is a plain torch reduction in a fixed order, so results are
bitwise reproducible run to run on the same machine. The offset loop
is plain Python over a fixed list: ``torch.compile`` unrolls it without graph breaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gcrf.kernels.window import (
    GatedWindow,
    PairwiseInputs,
    accumulation_dtype,
    check_field,
    check_type,
)

#: A window's constant tables: kernel channel slices, weights, per-axis position scales, radius.
Tables = tuple[tuple[tuple[int, int], ...], tuple[float, ...], tuple[tuple[float, ...], ...], int]

__all__ = [
    "GatedWindow",
    "PairwiseInputs",
    "gated_crf_pairwise_sum",
    "window_affinity",
    "window_message",
    "window_offsets",
]


def window_offsets(radius: int, spatial_rank: int) -> list[tuple[int, ...]]:
    """All offsets of the (2r+1)^q window in row-major order, each axis from −r to r.

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


def _pair_affinity(
    features: Tensor,
    side_i: tuple[slice, ...],
    side_j: tuple[slice, ...],
    kernel_slices: Sequence[tuple[int, int]],
    coefficients: Sequence[float],
) -> Tensor:
    """K_ij of one offset's pairs (i in ``side_i``, j = i + δ in ``side_j``): N×1×region, in the
    features' dtype. Where no kernel with a non-zero coefficient has feature channels, K depends on
    the offset only and the region is filled with that constant (rare)."""
    constant = 0.0
    affinity: Tensor | None = None
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
        exponent = squared[:, start:stop].sum(dim=1, keepdim=True).mul_(-0.5)
        # Below e·(smallest normal) a term is 0 rather than subnormal (see _flush): the exponent is
        # clamped (exp of it stays normal and fast) and what was clamped set to 0.
        floor = _EXP_FLOOR[exponent.dtype]
        term = exponent.clamp_(min=floor).exp_()
        term = torch.nn.functional.threshold_(term, 1.5 * math.exp(floor), 0.0)
        if coefficient != 1.0:
            term = term.mul_(coefficient)
        affinity = term if affinity is None else affinity.add_(term)
    if affinity is None:
        shape = (features.shape[0], 1, *features[side_i].shape[2:])
        return torch.full(shape, constant, dtype=features.dtype, device=features.device)
    if constant != 0.0:
        affinity = affinity.add_(constant)
    return affinity


#: ln(e · smallest normal) per dtype: the lowest exponent of a Gaussian term that is kept.
_EXP_FLOOR = {
    dtype: math.log(torch.finfo(dtype).tiny) + 1.0 for dtype in (torch.float32, torch.float64)
}


def _flush(tensor: Tensor) -> Tensor:
    """``tensor`` with its subnormal values (|x| below the dtype's smallest normal) set to 0.

    A CPU computes with subnormals tens of times slower than with normal numbers, and mean field
    makes them common: probabilities that converge to one-hot and affinities of distant colours
    fall below 1.2e-38 (fp32). They are below the precision of every sum they enter (the results
    in fp32 are unchanged), so the torch backend drops them, as a GPU's flush-to-zero mode does.
    Out of place: the input may be the caller's tensor.
    """
    return torch.where(tensor.abs() < torch.finfo(tensor.dtype).tiny, 0.0, tensor)


def _half_window(
    spatial_shape: Sequence[int], tables: Tables
) -> list[tuple[int, tuple[slice, ...], tuple[slice, ...], list[float]]]:
    """The half window, offset by offset: for every offset after the centre (row-major) that has
    pairs inside the image, its index in :func:`window_offsets`, the two sides of its pairs and its
    per-kernel coefficients (:func:`_offset_coefficients`). Offsets whose coefficients are all zero
    are skipped.

    Only these descriptions are listed (a list, not a generator, so that ``torch.compile`` unrolls
    the loops over it); each backend function computes an offset's ``K_ij``
    (:func:`_pair_affinity`) inside its loop and drops it before the next offset, so the affinity
    of the whole window is never held at once.
    """
    _, kernel_weights, kernel_pos_scales, radius = tables
    offsets = window_offsets(radius, len(spatial_shape))
    pairs = []
    for index in range(len(offsets) // 2 + 1, len(offsets)):
        offset = offsets[index]
        sides = _pair_slices(offset, spatial_shape)
        if sides is None:
            continue
        coefficients = _offset_coefficients(offset, kernel_weights, kernel_pos_scales)
        if not any(coefficients):
            continue
        pairs.append((index, *sides, coefficients))
    return pairs


def _window_tensors(
    features: Tensor, mask_src: Tensor | None, mask_dst: Tensor | None, acc: torch.dtype
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The window's features and gates in the accumulation dtype (gates None where absent)."""
    features = features.to(acc)
    m_src = None if mask_src is None else mask_src.to(acc)
    m_dst = None if mask_dst is None else mask_dst.to(acc)
    return features, m_src, m_dst


def _tables(window: GatedWindow) -> Tables:
    """The window's constant tables as one plain tuple: what the autograd Functions take, so that a
    ``torch.compile`` trace passes constants through instead of rebuilding a GatedWindow."""
    return (window.kernel_slices, window.kernel_weights, window.kernel_pos_scales, window.radius)


def _sweep(
    probs: Tensor,
    features: Tensor,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
    tables: Tables,
    compatibility: Tensor | None,
    both_sides: bool,
) -> tuple[Tensor, Tensor]:
    """One sweep over the half window. Returns (S, ∂S/∂y) or (S, M_i) when ``both_sides`` is False.

    ``probs`` is already in the accumulation dtype; the algebra is that of docs/math.md#message.
    """
    acc = probs.dtype
    features, m_src, m_dst = _window_tensors(features, mask_src, mask_dst, acc)
    gated = m_src is not None or m_dst is not None

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
    for _, side_i, side_j, coefficients in _half_window(features.shape[2:], tables):
        affinity = _pair_affinity(features, side_i, side_j, tables[0], coefficients)
        if compatibility is None:
            # Potts: w = (G_ij + G_ji) K_ij, the weight of the unordered pair.
            if m_src is None and m_dst is None:
                weight = affinity * 2.0
            elif m_dst is None:
                weight = torch.add(m_src[side_i], m_src[side_j]).mul_(affinity)
            elif m_src is None:
                weight = torch.add(m_dst[side_i], m_dst[side_j]).mul_(affinity)
            else:
                gate = torch.mul(m_dst[side_i], m_src[side_j])
                weight = gate.addcmul_(m_dst[side_j], m_src[side_i]).mul_(affinity)
            gate_sums.append(weight.sum())
            message[side_i].addcmul_(probs[side_j], weight)
            if both_sides:
                message[side_j].addcmul_(probs[side_i], weight)
        elif not gated:
            message[side_i].addcmul_(fields[0][side_j], affinity)
            if both_sides:
                message[side_j].addcmul_(fields[0][side_i], affinity)
        else:
            z_src, u_dst = fields
            k_dst_i = affinity if m_dst is None else affinity * m_dst[side_i]
            k_src_i = affinity if m_src is None else affinity * m_src[side_i]
            message[side_i].addcmul_(z_src[side_j], k_dst_i).addcmul_(u_dst[side_j], k_src_i)
            if both_sides:
                k_dst_j = affinity if m_dst is None else affinity * m_dst[side_j]
                k_src_j = affinity if m_src is None else affinity * m_src[side_j]
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
    """S with its gradient computed in the same sweep (module docstring)."""

    @staticmethod
    def forward(
        ctx,
        probs: Tensor,
        features: Tensor,
        mask_src: Tensor | None,
        mask_dst: Tensor | None,
        tables: Tables,
        compatibility: Tensor | None,
    ) -> Tensor:
        acc = accumulation_dtype(probs.dtype)
        needs_grad = ctx.needs_input_grad[0]
        total, grad = _sweep(
            _flush(probs.to(acc)), features, mask_src, mask_dst, tables, compatibility,
            both_sides=needs_grad,
        )  # fmt: skip
        if needs_grad:
            ctx.save_for_backward(grad)
        ctx.probs_dtype = probs.dtype
        return total

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: a second derivative would be wrong
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        grad_probs = (grad * grad_out.to(grad.dtype)).to(ctx.probs_dtype)
        return grad_probs, None, None, None, None, None


def gated_crf_pairwise_sum(inputs: PairwiseInputs) -> Tensor:
    """The loss's pairwise sum ``S`` (docs/math.md#loss), PyTorch backend.

    Differentiable w.r.t. ``inputs.probs`` only; the gradient comes from the forward sweep.

    Args:
        inputs: probabilities, the gated window (features already divided by σ, kernel tables,
            radius, 0/1 gates) and the normalised compatibility μ̂ or None; checked when built.

    Shape:
        probs: N×C×*Ω with Ω = (h, w) or (d, h, w); features: N×F×*Ω; masks: N×1×*Ω.

    Returns:
        0-dim tensor, float32 (float64 for float64 probs).

    Example:
        >>> y = torch.softmax(torch.randn(1, 3, 8, 8), 1)
        >>> window = GatedWindow(torch.randn(1, 3, 8, 8), ((0, 3),), (1.0,), ((1 / 6, 1 / 6),), 2)
        >>> s = gated_crf_pairwise_sum(PairwiseInputs(y, window))
    """
    check_type("inputs", inputs, PairwiseInputs)
    window = inputs.window
    return _PairwiseSum.apply(
        inputs.probs, window.features, window.mask_src, window.mask_dst, _tables(window),
        inputs.compatibility,
    )  # fmt: skip


def window_affinity(window: GatedWindow) -> Tensor:
    """``G_ij K_ij`` of every pixel to every window offset (docs/CONTRACTS.md §1), PyTorch backend.

    Args:
        window: the gated window (features already divided by σ, kernel tables, radius, gates).

    Shape:
        features: N×F×*Ω → N×(2r+1)^q×*Ω (q = len(Ω)); entry ``[n, o, i]`` is for
        ``j = i + offset_o`` with offsets in row-major order (:func:`window_offsets`); 0 where ``j``
        is outside the image or ``j == i``.

    Returns:
        float32 tensor (float64 for float64 features).

    Example:
        >>> window = GatedWindow(torch.randn(1, 3, 8, 8), ((0, 3),), (1.0,), ((0.0, 0.0),), 1)
        >>> window_affinity(window).shape
        torch.Size([1, 9, 8, 8])
    """
    check_type("window", window, GatedWindow)
    acc = accumulation_dtype(window.features.dtype)
    features, m_src, m_dst = _window_tensors(window.features, window.mask_src, window.mask_dst, acc)
    count = window.num_offsets
    out = features.new_zeros((features.shape[0], count, *features.shape[2:]))
    for index, side_i, side_j, coefficients in _half_window(window.spatial_shape, _tables(window)):
        affinity = _pair_affinity(features, side_i, side_j, window.kernel_slices, coefficients)
        # [o, i] holds G_ij K_ij with j = i + δ; the mirrored offset −δ (index count−1−o) at j holds
        # G_ji K_ji = m_dst(j) m_src(i) K_ij.
        forward_gate = affinity
        backward_gate = affinity
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


def _message(
    field: Tensor,
    features: Tensor,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
    tables: Tables,
) -> Tensor:
    """``M_i = m_dst(i) Σ_j K_ij m_src(j) v_j`` over the half window, both directions per pair."""
    acc = accumulation_dtype(field.dtype)
    features, m_src, m_dst = _window_tensors(features, mask_src, mask_dst, acc)
    source = _flush(field.to(acc))
    if m_src is not None:
        source = source * m_src
    message = torch.zeros_like(source)
    for _, side_i, side_j, coefficients in _half_window(features.shape[2:], tables):
        affinity = _pair_affinity(features, side_i, side_j, tables[0], coefficients)
        message[side_i].addcmul_(source[side_j], affinity)
        message[side_j].addcmul_(source[side_i], affinity)
    if m_dst is not None:
        message = message.mul_(m_dst)
    return message


class _WindowMessage(torch.autograd.Function):
    """``M`` of a field; linear in the field, so the backward is the message of the upstream
    gradient with the gate transposed (masks swapped), through this Function again (twice
    differentiable)."""

    @staticmethod
    def forward(
        ctx,
        field: Tensor,
        features: Tensor,
        mask_src: Tensor | None,
        mask_dst: Tensor | None,
        tables: Tables,
    ) -> Tensor:
        ctx.save_for_backward(features, mask_src, mask_dst)
        ctx.tables = tables
        ctx.field_dtype = field.dtype
        return _message(field, features, mask_src, mask_dst, tables)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        features, mask_src, mask_dst = ctx.saved_tensors
        grad_field = None
        if ctx.needs_input_grad[0]:
            grad_field = _WindowMessage.apply(
                grad_out, features, mask_dst, mask_src, ctx.tables
            ).to(ctx.field_dtype)
        return grad_field, None, None, None, None


def window_message(window: GatedWindow, field: Tensor) -> Tensor:
    """The message ``M_i = Σ_{j∈W(i)} G_ij K_ij v_j`` of a field (docs/math.md#message), PyTorch.

    Differentiable w.r.t. ``field`` (twice); the affinity is recomputed, never stored.

    Args:
        window: the gated window (features already divided by σ, kernel tables, radius, gates).
        field: the per-pixel vector field ``v`` (fp16/bf16/fp32, accumulated in fp32; fp64 in
            fp64).

    Shape:
        field: N×C×*Ω with the window's N and Ω → N×C×*Ω.

    Returns:
        ``M``, float32 (float64 for a float64 field).

    Example:
        >>> window = GatedWindow(torch.randn(1, 3, 8, 8), ((0, 3),), (1.0,), ((1 / 6, 1 / 6),), 2)
        >>> window_message(window, torch.softmax(torch.randn(1, 4, 8, 8), 1)).shape
        torch.Size([1, 4, 8, 8])
    """
    check_field(window, field)
    return _WindowMessage.apply(
        field, window.features, window.mask_src, window.mask_dst, _tables(window)
    )
