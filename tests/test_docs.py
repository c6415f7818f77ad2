"""The documentation says what the code does: the README's example runs, every reference to a
section of the specification (``docs/math.md#<anchor>``) in code, docs and notebooks exists, and
every document the code cites is in the repository."""

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


def test_every_document_the_code_cites_is_in_the_repository():
    """The specification and the docs live in the repository: every Markdown file that the library,
    the recipes and the benchmarks cite (``docs/math.md``, ``CONTRACTS.md``, ...) is one of its
    files, never a document only the developers had."""
    documents = [
        path.relative_to(REPOSITORY).as_posix()
        for path in REPOSITORY.rglob("*.md")
        if ".venv" not in path.parts and "site" not in path.parts
    ]
    cited = {
        (name, str(path.relative_to(REPOSITORY)))
        for folder in ("gcrf", "kernels", "recipes", "benchmarks")
        for path in (REPOSITORY / folder).rglob("*.py")
        for name in re.findall(r"[A-Za-z0-9_./-]+\.md\b", path.read_text())
    }
    assert cited, "no document cited"
    missing = sorted(
        (name, where)
        for name, where in cited
        if not any(doc == name or doc.endswith("/" + name.lstrip("./")) for doc in documents)
    )
    assert not missing, f"cited documents that are not in the repository: {missing}"
