"""One command for a GPU machine: the CUDA tests, the GPU benchmarks and their targets, in one run.

Run from the repository root on a machine with one CUDA GPU (``pip install -e ".[dev]"``)::

    python -m benchmarks.device                          # the whole plan (under 5 minutes)
    python -m benchmarks.device --dry_run true           # print the plan, run nothing
    python -m benchmarks.device --steps [loss,crf]       # some steps only (e.g. to rerun one)
    python -m benchmarks.device --out_dir /some/folder   # also copy what it writes there

**The plan.** Each step is a subprocess (``python -m ...``, with ``TRITON_INTERPRET`` removed from
its environment, so every Triton kernel is compiled for the GPU), run in order, the most important
first; its stdout and stderr are captured in ``<work_dir>/<step>.log`` and what it measured in
``<work_dir>/<step>.json`` (``.xml`` for the tests). A step runs in its own process group and may
take its budget plus whatever the steps before it left unused (never the budgets of the steps after
it). When that time is up the step gets SIGINT (pytest then stops its xdist workers and still writes
its report) and 8 s later its whole group — xdist workers, fresh-process rows, compilers — gets
SIGKILL; the step is recorded as timed out, with whatever result it wrote. A step that fails or
runs out of time is recorded as such and the next one starts. The run ends by ``--deadline_s``: no
step starts later and a step's limit is cut so that it ends by then, its 8 s included (what is left
is recorded as not run). After every step the results section and the JSON are rewritten, so
whatever ran is kept even if a later step fails or the run is killed.

| step | budget | what |
|---|---:|---|
| `kernel_tests` | 70 s | `pytest tests/test_kernels.py tests/test_backend_contract.py tests/test_crf.py tests/test_selfcheck.py -m "not cuda and not slow"` on `min(12, cores − 2)` xdist workers, without the ahead-of-time sm_90 compile (`test_kernels_compile_for_a_gpu_without_one`, pointless with a GPU): the tests of the Triton kernels, compiled on the GPU instead of interpreted |
| `cuda_tests` | 40 s | `pytest -m cuda` over the test files that mark tests `cuda` (:func:`cuda_test_files`), on up to 4 xdist workers |
| `loss` | 55 s | the Gated CRF loss fwd+bwd at the published VOC step (48×21×64²) and the large shape (8×21×512²), r = 5: Triton, torch backend, published unfold; fp32 and bf16; median of 5; peak memory; bitwise repeats, the determinism check (`python -m benchmarks.loss`) |
| `roofline` | 10 s | fp32 / bf16 matmul FLOP/s and device-copy bandwidth on this GPU, for the roofline target (`python -m benchmarks.roofline`) |
| `crf` | 30 s | mean-field CRF refinement, 5 iterations, value and gradient, every case, median of 3: Triton / torch / unfold (`python -m benchmarks.crf`; only where `gcrf.crf` exists) |
| `train_step` | 45 s | one training step of each recipe's default model at its batch size, with and without the Gated CRF term, and the backend that ran the loss (`benchmarks.model` through :func:`train_step`) |
| `data` | 15 s | the data pipeline's samples/s per loader worker (`python -m benchmarks.data`), put against the measured steps/s |
| `selfcheck` | 20 s | the cost of the Triton self-check of `backend="auto"` per dtype and rank, with an empty and with a filled Triton cache (`python -m benchmarks.selfcheck`) |

The budgets add up to 285 s, under the default ``--deadline_s`` of 300 s: the whole run takes
under 5 minutes. The budgets are estimates for one H100 and 16 cores (no GPU had run the plan when
they were set); every step's time is recorded, and what one step leaves goes to the next. Without a
CUDA device the command prints the plan, says so and exits with status 2 (``--dry_run true``: the
same on any machine); it exits with 1 when a step failed or ran out of time, else 0 — short targets
are results, not failures.

The ``data`` step has cases for the voc and cityscapes pipelines only; the loader estimate gives
the other recipes (acdc, synthetic) a row that says they were not measured, as it does for every
recipe when the ``data`` step has no result.

**What it writes.** The section between ``<!-- device-table:start -->`` and
``<!-- device-table:end -->`` of ``benchmarks/RESULTS.md`` (``--results``): the device name, driver,
CUDA, torch and Triton versions and the date; the targets below with pass / short; the measured
roofline; the loss, CRF and training-step tables (with the loss backend per recipe); the loader
estimate; the tests' counts and failures; every step's status and time.
``benchmarks/device_results.json`` (``--json_path``) holds the same, raw: the environment, and per
step its command, status, seconds, budget, time limit and result.

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

import contextlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from unittest import mock

from jsonargparse import CLI

from benchmarks.isolated import REPOSITORY
from benchmarks.tables import RESULTS, ResultTable, update_results

__all__ = [
    "STEP_NAMES",
    "Step",
    "Target",
    "cuda_test_files",
    "environment",
    "evaluate_targets",
    "loader_estimate",
    "main",
    "plan",
    "render",
    "run_plan",
    "train_step",
]

JSON_PATH = RESULTS.with_name("device_results.json")
RESULTS_KEY = "device-table"
#: Seconds by which the run ends: no step starts later (the budgets add up to 285 s).
DEADLINE_S = 300.0
#: Seconds a timed-out step has, after its SIGINT, before its process group gets SIGKILL.
KILL_GRACE_S = 8.0
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
#: Left out of ``kernel_tests``: it compiles for sm_90 with ptxas, without a GPU (slow, and what
#: the GPU's own compilation in every other kernel test covers).
AHEAD_OF_TIME_TEST = "test_kernels_compile_for_a_gpu_without_one"
#: Where a test file marks tests ``cuda`` (a decorator, ``pytestmark``, a parameter's ``marks``):
#: the ``cuda_tests`` step collects these files only.
CUDA_MARK = re.compile(
    r"^\s*(@pytest\.mark\.cuda\b|pytestmark\s*=.*\bpytest\.mark\.cuda\b)"
    r"|\bmarks\s*=.*\bpytest\.mark\.cuda\b",
    re.MULTILINE,
)
#: The ``train_step`` step: :func:`train_step`, its JSON path as the argument.
_TRAIN_STEP = "import sys; from benchmarks.device import train_step; train_step(sys.argv[1])"


@dataclass(frozen=True)
class Step:
    """One step of the plan.

    Attributes:
        name: the step's name (``--steps``, the log and result file names).
        budget_s: its time budget in seconds (see the module docstring for its time limit).
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

    def runnable(self) -> bool:
        """Whether what it needs is importable here."""
        return self.needs is None or importlib.util.find_spec(self.needs) is not None


def cuda_test_files() -> tuple[str, ...]:
    """The test files that mark tests ``cuda`` (:data:`CUDA_MARK`), relative to the repository.

    Collecting only these keeps the ``cuda_tests`` step fast and out of reach of an import problem
    in an unrelated test file (all of ``tests`` where none is found).
    """
    files = sorted((REPOSITORY / "tests").glob("test_*.py"))
    marked = tuple(f"tests/{f.name}" for f in files if CUDA_MARK.search(f.read_text("utf-8")))
    return marked or ("tests",)


def _workers(most: int) -> tuple[str, ...]:
    """pytest-xdist's ``-n``: ``min(most, cores - 2)`` workers, none below two or without xdist."""
    count = min(most, (os.cpu_count() or 1) - 2)
    if count < 2 or importlib.util.find_spec("xdist") is None:
        return ()
    return ("-n", str(count))


def plan() -> list[Step]:
    """The steps, in order (see the module docstring)."""
    pytest = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors")
    return [
        Step("kernel_tests", 70, "the kernel tests, compiled on the GPU (no interpreter)",
             (*pytest, *_workers(12), "-m", "not cuda and not slow", "-k",
              f"not {AHEAD_OF_TIME_TEST}", "--junitxml", "{work}/kernel_tests.xml",
              *KERNEL_TESTS), "kernel_tests.xml"),
        Step("cuda_tests", 40, "pytest -m cuda (the CUDA-only tests)",
             (*pytest, *_workers(4), "-m", "cuda", "--junitxml", "{work}/cuda_tests.xml",
              *cuda_test_files()), "cuda_tests.xml"),
        Step("loss", 55, "loss fwd+bwd: Triton / torch / unfold, voc and 8x512, fp32 and bf16",
             ("-m", "benchmarks.loss", "--device", "cuda", "--cases", "[voc,8x512]",
              "--dtypes", "[fp32,bf16]", "--repeats", "5", "--isolate", "false",
              "--json_path", "{work}/loss.json"), "loss.json"),
        Step("roofline", 10, "matmul FLOP/s (fp32, bf16) and device-copy bandwidth",
             ("-m", "benchmarks.roofline", "--json_path", "{work}/roofline.json"),
             "roofline.json"),
        Step("crf", 30, "mean-field CRF, 5 iterations: Triton / torch / unfold",
             ("-m", "benchmarks.crf", "--device", "cuda", "--implementations",
              "[gcrf_triton,gcrf_torch,unfold]", "--iterations", "[5]", "--repeats", "3",
              "--isolate", "false", "--json_path", "{work}/crf.json"), "crf.json",
             needs="gcrf.crf"),
        Step("train_step", 45, "a training step per recipe, with and without the Gated CRF term",
             ("-c", _TRAIN_STEP, "{work}/train_step.json"), "train_step.json"),
        Step("data", 15, "data pipeline samples/s per loader worker (CPU)",
             ("-m", "benchmarks.data", "--samples", "8", "--files", "3", "--json_path",
              "{work}/data.json"), "data.json"),
        Step("selfcheck", 20, "the Triton self-check of backend='auto', per dtype and rank",
             ("-m", "benchmarks.selfcheck", "--json_path", "{work}/selfcheck.json"),
             "selfcheck.json"),
    ]  # fmt: skip


STEP_NAMES = tuple(step.name for step in plan())


def train_step(
    json_path: str,
    recipes: Sequence[str] | None = None,
    device: str = "cuda",
    batch: int | None = None,
    iterations: int = 5,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """The ``train_step`` step: :func:`benchmarks.model.main` per recipe, with the loss backend.

    Every call of ``gcrf.loss.backends.choose_backend`` is recorded while a recipe is measured, so
    each ``CE + GCRF`` row says which backend ran its Gated CRF term (``backend="auto"`` of the
    recipes: ``triton`` on CUDA unless its self-check failed). The rows are written to ``json_path``
    after every recipe, so a run cut short keeps the recipes done.

    Args:
        json_path: where the rows go (``benchmarks.model``'s fields, ``steps_per_s``,
            ``loss_backend``).
        recipes: names of ``benchmarks.model.RECIPES`` (default: all).
        device: where to run.
        batch: images per step (default: the recipe's batch size on CUDA, 2 on CPU).
        iterations: timed steps per row (median).
        warmup: untimed steps first.
    """
    from benchmarks import model
    from gcrf.loss import backends

    original = backends.choose_backend
    chosen: list[str] = []

    def recording(*args: Any, **kwargs: Any) -> str:
        name = original(*args, **kwargs)
        chosen.append(name)
        return name

    holders = [
        module
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "gcrf" and getattr(module, "choose_backend", None) is original
    ]
    records: list[dict[str, Any]] = []
    with contextlib.ExitStack() as patches:
        for module in holders:
            patches.enter_context(mock.patch.object(module, "choose_backend", recording))
        for recipe in recipes or list(model.RECIPES):
            chosen.clear()
            rows = model.main(recipes=[recipe], batch=batch, iterations=iterations,
                              warmup=warmup, device=device)  # fmt: skip
            used = "/".join(sorted(set(chosen))) or "not called"
            records += [
                {**asdict(row), "steps_per_s": row.steps_per_s,
                 "loss_backend": used if row.loss != "CE" else ""}
                for row in rows
            ]  # fmt: skip
            Path(json_path).write_text(json.dumps(records, indent=1))
    return records


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


def _kill_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _run_step(
    command: list[str], log: Path, env: dict[str, str], timeout: float, grace_s: float
) -> int | None:
    """Run one step in its own process group; its return code, or None when it timed out.

    On time out the step gets SIGINT (pytest then stops its workers and writes its report), and
    ``grace_s`` later its whole group (the step and everything it started) gets SIGKILL; whatever
    is left of the group when the step ends is killed too.
    """
    with log.open("w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPOSITORY, start_new_session=True)  # fmt: skip
        group = process.pid  # start_new_session: the step leads a group of its own
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace_s)
            return None
        finally:
            _kill_group(group, signal.SIGKILL)  # xdist workers, fresh-process rows, compilers
            process.wait()


def run_plan(
    steps: Sequence[Step],
    info: dict[str, Any],
    work_dir: Path,
    results_path: Path = RESULTS,
    json_path: Path = JSON_PATH,
    deadline_s: float = DEADLINE_S,
    grace_s: float = KILL_GRACE_S,
) -> dict[str, Any]:
    """Run the steps in order; after each, rewrite the results section and the JSON.

    A step's time limit is its budget plus what the steps before it left unused: everything left
    before ``deadline_s`` (less ``grace_s``, so that even a step stopped at its limit ends by the
    deadline) except the budgets of the runnable steps after it, and at least its budget where the
    time left allows.

    Args:
        steps: the steps (:func:`plan`, or a subset).
        info: the :func:`environment`, recorded with the results.
        work_dir: where the logs and the steps' result files go.
        results_path: the Markdown file whose device section is rewritten.
        json_path: the JSON written beside it.
        deadline_s: seconds by which the run ends (no step starts later, a step's limit is cut).
        grace_s: seconds between a timed-out step's SIGINT and its process group's SIGKILL.

    Returns:
        The report (what the JSON holds).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    start = time.monotonic()
    report: dict[str, Any] = {"environment": info, "steps": []}
    runnable = [step.runnable() for step in steps]
    for index, step in enumerate(steps):
        record: dict[str, Any] = {"name": step.name, "what": step.what, "budget_s": step.budget_s,
                                  "command": shlex.join(step.command(work_dir))}  # fmt: skip
        left = deadline_s - grace_s - (time.monotonic() - start)
        if not runnable[index]:
            record["status"] = f"skipped: {step.needs} is not in this checkout"
        elif left < 1:
            record["status"] = "not run: out of time"
        else:
            later = sum(s.budget_s for s, ok in zip(steps[index + 1 :], runnable[index + 1 :],
                                                    strict=True) if ok)  # fmt: skip
            timeout = min(left, max(step.budget_s, left - later))
            record["timeout_s"] = round(timeout, 1)
            result = work_dir / step.result if step.result else None
            if result is not None:
                result.unlink(missing_ok=True)  # never report an earlier run's result
            log = work_dir / f"{step.name}.log"
            record["log"] = str(log)
            began = time.monotonic()
            returncode = _run_step(step.command(work_dir), log, env, timeout, grace_s)
            if returncode is None:
                record["status"] = f"timed out after {timeout:.0f} s"
            else:
                record["returncode"] = returncode
                record["status"] = "ok" if returncode == 0 else f"failed ({returncode})"
            record["seconds"] = round(time.monotonic() - began, 1)
            if result is not None and result.exists():  # a timed-out step's partial result too
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
    train_rows: list[dict[str, Any]],
    data_rows: list[dict[str, Any]],
    data_status: str | None = None,
) -> ResultTable:
    """Loader processes per GPU at the measured steps/s (CE + GCRF) and samples/s per worker.

    A recipe whose pipeline was not measured (no case of ``benchmarks.data`` for it, or no result
    of the ``data`` step, whose ``data_status`` is then given) gets a row that says so.
    """
    from benchmarks.data import loader_processes

    table = ResultTable(
        "Data loading against the measured training steps",
        ["recipe", "batch", "steps/s (CE + GCRF)", "samples/s needed", "samples/s per worker",
         "loader processes"],
    )  # fmt: skip
    pipeline = {r["case"]: r for r in data_rows}
    for row in train_rows:
        if row["loss"] != "CE + GCRF":
            continue
        cells = [row["recipe"], row["batch"], f"{row['steps_per_s']:.2f}",
                 f"{row['batch'] * row['steps_per_s']:.0f}"]  # fmt: skip
        data = pipeline.get(row["recipe"])
        if data is not None:
            processes = loader_processes(row["batch"], row["steps_per_s"], data["gcrf_ms"])
            table.add_row(*cells, f"{data['gcrf_samples_per_s']:.0f}", processes)
        elif not data_rows:
            table.add_row(*cells, f"not measured: data step {data_status or 'not run'}", "")
        else:
            table.add_row(*cells, f"not measured: no {row['recipe']} case in benchmarks.data", "")
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
        ran = [f"{r['recipe']} {r['loss_backend']}" for r in train if r.get("loss_backend")]
        if ran:
            parts.append("Backend that ran the Gated CRF term (the recipes' `backend=\"auto\"`): "
                         + ", ".join(ran) + ".")  # fmt: skip
        status = next((s["status"] for s in report["steps"] if s["name"] == "data"), None)
        data = _result(report, "data") or []
        parts += ["**Data loading** (samples/s per worker measured on this machine's CPU)",
                  loader_estimate(train, data, status).markdown()]  # fmt: skip
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


def _print_plan(steps: Sequence[Step], work_dir: Path, deadline_s: float) -> None:
    table = ResultTable("python -m benchmarks.device: the plan", ["step", "what", "command", "budget"],
                        left=3)  # fmt: skip
    for step in steps:
        command = shlex.join(["python", *step.command(work_dir)[1:]])
        table.add_row(step.name, step.what, command, f"{step.budget_s:.0f} s")
    table.notes.append(f"{sum(s.budget_s for s in steps):.0f} s of budgets in all; no step starts "
                       f"after {deadline_s:.0f} s.")  # fmt: skip
    table.print()


def main(
    dry_run: bool = False,
    steps: list[str] | None = None,
    deadline_s: float = DEADLINE_S,
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
    _print_plan(selected, work, deadline_s)
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
