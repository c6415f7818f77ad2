"""Fused Triton kernels of the Gated CRF core: the pairwise sum with its gradient, the window
affinity and the window message (docs/math.md#message; the contract: docs/CONTRACTS.md §1).

Everything here is one windowed, gated Gaussian filter, the message
``M_i = Σ_{j∈W(i)} G_ij K_ij v_j`` of docs/math.md#message, with the affinity ``K`` and gate ``G``
of docs/math.md#kernel and #gates:

- :func:`gated_crf_pairwise_sum`: ``S`` of the loss (docs/math.md#loss), and ``∂S/∂y`` from the same
  sweep when a gradient is needed;
- :func:`window_affinity`: ``G_ij K_ij`` for every pixel and window offset;
- :func:`window_message`: ``M`` of a field ``v`` (the mean-field update of docs/math.md#mean-field),
  differentiable w.r.t. ``v`` (the backward is the same filter with the transposed gate).

Names: a *kernel* here is a GPU kernel (``@triton.jit`` function launched on a grid); the Gaussian
``K`` is the *affinity*, a sum of ``NUM_GAUSSIANS`` weighted Gaussian terms (one per kernel
descriptor of the user-level API).

The position term of ``K`` depends on the offset only, so it is folded, together with ``w_k``, into a
small per-offset table ``coef[o, k] = w_k · exp(-½ ‖δ_o ⊙ s_k‖²)`` computed once on the host
(``coef = 0`` at the centre offset, which removes ``j = i`` without a branch). Pixel coordinates are
never loaded. Every kernel walks the window through one device function, :func:`_neighbour`: for an
offset it gives the neighbour's index, whether it is inside the image, its affinity and its source
gate.

Launch layout: one program per (tile of ``BLOCK_P`` flattened pixels, chunk of ``BLOCK_C`` channels,
sample). The program loops over the window offsets, loads the shifted neighbour features / gates /
field (out-of-image neighbours are masked loads; neighbouring tiles share them through the cache),
computes the affinity in registers and accumulates in fp32 (fp64 for fp64 inputs). The pairwise sum
reduces its terms into one partial sum per program, written to its own slot of a buffer; a second
single-program kernel adds the slots in a fixed order. No atomics anywhere, so results are bitwise
reproducible run to run. 2D inputs run as 3D volumes of depth 1 with a depth radius of 0.
Configurations and their pruning: :mod:`gcrf.kernels.autotune`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from gcrf.kernels import autotune
from gcrf.kernels.window import (
    SPATIAL_RANKS,
    GatedWindow,
    PairwiseInputs,
    accumulation_dtype,
    check_field,
    check_type,
    flat_tables,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_SPATIAL_RANKS",
    "GatedWindow",
    "PairwiseInputs",
    "gated_crf_pairwise_sum",
    "window_affinity",
    "window_message",
]

#: Spatial ranks the Triton backend runs: (h, w) images and (d, h, w) volumes.
SUPPORTED_SPATIAL_RANKS: tuple[int, ...] = SPATIAL_RANKS

# Launch with the fixed config instead of autotuning (the self-check of gcrf.loss runs tiny cases).
_UNTUNED: contextvars.ContextVar[bool] = contextvars.ContextVar("gcrf_untuned", default=False)


@contextlib.contextmanager
def untuned() -> Iterator[None]:
    """Launches inside this block take the fixed config of :func:`autotune.fixed_config`."""
    token = _UNTUNED.set(True)
    try:
        yield
    finally:
        _UNTUNED.reset(token)


# Channels handled by one program. Larger C is split into chunks (one program each, the affinity
# recomputed per chunk). Module-level so that the tests can shrink it to exercise the chunked path.
_MAX_BLOCK_C = 64


# --------------------------------------------------------------------------------------------------
# Shared device functions
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tile_coordinates(pid_p, P, H, W, BLOCK_P: tl.constexpr):
    """Flattened pixel indices of this tile, the in-range mask and the (d, h, w) coordinates."""
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    w_i = offs_p % W
    h_i = (offs_p // W) % H
    d_i = offs_p // (H * W)
    return offs_p, p_mask, d_i, h_i, w_i


@triton.jit
def _channel_tile(P, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (pixel tile, channel chunk, sample) of the channel-tiled kernels.

    Returns the sample index (int64), the tile's pixel indices, in-range mask and (d, h, w)
    coordinates, and the chunk's channel mask and int64 channel offsets (channel × P).
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_n = tl.program_id(2).to(tl.int64)
    offs_p, p_mask, d_i, h_i, w_i = _tile_coordinates(pid_p, P, H, W, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_c64 = offs_c.to(tl.int64) * P
    return pid_n, offs_p, p_mask, d_i, h_i, w_i, c_mask, offs_c64


@triton.jit
def _load_tile_window(
    pid_n,
    offs_p,
    p_mask,
    features_ptr,
    mask_src_ptr,
    mask_dst_ptr,
    NUM_FEATURES,
    P,
    HAS_FEATURES: tl.constexpr,
    HAS_MASK_DST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ACC: tl.constexpr,
):
    """The tile's side of the window of sample ``pid_n``: the sample's feature and gate pointers,
    the features of the tile's own pixels [BLOCK_P, BLOCK_F] with their channel offsets (int64)
    and mask, and the centre gate ``m_dst(i)``.

    Without features (position-only kernels) the tile is zeros and every channel is masked off.
    """
    features_n_ptr = features_ptr + pid_n * NUM_FEATURES * P
    mask_src_n_ptr = mask_src_ptr + pid_n * P
    mask_dst_n_ptr = mask_dst_ptr + pid_n * P
    offs_f = tl.arange(0, BLOCK_F)
    if HAS_FEATURES:
        f_mask = offs_f < NUM_FEATURES
        offs_f64 = offs_f.to(tl.int64) * P
        f_i = tl.load(
            features_n_ptr + offs_f64[None, :] + offs_p[:, None],
            mask=p_mask[:, None] & f_mask[None, :],
            other=0.0,
        ).to(ACC)
    else:
        f_mask = offs_f < 0
        offs_f64 = tl.zeros([BLOCK_F], dtype=tl.int64)
        f_i = tl.zeros([BLOCK_P, BLOCK_F], dtype=ACC)
    m_dst_i = _load_gate(mask_dst_n_ptr, offs_p, p_mask, HAS_MASK_DST, BLOCK_P, ACC)
    return features_n_ptr, mask_src_n_ptr, mask_dst_n_ptr, f_i, offs_f64, f_mask, m_dst_i


@triton.jit
def _load_gate(
    gate_n_ptr, offs, mask, HAS_GATE: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr
):
    """A gate (mask_src / mask_dst) at ``offs``, 0 where ``mask`` is off; all ones without a gate."""
    if HAS_GATE:
        gate = tl.load(gate_n_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        gate = tl.full([BLOCK_P], 1.0, dtype=ACC)
    return gate


@triton.jit
def _gaussian_affinity(
    features_n_ptr,
    f_i,
    offs_f64,
    f_mask,
    p_j,
    valid_j,
    coef_ptr,
    bounds_ptr,
    o,
    NUM_GAUSSIANS: tl.constexpr,
    HAS_FEATURES: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ACC: tl.constexpr,
):
    """K_ij for one window offset ``o`` over a tile: Σ_k coef[o, k] · exp(-½ ‖f_k(i) − f_k(j)‖²).

    ``coef[o, k]`` already holds ``w_k`` and the position factor, and is 0 at the centre offset.
    """
    affinity = tl.zeros([BLOCK_P], dtype=ACC)
    if HAS_FEATURES:
        f_j = tl.load(
            features_n_ptr + offs_f64[None, :] + p_j[:, None],
            mask=valid_j[:, None] & f_mask[None, :],
            other=0.0,
        ).to(ACC)
        diff = f_i - f_j
        sq = diff * diff
    for k in tl.static_range(NUM_GAUSSIANS):
        coef = tl.load(coef_ptr + o * NUM_GAUSSIANS + k).to(ACC)
        if HAS_FEATURES:
            # Channels [start, stop) of `features` belong to term k (a modality used by two kernel
            # descriptors appears twice, divided by each one's σ).
            start = tl.load(bounds_ptr + 2 * k)
            stop = tl.load(bounds_ptr + 2 * k + 1)
            offs_f = tl.arange(0, BLOCK_F)
            in_term = (offs_f >= start) & (offs_f < stop)
            dist = tl.sum(tl.where(in_term[None, :], sq, 0.0), axis=1)
            affinity += coef * tl.exp(-0.5 * dist)
        else:
            affinity += coef
    return affinity


@triton.jit
def _neighbour(
    o,
    offs_p,
    p_mask,
    d_i,
    h_i,
    w_i,
    D,
    H,
    W,
    features_n_ptr,
    f_i,
    offs_f64,
    f_mask,
    coef_ptr,
    bounds_ptr,
    mask_src_n_ptr,
    RADIUS: tl.constexpr,
    RADIUS_D: tl.constexpr,
    NUM_GAUSSIANS: tl.constexpr,
    HAS_FEATURES: tl.constexpr,
    HAS_MASK_SRC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ACC: tl.constexpr,
):
    """The neighbour ``j = i + δ_o`` of every pixel of the tile, for window offset ``o``.

    Offsets run row-major over the (2r_d+1)×(2r+1)×(2r+1) window (the affinity's output order).
    Returns ``p_j`` (flattened index), ``valid`` (in the tile and inside the image), ``K_ij``
    (0 where not valid) and ``m_src(j)`` (0 where not valid; 1 without a gate).
    """
    WINDOW: tl.constexpr = 2 * RADIUS + 1
    od = o // (WINDOW * WINDOW) - RADIUS_D
    oh = (o // WINDOW) % WINDOW - RADIUS
    ow = o % WINDOW - RADIUS
    d_j = d_i + od
    h_j = h_i + oh
    w_j = w_i + ow
    valid = p_mask & (d_j >= 0) & (d_j < D) & (h_j >= 0) & (h_j < H) & (w_j >= 0) & (w_j < W)
    p_j = offs_p + od * H * W + oh * W + ow
    k_ij = _gaussian_affinity(
        features_n_ptr, f_i, offs_f64, f_mask, p_j, valid, coef_ptr, bounds_ptr, o,
        NUM_GAUSSIANS, HAS_FEATURES, BLOCK_P, BLOCK_F, ACC,
    )  # fmt: skip
    k_ij = tl.where(valid, k_ij, 0.0)
    m_src_j = _load_gate(mask_src_n_ptr, p_j, valid, HAS_MASK_SRC, BLOCK_P, ACC)
    return p_j, valid, k_ij, m_src_j


# --------------------------------------------------------------------------------------------------
# The pairwise sum S of the loss, and ∂S/∂y when a gradient is needed
# --------------------------------------------------------------------------------------------------


@autotune.autotune(reset_to_zero=["partial_ptr"])
@triton.jit
def _gated_crf_kernel(
    probs_ptr,  # N×C×P, any float dtype: y, the left factor ⟨y_i, M_i⟩ of S
    field_a_ptr,  # N×C×P, filtered with G_ij: y (Potts, same pointer as probs) or μ̂y (HAS_COMPAT)
    field_b_ptr,  # N×C×P, filtered with G_ji: μ̂ᵀy (HAS_COMPAT and WITH_GRAD only)
    features_ptr,  # N×F×P, ACC dtype
    mask_src_ptr,  # N×P float, 0/1
    mask_dst_ptr,  # N×P float, 0/1
    coef_ptr,  # (2r_d+1)(2r+1)² × NUM_GAUSSIANS, ACC dtype
    bounds_ptr,  # NUM_GAUSSIANS × 2 int32 channel ranges
    partial_ptr,  # N × num_chunks × tiles_per_row, ACC dtype, zero-initialised
    grad_ptr,  # N×C×P, ACC dtype: ∂S/∂y (WITH_GRAD only)
    C,
    P,
    D,
    H,
    W,
    NUM_FEATURES,
    tiles_per_row,
    NUM_GAUSSIANS: tl.constexpr,
    RADIUS: tl.constexpr,
    RADIUS_D: tl.constexpr,
    HAS_FEATURES: tl.constexpr,
    HAS_MASK_SRC: tl.constexpr,
    HAS_MASK_DST: tl.constexpr,
    HAS_COMPAT: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # S and its gradient from the message (docs/math.md#message), with G_ij = m_dst(i) m_src(j):
    #   value only:  M_i = Σ_j G_ij K_ij a_j                      a = y (Potts) or μ̂y
    #                Potts: S = Σ_ij G_ij K_ij − Σ_i ⟨y_i, M_i⟩;  μ̂: S = Σ_i ⟨y_i, M_i⟩
    #   WITH_GRAD:   M_i = Σ_j K_ij (G_ij a_j + G_ji b_j) = ±∂S/∂y_i   b = y (Potts) or μ̂ᵀy
    #                Potts: ∂S/∂y = −M, S = Σ_ij G_ij K_ij − ½ Σ_i ⟨y_i, M_i⟩;
    #                μ̂: ∂S/∂y = M, S = ½ Σ_i ⟨y_i, M_i⟩.
    # Σ_ij G_ij K_ij does not depend on the channels: chunk 0 adds it.
    pid_n, offs_p, p_mask, d_i, h_i, w_i, c_mask, offs_c64 = _channel_tile(
        P, H, W, C, BLOCK_P, BLOCK_C
    )
    field_a_n_ptr = field_a_ptr + pid_n * C * P
    field_b_n_ptr = field_b_ptr + pid_n * C * P
    features_n_ptr, mask_src_n_ptr, mask_dst_n_ptr, f_i, offs_f64, f_mask, m_dst_i = (
        _load_tile_window(
            pid_n, offs_p, p_mask, features_ptr, mask_src_ptr, mask_dst_ptr, NUM_FEATURES, P,
            HAS_FEATURES, HAS_MASK_DST, BLOCK_P, BLOCK_F, ACC,
        )
    )  # fmt: skip
    m_src_i = _load_gate(mask_src_n_ptr, offs_p, p_mask, HAS_MASK_SRC, BLOCK_P, ACC)

    message = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    weight_sum = tl.zeros([BLOCK_P], dtype=ACC)
    NUM_OFFSETS: tl.constexpr = (2 * RADIUS_D + 1) * (2 * RADIUS + 1) * (2 * RADIUS + 1)
    for o in range(NUM_OFFSETS):
        p_j, valid, k_ij, m_src_j = _neighbour(
            o, offs_p, p_mask, d_i, h_i, w_i, D, H, W, features_n_ptr, f_i, offs_f64, f_mask,
            coef_ptr, bounds_ptr, mask_src_n_ptr, RADIUS, RADIUS_D, NUM_GAUSSIANS, HAS_FEATURES,
            HAS_MASK_SRC, BLOCK_P, BLOCK_F, ACC,
        )  # fmt: skip
        weight_ij = k_ij * m_dst_i * m_src_j  # G_ij K_ij
        tile_mask = valid[:, None] & c_mask[None, :]
        a_j = tl.load(
            field_a_n_ptr + offs_c64[None, :] + p_j[:, None], mask=tile_mask, other=0.0
        ).to(ACC)
        if WITH_GRAD:
            m_dst_j = _load_gate(mask_dst_n_ptr, p_j, valid, HAS_MASK_DST, BLOCK_P, ACC)
            weight_ji = k_ij * m_src_i * m_dst_j  # G_ji K_ij
            if HAS_COMPAT:
                b_j = tl.load(
                    field_b_n_ptr + offs_c64[None, :] + p_j[:, None], mask=tile_mask, other=0.0
                ).to(ACC)
                message += weight_ij[:, None] * a_j + weight_ji[:, None] * b_j
            else:
                message += (weight_ij + weight_ji)[:, None] * a_j
        else:
            message += weight_ij[:, None] * a_j
        if not HAS_COMPAT:
            weight_sum += weight_ij

    y_i = tl.load(
        probs_ptr + pid_n * C * P + offs_c64[None, :] + offs_p[:, None],
        mask=p_mask[:, None] & c_mask[None, :],
        other=0.0,
    ).to(ACC)
    dot = tl.sum(tl.sum(y_i * message, axis=1), axis=0)
    partial = dot * 0.5 if WITH_GRAD else dot
    if not HAS_COMPAT:
        partial = tl.sum(weight_sum, axis=0) * (tl.program_id(1) == 0).to(ACC) - partial
    num_chunks = tl.num_programs(1)
    slot = (pid_n * num_chunks + tl.program_id(1)) * tiles_per_row + tl.program_id(0)
    tl.store(partial_ptr + slot, partial)
    if WITH_GRAD:
        grad = message if HAS_COMPAT else -message
        tl.store(
            grad_ptr + pid_n * C * P + offs_c64[None, :] + offs_p[:, None],
            grad,
            mask=p_mask[:, None] & c_mask[None, :],
        )


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    # One program adds the partial sums in a fixed order: the deterministic second pass.
    acc = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    for start in range(0, numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < numel, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


# --------------------------------------------------------------------------------------------------
# Window affinity: [n, o, i] = G_ij K_ij, j = i + offset_o
# --------------------------------------------------------------------------------------------------


@autotune.autotune()
@triton.jit
def _window_affinity_kernel(
    features_ptr,
    mask_src_ptr,
    mask_dst_ptr,
    coef_ptr,
    bounds_ptr,
    out_ptr,  # N × num_offsets × P, float32 (float64 for float64 features)
    C,  # unused by the math; part of the shared tuning key (always 1 here)
    P,
    D,
    H,
    W,
    NUM_FEATURES,
    NUM_GAUSSIANS: tl.constexpr,
    RADIUS: tl.constexpr,
    RADIUS_D: tl.constexpr,
    HAS_FEATURES: tl.constexpr,
    HAS_MASK_SRC: tl.constexpr,
    HAS_MASK_DST: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_p, p_mask, d_i, h_i, w_i = _tile_coordinates(pid_p, P, H, W, BLOCK_P)
    features_n_ptr, mask_src_n_ptr, _mask_dst_n_ptr, f_i, offs_f64, f_mask, m_dst_i = (
        _load_tile_window(
            pid_n, offs_p, p_mask, features_ptr, mask_src_ptr, mask_dst_ptr, NUM_FEATURES, P,
            HAS_FEATURES, HAS_MASK_DST, BLOCK_P, BLOCK_F, ACC,
        )
    )  # fmt: skip

    NUM_OFFSETS: tl.constexpr = (2 * RADIUS_D + 1) * (2 * RADIUS + 1) * (2 * RADIUS + 1)
    # The output plane of offset o starts o·P elements after the sample's: the pointer advances by
    # P per offset (an int64 pointer, so o·P never overflows 32 bits).
    out_o_ptr = out_ptr + pid_n * NUM_OFFSETS * P
    for o in range(NUM_OFFSETS):
        _, _, k_ij, m_src_j = _neighbour(
            o, offs_p, p_mask, d_i, h_i, w_i, D, H, W, features_n_ptr, f_i, offs_f64, f_mask,
            coef_ptr, bounds_ptr, mask_src_n_ptr, RADIUS, RADIUS_D, NUM_GAUSSIANS, HAS_FEATURES,
            HAS_MASK_SRC, BLOCK_P, BLOCK_F, ACC,
        )  # fmt: skip
        value = k_ij * m_dst_i * m_src_j
        tl.store(out_o_ptr + offs_p, value.to(out_ptr.dtype.element_ty), mask=p_mask)
        out_o_ptr += P


# --------------------------------------------------------------------------------------------------
# Window message: M_i = Σ_j G_ij K_ij v_j
# --------------------------------------------------------------------------------------------------


@autotune.autotune()
@triton.jit
def _window_message_kernel(
    field_ptr,  # N×C×P, any float dtype: v
    features_ptr,  # N×F×P, ACC dtype
    mask_src_ptr,  # N×P float, 0/1
    mask_dst_ptr,  # N×P float, 0/1
    coef_ptr,  # (2r_d+1)(2r+1)² × NUM_GAUSSIANS, ACC dtype
    bounds_ptr,  # NUM_GAUSSIANS × 2 int32 channel ranges
    out_ptr,  # N×C×P, ACC dtype: M
    C,
    P,
    D,
    H,
    W,
    NUM_FEATURES,
    NUM_GAUSSIANS: tl.constexpr,
    RADIUS: tl.constexpr,
    RADIUS_D: tl.constexpr,
    HAS_FEATURES: tl.constexpr,
    HAS_MASK_SRC: tl.constexpr,
    HAS_MASK_DST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # M_i = m_dst(i) · Σ_j K_ij m_src(j) v_j: the sum runs over the window, the centre gate last.
    pid_n, offs_p, p_mask, d_i, h_i, w_i, c_mask, offs_c64 = _channel_tile(
        P, H, W, C, BLOCK_P, BLOCK_C
    )
    field_n_ptr = field_ptr + pid_n * C * P
    features_n_ptr, mask_src_n_ptr, _mask_dst_n_ptr, f_i, offs_f64, f_mask, m_dst_i = (
        _load_tile_window(
            pid_n, offs_p, p_mask, features_ptr, mask_src_ptr, mask_dst_ptr, NUM_FEATURES, P,
            HAS_FEATURES, HAS_MASK_DST, BLOCK_P, BLOCK_F, ACC,
        )
    )  # fmt: skip

    message = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    NUM_OFFSETS: tl.constexpr = (2 * RADIUS_D + 1) * (2 * RADIUS + 1) * (2 * RADIUS + 1)
    for o in range(NUM_OFFSETS):
        p_j, valid, k_ij, m_src_j = _neighbour(
            o, offs_p, p_mask, d_i, h_i, w_i, D, H, W, features_n_ptr, f_i, offs_f64, f_mask,
            coef_ptr, bounds_ptr, mask_src_n_ptr, RADIUS, RADIUS_D, NUM_GAUSSIANS, HAS_FEATURES,
            HAS_MASK_SRC, BLOCK_P, BLOCK_F, ACC,
        )  # fmt: skip
        v_j = tl.load(
            field_n_ptr + offs_c64[None, :] + p_j[:, None],
            mask=valid[:, None] & c_mask[None, :],
            other=0.0,
        ).to(ACC)
        message += (k_ij * m_src_j)[:, None] * v_j
    message = message * m_dst_i[:, None]
    tl.store(
        out_ptr + pid_n * C * P + offs_c64[None, :] + offs_p[:, None],
        message,
        mask=p_mask[:, None] & c_mask[None, :],
    )


# --------------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _window_tables(
    gaussian_bounds: tuple[int, ...],
    gaussian_weights: tuple[float, ...],
    gaussian_pos_scales: tuple[float, ...],
    radius: int,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``coef[o, k] = w_k · exp(−½ Σ_a (δ_a(o) · s_k[a])²)`` (0 at the centre) and the int32 bounds.

    Offsets ``o`` run row-major over the window padded to 3 axes (depth radius 0 in 2D), which is
    also the order of the affinity output.
    """
    num_terms = len(gaussian_weights)
    radius_d = radius if rank == 3 else 0
    scales = [gaussian_pos_scales[k * rank : (k + 1) * rank] for k in range(num_terms)]
    if rank == 2:
        scales = [(0.0, *s) for s in scales]
    coef = []
    for od in range(-radius_d, radius_d + 1):
        for oh in range(-radius, radius + 1):
            for ow in range(-radius, radius + 1):
                centre = od == 0 and oh == 0 and ow == 0
                for k in range(num_terms):
                    s_d, s_h, s_w = scales[k]
                    pos = (od * s_d) ** 2 + (oh * s_h) ** 2 + (ow * s_w) ** 2
                    coef.append(0.0 if centre else gaussian_weights[k] * math.exp(-0.5 * pos))
    coef_table = torch.tensor(coef, dtype=dtype, device=device)
    bounds = torch.tensor(gaussian_bounds, dtype=torch.int32, device=device)
    return coef_table, bounds


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _common_launch_args(
    features: Tensor,
    gaussian_bounds: Sequence[int],
    gaussian_weights: Sequence[float],
    gaussian_pos_scales: Sequence[float],
    radius: int,
    spatial: Sequence[int],
    acc_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, tuple[int, ...], dict]:
    """Tables, (P, D, H, W) and the constexpr flags shared by the kernels."""
    rank = len(spatial)
    d, h, w = (1, *spatial) if rank == 2 else tuple(spatial)
    if d * h * w >= 2**31 - 2 * (h * w + w + 1) * (radius + 1):
        # Pixel indices within one sample are int32 in the kernels (batch and channel offsets are
        # int64); a single image or volume of 2³¹ pixels is far beyond what the core is used for.
        raise ValueError(
            f"the triton backend needs fewer than 2**31 pixels per sample, got {spatial}"
        )
    coef, bounds = _window_tables(
        tuple(int(b) for b in gaussian_bounds),
        tuple(float(x) for x in gaussian_weights),
        tuple(float(x) for x in gaussian_pos_scales),
        int(radius),
        rank,
        features.device,
        acc_dtype,
    )
    num_features = features.shape[1]
    constexprs = {
        "NUM_GAUSSIANS": len(gaussian_weights),
        "RADIUS": int(radius),
        "RADIUS_D": int(radius) if rank == 3 else 0,
        "HAS_FEATURES": num_features > 0,
        "BLOCK_F": triton.next_power_of_2(max(num_features, 1)),
        "ACC": _TL_DTYPES[acc_dtype],
    }
    return coef, bounds, (d * h * w, d, h, w), constexprs


def _window_arguments(
    features: Tensor, mask_src: Tensor | None, mask_dst: Tensor | None, placeholder: Tensor
) -> tuple[tuple[Tensor, Tensor, Tensor], dict[str, bool]]:
    """The window's tensors as kernel arguments (``placeholder`` for an absent one: its pointer is
    never dereferenced) and the gate flags."""
    tensors = (
        features if features.shape[1] > 0 else placeholder,
        mask_src.contiguous() if mask_src is not None else placeholder,
        mask_dst.contiguous() if mask_dst is not None else placeholder,
    )
    return tensors, {"HAS_MASK_SRC": mask_src is not None, "HAS_MASK_DST": mask_dst is not None}


def _launch(program: triton.runtime.Autotuner, grid, *args, **kwargs) -> None:
    """Launch an autotuned GPU kernel, or its plain JIT function with the fixed config.

    The fixed config runs in the interpreter, under ``torch.use_deterministic_algorithms(True)`` and
    inside :func:`untuned`: every launch is bitwise reproducible within a process either way, but
    only a fixed config makes the result independent of the autotuner's choice (across processes and
    runs of the benchmark).
    """
    if autotune.INTERPRET or torch.are_deterministic_algorithms_enabled() or _UNTUNED.get():
        config = autotune.fixed_config(kwargs)
        logger.debug("%s: fixed config %s (no autotuning)", program.fn.__name__, config)
        program.fn[grid](*args, **kwargs, **config)
    else:
        program[grid](*args, **kwargs)


def _channel_block(num_channels: int) -> int:
    return min(triton.next_power_of_2(num_channels), _MAX_BLOCK_C)


def _pairwise_sum(
    probs: Tensor,
    features: Tensor,
    gaussian_bounds: Sequence[int],
    gaussian_weights: Sequence[float],
    gaussian_pos_scales: Sequence[float],
    radius: int,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
    compatibility: Tensor | None,
    with_grad: bool,
) -> tuple[Tensor, Tensor]:
    """S, and ∂S/∂probs in the accumulation dtype when ``with_grad`` (else an empty tensor)."""
    acc_dtype = accumulation_dtype(probs.dtype)
    n, c = probs.shape[:2]
    probs = probs.contiguous()
    features = features.to(acc_dtype).contiguous()
    coef, bounds, (p, d, h, w), constexprs = _common_launch_args(
        features,
        gaussian_bounds,
        gaussian_weights,
        gaussian_pos_scales,
        radius,
        probs.shape[2:],
        acc_dtype,
    )
    # The channel mixing by μ̂ is per pixel, so it is done once here rather than once per offset.
    field_a = field_b = probs
    if compatibility is not None:
        mu = compatibility.to(acc_dtype)
        y = probs.to(acc_dtype)
        field_a = torch.einsum("cd,nd...->nc...", mu, y).contiguous()  # μ̂ y
        if with_grad:
            field_b = torch.einsum("dc,nd...->nc...", mu, y).contiguous()  # μ̂ᵀ y
    block_c = _channel_block(c)
    num_chunks = triton.cdiv(c, block_c)
    # Room for the most tiles any config can launch; slots a larger tile leaves unused stay 0.
    tiles_per_row = triton.cdiv(p, autotune.min_block_p())
    partial = torch.zeros(n * num_chunks * tiles_per_row, dtype=acc_dtype, device=probs.device)
    if with_grad:
        grad = torch.empty(probs.shape, dtype=acc_dtype, device=probs.device)
    else:
        grad = probs.new_empty((0,), dtype=acc_dtype)
    placeholder = coef  # any tensor: the pointer of an absent input is never dereferenced
    window, gates = _window_arguments(features, mask_src, mask_dst, placeholder)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(p, meta["BLOCK_P"]), num_chunks, n)

    _launch(
        _gated_crf_kernel,
        grid,
        probs,
        field_a,
        field_b,
        *window,
        coef,
        bounds,
        partial,
        grad if with_grad else placeholder,
        c,
        p,
        d,
        h,
        w,
        features.shape[1],
        tiles_per_row,
        **gates,
        HAS_COMPAT=compatibility is not None,
        WITH_GRAD=with_grad,
        BLOCK_C=block_c,
        **constexprs,
    )
    total = torch.empty((), dtype=acc_dtype, device=probs.device)
    _sum_partials_kernel[(1,)](partial, total, partial.numel(), BLOCK=1024)
    return total, grad


def _window_message(
    field: Tensor,
    features: Tensor,
    gaussian_bounds: Sequence[int],
    gaussian_weights: Sequence[float],
    gaussian_pos_scales: Sequence[float],
    radius: int,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
) -> Tensor:
    """M = Σ_j G_ij K_ij v_j in the accumulation dtype of ``field``."""
    acc_dtype = accumulation_dtype(field.dtype)
    n, c = field.shape[:2]
    field = field.contiguous()
    features = features.to(acc_dtype).contiguous()
    coef, bounds, (p, d, h, w), constexprs = _common_launch_args(
        features, gaussian_bounds, gaussian_weights, gaussian_pos_scales, radius, field.shape[2:],
        acc_dtype,
    )  # fmt: skip
    out = torch.empty(field.shape, dtype=acc_dtype, device=field.device)
    block_c = _channel_block(c)
    num_chunks = triton.cdiv(c, block_c)
    window, gates = _window_arguments(features, mask_src, mask_dst, coef)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(p, meta["BLOCK_P"]), num_chunks, n)

    _launch(
        _window_message_kernel, grid, field, *window, coef, bounds, out, c, p, d, h, w,
        features.shape[1], **gates, BLOCK_C=block_c, **constexprs,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), autograd registered, fake
# impls for shape propagation.
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("gcrf::gated_crf_pairwise_sum", mutates_args=())
def _pairwise_sum_op(
    probs: Tensor,
    features: Tensor,
    gaussian_bounds: list[int],
    gaussian_weights: list[float],
    gaussian_pos_scales: list[float],
    radius: int,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
    compatibility: Tensor | None,
    with_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _pairwise_sum(
        probs, features, gaussian_bounds, gaussian_weights, gaussian_pos_scales, radius,
        mask_src, mask_dst, compatibility, with_grad,
    )  # fmt: skip


@_pairwise_sum_op.register_fake
def _(probs, features, gaussian_bounds, gaussian_weights, gaussian_pos_scales, radius, mask_src,
      mask_dst, compatibility, with_grad):  # fmt: skip
    acc_dtype = accumulation_dtype(probs.dtype)
    grad_shape = probs.shape if with_grad else (0,)
    return probs.new_empty((), dtype=acc_dtype), probs.new_empty(grad_shape, dtype=acc_dtype)


def _setup_context(ctx, inputs, output) -> None:
    probs, *_, with_grad = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)
    ctx.with_grad = with_grad
    ctx.probs_dtype = probs.dtype


@once_differentiable  # ∂S/∂y is saved, not a function of y in the graph: no second derivative
def _backward(ctx, grad_value: Tensor, _grad_of_grad: Tensor | None):
    if not ctx.with_grad:
        raise RuntimeError(
            "gcrf::gated_crf_pairwise_sum was called with with_grad=False; call it through "
            "gcrf.kernels.gated_crf.gated_crf_pairwise_sum, which asks for the gradient whenever "
            "probs requires one"
        )
    (grad,) = ctx.saved_tensors
    grad_probs = None
    if ctx.needs_input_grad[0]:
        grad_probs = (grad * grad_value.to(grad.dtype)).to(ctx.probs_dtype)
    return grad_probs, None, None, None, None, None, None, None, None, None


_pairwise_sum_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("gcrf::window_affinity", mutates_args=())
def _window_affinity_op(
    features: Tensor,
    spatial_shape: list[int],
    gaussian_bounds: list[int],
    gaussian_weights: list[float],
    gaussian_pos_scales: list[float],
    radius: int,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
) -> Tensor:
    acc_dtype = accumulation_dtype(features.dtype)
    features = features.contiguous()
    n = features.shape[0]
    coef, bounds, (p, d, h, w), constexprs = _common_launch_args(
        features,
        gaussian_bounds,
        gaussian_weights,
        gaussian_pos_scales,
        radius,
        spatial_shape,
        acc_dtype,
    )
    num_offsets = coef.numel() // len(gaussian_weights)
    # The kernel computes in acc_dtype (float64 for float64 features) and stores in out's dtype.
    out = torch.empty((n, num_offsets, *spatial_shape), dtype=acc_dtype, device=features.device)
    window, gates = _window_arguments(features, mask_src, mask_dst, coef)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(p, meta["BLOCK_P"]), n)

    # C = 1: unused by the math, part of the shared tuning key.
    _launch(
        _window_affinity_kernel, grid, *window, coef, bounds, out, 1, p, d, h, w,
        features.shape[1], **gates, **constexprs,
    )  # fmt: skip
    return out


@_window_affinity_op.register_fake
def _(features, spatial_shape, gaussian_bounds, gaussian_weights, gaussian_pos_scales, radius,
      mask_src, mask_dst):  # fmt: skip
    num_offsets = (2 * radius + 1) ** len(spatial_shape)
    dtype = accumulation_dtype(features.dtype)
    return features.new_empty((features.shape[0], num_offsets, *spatial_shape), dtype=dtype)


@torch.library.custom_op("gcrf::window_message", mutates_args=())
def _window_message_op(
    field: Tensor,
    features: Tensor,
    gaussian_bounds: list[int],
    gaussian_weights: list[float],
    gaussian_pos_scales: list[float],
    radius: int,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
) -> Tensor:
    return _window_message(
        field, features, gaussian_bounds, gaussian_weights, gaussian_pos_scales, radius, mask_src,
        mask_dst,
    )  # fmt: skip


@_window_message_op.register_fake
def _(field, features, gaussian_bounds, gaussian_weights, gaussian_pos_scales, radius, mask_src,
      mask_dst):  # fmt: skip
    return field.new_empty(field.shape, dtype=accumulation_dtype(field.dtype))


def _message_setup_context(ctx, inputs, output) -> None:
    field, features, bounds, weights, scales, radius, mask_src, mask_dst = inputs
    ctx.save_for_backward(features, mask_src, mask_dst)
    ctx.tables = (bounds, weights, scales, radius)
    ctx.field_dtype = field.dtype


def _message_backward(ctx, grad_out: Tensor):
    # M is linear in v: ∂L/∂v_j = Σ_i g_i G_ij K_ij = m_src(j) Σ_i K_ji m_dst(i) g_i, the same
    # filter with the gate transposed (masks swapped). It calls the op itself, so it is
    # differentiable again (gradgradcheck).
    features, mask_src, mask_dst = ctx.saved_tensors
    grad_field = None
    if ctx.needs_input_grad[0]:
        bounds, weights, scales, radius = ctx.tables
        grad_field = _window_message_op(
            grad_out, features, bounds, weights, scales, radius, mask_dst, mask_src
        ).to(ctx.field_dtype)
    return grad_field, None, None, None, None, None, None, None


_window_message_op.register_autograd(_message_backward, setup_context=_message_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API (docs/CONTRACTS.md §1)
# --------------------------------------------------------------------------------------------------


def _check_device(name: str, tensor: Tensor) -> None:
    if tensor.device.type != "cuda" and not autotune.INTERPRET:
        raise ValueError(
            f"the triton backend needs CUDA tensors (or the Triton interpreter, TRITON_INTERPRET=1 "
            f"set before importing gcrf.kernels); got {name} on {tensor.device}"
        )


def gated_crf_pairwise_sum(inputs: PairwiseInputs) -> Tensor:
    """The loss's pairwise sum ``S`` (docs/math.md#loss), fused in Triton.

    Never materialises the window: memory O(N·C·|Ω|), bitwise reproducible run to run. When
    ``probs`` requires a gradient the same sweep produces ∂S/∂probs (saved for the backward, which
    scales it; the affinity is never stored). Registered as ``torch.ops.gcrf.gated_crf_pairwise_sum``,
    so ``torch.compile`` keeps it in the graph.

    Args:
        inputs: probabilities (fp16/bf16/fp32, accumulated in fp32, or fp64, in fp64), the gated
            window and the normalised compatibility μ̂ or None (Potts); checked when built.

    Shape:
        probs: N×C×*Ω with Ω = (h, w) or (d, h, w); features: N×F×*Ω; masks: N×1×*Ω; μ̂: C×C.

    Returns:
        0-dim tensor ``S``, float32 (float64 when ``probs`` is float64).

    Example:
        >>> probs = torch.softmax(torch.randn(2, 5, 16, 16, device="cuda"), dim=1)
        >>> rgb = torch.rand(2, 3, 16, 16, device="cuda") / 0.1
        >>> window = GatedWindow(rgb, ((0, 3),), (1.0,), ((1 / 6, 1 / 6),), radius=2)
        >>> s = gated_crf_pairwise_sum(PairwiseInputs(probs, window))
    """
    check_type("inputs", inputs, PairwiseInputs)
    window = inputs.window
    _check_device("probs", inputs.probs)
    bounds, weights, scales = flat_tables(window)
    # The gradient comes from the same sweep as the value; ask for it only when it will be used.
    with_grad = inputs.probs.requires_grad and torch.is_grad_enabled()
    value, _ = _pairwise_sum_op(
        inputs.probs, window.features, bounds, weights, scales, window.radius, window.mask_src,
        window.mask_dst, inputs.compatibility, with_grad,
    )  # fmt: skip
    return value


def window_affinity(window: GatedWindow) -> Tensor:
    """``G_ij K_ij`` of every pixel to every window offset (docs/CONTRACTS.md §1), in Triton.

    Args:
        window: the gated window (features already divided by σ, kernel tables, radius, gates).

    Shape:
        features: N×F×*Ω → N×(2r+1)^q×*Ω, offsets row-major over the window (each axis from −r
        to r); 0 where ``j`` is outside the image or ``j == i``.

    Returns:
        float32 tensor of gated affinities (float64 for float64 features, computed in float64).

    Example:
        >>> rgb = torch.rand(1, 3, 32, 32, device="cuda") / 0.1
        >>> aff = window_affinity(GatedWindow(rgb, ((0, 3),), (1.0,), ((1 / 6, 1 / 6),), 3))
    """
    check_type("window", window, GatedWindow)
    features = window.features
    _check_device("features", features)
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()
    bounds, weights, scales = flat_tables(window)
    return _window_affinity_op(
        features, list(window.spatial_shape), bounds, weights, scales, window.radius,
        window.mask_src, window.mask_dst,
    )  # fmt: skip


def window_message(window: GatedWindow, field: Tensor) -> Tensor:
    """The message ``M_i = Σ_{j∈W(i)} G_ij K_ij v_j`` of a field (docs/math.md#message), in Triton.

    The contract of :func:`gcrf.loss.torch_backend.window_message` (docs/CONTRACTS.md §1), fused:
    registered as ``torch.ops.gcrf.window_message``, bitwise reproducible run to run.

    Example:
        >>> rgb = torch.rand(1, 3, 32, 32, device="cuda") / 0.1
        >>> window = GatedWindow(rgb, ((0, 3),), (1.0,), ((1 / 6, 1 / 6),), 3)
        >>> m = window_message(window, torch.softmax(torch.randn(1, 4, 32, 32, device="cuda"), 1))
    """
    check_field(window, field)
    _check_device("field", field)
    bounds, weights, scales = flat_tables(window)
    return _window_message_op(
        field, window.features, bounds, weights, scales, window.radius, window.mask_src,
        window.mask_dst,
    )  # fmt: skip
