"""The notebooks run top to bottom on CPU and are committed without outputs.

Each notebook asserts its own key facts in cells (e.g. the click-propagation IoU), so a notebook that
executes without error has also passed those checks. Executed with nbclient in ``notebooks/`` (the
working directory a user gets from ``jupyter lab notebooks/``), with the Agg matplotlib backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The notebook extras are part of `dev`: a broken import must fail the suite, not skip it.
import ipykernel  # noqa: F401  (the kernel the notebooks run on)
import matplotlib  # noqa: F401
import nbclient
import nbformat
import pytest
import skimage  # noqa: F401

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_notebooks_exist() -> None:
    names = {path.name for path in NOTEBOOKS}
    assert {
        "affinities.ipynb",
        "clicks_to_masks.ipynb",
        "crf_refinement.ipynb",
        "training_results.ipynb",
    } <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{path.name} cell {index} has outputs: strip them"
        assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"


def _execute(path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: Path | None = None) -> Any:
    """Run a notebook top to bottom in a fresh kernel; fail on any cell error."""
    # The kernel inherits this process's environment: a headless backend, CPU only, and no
    # checkpoint from the user's shell unless one is given (training_results.ipynb then trains its
    # own tiny model). One intra-op thread: the notebooks' tensors are small, and on a shared CPU
    # (parallel test workers) OpenMP threads waiting on busy cores make every small op orders of
    # magnitude slower.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if checkpoint is None:
        monkeypatch.delenv("GCRF_CHECKPOINT", raising=False)
    else:
        monkeypatch.setenv("GCRF_CHECKPOINT", str(checkpoint))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} failed:\n{error}")
    # Every code cell ran (no cell silently skipped).
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    return notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _execute(path, monkeypatch)


def test_training_results_loads_a_demo_checkpoint(tmp_path, monkeypatch) -> None:
    """The final weights of a ``recipes.demo`` run (its 64-channel ASPP) load as they are."""
    from recipes import demo

    results = demo.main(
        [
            "--steps=1",
            "--data={train_length: 8, val_length: 2}",
            "--validations=1",
            "--workers=1",
            f"--output_dir={tmp_path}",
        ]
    )
    checkpoint = results[-1].checkpoint
    notebook = _execute(NOTEBOOK_DIR / "training_results.ipynb", monkeypatch, Path(checkpoint))
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert f"loaded {checkpoint}" in printed
