"""Fused Triton kernels of the Gated CRF loss: the pairwise sum with its gradient, window affinity.

The whole loss reduces to one windowed, gated Gaussian filter (DESIGN §2). For a per-pixel vector
field ``v`` the *message* at pixel ``i`` is

    M_i = Σ_{j ∈ W(i), j ≠ i, j inside the image} G_ij · K_ij · v_j

with ``G_ij = m_dst(i) · m_src(j)`` and ``K_ij = Σ_k w_k · exp(-½ (‖f_k(i) − f_k(j)‖² + ‖δ ⊙ s_k‖²))``,
``δ = j − i`` in pixels and ``s_k`` the per-axis position scale of kernel ``k``. The position term
depends on the offset only, so it is folded, together with ``w_k``, into a small per-offset table
``coef[o, k] = w_k · exp(-½ ‖δ_o ⊙ s_k‖²)`` computed once on the host (``coef = 0`` at the centre
offset, which removes ``j = i`` without a branch). Pixel coordinates are never loaded.

Value (``S`` of docs/CONTRACTS.md §1), one gate, v = y (Potts) or μ̂y:
    Potts:  S = Σ_i Σ_j G_ij K_ij (1 − ⟨y_i, y_j⟩) = Σ_ij G_ij K_ij − Σ_i ⟨y_i, M_i⟩
    μ̂:      S = Σ_i Σ_j G_ij K_ij y_iᵀ μ̂ y_j = Σ_i ⟨y_i, M_i⟩
Gradient (K is symmetric and j ∈ W(i) ⇔ i ∈ W(j)): the same filter with the transposed gate
``G_ji = m_src(i) · m_dst(j)`` added,
    Potts:  ∂S/∂y_i = −Σ_j (G_ij + G_ji) K_ij y_j
    μ̂:      ∂S/∂y_i =  Σ_j K_ij (G_ij (μ̂ y_j) + G_ji (μ̂ᵀ y_j))
and S follows from that message too (Σ_i ⟨y_i, M_i⟩ counts every pair twice), so when probs need a
gradient one sweep produces both: the value and ∂S/∂y (fp32, one probs-sized buffer saved for the
backward, which only scales it by the upstream gradient). K is computed once, in registers, and never
stored: storing it would cost N·(2r+1)^k·h·w floats, the memory wall this project removes. Without a
gradient the sweep uses one gate and writes nothing but its partial sums.

Launch layout: one program per (tile of ``BLOCK_P`` flattened pixels, chunk of ``BLOCK_C`` channels,
sample). The program loops over the window offsets, loads the shifted neighbour features / masks /
probabilities (out-of-image neighbours are masked loads; neighbouring tiles share them through the
cache), computes K in registers and accumulates the message in fp32 (fp64 for fp64 inputs). It
reduces its loss terms into one partial sum, written to its own slot of a buffer; a second
single-program kernel adds the slots in a fixed order. No atomics anywhere, so results are bitwise
reproducible run to run. 2D inputs run as 3D volumes of depth 1 with a depth radius of 0.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from gcrf.kernels.window import (
    SPATIAL_RANKS,
    GatedWindow,
    PairwiseInputs,
    accumulation_dtype,
    flat_tables,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_SPATIAL_RANKS",
    "GatedWindow",
    "PairwiseInputs",
    "gated_crf_pairwise_sum",
    "window_affinity",
]

#: Spatial ranks the Triton backend runs: (h, w) images and (d, h, w) volumes.
SUPPORTED_SPATIAL_RANKS: tuple[int, ...] = SPATIAL_RANKS

# Channels handled by one program. Larger C is split into chunks (one program each, K recomputed per
# chunk). Module-level so that the tests can shrink it to exercise the chunked path on tiny shapes.
_MAX_BLOCK_C = 64

_INTERPRET = bool(triton.knobs.runtime.interpret)

# Block sizes / warps to tune over on a GPU. What limits these kernels is registers: per thread a
# program holds the channel tiles (message and neighbour probabilities; message and the two μ̂
# fields for the μ̂ gradient: BLOCK_P·BLOCK_C values each over 32·num_warps threads) and the
# feature tiles (centre and neighbour: BLOCK_P·BLOCK_F each), twice as many registers in fp64.
# Every config sets ``maxnreg=255``: without it ptxas trades a few spilled bytes for occupancy at
# some small tiles (e.g. fp64 with 8 channels at 128 pixels × 8 warps: 80 registers and 8 bytes
# spilled; with it 96 registers, none). Measured with ptxas for sm_90 over BLOCK_C 2–64 × BLOCK_F
# 4–64 × {bf16 Potts, fp32 μ̂, fp64 Potts, fp64 μ̂; fp32, bf16, fp64 μ̂ in 3D} with a gradient,
# {fp16 Potts, fp64 μ̂} without, and the affinity kernel (BLOCK_C 0) in fp32/fp64, every config:
# 1 960 compiles, 565 spill, and every one that spills has
#   values per thread = BLOCK_P · (a · BLOCK_C + 0.75 · BLOCK_F) · (2 in fp64) / (32 · num_warps),
#   a = 1.5 for the μ̂ gradient (three channel tiles instead of two), else 1,
# above 35, or above 30 where a pixel is split over several threads (fewer than one pixel per
# thread: the per-pixel values, window kernel, gates, coordinates, are held by each of them). The
# nearest: fp32 μ̂ in 3D, 8 channels, 32 features at one pixel per thread (36: 36 bytes) and bf16
# Potts, 16 channels, 64 features at half a pixel (32: 88 bytes), while bf16 Potts with 32 channels
# and 4 features fits at one pixel per thread (35: 236 registers, the VOC recipe's tile). Configs
# above the limit are pruned, which keeps 1 193 of the 1 395 that fit. Where no config is under its
# limit the lightest, 32 pixels × 8 warps, is kept: it holds the widest measured tile (64
# channels, 64 features, fp64 μ̂ gradient in 3D) in 201 registers; feature tiles wider than 64 may
# spill there. `python -m benchmarks.registers` compiles any such grid (`--all_configs true` for
# the sweep); tests/test_kernels.py compiles every kept config of the recipes' cases (and, marked
# slow, of the grid) and asserts zero spills.
_MAXNREG = 255
_GPU_CONFIGS = [
    triton.Config({"BLOCK_P": block_p}, num_warps=num_warps, maxnreg=_MAXNREG)
    for block_p, num_warps in ((32, 8), (32, 4), (64, 2), (64, 4), (128, 4), (128, 8), (256, 8))
]
# The config used without tuning: under torch.use_deterministic_algorithms(True), where the
# partial-sum layout and the reduction order must not depend on what the autotuner picked in this
# process (the pruning is a pure function of the tile shape, so its choice is reproducible), and
# in the interpreter, where tuning would only multiply the test time and the cost is per program,
# not per pixel (hence the large tile).
_INTERPRETER_CONFIG = {"BLOCK_P": 256, "num_warps": 8}
_PREFERRED_FIXED_CONFIG = _GPU_CONFIGS[3]  # 64 pixels × 4 warps, where it fits
# Shapes and flags that change the work per pixel (a kernel without a flag skips it in the key).
_TUNING_KEY = ["C", "NUM_FEATURES", "RADIUS", "RADIUS_D", "NUM_KERNELS", "HAS_MASK_SRC",
               "HAS_MASK_DST", "HAS_COMPAT", "WITH_GRAD"]  # fmt: skip
_MAX_VALUES_PER_THREAD = 35.0
_MAX_VALUES_PER_THREAD_SPLIT = 30.0  # fewer than one pixel per thread


def values_per_thread(
    config: triton.Config, block_c: int, block_f: int, *, fp64: bool = False, mu_grad: bool = False
) -> float:
    """Register-resident tile values per thread of a config (the pruning measure above).

    ``block_c`` is 0 for the affinity kernel, which holds no channel tiles; ``mu_grad`` marks the
    gradient sweep with a compatibility matrix (two μ̂ fields).
    """
    channels = (1.5 if mu_grad else 1.0) * block_c
    width = 2.0 if fp64 else 1.0
    return config.kwargs["BLOCK_P"] * (channels + 0.75 * block_f) * width / (32 * config.num_warps)


def values_per_thread_limit(config: triton.Config) -> float:
    """The most tile values per thread that ptxas keeps in registers with this config's layout."""
    split = config.kwargs["BLOCK_P"] < 32 * config.num_warps
    return _MAX_VALUES_PER_THREAD_SPLIT if split else _MAX_VALUES_PER_THREAD


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs that would spill registers (see above; keep the lightest if all would)."""

    def constexpr(name: str, default):
        return kwargs.get(name, named_args.get(name, default))

    block_c, block_f = constexpr("BLOCK_C", 0), constexpr("BLOCK_F", 1)
    fp64 = constexpr("ACC", tl.float32) == tl.float64
    mu_grad = bool(constexpr("HAS_COMPAT", False) and constexpr("WITH_GRAD", False))

    def load(config: triton.Config) -> float:
        return values_per_thread(config, block_c, block_f, fp64=fp64, mu_grad=mu_grad)

    kept = [c for c in configs if load(c) <= values_per_thread_limit(c)]
    return kept or [min(configs, key=lambda c: load(c) / values_per_thread_limit(c))]


def _fixed_config(constexprs: dict) -> dict:
    """Launch options of the untuned path: the preferred config where the pruning keeps it, else
    the kept config with the largest tile (the most pixels per program, then per thread)."""
    if _INTERPRET:
        return _INTERPRETER_CONFIG
    kept = _prune_configs(_GPU_CONFIGS, {}, **constexprs)
    if _PREFERRED_FIXED_CONFIG in kept:
        config = _PREFERRED_FIXED_CONFIG
    else:
        config = max(kept, key=lambda c: (c.kwargs["BLOCK_P"], -c.num_warps))
    return {**config.kwargs, "num_warps": config.num_warps, "maxnreg": config.maxnreg}


def _autotune(reset_to_zero: list[str] | None = None):
    return triton.autotune(
        configs=_GPU_CONFIGS,
        key=_TUNING_KEY,
        prune_configs_by={"early_config_prune": _prune_configs},
        reset_to_zero=reset_to_zero,
    )


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
def _window_kernel(
    features_n_ptr,
    f_i,
    offs_f64,
    f_mask,
    p_j,
    valid_j,
    P,
    coef_ptr,
    bounds_ptr,
    o,
    NUM_KERNELS: tl.constexpr,
    HAS_FEATURES: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ACC: tl.constexpr,
):
    """K_ij for one window offset ``o`` over a tile: Σ_k coef[o, k] · exp(-½ ‖f_k(i) − f_k(j)‖²).

    ``coef[o, k]`` already holds ``w_k`` and the position factor, and is 0 at the centre offset.
    """
    kern = tl.zeros([BLOCK_P], dtype=ACC)
    if HAS_FEATURES:
        f_j = tl.load(
            features_n_ptr + offs_f64[None, :] + p_j[:, None],
            mask=valid_j[:, None] & f_mask[None, :],
            other=0.0,
        ).to(ACC)
        diff = f_i - f_j
        sq = diff * diff
    for k in tl.static_range(NUM_KERNELS):
        coef = tl.load(coef_ptr + o * NUM_KERNELS + k).to(ACC)
        if HAS_FEATURES:
            # Channels [start, stop) of `features` belong to kernel k (a modality used by two kernels
            # appears twice, divided by each kernel's σ).
            start = tl.load(bounds_ptr + 2 * k)
            stop = tl.load(bounds_ptr + 2 * k + 1)
            offs_f = tl.arange(0, BLOCK_F)
            in_kernel = (offs_f >= start) & (offs_f < stop)
            dist = tl.sum(tl.where(in_kernel[None, :], sq, 0.0), axis=1)
            kern += coef * tl.exp(-0.5 * dist)
        else:
            kern += coef
    return kern


@triton.jit
def _load_tile_features(
    features_n_ptr,
    offs_p,
    p_mask,
    NUM_FEATURES,
    P,
    HAS_FEATURES: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ACC: tl.constexpr,
):
    """Features of the tile's own pixels [BLOCK_P, BLOCK_F] and the channel offsets (int64).

    Without features (xy-only kernels) the tile is zeros and every channel is masked off.
    """
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
    return f_i, offs_f64, f_mask


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


# --------------------------------------------------------------------------------------------------
# The gated window filter: S partial sums, and ∂S/∂y when a gradient is needed
# --------------------------------------------------------------------------------------------------


@_autotune(reset_to_zero=["partial_ptr"])
@triton.jit
def _gated_crf_kernel(
    probs_ptr,  # N×C×P, any float dtype: y, the left factor ⟨y_i, M_i⟩ of S
    field_a_ptr,  # N×C×P, filtered with G_ij: y (Potts, same pointer as probs) or μ̂y (HAS_COMPAT)
    field_b_ptr,  # N×C×P, filtered with G_ji: μ̂ᵀy (HAS_COMPAT and WITH_GRAD only)
    features_ptr,  # N×F×P, ACC dtype
    mask_src_ptr,  # N×P float, 0/1
    mask_dst_ptr,  # N×P float, 0/1
    coef_ptr,  # (2r_d+1)(2r+1)² × NUM_KERNELS, ACC dtype
    bounds_ptr,  # NUM_KERNELS × 2 int32 channel ranges
    partial_ptr,  # N × num_chunks × tiles_per_row, ACC dtype, zero-initialised
    grad_ptr,  # N×C×P, ACC dtype: ∂S/∂y (WITH_GRAD only)
    C,
    P,
    D,
    H,
    W,
    NUM_FEATURES,
    tiles_per_row,
    NUM_KERNELS: tl.constexpr,
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
    # For this tile's pixels i and this chunk's channels, with G_ij = m_dst(i) m_src(j):
    #   value only:  M_i = Σ_j G_ij K_ij a_j                      a = y (Potts) or μ̂y
    #                Potts: S = Σ_ij G_ij K_ij − Σ_i ⟨y_i, M_i⟩;  μ̂: S = Σ_i ⟨y_i, M_i⟩
    #   WITH_GRAD:   M_i = Σ_j K_ij (G_ij a_j + G_ji b_j) = ±∂S/∂y_i   b = y (Potts) or μ̂ᵀy
    #                Potts: ∂S/∂y = −M, S = Σ_ij G_ij K_ij − ½ Σ_i ⟨y_i, M_i⟩ (each unordered
    #                pair appears twice in Σ⟨y, M⟩); μ̂: ∂S/∂y = M, S = ½ Σ_i ⟨y_i, M_i⟩ (S is a
    #                quadratic form in y). One sweep gives the value and the gradient: the
    #                backward only scales the gradient by the upstream one, K is never stored.
    # Σ_ij G_ij K_ij does not depend on the channels: chunk 0 adds it.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_n = tl.program_id(2).to(tl.int64)

    offs_p, p_mask, d_i, h_i, w_i = _tile_coordinates(pid_p, P, H, W, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_c64 = offs_c.to(tl.int64) * P
    field_a_n_ptr = field_a_ptr + pid_n * C * P
    field_b_n_ptr = field_b_ptr + pid_n * C * P
    features_n_ptr = features_ptr + pid_n * NUM_FEATURES * P

    f_i, offs_f64, f_mask = _load_tile_features(
        features_n_ptr, offs_p, p_mask, NUM_FEATURES, P, HAS_FEATURES, BLOCK_P, BLOCK_F, ACC
    )
    m_src_i = _load_gate(mask_src_ptr + pid_n * P, offs_p, p_mask, HAS_MASK_SRC, BLOCK_P, ACC)
    m_dst_i = _load_gate(mask_dst_ptr + pid_n * P, offs_p, p_mask, HAS_MASK_DST, BLOCK_P, ACC)

    message = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    weight_sum = tl.zeros([BLOCK_P], dtype=ACC)
    HW = H * W
    WINDOW: tl.constexpr = 2 * RADIUS + 1
    for od in range(-RADIUS_D, RADIUS_D + 1):
        d_ok = p_mask & (d_i + od >= 0) & (d_i + od < D)
        for oh in range(-RADIUS, RADIUS + 1):
            dh_ok = d_ok & (h_i + oh >= 0) & (h_i + oh < H)
            for ow in range(-RADIUS, RADIUS + 1):
                valid = dh_ok & (w_i + ow >= 0) & (w_i + ow < W)
                p_j = offs_p + od * HW + oh * W + ow
                o = ((od + RADIUS_D) * WINDOW + (oh + RADIUS)) * WINDOW + (ow + RADIUS)
                kern = _window_kernel(
                    features_n_ptr, f_i, offs_f64, f_mask, p_j, valid, P, coef_ptr, bounds_ptr,
                    o, NUM_KERNELS, HAS_FEATURES, BLOCK_P, BLOCK_F, ACC,
                )  # fmt: skip
                kern = tl.where(valid, kern, 0.0)
                m_src_j = _load_gate(
                    mask_src_ptr + pid_n * P, p_j, valid, HAS_MASK_SRC, BLOCK_P, ACC
                )
                weight_ij = kern * m_dst_i * m_src_j  # G_ij K_ij
                tile_mask = valid[:, None] & c_mask[None, :]
                a_j = tl.load(
                    field_a_n_ptr + offs_c64[None, :] + p_j[:, None], mask=tile_mask, other=0.0
                ).to(ACC)
                if WITH_GRAD:
                    if HAS_MASK_DST:
                        m_dst_j = tl.load(mask_dst_ptr + pid_n * P + p_j, mask=valid, other=0.0)
                        weight_ji = kern * m_src_i * m_dst_j.to(ACC)  # G_ji K_ij
                    else:
                        weight_ji = kern * m_src_i
                    if HAS_COMPAT:
                        b_j = tl.load(
                            field_b_n_ptr + offs_c64[None, :] + p_j[:, None],
                            mask=tile_mask,
                            other=0.0,
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
        partial = tl.sum(weight_sum, axis=0) * (pid_c == 0).to(ACC) - partial
    num_chunks = tl.num_programs(1)
    tl.store(partial_ptr + (pid_n * num_chunks + pid_c) * tiles_per_row + pid_p, partial)
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


@_autotune()
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
    NUM_KERNELS: tl.constexpr,
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
    features_n_ptr = features_ptr + pid_n * NUM_FEATURES * P
    f_i, offs_f64, f_mask = _load_tile_features(
        features_n_ptr, offs_p, p_mask, NUM_FEATURES, P, HAS_FEATURES, BLOCK_P, BLOCK_F, ACC
    )
    m_dst_i = _load_gate(mask_dst_ptr + pid_n * P, offs_p, p_mask, HAS_MASK_DST, BLOCK_P, ACC)

    WINDOW: tl.constexpr = 2 * RADIUS + 1
    NUM_OFFSETS: tl.constexpr = (2 * RADIUS_D + 1) * WINDOW * WINDOW
    out_n_ptr = out_ptr + pid_n * NUM_OFFSETS * P
    HW = H * W
    for od in range(-RADIUS_D, RADIUS_D + 1):
        d_ok = p_mask & (d_i + od >= 0) & (d_i + od < D)
        for oh in range(-RADIUS, RADIUS + 1):
            dh_ok = d_ok & (h_i + oh >= 0) & (h_i + oh < H)
            for ow in range(-RADIUS, RADIUS + 1):
                valid = dh_ok & (w_i + ow >= 0) & (w_i + ow < W)
                p_j = offs_p + od * HW + oh * W + ow
                o = ((od + RADIUS_D) * WINDOW + (oh + RADIUS)) * WINDOW + (ow + RADIUS)
                kern = _window_kernel(
                    features_n_ptr, f_i, offs_f64, f_mask, p_j, valid, P, coef_ptr, bounds_ptr,
                    o, NUM_KERNELS, HAS_FEATURES, BLOCK_P, BLOCK_F, ACC,
                )  # fmt: skip
                m_src_j = _load_gate(
                    mask_src_ptr + pid_n * P, p_j, valid, HAS_MASK_SRC, BLOCK_P, ACC
                )
                value = tl.where(valid, kern, 0.0) * m_dst_i * m_src_j
                tl.store(
                    out_n_ptr + o.to(tl.int64) * P + offs_p,
                    value.to(out_ptr.dtype.element_ty),
                    mask=p_mask,
                )


# --------------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _window_tables(
    kernel_bounds: tuple[int, ...],
    kernel_weights: tuple[float, ...],
    kernel_pos_scales: tuple[float, ...],
    radius: int,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``coef[o, k] = w_k · exp(-½ Σ_a (δ_a(o) · s_ka)²)`` (0 at the centre) and the int32 bounds.

    Offsets ``o`` run row-major over the window padded to 3 axes (depth radius 0 in 2D), which is
    also the order of the affinity output.
    """
    num_kernels = len(kernel_weights)
    radius_d = radius if rank == 3 else 0
    scales = [kernel_pos_scales[k * rank : (k + 1) * rank] for k in range(num_kernels)]
    if rank == 2:
        scales = [(0.0, *s) for s in scales]
    coef = []
    for od in range(-radius_d, radius_d + 1):
        for oh in range(-radius, radius + 1):
            for ow in range(-radius, radius + 1):
                centre = od == 0 and oh == 0 and ow == 0
                for k in range(num_kernels):
                    s_d, s_h, s_w = scales[k]
                    pos = (od * s_d) ** 2 + (oh * s_h) ** 2 + (ow * s_w) ** 2
                    coef.append(0.0 if centre else kernel_weights[k] * math.exp(-0.5 * pos))
    coef_table = torch.tensor(coef, dtype=dtype, device=device)
    bounds = torch.tensor(kernel_bounds, dtype=torch.int32, device=device)
    return coef_table, bounds


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _common_launch_args(
    features: Tensor,
    kernel_bounds: Sequence[int],
    kernel_weights: Sequence[float],
    kernel_pos_scales: Sequence[float],
    radius: int,
    spatial: Sequence[int],
    acc_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, tuple[int, ...], dict]:
    """Tables, (P, D, H, W) and the constexpr flags shared by the three kernels."""
    rank = len(spatial)
    d, h, w = (1, *spatial) if rank == 2 else tuple(spatial)
    if d * h * w >= 2**31 - 2 * (h * w + w + 1) * (radius + 1):
        # Pixel indices within one sample are int32 in the kernels (batch and channel offsets are
        # int64); a single image or volume of 2³¹ pixels is far beyond what the loss is used for.
        raise ValueError(
            f"the triton backend needs fewer than 2**31 pixels per sample, got {spatial}"
        )
    coef, bounds = _window_tables(
        tuple(int(b) for b in kernel_bounds),
        tuple(float(x) for x in kernel_weights),
        tuple(float(x) for x in kernel_pos_scales),
        int(radius),
        rank,
        features.device,
        acc_dtype,
    )
    num_features = features.shape[1]
    constexprs = {
        "NUM_KERNELS": len(kernel_weights),
        "RADIUS": int(radius),
        "RADIUS_D": int(radius) if rank == 3 else 0,
        "HAS_FEATURES": num_features > 0,
        "BLOCK_F": triton.next_power_of_2(max(num_features, 1)),
        "ACC": _TL_DTYPES[acc_dtype],
    }
    return coef, bounds, (d * h * w, d, h, w), constexprs


def _launch(kernel: triton.runtime.Autotuner, grid, *args, **kwargs) -> None:
    """Launch an autotuned kernel, or its plain JIT function with the fixed config.

    The fixed config runs in the interpreter and under ``torch.use_deterministic_algorithms(True)``:
    every launch is bitwise reproducible within a process either way, but only a fixed config makes
    the result independent of the autotuner's choice (across processes and runs of the benchmark).
    """
    if _INTERPRET or torch.are_deterministic_algorithms_enabled():
        config = _fixed_config(kwargs)
        logger.debug("%s: fixed config %s (no autotuning)", kernel.fn.__name__, config)
        kernel.fn[grid](*args, **kwargs, **config)
    else:
        kernel[grid](*args, **kwargs)


def _channel_block(num_channels: int) -> int:
    return min(triton.next_power_of_2(num_channels), _MAX_BLOCK_C)


def _pairwise_sum(
    probs: Tensor,
    features: Tensor,
    kernel_bounds: Sequence[int],
    kernel_weights: Sequence[float],
    kernel_pos_scales: Sequence[float],
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
        kernel_bounds,
        kernel_weights,
        kernel_pos_scales,
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
    block_ps = [config.kwargs["BLOCK_P"] for config in _GPU_CONFIGS]
    min_block_p = min(_INTERPRETER_CONFIG["BLOCK_P"], *block_ps)
    tiles_per_row = triton.cdiv(p, min_block_p)
    partial = torch.zeros(n * num_chunks * tiles_per_row, dtype=acc_dtype, device=probs.device)
    if with_grad:
        grad = torch.empty(probs.shape, dtype=acc_dtype, device=probs.device)
    else:
        grad = probs.new_empty((0,), dtype=acc_dtype)
    placeholder = coef  # any tensor: the pointer of an absent input is never dereferenced

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(p, meta["BLOCK_P"]), num_chunks, n)

    _launch(
        _gated_crf_kernel,
        grid,
        probs,
        field_a,
        field_b,
        features if features.shape[1] > 0 else placeholder,
        mask_src.contiguous() if mask_src is not None else placeholder,
        mask_dst.contiguous() if mask_dst is not None else placeholder,
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
        HAS_MASK_SRC=mask_src is not None,
        HAS_MASK_DST=mask_dst is not None,
        HAS_COMPAT=compatibility is not None,
        WITH_GRAD=with_grad,
        BLOCK_C=block_c,
        **constexprs,
    )
    total = torch.empty((), dtype=acc_dtype, device=probs.device)
    _sum_partials_kernel[(1,)](partial, total, partial.numel(), BLOCK=1024)
    return total, grad


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), autograd from the gradient
# of the same sweep, fake impls for shape propagation.
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("gcrf::gated_crf_pairwise_sum", mutates_args=())
def _pairwise_sum_op(
    probs: Tensor,
    features: Tensor,
    kernel_bounds: list[int],
    kernel_weights: list[float],
    kernel_pos_scales: list[float],
    radius: int,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
    compatibility: Tensor | None,
    with_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _pairwise_sum(
        probs, features, kernel_bounds, kernel_weights, kernel_pos_scales, radius,
        mask_src, mask_dst, compatibility, with_grad,
    )  # fmt: skip


@_pairwise_sum_op.register_fake
def _(probs, features, kernel_bounds, kernel_weights, kernel_pos_scales, radius, mask_src,
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
    kernel_bounds: list[int],
    kernel_weights: list[float],
    kernel_pos_scales: list[float],
    radius: int,
    mask_src: Tensor | None,
    mask_dst: Tensor | None,
) -> Tensor:
    acc_dtype = accumulation_dtype(features.dtype)
    features = features.contiguous()
    n = features.shape[0]
    coef, bounds, (p, d, h, w), constexprs = _common_launch_args(
        features, kernel_bounds, kernel_weights, kernel_pos_scales, radius, spatial_shape, acc_dtype
    )
    num_offsets = coef.numel() // len(kernel_weights)
    # The kernel computes in acc_dtype (float64 for float64 features) and stores in out's dtype.
    out = torch.empty((n, num_offsets, *spatial_shape), dtype=acc_dtype, device=features.device)
    placeholder = coef

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(p, meta["BLOCK_P"]), n)

    _launch(
        _window_affinity_kernel,
        grid,
        features if features.shape[1] > 0 else placeholder,
        mask_src.contiguous() if mask_src is not None else placeholder,
        mask_dst.contiguous() if mask_dst is not None else placeholder,
        coef,
        bounds,
        out,
        1,
        p,
        d,
        h,
        w,
        features.shape[1],
        HAS_MASK_SRC=mask_src is not None,
        HAS_MASK_DST=mask_dst is not None,
        **constexprs,
    )
    return out


@_window_affinity_op.register_fake
def _(features, spatial_shape, kernel_bounds, kernel_weights, kernel_pos_scales, radius,
      mask_src, mask_dst):  # fmt: skip
    num_offsets = (2 * radius + 1) ** len(spatial_shape)
    dtype = accumulation_dtype(features.dtype)
    return features.new_empty((features.shape[0], num_offsets, *spatial_shape), dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Public API (docs/CONTRACTS.md §1)
# --------------------------------------------------------------------------------------------------


def _check_device(name: str, tensor: Tensor) -> None:
    if tensor.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"the triton backend needs CUDA tensors (or the Triton interpreter, TRITON_INTERPRET=1 "
            f"set before importing gcrf.kernels); got {name} on {tensor.device}"
        )


def gated_crf_pairwise_sum(inputs: PairwiseInputs) -> Tensor:
    """Gated pairwise sum ``S`` of the Gated CRF loss, fused in Triton (docs/CONTRACTS.md §1).

    ``S = Σ_n Σ_i Σ_{j ∈ W(i), j ≠ i, j inside the image} G_ij · K_ij · φ(y_i, y_j)`` with
    ``G_ij = m_dst(i) · m_src(j)``, ``K_ij = Σ_k w_k exp(-½ (‖f_k(i) − f_k(j)‖² + Σ_a (δ_a s_ka)²))``
    and ``φ = 1 − ⟨y_i, y_j⟩`` (Potts) or ``y_iᵀ μ̂ y_j``. Never materialises the window; memory is
    O(N·C·h·w); the result is bitwise reproducible run to run. Differentiable w.r.t. ``probs`` only:
    when ``probs`` requires a gradient, the same sweep also produces ∂S/∂probs (saved in fp32 for the
    backward; K is never stored). Registered as the ``torch.ops.gcrf.gated_crf_pairwise_sum``
    custom op, so ``torch.compile`` keeps it in the graph.

    Args:
        inputs: probabilities (fp16/bf16/fp32, accumulated in fp32, or fp64, in fp64), the gated
            window (features already divided by σ, kernel tables, radius, 0/1 gates) and the
            normalised compatibility μ̂ or None (Potts); they checked their consistency when built.

    Shape:
        - probs: N×C×h×w or N×C×d×h×w (``S``)
        - features: N×F×S; mask_src, mask_dst: N×1×S; compatibility: C×C

    Returns:
        0-dim tensor ``S``, float32 (float64 when ``probs`` is float64).

    Example:
        >>> probs = torch.softmax(torch.randn(2, 5, 16, 16, device="cuda"), dim=1)
        >>> rgb = torch.rand(2, 3, 16, 16, device="cuda") / 0.1
        >>> window = GatedWindow(rgb, ((0, 3),), (1.0,), ((1 / 6, 1 / 6),), radius=2)
        >>> s = gated_crf_pairwise_sum(PairwiseInputs(probs, window))
    """
    if not isinstance(inputs, PairwiseInputs):
        raise TypeError(f"inputs must be a PairwiseInputs; got {type(inputs).__name__}")
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
    """Gated kernel of every pixel over its window, ``[n, o, i] = G_ij · K_ij``, ``j = i + offset_o``.

    Offsets run row-major over the window (each axis from −r to r); the value is 0 where ``j`` is
    outside the image or ``j == i``. Same kernel definition as :func:`gated_crf_pairwise_sum`.

    Args:
        window: the gated window (features already divided by σ, kernel tables, radius, gates).

    Shape:
        - features: N×F×h×w or N×F×d×h×w; masks N×1×S
        - output: N×(2r+1)^k×S, k the spatial rank

    Returns:
        float32 tensor of gated affinities (float64 for float64 features, computed in float64).

    Example:
        >>> rgb = torch.rand(1, 3, 32, 32, device="cuda") / 0.1
        >>> aff = window_affinity(GatedWindow(rgb, ((0, 3),), (1.0,), ((1 / 6, 1 / 6),), 3))
    """
    if not isinstance(window, GatedWindow):
        raise TypeError(f"window must be a GatedWindow; got {type(window).__name__}")
    features = window.features
    _check_device("features", features)
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()
    bounds, weights, scales = flat_tables(window)
    return _window_affinity_op(
        features, list(window.spatial_shape), bounds, weights, scales, window.radius,
        window.mask_src, window.mask_dst,
    )  # fmt: skip
