"""Tests of the fused Triton kernels (``gcrf.kernels.gated_crf``).

On a machine without CUDA, tests/conftest.py turns on Triton's interpreter, so every ``@triton.jit``
kernel runs on CPU tensors; shapes stay tiny (the interpreter executes each program in Python).
Every value and gradient is checked against three references: a dense float64 formulation written
here (the full P×P matrix of ``G_ij·K_ij`` restricted to the window, gradients by autograd), the
per-pixel float64 loop of tests/loss_reference.py that the loss tests use too, and the torch
backend. Tests marked ``cuda`` repeat the checks at realistic shapes on a GPU.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl

from benchmarks.registers import AOT_CASES, SWEEP_CASES
from gcrf.kernels import gated_crf
from gcrf.kernels.gated_crf import SUPPORTED_SPATIAL_RANKS
from gcrf.kernels.window import GatedWindow, PairwiseInputs
from gcrf.loss import torch_backend
from tests.loss_reference import (
    flat_pairwise_sum,
    flat_window_affinity,
    naive_pairwise_sum,
    naive_window_affinity,
)

# The backends take the typed contract values; the tests pass their fields.
gated_crf_pairwise_sum = flat_pairwise_sum(gated_crf.gated_crf_pairwise_sum)
window_affinity = flat_window_affinity(gated_crf.window_affinity)
torch_pairwise_sum = flat_pairwise_sum(torch_backend.gated_crf_pairwise_sum)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Two kernels as gcrf.loss builds them from {"weight": 1, "xy": 6, "rgb": 0.1} and {"weight": 0.5,
# "xy": 3}: the first has 3 feature channels (and a position term), the second position only.
TWO_KERNELS = {
    "kernel_slices": [(0, 3), (3, 3)],
    "kernel_weights": [1.0, 0.5],
    "kernel_pos_scales": [(1 / 6, 1 / 5), (1 / 3, 1 / 3)],
}


# --------------------------------------------------------------------------------------------------
# Naive float64 reference
# --------------------------------------------------------------------------------------------------


def reference_gated_affinity(
    features, kernel_slices, kernel_weights, kernel_pos_scales, radius, mask_src, mask_dst
):
    """Dense N×P×P float64 matrix of ``G_ij·K_ij``, zero outside the window and on the diagonal."""
    n, spatial = features.shape[0], tuple(features.shape[2:])
    rank = len(spatial)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in spatial], indexing="ij")
    coords = torch.stack(grids).reshape(rank, -1).to(features.device)
    num_pixels = coords.shape[1]
    delta = coords[:, None, :] - coords[:, :, None]  # [axis, i, j] = j − i
    in_window = (delta.abs() <= radius).all(0) & ~torch.eye(
        num_pixels, dtype=torch.bool, device=features.device
    )
    f = features.double().reshape(n, features.shape[1], num_pixels)
    kern = torch.zeros(n, num_pixels, num_pixels, dtype=torch.float64, device=features.device)
    for (start, stop), weight, scales in zip(
        kernel_slices, kernel_weights, kernel_pos_scales, strict=True
    ):
        fk = f[:, start:stop]
        feature_dist = ((fk[:, :, :, None] - fk[:, :, None, :]) ** 2).sum(1)
        pos_dist = sum((delta[a] * scales[a]) ** 2 for a in range(rank))
        kern += weight * torch.exp(-0.5 * (feature_dist + pos_dist))
    gate = torch.ones_like(kern)
    if mask_dst is not None:
        gate = gate * mask_dst.double().reshape(n, num_pixels, 1)
    if mask_src is not None:
        gate = gate * mask_src.double().reshape(n, 1, num_pixels)
    return gate * kern * in_window


def reference_pairwise_sum(
    probs, features, kernel_slices, kernel_weights, kernel_pos_scales, radius,
    mask_src=None, mask_dst=None, compatibility=None,
):  # fmt: skip
    """``S`` of docs/CONTRACTS.md §1 in float64 from the dense affinity (differentiable in probs)."""
    gated = reference_gated_affinity(
        features, kernel_slices, kernel_weights, kernel_pos_scales, radius, mask_src, mask_dst
    )
    n, c = probs.shape[:2]
    y = probs.double().reshape(n, c, -1)
    if compatibility is None:
        phi = 1.0 - torch.einsum("nci,ncj->nij", y, y)
    else:
        phi = torch.einsum("nci,cd,ndj->nij", y, compatibility.double(), y)
    return (gated * phi).sum()


def reference_window_affinity(
    features, kernel_slices, kernel_weights, kernel_pos_scales, radius, mask_src, mask_dst
):
    """N×(2r+1)^k×S layout of CONTRACTS §1 read out of the dense matrix, offset by offset."""
    gated = reference_gated_affinity(
        features, kernel_slices, kernel_weights, kernel_pos_scales, radius, mask_src, mask_dst
    )
    n, spatial = features.shape[0], tuple(features.shape[2:])
    rank = len(spatial)
    index = torch.arange(gated.shape[1]).reshape(spatial)
    offsets = torch.cartesian_prod(*[torch.arange(-radius, radius + 1)] * rank).reshape(-1, rank)
    out = torch.zeros(n, len(offsets), *spatial, dtype=torch.float64)
    for o, offset in enumerate(offsets.tolist()):
        for pos in torch.cartesian_prod(*[torch.arange(s) for s in spatial]).reshape(-1, rank):
            j = [p + d for p, d in zip(pos.tolist(), offset, strict=True)]
            if all(0 <= x < s for x, s in zip(j, spatial, strict=True)):
                i_flat, j_flat = index[tuple(pos.tolist())], index[tuple(j)]
                out[(slice(None), o, *pos.tolist())] = gated[:, i_flat, j_flat].cpu()
    return out


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def make_inputs(
    n=2, c=5, spatial=(13, 17), num_features=3, masks="none", compat=False, seed=0,
    dtype=torch.float32,
):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, *spatial, generator=gen), dim=1).to(dtype)
    features = 0.7 * torch.randn(n, num_features, *spatial, generator=gen)
    mask_src = mask_dst = None
    if masks in ("src", "both"):
        mask_src = (torch.rand(n, 1, *spatial, generator=gen) > 0.3).float()
    if masks in ("dst", "both"):
        mask_dst = (torch.rand(n, 1, *spatial, generator=gen) > 0.3).float()
    compatibility = None
    if compat:
        mu = torch.rand(c, c, generator=gen)
        mu.fill_diagonal_(0)
        compatibility = (c - 1) * mu / mu.sum(1, keepdim=True).clamp_min(1e-12)
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return {
        "probs": probs.to(DEVICE),
        "features": features.to(DEVICE, torch.float64 if dtype == torch.float64 else torch.float32),
        "mask_src": move(mask_src),
        "mask_dst": move(mask_dst),
        "compatibility": None
        if compatibility is None
        else compatibility.to(DEVICE, dtype if dtype == torch.float64 else torch.float32),
    }


def run_with_grad(fn, inputs, window, upstream):
    """Value and ∂(upstream·S)/∂probs of a pairwise-sum implementation (the grad in probs' dtype)."""
    probs = inputs["probs"].detach().clone().requires_grad_(True)
    args = {**inputs, "probs": probs}
    value = fn(**args, **window)
    value.backward(torch.as_tensor(upstream, dtype=value.dtype, device=value.device))
    return value.detach(), probs.grad


def assert_matches_reference(inputs, window, upstream=0.37, rtol=2e-5, atol=1e-6):
    """Value and gradient against the dense reference here, the loop reference of the loss tests and
    the torch backend."""
    value, grad = run_with_grad(gated_crf_pairwise_sum, inputs, window, upstream)
    torch_value, torch_grad = run_with_grad(torch_pairwise_sum, inputs, window, upstream)
    torch.testing.assert_close(value, torch_value, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, torch_grad, rtol=rtol, atol=atol)
    ref_value, ref_grad = run_with_grad(reference_pairwise_sum, inputs, window, upstream)
    loop_value, loop_grad = run_with_grad(naive_pairwise_sum, inputs, window, upstream)
    torch.testing.assert_close(loop_value.cpu(), ref_value.cpu(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        loop_grad.double().cpu(), ref_grad.double().cpu(), rtol=1e-10, atol=1e-10
    )
    assert value.dtype == (
        torch.float64 if inputs["probs"].dtype == torch.float64 else torch.float32
    )
    assert value.shape == ()
    assert grad.dtype == inputs["probs"].dtype and grad.shape == inputs["probs"].shape
    torch.testing.assert_close(value.double(), ref_value, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# Forward and backward against the float64 reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masks", ["none", "src", "dst", "both"])
def test_matches_reference_for_every_mask_combination(masks):
    inputs = make_inputs(masks=masks)
    probs_before = inputs["probs"].clone()
    assert_matches_reference(inputs, {**TWO_KERNELS, "radius": 1})
    assert torch.equal(inputs["probs"], probs_before)


@pytest.mark.parametrize("radius", [2, 3])
def test_matches_reference_for_larger_radii(radius):
    inputs = make_inputs(n=1 if radius == 3 else 2, masks="both", seed=radius)
    assert_matches_reference(inputs, {**TWO_KERNELS, "radius": radius})


@pytest.mark.parametrize("masks", ["none", "both"])
def test_compatibility_matrix(masks):
    inputs = make_inputs(masks=masks, compat=True, seed=3)
    assert_matches_reference(inputs, {**TWO_KERNELS, "radius": 2}, upstream=-1.3)


def test_single_kernel_and_position_only_kernel():
    inputs = make_inputs(n=1, num_features=4, seed=4)
    one_kernel = {"kernel_slices": [(0, 4)], "kernel_weights": [2.0],
                  "kernel_pos_scales": [(0.0, 0.0)], "radius": 2}  # fmt: skip
    assert_matches_reference(inputs, one_kernel)
    assert_matches_reference(
        make_inputs(n=1, num_features=0, seed=5, masks="src"),
        {"kernel_slices": [(0, 0)], "kernel_weights": [1.0], "kernel_pos_scales": [(0.5, 0.25)],
         "radius": 2},
    )  # fmt: skip


def test_single_class():
    assert_matches_reference(make_inputs(c=1, masks="both", seed=6), {**TWO_KERNELS, "radius": 1})


@pytest.mark.parametrize(("c", "compat"), [(5, False), (9, True)])
def test_channels_split_over_several_blocks(monkeypatch, c, compat):
    # Blocks of 4 channels: C=5 → 4 + 1, C=9 → 4 + 4 + 1 (last block partial).
    monkeypatch.setattr(gated_crf, "_MAX_BLOCK_C", 4)
    inputs = make_inputs(c=c, masks="both", compat=compat, seed=7)
    assert_matches_reference(inputs, {**TWO_KERNELS, "radius": 1}, upstream=2.5)


@pytest.mark.parametrize("spatial", [(1, 9), (12, 11), (3, 43)])
def test_odd_sizes(spatial):
    inputs = make_inputs(n=1, spatial=spatial, masks="src", seed=8)
    assert_matches_reference(inputs, {**TWO_KERNELS, "radius": 2})


@pytest.mark.parametrize("spatial", [(8, 16), (9, 11)])
def test_several_pixel_tiles(monkeypatch, spatial):
    # Tiles of 32 pixels: 8×16 fills 4 tiles exactly, 9×11 = 99 leaves the 4th tile with 3 pixels;
    # neighbours cross tile boundaries in both directions.
    monkeypatch.setattr(gated_crf, "_INTERPRETER_CONFIG", {"BLOCK_P": 32, "num_warps": 4})
    inputs = make_inputs(n=1, spatial=spatial, masks="both", compat=spatial == (9, 11), seed=8)
    assert_matches_reference(inputs, {**TWO_KERNELS, "radius": 2})


def test_float64_inputs_are_accumulated_in_float64():
    inputs = make_inputs(masks="both", compat=True, dtype=torch.float64, seed=9)
    assert_matches_reference(inputs, {**TWO_KERNELS, "radius": 2}, rtol=1e-12, atol=1e-12)


def test_noncontiguous_probs():
    inputs = make_inputs(spatial=(17, 13), seed=10)
    inputs["probs"] = inputs["probs"].transpose(2, 3)  # a 13×17 view with permuted strides
    inputs["features"] = inputs["features"].transpose(2, 3)
    assert not inputs["probs"].is_contiguous()
    assert_matches_reference(inputs, {**TWO_KERNELS, "radius": 1})


@pytest.mark.slow
@pytest.mark.parametrize("radius", [5, 8])
def test_large_radii(radius):
    # The window is larger than the image: every pixel sees the whole image but itself.
    inputs = make_inputs(n=1, spatial=(5, 6), masks="both", compat=radius == 8, seed=radius)
    assert_matches_reference(inputs, {**TWO_KERNELS, "radius": radius})


@pytest.mark.parametrize("compat", [False, True])
def test_volumes(compat):
    assert 3 in SUPPORTED_SPATIAL_RANKS
    inputs = make_inputs(n=2, c=3, spatial=(4, 5, 6), masks="both", compat=compat, seed=11)
    window = {
        "kernel_slices": [(0, 3), (3, 3)],
        "kernel_weights": [1.0, 0.25],
        "kernel_pos_scales": [(0.5, 0.2, 0.1), (0.3, 0.3, 0.3)],  # anisotropic voxels
        "radius": 1,
    }
    assert_matches_reference(inputs, window, upstream=0.8)


# --------------------------------------------------------------------------------------------------
# Low precision, determinism (every reference comparison above also checks the torch backend)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_torch_backend(dtype):
    # Flash-attention style: the reference sees the same rounded probabilities, upcast to fp64; the
    # kernel's error must stay within 2× the torch backend's error in the same dtype.
    inputs = make_inputs(masks="both", dtype=dtype, seed=13)
    window = {**TWO_KERNELS, "radius": 2}
    value, grad = run_with_grad(gated_crf_pairwise_sum, inputs, window, 0.9)
    torch_value, torch_grad = run_with_grad(torch_pairwise_sum, inputs, window, 0.9)
    upcast = {**inputs, "probs": inputs["probs"].double()}
    ref_value, ref_grad = run_with_grad(reference_pairwise_sum, upcast, window, 0.9)
    assert grad.dtype == dtype
    value_eps = 1e-6 * ref_value.abs().item()
    grad_eps = 1e-6 * ref_grad.abs().max().item()
    assert (value.double() - ref_value).abs() <= 2 * (
        torch_value.double() - ref_value
    ).abs() + value_eps
    assert (grad.double() - ref_grad).abs().max() <= 2 * (
        torch_grad.double() - ref_grad
    ).abs().max() + grad_eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    # Independent of the torch backend: only the final cast of the gradient to the input dtype may
    # lose precision; the value is accumulated in fp32.
    inputs = make_inputs(masks="src", dtype=dtype, seed=14)
    window = {**TWO_KERNELS, "radius": 1}
    value, grad = run_with_grad(gated_crf_pairwise_sum, inputs, window, 1.0)
    upcast = {**inputs, "probs": inputs["probs"].double()}
    ref_value, ref_grad = run_with_grad(reference_pairwise_sum, upcast, window, 1.0)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-5)
    resolution = torch.finfo(dtype).eps
    assert (grad.double() - ref_grad).abs().max() <= resolution * ref_grad.abs().max()


def test_repeated_runs_are_bitwise_equal():
    inputs = make_inputs(spatial=(7, 9), masks="both", compat=True, seed=15)
    window = {**TWO_KERNELS, "radius": 1}
    first_value, first_grad = run_with_grad(gated_crf_pairwise_sum, inputs, window, 0.5)
    for _ in range(2):
        value, grad = run_with_grad(gated_crf_pairwise_sum, inputs, window, 0.5)
        assert torch.equal(value, first_value)
        assert torch.equal(grad, first_grad)


# --------------------------------------------------------------------------------------------------
# Window affinity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spatial", "radius"), [((6, 9), 2), ((3, 4, 5), 1)])
def test_window_affinity_matches_reference(spatial, radius):
    inputs = make_inputs(n=2, spatial=spatial, masks="both", seed=16)
    rank = len(spatial)
    window = {
        "kernel_slices": [(0, 3), (1, 2)],
        "kernel_weights": [1.0, 0.5],
        "kernel_pos_scales": [(0.3,) * rank, (0.0,) * rank],
        "radius": radius,
    }
    args = {
        "features": inputs["features"],
        "mask_src": inputs["mask_src"],
        "mask_dst": inputs["mask_dst"],
    }
    out = window_affinity(**args, **window)
    assert out.dtype == torch.float32
    assert out.shape == (2, (2 * radius + 1) ** rank, *spatial)
    expected = reference_window_affinity(**args, **window)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-7)
    loop_expected = naive_window_affinity(**args, **window)
    torch.testing.assert_close(loop_expected.cpu().double(), expected, rtol=1e-10, atol=1e-10)
    assert torch.all(out[:, ((2 * radius + 1) ** rank) // 2] == 0)  # the centre offset


def test_window_affinity_of_float64_features_is_float64():
    """float64 in, float64 out, computed in float64 (it used to come back as float32)."""
    inputs = make_inputs(n=1, spatial=(5, 7), masks="src", seed=3)
    window = {
        "kernel_slices": [(0, 3)],
        "kernel_weights": [1.0],
        "kernel_pos_scales": [(0.2, 0.2)],
        "radius": 1,
    }
    features = inputs["features"].double()
    out = window_affinity(features, mask_src=inputs["mask_src"], **window)
    assert out.dtype == torch.float64
    expected = reference_window_affinity(
        features, mask_src=inputs["mask_src"], mask_dst=None, **window
    )
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-14)


def test_window_affinity_sums_to_the_potts_weight_term():
    # With y = 0, φ = 1 for every pair, so S = Σ_ij G_ij K_ij: the sum of the affinity map.
    inputs = make_inputs(c=2, masks="dst", seed=17)
    window = {**TWO_KERNELS, "radius": 2}
    affinity = window_affinity(
        inputs["features"], mask_src=None, mask_dst=inputs["mask_dst"], **window
    )
    probs = torch.zeros_like(inputs["probs"])  # y = 0 → φ = 1 everywhere
    total = gated_crf_pairwise_sum(probs, inputs["features"], mask_dst=inputs["mask_dst"], **window)
    torch.testing.assert_close(affinity.double().sum(), total.double(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Validation, torch.library registration
# --------------------------------------------------------------------------------------------------


def test_bad_arguments_raise_with_names():
    inputs = make_inputs(seed=18)
    probs, features = inputs["probs"], inputs["features"]
    window = {**TWO_KERNELS, "radius": 1}
    with pytest.raises(ValueError, match="radius"):
        gated_crf_pairwise_sum(probs, features, **{**window, "radius": 0})
    with pytest.raises(ValueError, match="kernel_slices"):
        gated_crf_pairwise_sum(probs, features, **{**window, "kernel_slices": [(0, 9), (3, 3)]})
    with pytest.raises(ValueError, match="kernel_pos_scales"):
        gated_crf_pairwise_sum(probs, features, **{**window, "kernel_pos_scales": [(1.0,), (1.0,)]})
    with pytest.raises(ValueError, match="features"):
        gated_crf_pairwise_sum(probs, features[..., :-1], **window)
    with pytest.raises(ValueError, match="mask_src"):
        gated_crf_pairwise_sum(probs, features, mask_src=probs[:, :1, :-1], **window)
    with pytest.raises(ValueError, match="compatibility"):
        gated_crf_pairwise_sum(probs, features, compatibility=torch.eye(3), **window)
    with pytest.raises(ValueError, match="spatial rank"):
        gated_crf_pairwise_sum(probs[:, :, None, None], features, **window)
    with pytest.raises(ValueError, match="probs"):
        gated_crf_pairwise_sum(probs[:, :, 0], features, **window)
    with pytest.raises(TypeError, match="probs"):
        gated_crf_pairwise_sum(probs.to(torch.int64), features, **window)
    with pytest.raises(ValueError, match="radius"):
        window_affinity(features, **{**window, "radius": 1.5})


def prune(block_c: int, block_f: int, fp64: bool = False, mu_grad: bool = False) -> list:
    acc = tl.float64 if fp64 else tl.float32
    flags = {"HAS_COMPAT": mu_grad, "WITH_GRAD": True}
    return gated_crf._prune_configs(
        gated_crf._GPU_CONFIGS, {}, BLOCK_C=block_c, BLOCK_F=block_f, ACC=acc, **flags
    )


def test_config_pruning_keeps_tiles_in_registers():
    grid = itertools.product((0, 2, 32, 64), (1, 4, 64), (False, True), (False, True))
    for block_c, block_f, fp64, mu_grad in grid:
        kept = prune(block_c, block_f, fp64, mu_grad)
        assert kept, (block_c, block_f, fp64, mu_grad)
        if len(kept) == 1 and (kept[0].kwargs["BLOCK_P"], kept[0].num_warps) == (32, 8):
            continue  # the lightest config, kept where none is under its limit
        values = (1.5 if mu_grad else 1) * block_c + 0.75 * block_f
        for config in kept:  # ptxas free to use 255 registers, at most 35 tile values per thread
            threads = 32 * config.num_warps  # (30 where a pixel is split over several threads)
            limit = 30 if config.kwargs["BLOCK_P"] < threads else 35
            assert config.kwargs["BLOCK_P"] * values * (2 if fp64 else 1) <= limit * threads
            assert config.maxnreg == 255
    # The widest tiles fit under no limit: the lightest config only.
    for block_c, block_f in ((64, 64), (64, 128)):
        (lightest,) = prune(block_c, block_f, fp64=True, mu_grad=True)
        assert (lightest.kwargs["BLOCK_P"], lightest.num_warps) == (32, 8)
    # The μ̂ gradient holds one more channel tile than the Potts gradient.
    assert set(map(str, prune(32, 4, mu_grad=True))) < set(map(str, prune(32, 4)))


def test_fixed_config_fits_the_tile(monkeypatch):
    # The untuned (deterministic) launch takes 64 pixels × 4 warps where that fits, else a kept one.
    monkeypatch.setattr(gated_crf, "_INTERPRET", False)
    small = gated_crf._fixed_config({"BLOCK_C": 4, "BLOCK_F": 4, "ACC": tl.float32})
    assert small == {"BLOCK_P": 64, "num_warps": 4, "maxnreg": 255}
    for block_c, block_f, fp64 in ((64, 4, False), (64, 64, True)):
        acc = tl.float64 if fp64 else tl.float32
        fixed = gated_crf._fixed_config({"BLOCK_C": block_c, "BLOCK_F": block_f, "ACC": acc})
        kept = [(c.kwargs["BLOCK_P"], c.num_warps) for c in prune(block_c, block_f, fp64)]
        assert (64, 4) not in kept
        assert (fixed["BLOCK_P"], fixed["num_warps"]) == max(kept, key=lambda s: (s[0], -s[1]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal without interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(gated_crf, "_INTERPRET", False)
    inputs = make_inputs(seed=19)
    with pytest.raises(ValueError, match="CUDA"):
        gated_crf_pairwise_sum(inputs["probs"], inputs["features"], **TWO_KERNELS, radius=1)


@pytest.mark.parametrize("with_grad", [True, False])
def test_custom_op_passes_opcheck(with_grad):
    # Schema, fake tensor impl, autograd registration and AOT dispatch of the registered op.
    inputs = make_inputs(n=1, c=3, spatial=(5, 6), masks="both", compat=True, seed=20)
    probs = inputs["probs"].requires_grad_(with_grad)
    args = (probs, inputs["features"], [0, 3, 3, 3], [1.0, 0.5], [0.2, 0.2, 0.3, 0.3], 1,
            inputs["mask_src"], inputs["mask_dst"], inputs["compatibility"], with_grad)  # fmt: skip
    torch.library.opcheck(torch.ops.gcrf.gated_crf_pairwise_sum.default, args)


def test_second_derivative_is_refused():
    # The gradient is saved from the sweep; a second derivative must raise, never be silently 0.
    inputs = make_inputs(n=1, c=2, spatial=(5, 5), seed=23)
    probs = inputs["probs"].requires_grad_(True)
    scale = torch.tensor(2.0, requires_grad=True)
    value = gated_crf_pairwise_sum(probs, inputs["features"], **TWO_KERNELS, radius=1) * scale
    (grad,) = torch.autograd.grad(value, probs, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.sum(), probs)


def test_value_without_gradient_matches_value_with_gradient():
    # The no-grad sweep (one gate, Σ ⟨y, M⟩) and the gradient sweep (both gates, ½ Σ ⟨y, M⟩) are two
    # formulas for the same S.
    for compat in (False, True):
        inputs = make_inputs(spatial=(7, 9), masks="both", compat=compat, seed=22)
        window = {**TWO_KERNELS, "radius": 1}
        with torch.no_grad():
            value_only = gated_crf_pairwise_sum(**inputs, **window)
        value, _ = run_with_grad(gated_crf_pairwise_sum, inputs, window, 1.0)
        ref_value = reference_pairwise_sum(**inputs, **window)
        torch.testing.assert_close(value_only.double(), ref_value, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(value_only, value, rtol=1e-5, atol=1e-5)


def test_compiles_without_graph_break():
    # fullgraph=True raises on any graph break; aot_eager also traces the registered backward.
    inputs = make_inputs(n=1, c=3, spatial=(5, 6), masks="src", seed=21)

    def step(logits, features, mask_src):
        probs = torch.softmax(logits, dim=1)
        return (
            gated_crf_pairwise_sum(probs, features, mask_src=mask_src, **TWO_KERNELS, radius=1) / 7
        )

    logits = torch.randn(1, 3, 5, 6, device=DEVICE, requires_grad=True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(logits, inputs["features"], inputs["mask_src"])
    loss.backward()
    eager_logits = logits.detach().clone().requires_grad_(True)
    eager_loss = step(eager_logits, inputs["features"], inputs["mask_src"])
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(logits.grad, eager_logits.grad)


REPOSITORY = Path(__file__).resolve().parents[1]


# Compiles the kernels for sm_90 with Triton's own ptxas, without a GPU (benchmarks/registers.py):
# catches code generation errors (types, layouts, constexpr branches) that the interpreter cannot
# see, and register spills. Every case is compiled with every autotune config that the pruning keeps
# for it, and ptxas -v reports the registers and spill bytes of each (printed, and asserted to be
# zero spills).
def compile_ahead_of_time(tmp_path, cases) -> list[dict]:
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("Triton's CUDA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    command = [sys.executable, "-m", "benchmarks.registers", "--cases", json.dumps(cases),
               "--json_rows", "true"]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=1800, cwd=REPOSITORY
    )
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("no ptxas available for ahead-of-time compilation")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    for row in rows:  # the report: registers per kept configuration (pytest -s shows it)
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    return rows


def assert_no_spills(rows: list[dict], cases: list[dict]) -> None:
    assert len(rows) > len(cases)  # several kept configurations per case
    assert all(row["kept"] for row in rows)
    spilling = [row for row in rows if row["spills"] != 0]
    assert not spilling, f"kept autotune configurations that spill registers: {spilling}"
    assert all(0 < row["registers"] <= 255 for row in rows)


def test_kernels_compile_for_a_gpu_without_one(tmp_path):
    assert_no_spills(compile_ahead_of_time(tmp_path, AOT_CASES), AOT_CASES)


@pytest.mark.slow
def test_every_kept_config_of_the_measured_grid_compiles_without_spills(tmp_path):
    assert_no_spills(compile_ahead_of_time(tmp_path, SWEEP_CASES), SWEEP_CASES)


def test_pruning_measure_follows_the_spill_measurements():
    """The rule's calibration points (ptxas for sm_90, maxnreg 255; see kernels/gated_crf.py)."""
    by_shape = {(c.kwargs["BLOCK_P"], c.num_warps): c for c in gated_crf._GPU_CONFIGS}
    # (config, BLOCK_C, BLOCK_F, fp64, μ̂ gradient): measured to spill (fp32 μ̂ in 3D 36 bytes at
    # one pixel per thread, bf16 Potts 88 at half a pixel, fp64 affinity 200) ...
    spills = [((64, 2), 8, 32, False, True), ((64, 4), 16, 64, False, False),
              ((64, 4), 0, 64, True, False)]  # fmt: skip
    # ... and measured to fit, at the limits (229 to 240 registers).
    fits = [((64, 2), 32, 4, False, False), ((64, 4), 8, 64, False, True),
            ((128, 8), 32, 16, False, True)]  # fmt: skip
    for shape, block_c, block_f, fp64, mu_grad in spills:
        assert by_shape[shape] not in prune(block_c, block_f, fp64, mu_grad)
    for shape, block_c, block_f, fp64, mu_grad in fits:
        assert by_shape[shape] in prune(block_c, block_f, fp64, mu_grad)
    # fp64 doubles the registers: a tile that fits in fp32 can be pruned in fp64.
    assert set(map(str, prune(32, 16, fp64=True))) < set(map(str, prune(32, 16)))


# --------------------------------------------------------------------------------------------------
# CUDA: realistic shapes, torch.compile with inductor, determinism over many runs
# --------------------------------------------------------------------------------------------------


def realistic_inputs(n, c, size, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    probs = torch.softmax(torch.randn(n, c, size, size, device="cuda", generator=gen), 1).to(dtype)
    rgb = torch.rand(n, 3, size, size, device="cuda", generator=gen) / 0.1
    mask_src = (torch.rand(n, 1, size, size, device="cuda", generator=gen) > 0.2).float()
    return probs, rgb, mask_src


REALISTIC_WINDOW = {
    "kernel_slices": [(0, 3)],
    "kernel_weights": [1.0],
    "kernel_pos_scales": [(1 / 6, 1 / 6)],
    "radius": 5,
}


@pytest.mark.cuda
@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_realistic_shapes_match_torch_backend(size, dtype):
    probs, rgb, mask_src = realistic_inputs(8, 21, size, dtype)
    inputs = {"probs": probs, "features": rgb, "mask_src": mask_src, "mask_dst": mask_src,
              "compatibility": None}  # fmt: skip
    value, grad = run_with_grad(gated_crf_pairwise_sum, inputs, REALISTIC_WINDOW, 1 / 17)
    ref_value, ref_grad = run_with_grad(torch_pairwise_sum, inputs, REALISTIC_WINDOW, 1 / 17)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)


@pytest.mark.cuda
def test_cuda_repeated_runs_are_bitwise_equal():
    probs, rgb, mask_src = realistic_inputs(8, 21, 128)
    inputs = {"probs": probs, "features": rgb, "mask_src": mask_src, "mask_dst": None,
              "compatibility": None}  # fmt: skip
    first_value, first_grad = run_with_grad(gated_crf_pairwise_sum, inputs, REALISTIC_WINDOW, 1.0)
    for _ in range(10):
        value, grad = run_with_grad(gated_crf_pairwise_sum, inputs, REALISTIC_WINDOW, 1.0)
        assert torch.equal(value, first_value)
        assert torch.equal(grad, first_grad)


@pytest.mark.cuda
def test_cuda_torch_compile_fullgraph_with_inductor():
    _, rgb, mask_src = realistic_inputs(2, 21, 64)
    conv = torch.nn.Conv2d(3, 21, 3, padding=1, device="cuda")

    def step(image, features, mask):
        probs = torch.softmax(conv(image), dim=1)
        s = gated_crf_pairwise_sum(probs, features, mask_src=mask, **REALISTIC_WINDOW)
        return s / mask.sum().clamp_min(1)

    compiled = torch.compile(step, fullgraph=True)
    image = torch.randn(2, 3, 64, 64, device="cuda")
    loss = compiled(image, rgb, mask_src)
    loss.backward()
    compiled_grad = conv.weight.grad.clone()
    conv.weight.grad = None
    eager_loss = step(image, rgb, mask_src)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, conv.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("masks", ["none", "both"])
def test_position_only_kernels_without_features(masks):
    """xy-only kernels: the feature tensor has no channels and the kernel never loads features."""
    inputs = make_inputs(num_features=0, masks=masks, seed=11)
    window = {
        "kernel_slices": [(0, 0), (0, 0)],
        "kernel_weights": [1.0, 0.25],
        "kernel_pos_scales": [(1 / 2, 1 / 3), (1 / 5, 1 / 5)],
        "radius": 2,
    }
    assert_matches_reference(inputs, window, upstream=-0.8)


def test_backends_take_the_typed_contract_only():
    """Both backends consume the same typed values; loose arguments are refused by name."""
    inputs = make_inputs(seed=21)
    window = GatedWindow(inputs["features"], ((0, 3), (3, 3)), (1.0, 0.5), ((0.2,) * 2,) * 2, 1)
    pairwise = PairwiseInputs(inputs["probs"], window)
    expected = torch_backend.gated_crf_pairwise_sum(pairwise)
    torch.testing.assert_close(gated_crf.gated_crf_pairwise_sum(pairwise), expected)
    torch.testing.assert_close(
        gated_crf.window_affinity(window), torch_backend.window_affinity(window)
    )
    with pytest.raises(TypeError, match="PairwiseInputs"):
        gated_crf.gated_crf_pairwise_sum(window)
    with pytest.raises(TypeError, match="GatedWindow"):
        gated_crf.window_affinity(inputs["features"])
