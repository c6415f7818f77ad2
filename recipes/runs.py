"""Several recipe runs side by side, one process each: what the comparison recipes are made of.

A run is a recipe module and its command line (``RunSpec``), so a comparison assembles its runs the
one way every recipe does (LightningCLI: the whole configuration in ``config.yaml``, checkpoints
and TensorBoard hyperparameters) and only chooses the settings (in gcrf's names, turned into flags
by :func:`recipes.cli.command_line_args`). :func:`run_side_by_side` trains them in worker
processes (spawned, one torch thread each by default) and returns the final validation metrics of
each; a run may name a function to call in its process once training is over (``RunSpec.after``:
e.g. choose a CRF setting on the training data and validate again with it). The runs share one
console: every line a run logs starts with its name (``[full] step 50/1000 | train/loss …``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from recipes.cli import CONSOLE_HANDLER, configure_logging

__all__ = [
    "RunResult",
    "RunSpec",
    "cpu_trainer_settings",
    "gap_closed",
    "labelled_console",
    "run_side_by_side",
]


@dataclass(frozen=True)
class RunSpec:
    """One run: a name, what it is, the recipe module and its arguments.

    ``after``, when given, is called in the run's process with the recipe's CLI object once
    training is over (a module-level function or a ``functools.partial`` of one: it travels to a
    spawned process); it may validate again, and what it returns is kept in
    :attr:`RunResult.extra`. The run's metrics are read after it.
    """

    name: str
    description: str
    recipe: str  #: module path, e.g. ``"recipes.acdc_scribbles"``
    args: tuple[str, ...] = ()
    after: Callable[[Any], dict[str, Any]] | None = None


@dataclass
class RunResult:
    """The outcome of one run: its final validation metrics and where its files are."""

    name: str
    description: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0
    log_dir: str = ""
    checkpoint: str = ""  #: the weights at the last step (``last.ckpt``), "" without checkpoints
    extra: dict[str, Any] = field(default_factory=dict)  #: what ``RunSpec.after`` returned

    @property
    def miou(self) -> float:
        """``val/mIoU`` of the final validation (NaN when the run has none)."""
        return self.metrics.get("val/mIoU", float("nan"))


def cpu_trainer_settings(steps: int, validations: int) -> dict[str, Any]:
    """Trainer settings of a short run on one CPU: ``steps`` steps, ``validations`` validations
    (the last one at the end), no sanity check, no progress bar (the runs share one terminal).

    Example:
        >>> cpu_trainer_settings(100, 4)["trainer.val_check_interval"]
        25
    """
    return {
        "trainer.max_steps": steps,
        "trainer.val_check_interval": max(1, steps // validations),
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.num_sanity_val_steps": 0,
        "trainer.enable_progress_bar": False,
    }


def gap_closed(full: float, weak: float, weak_with_loss: float) -> float:
    """Share of the weak→full gap closed by the run with the loss (1.0 = all of it).

    Example:
        >>> round(gap_closed(0.8, 0.6, 0.7), 6)
        0.5
    """
    gap = full - weak
    return float("nan") if gap <= 0 else (weak_with_loss - weak) / gap


#: Lightning's loggers: their messages of a run go to the run's labelled console.
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@contextlib.contextmanager
def labelled_console(run: str) -> Iterator[None]:
    """Within the block, every line logged to the console starts with ``[run]``.

    gcrf's lines (the progress) and Lightning's messages from WARNING up go through the one console
    handler of :func:`recipes.cli.configure_logging`, labelled; Lightning's INFO lines (devices,
    seeds) and its warnings (advice for interactive use) are left out: the comparison's table is
    the output. Everything is restored on exit, so runs in one process (``workers=1``) label their
    own lines.
    """
    configure_logging()
    console = [h for h in logging.getLogger("gcrf").handlers if h.get_name() == CONSOLE_HANDLER]
    formatters = [h.formatter for h in console]
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    saved = [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    configure_logging(run)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            for logger in loggers:
                logger.setLevel(logging.WARNING)
                if console:  # not when the user's own handlers hold the gcrf logger
                    logger.handlers[:] = console
                    logger.propagate = False
            yield
    finally:
        for logger, (level, handlers, propagate) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        for handler, formatter in zip(console, formatters, strict=True):
            handler.setFormatter(formatter)


def _run(spec: RunSpec, threads: int) -> RunResult:
    torch.set_num_threads(threads)
    main = importlib.import_module(spec.recipe).main
    start = time.monotonic()
    with labelled_console(spec.name):
        cli = main(list(spec.args))
        seconds = time.monotonic() - start
        extra = spec.after(cli) if spec.after is not None else {}
    metrics = {
        key: float(value)
        for key, value in cli.trainer.callback_metrics.items()
        if key.startswith("val/") and value.numel() == 1
    }
    logger = cli.trainer.logger
    log_dir = getattr(logger, "log_dir", None) or cli.trainer.default_root_dir
    last = [c.last_model_path for c in cli.trainer.checkpoint_callbacks if c.last_model_path]
    return RunResult(
        spec.name,
        spec.description,
        metrics,
        seconds,
        int(cli.trainer.global_step),
        str(log_dir),
        last[0] if last else "",
        dict(extra),
    )


def run_side_by_side(
    specs: Sequence[RunSpec], workers: int | None = None, threads: int | None = None
) -> list[RunResult]:
    """Train the runs, ``workers`` at a time in spawned processes (1: in turn, in this process).

    Args:
        specs: the runs.
        workers: processes (default: one per run, at most one per CPU core... rounded up so that
            every core is busy: ``min(len(specs), cpu_count + 1)``).
        threads: torch threads per run (default: the cores shared out, at least 1).

    Returns:
        One :class:`RunResult` per run, in the order of ``specs``.
    """
    cores = os.cpu_count() or 1
    workers = workers if workers is not None else min(len(specs), cores + 1)
    threads = threads if threads is not None else max(1, cores // max(1, workers))
    if workers <= 1:
        return [_run(spec, threads) for spec in specs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_run, spec, threads) for spec in specs]
        return [future.result() for future in futures]
