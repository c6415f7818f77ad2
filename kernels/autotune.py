"""Autotune configurations of gcrf's Triton kernels and the rule that prunes them.

What limits these kernels is registers. Per thread a program holds the channel tiles (the message
and the neighbour's field; the message and the two μ̂ fields for the μ̂ gradient: ``BLOCK_P·BLOCK_C``
values each over ``32·num_warps`` threads) and the feature tiles (centre and neighbour:
``BLOCK_P·BLOCK_F`` each), twice as many registers in fp64.

Every config sets ``maxnreg=255``: without it ptxas trades a few spilled bytes for occupancy at some
small tiles (e.g. fp64 with 8 channels at 128 pixels × 8 warps: 80 registers and 8 bytes spilled;
with it 96 registers, none).

**The measurement.** ptxas for sm_90 (Triton's own, no GPU needed) over BLOCK_C 2–64 × BLOCK_F 4–64
× {bf16 Potts, fp32 μ̂, fp64 Potts, fp64 μ̂; fp32, bf16, fp64 μ̂ in 3D} with a gradient, {fp16 Potts,
fp64 μ̂} without, and the affinity kernel (BLOCK_C 0) in fp32/fp64, every config: 1 960 compiles,
565 spill, and every one that spills has

    values per thread = BLOCK_P · (a · BLOCK_C + 0.75 · BLOCK_F) · (2 in fp64) / (32 · num_warps),
    a = 1.5 for the μ̂ gradient (three channel tiles instead of two), else 1,

above 35, or above 30 where a pixel is split over several threads (fewer than one pixel per thread:
the per-pixel values — the Gaussian affinity, gates, coordinates — are held by each of them). The
nearest: fp32 μ̂ in 3D, 8 channels, 32 features at one pixel per thread (36: 36 bytes) and bf16
Potts, 16 channels, 64 features at half a pixel (32: 88 bytes), while bf16 Potts with 32 channels
and 4 features fits at one pixel per thread (35: 236 registers, the VOC recipe's tile).

**The rule.** Configs above the limit are pruned, which keeps 1 193 of the 1 395 that fit. Where no
config is under its limit the lightest, 32 pixels × 8 warps, is kept: it holds the widest measured
tile (64 channels, 64 features, fp64 μ̂ gradient in 3D) in 201 registers; feature tiles wider than 64
may spill there. The message kernel of the mean-field CRF holds the tiles of the value-only sweep
(a = 1). ``python -m benchmarks.registers`` compiles any such grid (``--all_configs true`` repeats
the sweep after a kernel change); tests/test_kernels.py compiles every kept config of the recipes'
cases (and, marked slow, of the grid) and asserts zero spills.

**Without tuning** (under ``torch.use_deterministic_algorithms(True)`` and in the interpreter) a
launch takes a fixed config, a pure function of the tile shape (:func:`fixed_config`), so the
partial-sum layout and reduction order never depend on what an autotuner picked in this process.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "GPU_CONFIGS",
    "INTERPRET",
    "INTERPRETER_CONFIG",
    "TUNING_KEY",
    "autotune",
    "fixed_config",
    "min_block_p",
    "prune_configs",
    "values_per_thread",
    "values_per_thread_limit",
]

#: Whether ``@triton.jit`` functions run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when
#: they were defined, i.e. when gcrf.kernels was first imported).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
_MAXNREG = 255
#: Block sizes / warps tuned over on a GPU.
GPU_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_P": block_p}, num_warps=num_warps, maxnreg=_MAXNREG)
    for block_p, num_warps in ((32, 8), (32, 4), (64, 2), (64, 4), (128, 4), (128, 8), (256, 8))
]
#: The config of the interpreter, where tuning would only multiply the test time and the cost is
#: per program, not per pixel (hence the large tile). Tests shrink it to exercise several tiles.
INTERPRETER_CONFIG: dict[str, int] = {"BLOCK_P": 256, "num_warps": 8}
_PREFERRED_FIXED_CONFIG = GPU_CONFIGS[3]  # 64 pixels × 4 warps, where it fits
#: Shapes and flags that change the work per pixel (a kernel without a flag skips it in the key).
TUNING_KEY: list[str] = ["C", "NUM_FEATURES", "RADIUS", "RADIUS_D", "NUM_GAUSSIANS", "HAS_MASK_SRC",
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


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop the configs that would spill registers (keep the lightest if all would).

    The signature is Triton's ``early_config_prune`` hook: the launch's arguments by name, the
    constexprs as keyword arguments.
    """

    def constexpr(name: str, default):
        return kwargs.get(name, named_args.get(name, default))

    block_c, block_f = constexpr("BLOCK_C", 0), constexpr("BLOCK_F", 1)
    fp64 = constexpr("ACC", tl.float32) == tl.float64
    mu_grad = bool(constexpr("HAS_COMPAT", False) and constexpr("WITH_GRAD", False))

    def load(config: triton.Config) -> float:
        return values_per_thread(config, block_c, block_f, fp64=fp64, mu_grad=mu_grad)

    kept = [c for c in configs if load(c) <= values_per_thread_limit(c)]
    return kept or [min(configs, key=lambda c: load(c) / values_per_thread_limit(c))]


def fixed_config(constexprs: dict) -> dict:
    """Launch options of the untuned path.

    In the interpreter :data:`INTERPRETER_CONFIG`; on a GPU the preferred config (64 pixels × 4
    warps) where the pruning keeps it, else the kept config with the largest tile (the most pixels
    per program, then per thread).
    """
    if INTERPRET:
        return INTERPRETER_CONFIG
    kept = prune_configs(GPU_CONFIGS, {}, **constexprs)
    if _PREFERRED_FIXED_CONFIG in kept:
        config = _PREFERRED_FIXED_CONFIG
    else:
        config = max(kept, key=lambda c: (c.kwargs["BLOCK_P"], -c.num_warps))
    return {**config.kwargs, "num_warps": config.num_warps, "maxnreg": config.maxnreg}


def min_block_p() -> int:
    """The smallest pixel tile any launch can use (sizes the partial-sum buffers)."""
    return min(INTERPRETER_CONFIG["BLOCK_P"], *(c.kwargs["BLOCK_P"] for c in GPU_CONFIGS))


def autotune(reset_to_zero: list[str] | None = None):
    """``triton.autotune`` over :data:`GPU_CONFIGS`, keyed by :data:`TUNING_KEY`, pruned."""
    return triton.autotune(
        configs=GPU_CONFIGS,
        key=TUNING_KEY,
        prune_configs_by={"early_config_prune": prune_configs},
        reset_to_zero=reset_to_zero,
    )
