"""Optimiser and learning-rate scheduler factories of the training module.

A factory is a picklable callable (a ``functools.partial``, never a closure: DDP-spawn and
checkpoints pickle the module that holds it) that builds the object once the parameters or the
number of steps are known.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "ADAM_DEFAULTS",
    "DEFAULT_LR_SCHEDULER",
    "SGD_DEFAULTS",
    "OptimizerFactory",
    "SchedulerFactory",
    "make_optimizer_factory",
    "make_poly_scheduler_factory",
]

#: Builds an optimiser from the parameters to train.
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
#: Builds a per-step learning-rate scheduler from the optimiser and the total number of steps.
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]

# The DeepLab defaults of the published code.
SGD_DEFAULTS: dict[str, float] = {
    "lr": 0.007,
    "momentum": 0.9,
    "dampening": 0.0,
    "weight_decay": 1e-4,
}
ADAM_DEFAULTS: dict[str, float] = {"lr": 1e-4}


def make_optimizer_factory(
    name: str = "sgd", kwargs: Mapping[str, Any] | None = None
) -> OptimizerFactory:
    """An optimiser factory for ``"sgd"`` or ``"adam"``.

    Args:
        name: ``"sgd"`` (``torch.optim.SGD``) or ``"adam"`` (``torch.optim.Adam``).
        kwargs: keyword arguments of the optimiser; ``None`` takes the published defaults (SGD: lr
            0.007, momentum 0.9, dampening 0, weight decay 1e-4; Adam: lr 1e-4). Given kwargs replace
            the defaults entirely, as the published ``--optimizer_kwargs`` did.

    Returns:
        A callable ``factory(parameters) -> torch.optim.Optimizer``.

    Example:
        >>> factory = make_optimizer_factory("adam", {"lr": 1e-3})
        >>> factory(torch.nn.Linear(2, 2).parameters()).defaults["lr"]
        0.001
    """
    classes = {"sgd": (torch.optim.SGD, SGD_DEFAULTS), "adam": (torch.optim.Adam, ADAM_DEFAULTS)}
    if name not in classes:
        raise ValueError(f"optimizer name must be one of {sorted(classes)}, got {name!r}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"optimizer kwargs must be a mapping or None, got {type(kwargs).__name__}")
    cls, defaults = classes[name]
    # A partial, not a closure: DDP-spawn and checkpoints pickle the module that holds it.
    return functools.partial(cls, **dict(defaults if kwargs is None else kwargs))


def make_poly_scheduler_factory(power: float = 0.9) -> SchedulerFactory:
    """A polynomial-decay scheduler factory, ``lr_t = lr_0 · (1 − t / T)^power``, stepped per step.

    Args:
        power: the decay exponent (published default 0.9).

    Returns:
        A callable ``factory(optimizer, total_steps) -> PolynomialLR``.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        >>> sched = make_poly_scheduler_factory(1.0)(opt, 4)
        >>> opt.step(); sched.step(); round(opt.param_groups[0]["lr"], 3)
        0.75
    """
    if not isinstance(power, (int, float)) or isinstance(power, bool) or power < 0:
        raise ValueError(f"power must be a number >= 0, got {power!r}")
    return functools.partial(_polynomial_lr, power=float(power))


def _polynomial_lr(
    optimizer: torch.optim.Optimizer, total_steps: int, power: float
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=power)


#: The default schedule of :class:`~gcrf.training.SegmentationModule`: the published polynomial
#: decay with power 0.9, stepped every iteration.
DEFAULT_LR_SCHEDULER: SchedulerFactory = make_poly_scheduler_factory(0.9)
