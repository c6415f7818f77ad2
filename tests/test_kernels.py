"""Tests of what only the Triton backend has (``gcrf.kernels.gated_crf``, ``gcrf.kernels.autotune``).

The backend contract itself (values and gradients of the pairwise sum, the affinity and the message
against naive float64 references) is tests/test_backend_contract.py, which the Triton backend runs
like every backend. Here: the launch layout (channel chunks, pixel tiles), low precision against the
torch backend, the autotune configurations and their pruning, the custom-op registration, the
ahead-of-time compilation for sm_90 (no GPU needed) and, marked ``cuda``, realistic shapes on a GPU.
On a machine without CUDA, tests/conftest.py turns on Triton's interpreter.
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
from gcrf.kernels import autotune, gated_crf
from gcrf.kernels.window import GatedWindow, PairwiseInputs
from gcrf.loss.backends import get_backend
from tests.loss_reference import naive_window_affinity, naive_window_message
from tests.test_backend_contract import (
    DEVICE,
    TWO_KERNELS,
    assert_pairwise_sum_matches,
    make_inputs,
    pairwise_with_grad,
    reference_with_grad,
    window_of,
)

TRITON = get_backend("triton")
TORCH = get_backend("torch")


# --------------------------------------------------------------------------------------------------
# Launch layout: channel chunks and pixel tiles (the contract itself: tests/test_backend_contract.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("c", "compat"), [(5, False), (9, True)])
def test_channels_split_over_several_blocks(monkeypatch, c, compat):
    # Blocks of 4 channels: C=5 → 4 + 1, C=9 → 4 + 4 + 1 (last block partial).
    monkeypatch.setattr(gated_crf, "_MAX_BLOCK_C", 4)
    inputs = make_inputs(c=c, masks="both", compat=compat, seed=7)
    tables = {**TWO_KERNELS, "radius": 1}
    assert_pairwise_sum_matches(TRITON, inputs, tables, upstream=2.5)
    window = window_of(inputs, tables)
    expected = naive_window_message(inputs["probs"], window_of(inputs, tables))
    message = gated_crf.window_message(window, inputs["probs"])
    torch.testing.assert_close(message.double().cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial", [(8, 16), (9, 11)])
def test_several_pixel_tiles(monkeypatch, spatial):
    # Tiles of 32 pixels: 8×16 fills 4 tiles exactly, 9×11 = 99 leaves the 4th tile with 3 pixels;
    # neighbours cross tile boundaries in both directions.
    monkeypatch.setattr(autotune, "INTERPRETER_CONFIG", {"BLOCK_P": 32, "num_warps": 4})
    inputs = make_inputs(n=1, spatial=spatial, masks="both", compat=spatial == (9, 11), seed=8)
    tables = {**TWO_KERNELS, "radius": 2}
    assert_pairwise_sum_matches(TRITON, inputs, tables)
    window = window_of(inputs, tables)
    torch.testing.assert_close(
        gated_crf.window_message(window, inputs["probs"]).double().cpu(),
        naive_window_message(inputs["probs"], window),
        rtol=1e-5,
        atol=1e-6,
    )
    torch.testing.assert_close(
        gated_crf.window_affinity(window).double().cpu(),
        naive_window_affinity(window),
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.slow
@pytest.mark.parametrize("radius", [5, 8])
def test_large_radii(radius):
    # The window is larger than the image: every pixel sees the whole image but itself.
    inputs = make_inputs(n=1, spatial=(5, 6), masks="both", compat=radius == 8, seed=radius)
    assert_pairwise_sum_matches(TRITON, inputs, {**TWO_KERNELS, "radius": radius})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_torch_backend(dtype):
    # Flash-attention style: the reference sees the same rounded probabilities, upcast to fp64; the
    # kernel's error must stay within 2× the torch backend's error in the same dtype.
    inputs = make_inputs(masks="both", dtype=dtype, seed=13)
    tables = {**TWO_KERNELS, "radius": 2}
    value, grad = pairwise_with_grad(TRITON, inputs, tables, 0.9)
    torch_value, torch_grad = pairwise_with_grad(TORCH, inputs, tables, 0.9)
    ref_value, ref_grad = reference_with_grad(inputs, tables, 0.9)
    assert grad.dtype == dtype
    value_eps = 1e-6 * ref_value.abs().item()
    grad_eps = 1e-6 * ref_grad.abs().max().item()
    value_error = (value.double().cpu() - ref_value).abs()
    assert value_error <= 2 * (torch_value.double().cpu() - ref_value).abs() + value_eps
    grad_error = (grad.double().cpu() - ref_grad).abs().max()
    assert grad_error <= 2 * (torch_grad.double().cpu() - ref_grad).abs().max() + grad_eps


# --------------------------------------------------------------------------------------------------
# Autotune configurations (gcrf.kernels.autotune), torch.library registration
# --------------------------------------------------------------------------------------------------


def prune(block_c: int, block_f: int, fp64: bool = False, mu_grad: bool = False) -> list:
    acc = tl.float64 if fp64 else tl.float32
    flags = {"HAS_COMPAT": mu_grad, "WITH_GRAD": True}
    return autotune.prune_configs(
        autotune.GPU_CONFIGS, {}, BLOCK_C=block_c, BLOCK_F=block_f, ACC=acc, **flags
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
    monkeypatch.setattr(autotune, "INTERPRET", False)
    small = autotune.fixed_config({"BLOCK_C": 4, "BLOCK_F": 4, "ACC": tl.float32})
    assert small == {"BLOCK_P": 64, "num_warps": 4, "maxnreg": 255}
    for block_c, block_f, fp64 in ((64, 4, False), (64, 64, True)):
        acc = tl.float64 if fp64 else tl.float32
        fixed = autotune.fixed_config({"BLOCK_C": block_c, "BLOCK_F": block_f, "ACC": acc})
        kept = [(c.kwargs["BLOCK_P"], c.num_warps) for c in prune(block_c, block_f, fp64)]
        assert (64, 4) not in kept
        assert (fixed["BLOCK_P"], fixed["num_warps"]) == max(kept, key=lambda s: (s[0], -s[1]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal without interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(autotune, "INTERPRET", False)
    inputs = make_inputs(seed=19)
    window = window_of(inputs, {**TWO_KERNELS, "radius": 1})
    with pytest.raises(ValueError, match="CUDA"):
        gated_crf.gated_crf_pairwise_sum(PairwiseInputs(inputs["probs"], window))
    with pytest.raises(ValueError, match="CUDA"):
        gated_crf.window_message(window, inputs["probs"])


@pytest.mark.parametrize("with_grad", [True, False])
def test_custom_op_passes_opcheck(with_grad):
    # Schema, fake tensor impl, autograd registration and AOT dispatch of the registered op.
    inputs = make_inputs(n=1, c=3, spatial=(5, 6), masks="both", compat=True, seed=20)
    probs = inputs["probs"].requires_grad_(with_grad)
    args = (probs, inputs["features"], [0, 3, 3, 3], [1.0, 0.5], [0.2, 0.2, 0.3, 0.3], 1,
            inputs["mask_src"], inputs["mask_dst"], inputs["compatibility"], with_grad)  # fmt: skip
    torch.library.opcheck(torch.ops.gcrf.gated_crf_pairwise_sum.default, args)


def test_message_op_passes_opcheck():
    inputs = make_inputs(n=1, c=3, spatial=(5, 6), masks="both", seed=20)
    field = inputs["probs"].requires_grad_(True)
    args = (field, inputs["features"], [0, 3, 3, 3], [1.0, 0.5], [0.2, 0.2, 0.3, 0.3], 1,
            inputs["mask_src"], inputs["mask_dst"])  # fmt: skip
    torch.library.opcheck(torch.ops.gcrf.window_message.default, args)


def test_compiles_without_graph_break():
    # fullgraph=True raises on any graph break; aot_eager also traces the registered backward.
    inputs = make_inputs(n=1, c=3, spatial=(5, 6), masks="src", seed=21)

    def step(logits, features, mask_src):
        probs = torch.softmax(logits, dim=1)
        window = GatedWindow(features, **TWO_KERNELS, radius=1, mask_src=mask_src)
        message = gated_crf.window_message(window, probs)
        return gated_crf.gated_crf_pairwise_sum(PairwiseInputs(probs, window)) / 7 + message.mean()

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
    """The rule's calibration points (ptxas for sm_90, maxnreg 255; see kernels/autotune.py)."""
    by_shape = {(c.kwargs["BLOCK_P"], c.num_warps): c for c in autotune.GPU_CONFIGS}
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
    "kernel_slices": ((0, 3),),
    "kernel_weights": (1.0,),
    "kernel_pos_scales": ((1 / 6, 1 / 6),),
    "radius": 5,
}


@pytest.mark.cuda
@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_realistic_shapes_match_torch_backend(size, dtype):
    probs, rgb, mask_src = realistic_inputs(8, 21, size, dtype)
    inputs = {"probs": probs, "features": rgb, "mask_src": mask_src, "mask_dst": mask_src,
              "compatibility": None}  # fmt: skip
    value, grad = pairwise_with_grad(TRITON, inputs, REALISTIC_WINDOW, 1 / 17)
    ref_value, ref_grad = pairwise_with_grad(TORCH, inputs, REALISTIC_WINDOW, 1 / 17)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)
    window = window_of(inputs, REALISTIC_WINDOW)
    message = TRITON.window_message(window, probs)
    torch.testing.assert_close(message, TORCH.window_message(window, probs), **tol)


@pytest.mark.cuda
def test_cuda_repeated_runs_are_bitwise_equal():
    probs, rgb, mask_src = realistic_inputs(8, 21, 128)
    inputs = {"probs": probs, "features": rgb, "mask_src": mask_src, "mask_dst": None,
              "compatibility": None}  # fmt: skip
    first_value, first_grad = pairwise_with_grad(TRITON, inputs, REALISTIC_WINDOW, 1.0)
    window = window_of(inputs, REALISTIC_WINDOW)
    first_message = TRITON.window_message(window, probs)
    for _ in range(10):
        value, grad = pairwise_with_grad(TRITON, inputs, REALISTIC_WINDOW, 1.0)
        assert torch.equal(value, first_value)
        assert torch.equal(grad, first_grad)
        assert torch.equal(TRITON.window_message(window, probs), first_message)


@pytest.mark.cuda
def test_cuda_torch_compile_fullgraph_with_inductor():
    _, rgb, mask_src = realistic_inputs(2, 21, 64)
    conv = torch.nn.Conv2d(3, 21, 3, padding=1, device="cuda")

    def step(image, features, mask):
        probs = torch.softmax(conv(image), dim=1)
        window = GatedWindow(features, **REALISTIC_WINDOW, mask_src=mask)
        s = gated_crf.gated_crf_pairwise_sum(PairwiseInputs(probs, window))
        return s / mask.sum().clamp_min(1) + gated_crf.window_message(window, probs).mean()

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
