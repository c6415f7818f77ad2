"""The documentation says what the code does: the README's example runs, and every reference to a
section of the specification (``docs/math.md#<anchor>``) in code, docs and notebooks exists."""

from __future__ import annotations

import re
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
SPEC = REPOSITORY / "docs" / "math.md"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_readme_loss_example_runs_and_gives_a_gradient():
    blocks = _python_blocks(REPOSITORY / "README.md")
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    loss, logits = namespace["loss"], namespace["logits"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert (
        logits.grad is not None
        and torch.isfinite(logits.grad).all()
        and logits.grad.abs().sum() > 0
    )


def test_every_reference_to_the_specification_resolves():
    anchors = set(re.findall(r"\{#([a-z0-9-]+)\}", SPEC.read_text()))
    assert {"kernel", "gates", "loss", "message", "mean-field"} <= anchors
    sources = [
        path
        for folder in ("gcrf", "kernels", "recipes", "benchmarks", "tests", "docs", "notebooks")
        for path in (REPOSITORY / folder).rglob("*")
        if path.suffix in {".py", ".md", ".ipynb"}
    ] + [REPOSITORY / "README.md"]
    referenced = {}
    for path in sources:
        for anchor in re.findall(r"math\.md#([A-Za-z0-9_-]+)", path.read_text()):
            referenced.setdefault(anchor, path.relative_to(REPOSITORY))
    assert referenced, "no reference to docs/math.md found"
    broken = {anchor: str(path) for anchor, path in referenced.items() if anchor not in anchors}
    assert not broken, f"references to missing sections of docs/math.md: {broken}"


def test_no_reference_to_a_document_outside_the_repository():
    """The specification lives in docs/: code cites its sections, never a design file that only
    the developers had ("DESIGN §1")."""
    offenders = [
        str(path.relative_to(REPOSITORY))
        for folder in ("gcrf", "kernels", "recipes", "benchmarks", "docs", "notebooks")
        for path in (REPOSITORY / folder).rglob("*")
        if path.suffix in {".py", ".md", ".ipynb"}
        and re.search(r"DESIGN(\.md| §)", path.read_text())
    ]
    assert not offenders, offenders
