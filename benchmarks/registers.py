"""Registers and spills of the Triton kernels, compiled ahead of time for sm_90 without a GPU.

Run from the repository root (no GPU needed: Triton compiles for the target and its bundled ptxas
reports the registers and spill bytes of each kernel)::

    python -m benchmarks.registers                     # the measured grid, kept configs only
    python -m benchmarks.registers --all_configs true  # every config, whether kept or not
    python -m benchmarks.registers --all_configs true \
        --block_cs [2,4,8,16,32,64] --block_fs [4,8,16,32,64]  # the grid the rule was fitted on
    python -m benchmarks.registers --cases '[{"kernel": "pairwise", "dtype": "bf16",
        "grad": true, "block_c": 32, "block_f": 4}]'

A case is a dict: ``kernel`` ("pairwise" or "affinity"), ``dtype`` of the inputs ("fp32",
"bf16", "fp16", "fp64"), ``block_f``, and for the pairwise kernel ``block_c``, ``grad`` and
``compat`` (the μ̂ branch); ``radius_d`` > 0 compiles the 3D kernel. Each case is compiled with
every autotune config the pruning keeps for it (``--all_configs``: every config), and the table
says how many compiles spill, and how many spilling configs the pruning would keep (must be 0).
With ``--json_rows true`` the rows are printed as one JSON list instead (the tests read it).

The compile runs in this process, so it must not run under ``TRITON_INTERPRET=1`` (the tests
start it as a subprocess without it).
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
import triton.language as tl
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

from gcrf.kernels import autotune, gated_crf

__all__ = ["AOT_CASES", "SWEEP_CASES", "compile_cases", "main", "registers_and_spills"]

#: The cases the recipes run (C = 4 to 21, three colour channels), every dtype and flag branch once.
AOT_CASES: list[dict[str, Any]] = [
    {"kernel": "pairwise", "dtype": "bf16", "grad": True, "block_c": 32, "block_f": 4},
    {"kernel": "pairwise", "dtype": "fp16", "grad": False, "block_c": 32, "block_f": 4},
    {"kernel": "pairwise", "grad": True, "compat": True, "radius_d": 5, "block_c": 8, "block_f": 4},
    {"kernel": "pairwise", "dtype": "fp64", "compat": True, "grad": False, "block_c": 32,
     "block_f": 4},
    {"kernel": "affinity", "block_f": 4},
    {"kernel": "message", "dtype": "bf16", "block_c": 32, "block_f": 4},
    {"kernel": "message", "radius_d": 2, "block_c": 4, "block_f": 4},
]  # fmt: skip

#: Branches of the measured grid (kernels/autotune.py), plus two the fit never saw (fp32 Potts,
#: bf16 μ̂ in a volume).
SWEEP_VARIANTS: list[dict[str, Any]] = [
    {"dtype": "bf16", "grad": True},
    {"dtype": "fp32", "grad": True},
    {"dtype": "fp32", "grad": True, "compat": True},
    {"dtype": "bf16", "grad": True, "compat": True, "radius_d": 2},
    {"dtype": "fp64", "grad": True},
    {"dtype": "fp64", "grad": True, "compat": True},
    {"dtype": "fp16", "grad": False},
    {"dtype": "fp64", "grad": False, "compat": True},
]


#: Tile shapes of the default grid: where the kept configs reach the rule's limits.
BLOCK_CS: tuple[int, ...] = (2, 8, 32, 64)
BLOCK_FS: tuple[int, ...] = (4, 16, 64)


def sweep_cases(
    block_cs: tuple[int, ...] = BLOCK_CS, block_fs: tuple[int, ...] = BLOCK_FS
) -> list[dict[str, Any]]:
    """Every variant at every tile shape, and the affinity kernel in fp32 and fp64."""
    pairwise = [
        {"kernel": "pairwise", **variant, "block_c": block_c, "block_f": block_f}
        for variant in SWEEP_VARIANTS
        for block_c, block_f in itertools.product(block_cs, block_fs)
    ]
    affinity = [
        {"kernel": "affinity", "dtype": dtype, "block_f": block_f}
        for dtype in ("fp32", "fp64")
        for block_f in block_fs
        if block_f >= 16  # no channel tiles: only wide feature tiles come near a limit
    ]
    return pairwise + affinity


#: The measured grid, thinned to where the kept configs reach the rule's limits (the slow test).
SWEEP_CASES = sweep_cases()

_FIELDS = ("probs_ptr", "field_a_ptr", "field_b_ptr", "field_ptr")
_FP64_POINTERS = (*_FIELDS, "features_ptr", "coef_ptr", "partial_ptr", "grad_ptr", "out_ptr")


def _ptxas() -> str:
    # Imported here, not at the top: a Triton without the CUDA backend can still import this module.
    import triton.backends.nvidia.compiler as nvidia

    try:
        tool = nvidia.get_ptxas(90)
    except TypeError:  # older Triton: no arch argument
        tool = nvidia.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


def registers_and_spills(
    kernel, dtypes: dict[str, str], constexprs: dict[str, Any], options: dict[str, Any]
) -> tuple[int, int]:
    """Compile one JIT function for sm_90 and read (registers, spill bytes) from ``ptxas -v``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = dtypes.get(param.name, "*fp32")
        else:
            signature[param.name] = "i32"
    source = ASTSource(kernel, signature, constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    if not compiled.asm["cubin"]:
        raise RuntimeError(f"{kernel.__name__}: empty cubin")
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        target = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"]).group(1)
        command = [_ptxas(), "-v", f"--gpu-name={target}", str(ptx), "-o", f"{ptx}.o"]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def _case_arguments(case: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    dtype = case.get("dtype", "fp32")
    dtypes = {"bounds_ptr": "*i32"}
    if dtype in ("bf16", "fp16"):  # the μ̂ fields are mixed on the host in the fp32 accumulator
        names = ("probs_ptr",) if case.get("compat") else _FIELDS
        dtypes |= {name: f"*{dtype}" for name in names}
    elif dtype == "fp64":
        dtypes |= {name: "*fp64" for name in _FP64_POINTERS}
    constexprs = {
        "NUM_GAUSSIANS": 2,
        "RADIUS": 5,
        "RADIUS_D": case.get("radius_d", 0),
        "HAS_FEATURES": True,
        "BLOCK_F": case["block_f"],
        "ACC": tl.float64 if dtype == "fp64" else tl.float32,
        "HAS_MASK_SRC": True,
        "HAS_MASK_DST": True,
    }
    if case["kernel"] == "pairwise":
        constexprs |= {
            "HAS_COMPAT": case.get("compat", False),
            "WITH_GRAD": case["grad"],
            "BLOCK_C": case["block_c"],
        }
    elif case["kernel"] == "message":
        constexprs["BLOCK_C"] = case["block_c"]
    return dtypes, constexprs


def compile_cases(cases: list[dict[str, Any]], all_configs: bool = False) -> list[dict[str, Any]]:
    """One row per (case, config): the case, the config, registers, spills and whether it is kept."""
    kernels = {
        "pairwise": gated_crf._gated_crf_kernel,
        "affinity": gated_crf._window_affinity_kernel,
        "message": gated_crf._window_message_kernel,
    }
    rows = []
    for case in cases:
        autotuner = kernels[case["kernel"]]
        dtypes, constexprs = _case_arguments(case)
        kept = autotune.prune_configs(autotuner.configs, {}, **constexprs)
        for config in autotuner.configs if all_configs else kept:
            options = {"num_warps": config.num_warps, "maxnreg": config.maxnreg}
            registers, spills = registers_and_spills(
                autotuner.fn, dtypes, {**constexprs, **config.kwargs}, options
            )
            rows.append({**case, **config.kwargs, "num_warps": config.num_warps,
                         "registers": registers, "spills": spills, "kept": config in kept})  # fmt: skip
    registers, spills = registers_and_spills(
        gated_crf._sum_partials_kernel, {}, {"BLOCK": 1024}, {"num_warps": 4}
    )
    rows.append({"kernel": "sum", "registers": registers, "spills": spills, "kept": True})
    return rows


def main(
    cases: str | None = None,
    all_configs: bool = False,
    block_cs: list[int] | None = None,
    block_fs: list[int] | None = None,
    json_rows: bool = False,
) -> list[dict[str, Any]]:
    """Compile, print the summary (or the rows as JSON) and return the rows.

    Args:
        cases: a JSON list of cases (default: every variant at every ``block_cs`` × ``block_fs``).
        all_configs: compile every autotune config, not only those the pruning keeps.
        block_cs: channel tiles of the default cases (default :data:`BLOCK_CS`).
        block_fs: feature tiles of the default cases (default :data:`BLOCK_FS`).
        json_rows: print the rows as one JSON list on the last line instead of the tables.
    """
    if cases:
        selected = json.loads(cases)
    else:
        selected = sweep_cases(tuple(block_cs or BLOCK_CS), tuple(block_fs or BLOCK_FS))
    rows = compile_cases(selected, all_configs)
    if json_rows:
        print(json.dumps(rows))
        return rows
    configs = [row for row in rows if row["kernel"] != "sum"]
    spilling = [row for row in configs if row["spills"]]
    kept_spilling = [row for row in spilling if row["kept"]]
    fitting = [row for row in configs if not row["spills"]]
    console = Console(width=160)
    if len(rows) <= 80:
        table = Table(title="registers per autotune config (sm_90)")
        for column in ("kernel", "case", "BLOCK_P", "warps", "registers", "spills", "kept"):
            table.add_column(column, justify="left" if column in ("kernel", "case") else "right")
        shown = ("kernel", "BLOCK_P", "num_warps", "registers", "spills", "kept")
        for row in rows:
            case = " ".join(f"{k}={v}" for k, v in row.items() if k not in shown)
            values = [row.get(k, "") for k in ("BLOCK_P", "num_warps", "registers", "spills")]
            table.add_row(row["kernel"], case, *map(str, values), "yes" if row["kept"] else "no")
        console.print(table)
    summary = Table(title="sm_90, ptxas -v: compiles of the kernels' autotune configs")
    for column in ("compiles", "spill", "kept that spill", "kept of those that fit"):
        summary.add_column(column, justify="right")
    kept_fitting = sum(row["kept"] for row in fitting)
    summary.add_row(
        str(len(configs)),
        str(len(spilling)),
        str(len(kept_spilling)),
        f"{kept_fitting} / {len(fitting)}",
    )
    console.print(summary)
    for row in kept_spilling:
        console.print("[red]kept but spills:[/red]", row)
    return rows


if __name__ == "__main__":
    CLI(main)
