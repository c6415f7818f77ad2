"""The cost of the Triton self-check of ``backend="auto"`` (gcrf.loss.selfcheck) on this GPU.

``python -m benchmarks.selfcheck --json_path selfcheck.json`` runs :func:`gcrf.loss.verify_triton`
for fp32 and bf16, images and volumes, twice, each time in a fresh process: first with an empty
Triton cache (``TRITON_CACHE_DIR`` a new folder, so the kernels it needs are compiled: what the
first process on a new machine pays), then with that cache filled (what every later process pays).
It prints one row per case and writes them as JSON; ``python -m benchmarks.device`` runs it as its
``selfcheck`` step. Needs a CUDA GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from jsonargparse import CLI

from benchmarks.isolated import REPOSITORY
from benchmarks.tables import ResultTable

__all__ = ["CASES", "main", "selfcheck_table"]

#: (dtype, spatial rank) of every check timed.
CASES: tuple[tuple[str, int], ...] = (("float32", 2), ("bfloat16", 2), ("float32", 3))

_ONE_CHECK = """
import json, sys, time, torch
from gcrf.loss import verify_triton
dtype, rank = getattr(torch, sys.argv[1]), int(sys.argv[2])
torch.cuda.init()
verdict = verify_triton("cuda", dtype, rank)
print(json.dumps({"ok": verdict.ok, "seconds": verdict.seconds, "case": verdict.case,
                  "error": verdict.error}))
"""


def _check_in_fresh_process(dtype: str, rank: int, cache_dir: Path) -> dict:
    env = {"TRITON_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPOSITORY)}
    done = subprocess.run(
        [sys.executable, "-c", _ONE_CHECK, dtype, str(rank)], capture_output=True, text=True,
        env={**os.environ, **env}, cwd=REPOSITORY, timeout=600, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return {"ok": False, "seconds": None, "case": "", "error": done.stderr.strip()[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def selfcheck_table(rows: list[dict]) -> ResultTable:
    """The rows as a table: case, verdict, seconds with an empty and with a filled Triton cache."""
    table = ResultTable(
        "Triton self-check of backend='auto' (fresh process each)",
        ["dtype", "rank", "verdict", "empty cache (compiles)", "filled cache"],
    )
    for row in rows:
        verdict = "pass" if row["cold"]["ok"] and row["warm"]["ok"] else "FAILED"
        if verdict != "pass":
            failed = row["cold"] if not row["cold"]["ok"] else row["warm"]
            verdict += f": {failed['case']} {failed['error']}"
        seconds = [f"{r['seconds']:.2f} s" if r["seconds"] is not None else "" for r in
                   (row["cold"], row["warm"])]  # fmt: skip
        table.add_row(row["dtype"], row["rank"], verdict, *seconds)
    return table


def main(json_path: str | None = None) -> list[dict]:
    """Time the self-check of every case of :data:`CASES`; print and optionally write the rows.

    Args:
        json_path: also write the rows there as JSON, after every case (a run cut short keeps the
            cases done).
    """
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for dtype, rank in CASES:
            cold = _check_in_fresh_process(dtype, rank, Path(cache))
            warm = _check_in_fresh_process(dtype, rank, Path(cache))
            rows.append({"dtype": dtype, "rank": rank, "cold": cold, "warm": warm})
            if json_path is not None:
                Path(json_path).write_text(json.dumps(rows, indent=1))
    selfcheck_table(rows).print()
    return rows


if __name__ == "__main__":
    CLI(main)
