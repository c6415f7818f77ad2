"""Tests of the benchmarks' machinery (never of their timings): the device plan and its reports, the
roofline arithmetic, the pass / short logic, the fresh-process measurement, and the unfold mean-field
CRF against a naive float64 loop written here (and against ``gcrf.crf`` where it exists)."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import crf, device, loss
from benchmarks.isolated import REPOSITORY, PeakMemory, run_in_fresh_process
from benchmarks.roofline import Peaks, Work, mean_field_work, pairwise_sum_work, roofline_fraction
from benchmarks.tables import ResultTable, update_results
from benchmarks.unfold_reference import unfold_mean_field_crf

# --------------------------------------------------------------------------------------------------
# Work model and roofline
# --------------------------------------------------------------------------------------------------


def test_pairwise_work_matches_a_hand_count():
    # 1×2×3×4 probabilities, r = 1 (9 offsets), 3 features, 1 kernel, mask_src, with the gradient.
    # Per (pixel, offset): Gaussian 3·3 + 4·1 = 13; gates 1 (G_ij) + 1 (G_ji) + 1 (their sum) = 3;
    # message 2·2 = 4; Potts weight sum 1: 21. 12 pixels × 9 offsets × 21 = 2268, plus ⟨y, M⟩
    # 2·2 per pixel = 48: 2316 FLOPs. Bytes per pixel: probs 2·4 in, gradient 2·4 out, features
    # 3·4, mask 4: 32; 12 pixels: 384.
    work = pairwise_sum_work(1, 2, (3, 4), 1, num_features=3, num_kernels=1, gates=1, grad=True)
    assert (work.flops, work.bytes) == (2316, 384)
    # Value only, no gate, bf16, 3D (27 offsets): per pair 13 + 0 + 4 + 1 = 18; 2·2·2 voxels.
    work = pairwise_sum_work(1, 2, (2, 2, 2), 1, 3, 1, gates=0, grad=False, probs_bytes=2)
    assert (work.flops, work.bytes) == (8 * 27 * 18 + 8 * 4, 8 * (2 * 2 + 3 * 4))
    # μ̂ with the gradient: two fields (4C), no Potts sum, no gate add: 13 + 2·0 + 8 = 21.
    work = pairwise_sum_work(1, 2, (3, 4), 1, 3, 1, gates=0, grad=True, compat=True)
    assert work.flops == 12 * 9 * 21 + 12 * 4


def test_mean_field_work_matches_a_hand_count():
    # 1×3×2×3 logits, r = 1, 1 feature, 2 kernels, 2 iterations, no gate. Per pair: Gaussian
    # 3 + 8 = 11, message 2·3 = 6: 17; per pixel and iteration 9·17, μM 2·3² = 18 (Potts: 2·3 = 6),
    # 5·3 = 15: 186 (174); 6 pixels, 2 iterations: 2232 (2088). Bytes per pixel and iteration:
    # U, Q in and Ũ out (3·3·4), the feature 4: 40.
    work = mean_field_work(
        1, 3, (2, 3), 1, num_features=1, num_kernels=2, iterations=2, compat=True
    )
    assert (work.flops, work.bytes) == (2232, 2 * 6 * 40)
    assert mean_field_work(1, 3, (2, 3), 1, 1, 2, iterations=2).flops == 2088


def test_roofline_fraction_takes_the_slower_bound():
    peaks = Peaks(fp32_flops=1e12, bf16_flops=4e12, copy_bytes_per_s=1e11)
    compute_bound = Work(flops=2e9, bytes=1e8)  # 2 ms of compute, 1 ms of traffic
    assert roofline_fraction(compute_bound, 4e-3, peaks) == pytest.approx(0.5)
    memory_bound = Work(flops=1e8, bytes=3e8)  # 0.1 ms of compute, 3 ms of traffic
    assert roofline_fraction(memory_bound, 6e-3, peaks) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------
# Targets, reports, the plan
# --------------------------------------------------------------------------------------------------


def loss_row(implementation, dtype, seconds, bitwise=True, case="8x512"):
    label = loss.IMPLEMENTATIONS[implementation].label
    row = {"case": case, "dtype": dtype, "implementation": implementation, "label": label,
           "baseline": implementation == "unfold", "time_s": seconds, "peak_bytes": 2**30,
           "loss": 1.0}  # fmt: skip
    if implementation == "triton":
        row["bitwise"] = bitwise
    return row


PEAKS = {"fp32_flops": 50e12, "bf16_flops": 900e12, "copy_bytes_per_s": 4e12}


def fake_report(loss_rows, peaks=PEAKS):
    steps = [{"name": "roofline", "budget_s": 30, "status": "ok", "seconds": 3, "result": peaks},
             {"name": "loss", "budget_s": 150, "status": "ok", "seconds": 90, "result": loss_rows}]  # fmt: skip
    return {"environment": {"device": "Fake GPU"}, "steps": steps}


def test_targets_pass_and_short():
    work = loss.case_work(loss.CASES["8x512"], "fp32")
    roofline_s = max(work.flops / PEAKS["fp32_flops"], work.bytes / PEAKS["copy_bytes_per_s"])
    triton_fp32 = roofline_s / 0.6  # 60 % of the roofline: within 2×
    rows = [loss_row("triton", "fp32", triton_fp32), loss_row("torch", "fp32", 3 * triton_fp32),
            loss_row("unfold", "fp32", 31 * triton_fp32),
            loss_row("triton", "bf16", 1.0, bitwise=False), loss_row("torch", "bf16", 2.9),
            loss_row("unfold", "bf16", 29.0)]  # fmt: skip
    targets = {t.name: t for t in device.evaluate_targets(fake_report(rows))}
    verdicts = {name: t.verdict for name, t in targets.items()}
    shape = "8×512×512, C=21, r=5"
    assert verdicts == {
        f"Triton vs published unfold, {shape}, fp32": "pass",
        f"Triton vs torch backend, {shape}, fp32": "pass",
        f"Triton vs published unfold, {shape}, bf16": "short",
        f"Triton vs torch backend, {shape}, bf16": "short",
        f"Triton fp32 vs the FP32 roofline, {shape}": "pass",
        "repeated runs": "short",
    }
    assert targets[f"Triton vs published unfold, {shape}, fp32"].measured == "31.0×"
    assert targets[f"Triton fp32 vs the FP32 roofline, {shape}"].measured == "60.0 %"
    assert targets["repeated runs"].measured == "1 of 2 Triton rows bit-identical"
    # At 40 % of the roofline the fp32 target is short; without rows everything is unmeasured.
    rows[0] = loss_row("triton", "fp32", roofline_s / 0.4)
    targets = {t.name: t.verdict for t in device.evaluate_targets(fake_report(rows))}
    assert targets[f"Triton fp32 vs the FP32 roofline, {shape}"] == "short"
    empty = device.evaluate_targets({"environment": {}, "steps": []})
    assert {t.verdict for t in empty} == {"not measured"}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0"
failures="1" skipped="1" tests="5"><testcase classname="tests.test_kernels" name="test_a"/>
<testcase classname="tests.test_kernels" name="test_b"><failure message="boom"/></testcase>
</testsuite></testsuites>"""


def test_render_on_fake_results(tmp_path):
    (tmp_path / "cuda_tests.xml").write_text(JUNIT)
    report = fake_report([loss_row("triton", "fp32", 0.01), loss_row("unfold", "fp32", 0.5)])
    report["steps"] += [
        {"name": "cuda_tests", "budget_s": 60, "status": "failed (1)", "seconds": 20,
         "result": device._read_result(tmp_path / "cuda_tests.xml")},
        {"name": "train_step", "budget_s": 60, "status": "ok", "seconds": 30, "result": [
            {"recipe": "voc", "model": "deeplabv3p resnet34", "loss": "CE", "batch": 48,
             "size": 256, "ms_per_step": 100.0, "images_per_s": 480.0, "peak_bytes": 2**31,
             "steps_per_s": 10.0},
            {"recipe": "voc", "model": "deeplabv3p resnet34", "loss": "CE + GCRF", "batch": 48,
             "size": 256, "ms_per_step": 125.0, "images_per_s": 384.0, "peak_bytes": 2**31,
             "steps_per_s": 8.0, "loss_backend": "triton"},
            {"recipe": "acdc", "model": "unet resnet34", "loss": "CE + GCRF", "batch": 12,
             "size": 256, "ms_per_step": 50.0, "images_per_s": 240.0, "peak_bytes": 2**30,
             "steps_per_s": 20.0, "loss_backend": "torch"}]},
        {"name": "data", "budget_s": 45, "status": "ok", "seconds": 10, "result": [
            {"case": "voc", "batch_size": 48, "gcrf_ms": 10.0, "gcrf_samples_per_s": 100.0}]},
        {"name": "crf", "budget_s": 60, "status": "timed out after 60 s", "seconds": 60},
        {"name": "selfcheck", "budget_s": 30, "status": "ok", "seconds": 9, "result": [
            {"dtype": "float32", "rank": 2, "cold": {"ok": True, "seconds": 3.25, "case": "",
             "error": ""}, "warm": {"ok": True, "seconds": 0.04, "case": "", "error": ""}},
            {"dtype": "bfloat16", "rank": 2, "cold": {"ok": False, "seconds": 2.0,
             "case": "message, source gate", "error": "the value differs"},
             "warm": {"ok": True, "seconds": 0.05, "case": "", "error": ""}}]},
    ]  # fmt: skip
    report["targets"] = [vars(t) for t in device.evaluate_targets(report)]
    text = device.render(report)
    assert "Fake GPU" in text
    # Loss: 0.5 s / 0.01 s; the loader: 48 images × 8 steps/s = 384 samples/s at 100 per worker.
    assert "| 8×512×512, C=21 | fp32 | gcrf triton | 10.0 ms | 1024 MiB | 50.0× |" in text
    assert "| voc | 48 | 8.00 | 384 | 100 | 4 |" in text
    assert "| acdc | 12 | 20.00 | 240 | not measured: no acdc case in benchmarks.data |  |" in text
    assert 'Gated CRF term (the recipes\' `backend="auto"`): voc triton, acdc torch.' in text
    assert (
        "| voc | deeplabv3p resnet34 | CE + GCRF | 48 | 256² | 125 | 8.00 | 384.0 | +25.0 % |"
        in text
    )
    assert (
        "`cuda_tests`: 3 passed, 1 failed, 1 skipped — failed: `tests.test_kernels::test_b`" in text
    )
    assert "| crf | 60 s | 60 s | timed out after 60 s |" in text
    assert "| float32 | 2 | pass | 3.25 s | 0.04 s |" in text
    assert (
        "| bfloat16 | 2 | FAILED: message, source gate the value differs | 2.00 s | 0.05 s |"
        in text
    )
    assert (
        "| Triton vs published unfold, 8×512×512, C=21, r=5, fp32 | ≥ 30× faster | 50.0× | **pass** |"
        in text
    )


def _python(code: str) -> tuple[str, ...]:
    return ("-c", code)


@pytest.fixture
def rendered_once():
    """Import what rendering a report needs (lightning, among others) before a plan's clock starts:
    the first render of a process would otherwise eat seconds of the short deadlines below."""
    device.render(fake_report([]))


def test_run_plan_keeps_partial_results(tmp_path, rendered_once):
    rows = [loss_row("triton", "fp32", 0.01), loss_row("unfold", "fp32", 0.5)]
    write_rows = f"import json; json.dump({rows!r}, open('{{work}}/loss.json', 'w'))"
    steps = [
        device.Step("loss", 20, "writes fake rows", _python(write_rows), "loss.json"),
        device.Step("roofline", 20, "fails", _python("import sys; print('oops'); sys.exit(3)")),
        device.Step("cuda_tests", 20, "absent module", _python(""), needs="no_such_module_x"),
        device.Step("data", 4.5, "runs past its budget", _python("import time; time.sleep(60)")),
        device.Step("crf", 20, "after the deadline", _python("")),
    ]
    results, json_path = tmp_path / "RESULTS.md", tmp_path / "device.json"
    results.write_text("# Benchmark results\n\nkept text\n")
    report = device.run_plan(steps, {"device": "Fake GPU"}, tmp_path / "work", results,
                             json_path, deadline_s=5.0, grace_s=0.5)  # fmt: skip
    statuses = [step["status"] for step in report["steps"]]
    assert statuses[0] == "ok" and statuses[1] == "failed (3)"
    assert statuses[2] == "skipped: no_such_module_x is not in this checkout"
    assert statuses[3].startswith("timed out after")
    assert statuses[4] == "not run: out of time"
    assert "oops" in (tmp_path / "work" / "roofline.log").read_text()  # output captured
    saved = json.loads(json_path.read_text())
    assert saved["steps"][0]["result"] == rows
    text = results.read_text()
    assert "kept text" in text and text.count("<!-- device-table:start -->") == 1
    assert "| loss | 20 s |" in text and "50.0×" in text  # the first step's rows were kept


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its parent does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_timed_out_step_takes_everything_it_started_with_it(tmp_path, rendered_once):
    # The step starts a grandchild that sleeps (as xdist workers or fresh-process rows would),
    # then sleeps itself past its budget: both must be gone once the step is recorded.
    sleeper = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"
    grandchild = (
        f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {sleeper!r}]); "
        "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(120)"
    )
    steps = [device.Step("data", 3, "starts a grandchild", ("-c", grandchild, "{work}/pid"))]
    began = time.monotonic()
    report = device.run_plan(steps, {"device": "Fake GPU"}, tmp_path / "work",
                             tmp_path / "RESULTS.md", tmp_path / "device.json", deadline_s=4,
                             grace_s=1)  # fmt: skip
    assert report["steps"][0]["status"].startswith("timed out after")
    # SIGINT to the step, SIGKILL to its group (the grandchild ignores SIGINT) a second later.
    assert time.monotonic() - began < 4 + 10
    pid = int((tmp_path / "work" / "pid").read_text())
    for _ in range(50):  # the orphan is reaped by init shortly after its death
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid)


def test_slack_of_earlier_steps_goes_to_later_ones(tmp_path, rendered_once):
    steps = [device.Step("loss", 20, "quick", _python("")),
             device.Step("crf", 5, "absent module", _python(""), needs="no_such_module_x"),
             device.Step("data", 5, "quick too", _python(""))]  # fmt: skip
    report = device.run_plan(steps, {"device": "Fake GPU"}, tmp_path / "work",
                             tmp_path / "RESULTS.md", tmp_path / "device.json", deadline_s=41,
                             grace_s=1)  # fmt: skip
    first, skipped, last = report["steps"]
    # The first may use all but the budget of the last runnable step (and the grace period); the
    # last, what is left.
    assert 30 < first["timeout_s"] <= 35 and "timeout_s" not in skipped
    assert 5 < last["timeout_s"] <= 40 and last["status"] == "ok"


def test_update_results_replaces_only_its_block(tmp_path):
    path = tmp_path / "RESULTS.md"
    update_results("a", "first", "A", path)
    update_results("b", "other", "B", path)
    update_results("a", "second", "A", path)
    text = path.read_text()
    assert "first" not in text and "second" in text and "other" in text
    assert text.count("## A") == 1
    table = ResultTable("t", ["name", "value"])
    table.add_row("x", 1)
    assert table.markdown() == "| name | value |\n|---|---:|\n| x | 1 |"
    with pytest.raises(ValueError, match="needs 2 cells"):
        table.add_row("only one")


def _without_cuda() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize("args", [[], ["--dry_run", "true"], ["--steps", "[loss,crf]"]])
def test_without_a_gpu_it_prints_the_plan_and_exits_non_zero(args):
    done = subprocess.run([sys.executable, "-m", "benchmarks.device", *args], capture_output=True,
                          text=True, env=_without_cuda(), cwd=REPOSITORY, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    names = ["loss", "crf"] if "--steps" in args else list(device.STEP_NAMES)
    for name in device.STEP_NAMES:
        assert (f"│ {name} " in done.stdout) == (name in names)
    assert "Nothing was run" in done.stdout
    assert ("--dry_run true" if args[:1] == ["--dry_run"] else "no CUDA device") in done.stdout


def test_plan_commands_are_accepted_by_their_programs():
    """Every benchmark step's arguments parse (jsonargparse --print_config runs nothing)."""
    work = REPOSITORY / "runs" / "device-test"
    commands = [[*step.command(work), "--print_config"] for step in device.plan()
                if step.args[1].startswith("benchmarks.")]  # fmt: skip
    assert len(commands) == 5
    runs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_without_cuda(), cwd=REPOSITORY) for c in commands]  # fmt: skip
    for command, run in zip(commands, runs, strict=True):
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"{command}: {err[-2000:]}"
    budgets = sum(step.budget_s for step in device.plan())
    # Under 5 minutes (the deadline), with room to start Python and write the results.
    assert device.DEADLINE_S == 300 and budgets <= device.DEADLINE_S - 15


def test_the_test_steps_collect_the_right_files():
    steps = {step.name: step for step in device.plan()}
    cuda_files = [a for a in steps["cuda_tests"].args if a.startswith("tests")]
    assert cuda_files == list(device.cuda_test_files())
    # The files with CUDA tests, not those that merely name the marker (as this one does).
    assert "tests/test_kernels.py" in cuda_files and "tests/test_benchmarks.py" not in cuda_files
    kernel = steps["kernel_tests"].args
    assert [a for a in kernel if a.startswith("tests")] == list(device.KERNEL_TESTS)
    # The ahead-of-time compile is left out, and it is a test that exists.
    assert kernel[kernel.index("-k") + 1] == f"not {device.AHEAD_OF_TIME_TEST}"
    assert f"def {device.AHEAD_OF_TIME_TEST}(" in (REPOSITORY / "tests/test_kernels.py").read_text()
    order = [step.name for step in device.plan()]
    assert order[:3] == ["kernel_tests", "cuda_tests", "loss"]  # the most important first


def test_train_step_records_the_backend_that_ran_the_loss(tmp_path, monkeypatch):
    from benchmarks import model

    def fake_main(recipes, batch, iterations, warmup, device):
        import gcrf.loss

        rows = [model.Row(recipes[0], "net", "CE", 2, 64, 10.0, 200.0, None)]
        gcrf.loss.choose_backend("auto", torch.rand(1, 2, 4, 4), 2)  # what the GCRF term does
        return [*rows, model.Row(recipes[0], "net", "CE + GCRF", 2, 64, 20.0, 100.0, None)]

    monkeypatch.setattr(model, "main", fake_main)
    path = tmp_path / "train_step.json"
    records = device.train_step(str(path), recipes=["voc", "acdc"], device="cpu")
    assert json.loads(path.read_text()) == records
    assert [(r["recipe"], r["loss"], r["loss_backend"]) for r in records] == [
        ("voc", "CE", ""), ("voc", "CE + GCRF", "torch"),
        ("acdc", "CE", ""), ("acdc", "CE + GCRF", "torch"),
    ]  # fmt: skip
    assert records[1]["steps_per_s"] == 50.0
    import gcrf.loss
    from gcrf.loss import backends

    assert gcrf.loss.choose_backend is backends.choose_backend  # the recorder is gone


def test_results_md_lists_the_plan():
    text = (REPOSITORY / "benchmarks" / "RESULTS.md").read_text()
    section = text[text.index("## GPU: `python -m benchmarks.device`") :]
    section = section[: section.index("<!-- device-table:start -->")]
    listed = re.findall(r"^\| `(\w+)` \| (\d+) s \|", section, re.MULTILINE)
    assert listed == [(step.name, f"{step.budget_s:.0f}") for step in device.plan()]
    total = sum(step.budget_s for step in device.plan())
    assert f"{total:.0f} s" in section


def test_the_docstring_states_the_plan():
    documented = re.findall(r"^\| `(\w+)` \| (\d+) s \|", device.__doc__, re.MULTILINE)
    assert documented == [(step.name, f"{step.budget_s:.0f}") for step in device.plan()]
    total = sum(step.budget_s for step in device.plan())
    assert f"The budgets add up to {total:.0f} s" in device.__doc__


# --------------------------------------------------------------------------------------------------
# Fresh-process measurement and the CPU goals of the CRF benchmark
# --------------------------------------------------------------------------------------------------


def allocate(megabytes: int) -> dict:
    """Run in a fresh process by the test below: the peak of one allocation."""
    memory = PeakMemory("cpu")
    memory.start()
    block = torch.ones(megabytes * 2**18)  # float32: 4 bytes each, touched
    del block
    return {"peak_bytes": memory.peak_bytes()}


def test_fresh_process_measures_the_peak_and_reports_failures():
    result = run_in_fresh_process("tests.test_benchmarks:allocate", {"megabytes": 200})
    assert 190 * 2**20 <= result["peak_bytes"] <= 260 * 2**20
    failed = run_in_fresh_process("tests.test_benchmarks:allocate", {"megabytes": "x"})
    assert failed["skipped"].startswith("failed: TypeError")


def crf_row(implementation, seconds, peak, grad=False, case="voc_stride1"):
    return {"case": case, "iterations": 5, "grad": grad, "implementation": implementation,
            "label": implementation, "time_s": seconds, "peak_bytes": peak}  # fmt: skip


def test_crf_goals():
    rows = [crf_row("unfold", 10.0, 1000), crf_row("gcrf_torch", 10.0, 100),  # equal speed, 1/10
            crf_row("unfold", 10.0, 1000, grad=True), crf_row("gcrf_torch", 10.0, 100, grad=True),
            crf_row("unfold", 1.0, 1000, case="acdc"), crf_row("gcrf_torch", 0.5, 101, case="acdc"),
            crf_row("pydensecrf", 2.5, 10)]  # fmt: skip
    goals = {what: verdict for what, _, verdict in crf.crf_goals(rows)}
    assert goals == {
        "VOC 500×375, stride 1, C=21, r=5, T=5": "pass",
        "VOC 500×375, stride 1, C=21, r=5, T=5, grad": "short",  # must be faster with a gradient
        "ACDC 10×256×216, C=4, r=2 (3D), T=5": "short",  # 1/9.9 of the memory
    }
    table = crf.crf_table(rows).markdown()
    assert (
        "| VOC 500×375, stride 1, C=21, r=5 | 5 | no | gcrf_torch | 10 s | 0 MiB | 1.00× | 1/10 | 4.0× |"
        in table
    )


# --------------------------------------------------------------------------------------------------
# The unfold mean-field CRF against a naive float64 loop
# --------------------------------------------------------------------------------------------------


def naive_mean_field(logits, features, kernels, radius, iterations, compat, mask_src, mask_dst,
                     scale):  # fmt: skip
    """Per pixel and window offset, float64. ``features[m]`` at the logits' size; ``scale`` the
    per-axis factor of a position offset (1, or spacing × input ratio)."""
    n, c, *size = logits.shape
    pixels = list(itertools.product(*[range(s) for s in size]))
    mu = 1 - torch.eye(c, dtype=torch.float64) if compat is None else compat
    refined = logits.clone()
    q = torch.softmax(logits, 1)
    for _ in range(iterations):
        message = torch.zeros_like(logits)
        for b, i in itertools.product(range(n), pixels):
            for j in pixels:
                delta = [a - b_ for a, b_ in zip(j, i, strict=True)]
                if j == i or max(map(abs, delta)) > radius:
                    continue
                k = 0.0
                for desc in kernels:
                    dist = 0.0
                    for name, sigma in desc.items():
                        if name in ("xy", "xyz"):
                            dist += sum(
                                (d * s / sigma) ** 2 for d, s in zip(delta, scale, strict=True)
                            )
                        elif name != "weight":
                            f = features[name][b]
                            dist += (
                                float(((f[(slice(None), *i)] - f[(slice(None), *j)]) ** 2).sum())
                                / sigma**2
                            )
                    k += desc["weight"] * math.exp(-0.5 * dist)
                gate = float(mask_dst[b, 0][i] * mask_src[b, 0][j])
                message[(b, slice(None), *i)] += gate * k * q[(b, slice(None), *j)]
        refined = logits - torch.einsum("lk,nk...->nl...", mu, message)
        q = torch.softmax(refined, 1)
    return refined


def _binary(shape, generator):
    return (torch.rand(shape, generator=generator, dtype=torch.float64) > 0.25).double()


def test_unfold_mean_field_matches_the_naive_loop_in_2d():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    rgb = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    kernels = [{"weight": 1.5, "xy": 2.0, "rgb": 0.5}, {"weight": 0.5, "xy": 1.0}]
    mask_src, mask_dst = _binary((2, 1, 4, 5), g), _binary((2, 1, 4, 5), g)
    compat = torch.rand(3, 3, generator=g, dtype=torch.float64)
    for radius, mu, masks in ((1, None, (None, None)), (2, compat, (mask_src, mask_dst))):
        ones = torch.ones(2, 1, 4, 5, dtype=torch.float64)
        expected = naive_mean_field(logits, {"rgb": rgb}, kernels, radius, 3, mu,
                                    masks[0] if masks[0] is not None else ones,
                                    masks[1] if masks[1] is not None else ones, (1, 1))  # fmt: skip
        refined = unfold_mean_field_crf(logits, {"rgb": rgb}, kernels, radius, 3, mu, *masks)
        torch.testing.assert_close(refined, expected, rtol=1e-10, atol=1e-10)


def test_unfold_mean_field_matches_the_naive_loop_in_3d_with_spacing_and_resizing():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2, 3, 4, 3, generator=g, dtype=torch.float64)
    image = torch.rand(1, 1, 3, 8, 6, generator=g, dtype=torch.float64)  # 2× in h and w
    mask = torch.ones(1, 1, 3, 8, 6, dtype=torch.float64)
    mask[..., :2, :] = 0.0  # the first logits row is partly masked: < 1 after the area resize
    mask[..., 0, 0, 0] = float("nan")
    kernels = [{"weight": 1.0, "xyz": 3.0, "rgb": 0.3}]
    spacing = (2.0, 0.5, 0.5)
    resized = {"rgb": F.adaptive_avg_pool3d(image, (3, 4, 3))}
    gate = F.adaptive_avg_pool3d(torch.nan_to_num(mask), (3, 4, 3))
    gate = torch.where(gate < 1, 0.0, gate)
    ones = torch.ones_like(gate)
    expected = naive_mean_field(logits, resized, kernels, 1, 2, None, gate, ones, (2.0, 1.0, 1.0))
    refined = unfold_mean_field_crf(logits, {"rgb": image}, kernels, 1, 2, mask_src=mask,
                                    spacing=spacing)  # fmt: skip
    torch.testing.assert_close(refined, expected, rtol=1e-10, atol=1e-10)
    assert torch.isnan(mask[..., 0, 0, 0])  # the input is not modified


def test_unfold_mean_field_matches_gcrf_crf():
    """The reference against the library in float64: a test of both."""
    gcrf_crf = pytest.importorskip("gcrf.crf")
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, 7, generator=g, dtype=torch.float64)
    rgb = torch.rand(2, 3, 12, 14, generator=g, dtype=torch.float64)
    mask_src, mask_dst = _binary((2, 1, 12, 14), g), _binary((2, 1, 12, 14), g)
    kernels = [{"weight": 1.0, "xy": 3.0, "rgb": 0.2}, {"weight": 0.3, "xy": 1.0}]
    compat = torch.rand(4, 4, generator=g, dtype=torch.float64)
    for mu, masks in ((None, (None, None)), (compat, (mask_src, mask_dst))):
        ours = unfold_mean_field_crf(logits, {"rgb": rgb}, kernels, 2, 4, mu, *masks)
        theirs = gcrf_crf.mean_field_crf(logits, {"rgb": rgb}, kernels, 2, iterations=4,
                                         compatibility=mu, mask_src=masks[0], mask_dst=masks[1],
                                         backend="torch")  # fmt: skip
        torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-10)
    volume = torch.randn(1, 3, 3, 5, 4, generator=g, dtype=torch.float64)
    image = torch.rand(1, 1, 3, 5, 4, generator=g, dtype=torch.float64)
    kernels = [{"weight": 1.0, "xyz": 2.0, "rgb": 0.3}]
    ours = unfold_mean_field_crf(volume, {"rgb": image}, kernels, 1, 3, spacing=(3.0, 1.0, 1.0))
    theirs = gcrf_crf.mean_field_crf(volume, {"rgb": image}, kernels, 1, iterations=3,
                                     spacing=(3.0, 1.0, 1.0), backend="torch")  # fmt: skip
    torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# The benchmarks' command lines on CPU (slow: a few seconds each)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_benchmark_rows_agree_with_the_published_value(tmp_path):
    path = tmp_path / "rows.json"
    rows = loss.main(backends=["unfold", "torch"], cases=["8x64"], repeats=1, json_path=str(path))
    assert json.loads(path.read_text()) == rows
    unfold, torch_row = rows
    # With mask_src the published formulation and gcrf agree (README); gcrf needs less memory.
    assert torch_row["loss"] == pytest.approx(unfold["loss"], rel=1e-5)
    assert torch_row["peak_bytes"] < unfold["peak_bytes"]


@pytest.mark.slow
def test_train_step_of_the_device_plan_on_cpu(tmp_path):
    path = tmp_path / "train_step.json"
    records = device.train_step(str(path), recipes=["synthetic"], device="cpu", batch=1,
                                iterations=1, warmup=0)  # fmt: skip
    assert [(r["loss"], r["loss_backend"]) for r in records] == [("CE", ""), ("CE + GCRF", "torch")]
    assert json.loads(path.read_text()) == records


@pytest.mark.slow
def test_crf_benchmark_runs_rows_in_fresh_processes(tmp_path):
    rows = crf.main(cases=["voc_stride4"], implementations=["unfold", "gcrf_triton"],
                    iterations=[1], grad=[False, True], json_path=str(tmp_path / "crf.json"))  # fmt: skip
    measured = [r for r in rows if "time_s" in r]
    assert [(r["implementation"], r["grad"]) for r in measured] == [
        ("unfold", False),
        ("unfold", True),
    ]
    assert all(r["peak_bytes"] > 0 for r in measured)
    assert all("unavailable" in r for r in rows if r["implementation"] == "gcrf_triton")


def test_crf_quality_grid_and_table():
    from benchmarks.crf_quality import (
        PYDENSECRF_GRID,
        PydensecrfSetting,
        pydensecrf_grid_for_gcrf,
        quality_table,
    )
    from gcrf.crf import window_mass
    from recipes.acdc_compare import RefinementGrid

    # As many pydensecrf2 settings as each gcrf grid; the prototype among them.
    converted = pydensecrf_grid_for_gcrf("mr")
    assert len(PYDENSECRF_GRID) == len(RefinementGrid().settings()) == len(converted)
    assert PydensecrfSetting(1.0, 3.0, 5.0, 5.0, 3.0) in PYDENSECRF_GRID
    # Setting for setting: the same σ's, compat over the Gaussian's mass in the window.
    for theirs, ours in zip(PYDENSECRF_GRID, converted, strict=True):
        gaussian, bilateral = ours.kernels
        assert gaussian["xy"] == theirs.gaussian_sxy and bilateral["xy"] == theirs.bilateral_sxy
        assert bilateral["mr"] == pytest.approx(theirs.bilateral_srgb / 255)
        mass = window_mass(theirs.bilateral_sxy, ours.radius)
        assert bilateral["weight"] == pytest.approx(theirs.bilateral_compat / mass)
    rows = [
        {"run": "pce", "crf": "none", "setting": "", "dice": 0.464, "dice_std": 0.1,
         "dice_per_class": [0.3, 0.5, 0.6], "hd95": 85.5},
        {"run": "pce", "crf": "gcrf", "setting": "w 0.5", "dice": 0.495, "dice_std": 0.1,
         "dice_per_class": [0.3, 0.5, 0.7], "hd95": 68.9},
    ]  # fmt: skip
    rows.append(
        {**rows[1], "crf": "converted", "setting": "{'weight': 0.06200380582484522, 'xy': 3.0}"}
    )
    text = quality_table(rows, ["rv", "myo", "lv"]).markdown()
    assert "| pce | gcrf | 0.495 ± 0.100 | 0.300 | 0.500 | 0.700 | 68.9 | +0.031 | w 0.5 |" in text
    assert "{'weight': 0.062, 'xy': 3.0} |" in text  # long converted weights shortened


def test_pydensecrf_refinement_cleans_a_noisy_slice():
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (a peer, not a dependency)")
    from benchmarks.crf_quality import PydensecrfSetting, pydensecrf_refinement

    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 10:22, 8:24] = 1
    image = (0.2 + 0.6 * labels.float())[:, None]
    noise = torch.randn(2, 2, 32, 32, generator=g)
    logits = 2 * torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float() + 1.5 * noise
    refined = pydensecrf_refinement(logits, image, PydensecrfSetting(1.0, 3.0, 5.0, 5.0, 3.0))
    assert refined.shape == logits.shape
    raw = (logits.argmax(1) == labels).float().mean()
    assert (refined.argmax(1) == labels).float().mean() > raw + 0.1
