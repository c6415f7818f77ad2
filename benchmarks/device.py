"""One command for a GPU machine: the CUDA tests, the GPU benchmarks and their targets, in one run.

Run from the repository root on a machine with one CUDA GPU (``pip install -e ".[dev]"``)::

    python -m benchmarks.device                          # the whole plan (under 9 minutes)
    python -m benchmarks.device --dry_run true           # print the plan, run nothing
    python -m benchmarks.device --steps [loss,crf]       # some steps only (e.g. to rerun one)
    python -m benchmarks.device --out_dir /some/folder   # also copy what it writes there

**The plan.** Each step is a subprocess (``python -m ...``, with ``TRITON_INTERPRET`` removed from
its environment, so every Triton kernel is compiled for the GPU), run in order with its time
budget as its timeout; its stdout and stderr are captured in ``<work_dir>/<step>.log`` and what it
measured in ``<work_dir>/<step>.json`` (``.xml`` for the tests). A step that fails or runs out of
time is recorded as such and the next one starts; steps stop once ``--deadline_s`` is spent (what
is left is recorded as not run). After every step the results section and the JSON are rewritten,
so whatever ran is kept even if a later step fails or the run is killed.

| step | budget | what |
|---|---:|---|
| `roofline` | 30 s | fp32 / bf16 matmul FLOP/s and device-copy bandwidth on this GPU (`python -m benchmarks.roofline`) |
| `loss` | 90 s | the Gated CRF loss fwd+bwd at the published VOC step (48×21×64²) and the large shape (8×21×512²), r = 5: Triton, torch backend, published unfold; fp32 and bf16; peak memory; bitwise repeats (`python -m benchmarks.loss`) |
| `cuda_tests` | 60 s | `pytest -m cuda tests` (the CUDA-only tests) |
| `selfcheck` | 30 s | the cost of the Triton self-check of `backend="auto"` per dtype and rank, with an empty and with a filled Triton cache (`python -m benchmarks.selfcheck`) |
| `kernel_tests` | 100 s | `pytest tests/test_kernels.py tests/test_backend_contract.py tests/test_crf.py tests/test_selfcheck.py -m "not cuda and not slow"`: the tests of the Triton kernels, compiled on the GPU instead of interpreted |
| `train_step` | 90 s | one training step of each recipe's default model, with and without the Gated CRF term (`python -m benchmarks.model`) |
| `data` | 35 s | the data pipeline's samples/s per loader worker (`python -m benchmarks.data`), put against the measured steps/s |
| `crf` | 90 s | mean-field CRF refinement, Triton / torch / unfold (`python -m benchmarks.crf`; only where `gcrf.crf` exists) |

The budgets add up to 525 s, under the default ``--deadline_s`` of 540 s (a 10-minute command
limit leaves a minute for starting Python and writing). Without a CUDA device the command prints
the plan, says so and exits with status 2 (``--dry_run true``: the same on any machine); it exits
with 1 when a step failed or ran out of time, else 0 — short targets are results, not failures.

**What it writes.** The section between ``<!-- device-table:start -->`` and
``<!-- device-table:end -->`` of ``benchmarks/RESULTS.md`` (``--results``): the device name, driver,
CUDA, torch and Triton versions and the date; the targets below with pass / short; the measured
roofline; the loss, CRF and training-step tables; the loader estimate; the tests' counts and
failures; every step's status and time. ``benchmarks/device_results.json`` (``--json_path``) holds
the same, raw: the environment, and per step its command, status, seconds, budget and result.

**Targets** (pass / short), from the ``loss`` step (the speeds at 8×21×512², r = 5):

- Triton ≥ 30× faster than the published unfold formulation (fp32 and bf16);
- Triton ≥ 3× faster than the torch backend (fp32 and bf16);
- Triton fp32 within 2× of the FP32 roofline measured on that GPU (achieved fraction ≥ 50 %);
- bitwise-identical repeated runs (every Triton row of the step, both shapes and dtypes: value
  and gradient of two more runs equal to the first's).

**Work model** of the achieved fraction (stated in full in ``benchmarks/roofline.py``): per pixel
and window offset, ``3F + 4K`` FLOPs for the Gaussian over F feature channels and K kernels, one
per gate (two with the gradient, plus one add), ``2C`` for the C-channel multiply-add (``4C`` for
the μ̂ gradient), one for the Potts weight sum; ``2C`` per pixel for ⟨y, M⟩; bytes: probabilities,
features and gates read once, the gradient written once. The roofline time is
``max(FLOPs / fp32 matmul FLOP/s, bytes / copy bandwidth)``; the fraction is that over the time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from jsonargparse import CLI

from benchmarks.isolated import REPOSITORY
from benchmarks.tables import RESULTS, ResultTable, update_results

__all__ = [
    "STEP_NAMES",
    "Step",
    "Target",
    "environment",
    "evaluate_targets",
    "loader_estimate",
    "main",
    "plan",
    "render",
    "run_plan",
]

JSON_PATH = RESULTS.with_name("device_results.json")
RESULTS_KEY = "device-table"
#: The case and the thresholds of the targets.
TARGET_CASE = "8x512"
UNFOLD_SPEEDUP = 30.0
TORCH_SPEEDUP = 3.0
ROOFLINE_FRACTION = 0.5
#: The tests that run the Triton kernels (under the interpreter on a CPU machine).
KERNEL_TESTS = (
    "tests/test_kernels.py",
    "tests/test_backend_contract.py",
    "tests/test_crf.py",
    "tests/test_selfcheck.py",
)


@dataclass(frozen=True)
class Step:
    """One step of the plan.

    Attributes:
        name: the step's name (``--steps``, the log and result file names).
        budget_s: its timeout in seconds.
        what: one line for the plan.
        args: the arguments after ``python``; ``{work}`` is replaced by the work folder.
        result: the file (in the work folder) the step writes what it measured to, if any.
        needs: a module that must be importable for the step to run (else it is skipped).
    """

    name: str
    budget_s: float
    what: str
    args: tuple[str, ...]
    result: str | None = None
    needs: str | None = None

    def command(self, work_dir: Path) -> list[str]:
        """The command line, with this Python and the work folder filled in."""
        return [sys.executable, *(a.replace("{work}", str(work_dir)) for a in self.args)]


def plan() -> list[Step]:
    """The steps, in order (see the module docstring)."""
    pytest = ("-m", "pytest", "-q", "-p", "no:cacheprovider")
    workers = ("-n", "8") if importlib.util.find_spec("xdist") is not None else ()
    return [
        Step("roofline", 30, "matmul FLOP/s (fp32, bf16) and device-copy bandwidth",
             ("-m", "benchmarks.roofline", "--json_path", "{work}/roofline.json"),
             "roofline.json"),
        Step("loss", 90, "loss fwd+bwd: Triton / torch / unfold, voc and 8x512, fp32 and bf16",
             ("-m", "benchmarks.loss", "--device", "cuda", "--cases", "[voc,8x512]",
              "--dtypes", "[fp32,bf16]", "--isolate", "false", "--json_path", "{work}/loss.json"),
             "loss.json"),
        Step("cuda_tests", 60, "pytest -m cuda (the CUDA-only tests)",
             (*pytest, "-m", "cuda", "--junitxml", "{work}/cuda_tests.xml", "tests"),
             "cuda_tests.xml"),
        Step("selfcheck", 30, "the Triton self-check of backend='auto': its cost per dtype and rank",
             ("-m", "benchmarks.selfcheck", "--json_path", "{work}/selfcheck.json"),
             "selfcheck.json"),
        Step("kernel_tests", 100, "the kernel tests, compiled on the GPU (no interpreter)",
             (*pytest, *workers, "-m", "not cuda and not slow", "--junitxml",
              "{work}/kernel_tests.xml", *KERNEL_TESTS), "kernel_tests.xml"),
        Step("train_step", 90, "a training step per recipe, with and without the Gated CRF term",
             ("-m", "benchmarks.model", "--device", "cuda", "--json_path",
              "{work}/train_step.json"), "train_step.json"),
        Step("data", 35, "data pipeline samples/s per loader worker (CPU)",
             ("-m", "benchmarks.data", "--samples", "15", "--json_path", "{work}/data.json"),
             "data.json"),
        Step("crf", 90, "mean-field CRF: Triton / torch / unfold",
             ("-m", "benchmarks.crf", "--device", "cuda", "--implementations",
              "[gcrf_triton,gcrf_torch,unfold]", "--repeats", "5", "--isolate", "false",
              "--json_path", "{work}/crf.json"), "crf.json",
             needs="gcrf.crf"),
    ]  # fmt: skip


STEP_NAMES = tuple(step.name for step in plan())


def environment() -> dict[str, Any]:
    """The machine: GPU name, driver, memory, CUDA, torch and Triton versions, the date."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["device"] = properties.name
        info["memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["capability"] = f"{properties.major}.{properties.minor}"
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
        info["driver"] = done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = None
    return info


def _read_result(path: Path) -> Any:
    """A step's JSON, or the counts and failures of a pytest JUnit XML file."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    suites = ET.parse(path).getroot()
    suites = suites.findall("testsuite") if suites.tag == "testsuites" else [suites]
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def run_plan(
    steps: Sequence[Step],
    info: dict[str, Any],
    work_dir: Path,
    results_path: Path = RESULTS,
    json_path: Path = JSON_PATH,
    deadline_s: float = 540.0,
) -> dict[str, Any]:
    """Run the steps in order; after each, rewrite the results section and the JSON.

    Args:
        steps: the steps (:func:`plan`, or a subset).
        info: the :func:`environment`, recorded with the results.
        work_dir: where the logs and the steps' result files go.
        results_path: the Markdown file whose device section is rewritten.
        json_path: the JSON written beside it.
        deadline_s: seconds after which no step starts (a running step's timeout is cut to it).

    Returns:
        The report (what the JSON holds).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    start = time.monotonic()
    report: dict[str, Any] = {"environment": info, "steps": []}
    for step in steps:
        record: dict[str, Any] = {"name": step.name, "what": step.what, "budget_s": step.budget_s,
                                  "command": shlex.join(step.command(work_dir))}  # fmt: skip
        left = deadline_s - (time.monotonic() - start)
        if step.needs is not None and importlib.util.find_spec(step.needs) is None:
            record["status"] = f"skipped: {step.needs} is not in this checkout"
        elif left < 1:
            record["status"] = "not run: out of time"
        else:
            timeout = min(step.budget_s, left)
            result = work_dir / step.result if step.result else None
            if result is not None:
                result.unlink(missing_ok=True)  # never report an earlier run's result
            log = work_dir / f"{step.name}.log"
            record["log"] = str(log)
            began = time.monotonic()
            with log.open("w") as stream:
                try:
                    done = subprocess.run(
                        step.command(work_dir), stdout=stream, stderr=subprocess.STDOUT,
                        env=env, cwd=REPOSITORY, timeout=timeout, check=False,
                    )  # fmt: skip
                    record["returncode"] = done.returncode
                    record["status"] = (
                        "ok" if done.returncode == 0 else f"failed ({done.returncode})"
                    )
                except subprocess.TimeoutExpired:
                    record["status"] = f"timed out after {timeout:.0f} s"
            record["seconds"] = round(time.monotonic() - began, 1)
            if result is not None and result.exists():
                try:
                    record["result"] = _read_result(result)
                except (ValueError, ET.ParseError) as error:
                    record["status"] += f"; unreadable result: {error}"
            if record["status"] != "ok":
                tail = log.read_text(errors="replace").strip().splitlines()[-15:]
                print("\n".join(tail), flush=True)
        print(f"[{step.name}] {record['status']} ({record.get('seconds', 0)} s)", flush=True)
        report["steps"].append(record)
        report["seconds"] = round(time.monotonic() - start, 1)
        report["targets"] = [asdict(t) for t in evaluate_targets(report)]
        json_path.write_text(json.dumps(report, indent=1))
        update_results(RESULTS_KEY, render(report), "GPU: `python -m benchmarks.device`",
                       results_path)  # fmt: skip
    return report


@dataclass(frozen=True)
class Target:
    """A checked target: what, the goal, what was measured, and the verdict."""

    name: str
    goal: str
    measured: str
    verdict: Literal["pass", "short", "not measured"]


def _result(report: dict[str, Any], name: str) -> Any:
    for step in report["steps"]:
        if step["name"] == name:
            return step.get("result")
    return None


def _peaks(report: dict[str, Any]) -> Any:
    from benchmarks.roofline import Peaks

    measured = _result(report, "roofline")
    return Peaks(**measured) if measured else None


def evaluate_targets(report: dict[str, Any]) -> list[Target]:
    """The targets of the module docstring, from the loss and roofline results of ``report``."""
    from benchmarks.loss import CASES, RADIUS, case_work
    from benchmarks.roofline import roofline_fraction

    rows = _result(report, "loss") or []
    times = {(r["implementation"], r["dtype"]): r["time_s"]
             for r in rows if r["case"] == TARGET_CASE and "time_s" in r}  # fmt: skip
    shape = f"{CASES[TARGET_CASE].label}, r={RADIUS}"
    targets = []
    for dtype in ("fp32", "bf16"):
        for other, label, least in (("unfold", "published unfold", UNFOLD_SPEEDUP),
                                    ("torch", "torch backend", TORCH_SPEEDUP)):  # fmt: skip
            name = f"Triton vs {label}, {shape}, {dtype}"
            goal = f"≥ {least:g}× faster"
            if ("triton", dtype) in times and (other, dtype) in times:
                ratio = times[(other, dtype)] / times[("triton", dtype)]
                verdict = "pass" if ratio >= least else "short"
                targets.append(Target(name, goal, f"{ratio:.1f}×", verdict))
            else:
                targets.append(Target(name, goal, "", "not measured"))
    peaks = _peaks(report)
    name = f"Triton fp32 vs the FP32 roofline, {shape}"
    goal = f"within 2× (≥ {100 * ROOFLINE_FRACTION:.0f} % of the roofline)"
    if peaks is not None and ("triton", "fp32") in times:
        work = case_work(CASES[TARGET_CASE], "fp32")
        fraction = roofline_fraction(work, times[("triton", "fp32")], peaks)
        verdict = "pass" if fraction >= ROOFLINE_FRACTION else "short"
        targets.append(Target(name, goal, f"{100 * fraction:.1f} %", verdict))
    else:
        targets.append(Target(name, goal, "", "not measured"))
    checked = [r for r in rows if r["implementation"] == "triton" and "bitwise" in r]
    same = sum(bool(r["bitwise"]) for r in checked)
    verdict = "not measured" if not checked else ("pass" if same == len(checked) else "short")
    measured = f"{same} of {len(checked)} Triton rows bit-identical" if checked else ""
    targets.append(Target("repeated runs", "bitwise identical", measured, verdict))
    return targets


def loader_estimate(
    train_rows: list[dict[str, Any]], data_rows: list[dict[str, Any]]
) -> ResultTable:
    """Loader processes per GPU at the measured steps/s (CE + GCRF) and samples/s per worker."""
    from benchmarks.data import loader_processes

    table = ResultTable(
        "Data loading against the measured training steps",
        ["recipe", "batch", "steps/s (CE + GCRF)", "samples/s needed", "samples/s per worker",
         "loader processes"],
    )  # fmt: skip
    pipeline = {r["case"]: r for r in data_rows}
    for row in train_rows:
        data = pipeline.get(row["recipe"])
        if row["loss"] != "CE + GCRF" or data is None:
            continue
        table.add_row(
            row["recipe"], row["batch"], f"{row['steps_per_s']:.2f}",
            f"{row['batch'] * row['steps_per_s']:.0f}", f"{data['gcrf_samples_per_s']:.0f}",
            loader_processes(row["batch"], row["steps_per_s"], data["gcrf_ms"]),
        )  # fmt: skip
    return table


def _tests_line(name: str, result: dict[str, Any] | None) -> str:
    if result is None:
        return f"- `{name}`: no result"
    line = (f"- `{name}`: {result['passed']} passed, {result['failures'] + result['errors']} "
            f"failed, {result['skipped']} skipped")  # fmt: skip
    if result["failed"]:
        line += " — failed: " + ", ".join(f"`{t}`" for t in result["failed"][:10])
    return line


def render(report: dict[str, Any]) -> str:
    """The Markdown section of ``benchmarks/RESULTS.md`` for a (possibly partial) report."""
    from benchmarks.crf import crf_table
    from benchmarks.loss import loss_table
    from benchmarks.model import Row, step_table
    from benchmarks.selfcheck import selfcheck_table

    info = report["environment"]
    parts = [
        f"Measured by `python -m benchmarks.device` on {info.get('device', 'no GPU')} "
        f"({info.get('memory_gib', '?')} GiB, driver {info.get('driver') or '?'}, CUDA "
        f"{info.get('cuda') or '?'}), torch {info.get('torch')}, Triton {info.get('triton')}, "
        f"{info.get('date')}; {report.get('seconds', 0):.0f} s in all.",
    ]
    targets = ResultTable("Targets", ["target", "goal", "measured", "verdict"], left=4)
    for target in report.get("targets", []):
        targets.add_row(target["name"], target["goal"], target["measured"],
                        f"**{target['verdict']}**")  # fmt: skip
    parts += ["**Targets**", targets.markdown()]
    peaks = _peaks(report)
    if peaks is not None:
        parts.append(
            f"**Roofline measured here**: fp32 matmul {peaks.fp32_flops / 1e12:.1f} TFLOP/s, bf16 "
            f"matmul {peaks.bf16_flops / 1e12:.1f} TFLOP/s, device-to-device copy "
            f"{peaks.copy_bytes_per_s / 1e9:.0f} GB/s (read + write)."
        )
    loss = _result(report, "loss")
    if loss:
        parts += ["**Loss**, forward + backward, r = 5 (fraction: the work model of "
                  "`benchmarks/roofline.py` against the whole call)",
                  loss_table(loss, peaks).markdown()]  # fmt: skip
    crf = _result(report, "crf")
    if crf:
        parts += ["**Mean-field CRF**", crf_table(crf, peaks).markdown()]
    checks = _result(report, "selfcheck")
    if checks:
        parts += ["**Self-check** of `backend=\"auto\"` (`gcrf.loss.verify_triton`)",
                  selfcheck_table(checks).markdown()]  # fmt: skip
    train = _result(report, "train_step")
    if train:
        fields = Row.__dataclass_fields__
        rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in train]
        parts += ["**Training step** per recipe (recipe batch sizes, fp32)",
                  step_table(rows, "").markdown()]  # fmt: skip
        data = _result(report, "data")
        if data:
            parts += ["**Data loading** (samples/s per worker measured on this machine's CPU)",
                      loader_estimate(train, data).markdown()]  # fmt: skip
    parts.append("**Tests**, compiled on the GPU (no interpreter)")
    parts.append(
        "\n".join(_tests_line(n, _result(report, n)) for n in ("cuda_tests", "kernel_tests"))
    )
    steps = ResultTable("Steps", ["step", "budget", "time", "status"], left=1)
    for step in report["steps"]:
        seconds = f"{step['seconds']:.0f} s" if "seconds" in step else ""
        steps.add_row(step["name"], f"{step['budget_s']:.0f} s", seconds, step["status"])
    parts += ["**Steps**", steps.markdown()]
    return "\n\n".join(parts)


def _print_plan(steps: Sequence[Step], work_dir: Path) -> None:
    table = ResultTable("python -m benchmarks.device: the plan", ["step", "what", "command", "budget"],
                        left=3)  # fmt: skip
    for step in steps:
        command = shlex.join(["python", *step.command(work_dir)[1:]])
        table.add_row(step.name, step.what, command, f"{step.budget_s:.0f} s")
    table.notes.append(f"{sum(s.budget_s for s in steps):.0f} s of budgets in all.")
    table.print()


def main(
    dry_run: bool = False,
    steps: list[str] | None = None,
    deadline_s: float = 540.0,
    work_dir: str = "runs/device",
    results: str = str(RESULTS),
    json_path: str = str(JSON_PATH),
    out_dir: str | None = None,
) -> int:
    """Run the plan on this machine's GPU (see the module docstring); return the exit status.

    Args:
        dry_run: print the plan and exit (status 2) without running anything.
        steps: names of the steps to run, in plan order (default: all).
        deadline_s: seconds after which no further step starts.
        work_dir: where the logs and the steps' result files go (relative to the repository).
        results: the Markdown file whose device section is rewritten.
        json_path: the JSON written with it.
        out_dir: also copy the results file, the JSON and the work folder there.
    """
    selected = plan()
    if steps is not None:
        unknown = sorted(set(steps) - set(STEP_NAMES))
        if unknown:
            raise ValueError(f"steps must be among {list(STEP_NAMES)}, got {unknown}")
        selected = [step for step in selected if step.name in steps]
    work = REPOSITORY / work_dir
    _print_plan(selected, work)
    import torch

    if dry_run or not torch.cuda.is_available():
        reason = "--dry_run true" if dry_run else "no CUDA device is visible on this machine"
        print(f"Nothing was run ({reason}): the plan above needs one CUDA GPU.")
        return 2
    report = run_plan(selected, environment(), work, Path(results), Path(json_path), deadline_s)
    print(render(report))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(results, out / Path(results).name)
        shutil.copy(json_path, out / Path(json_path).name)
        shutil.copytree(work, out / "device", dirs_exist_ok=True)
    failed = [
        s for s in report["steps"] if not (s["status"] == "ok" or s["status"].startswith("skipped"))
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(CLI(main))
