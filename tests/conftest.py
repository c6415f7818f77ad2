"""Test configuration shared by the whole suite.

Triton kernels run on the CPU through Triton's interpreter when no CUDA device is present. The
interpreter is chosen when a ``@triton.jit`` function is defined, so the variable is set here,
before any test module imports ``gcrf.kernels``.
"""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _restore_gcrf_logging():
    """Undo what a recipe's ``configure_logging()`` does to the ``gcrf`` logger (its own handler,
    no propagation), so that a later test in the same worker still sees gcrf's records in
    ``caplog``: which tests share a worker depends on the scheduling."""
    logger = logging.getLogger("gcrf")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]
