"""Models by name: ``create_model("deeplabv3p_resnet50", num_classes=21)``.

Entry points are small functions registered by decorator (as in timm): the function's name is the
model's name, its keyword arguments are the model's. ``"deeplabv3p"`` takes the encoder as a keyword
(any timm encoder); ``"deeplabv3p_resnet18/34/50/101"`` fix the encoders of the published work;
``"unet"`` (any timm encoder, the medical baseline) and ``"unet_resnet18/34"``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar, overload

from torch import nn

from gcrf.models.deeplabv3plus import DeepLabV3Plus
from gcrf.models.unet import UNet

__all__ = ["create_model", "list_models", "register_model"]

ModelFactory = TypeVar("ModelFactory", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


@overload
def register_model(name_or_factory: ModelFactory) -> ModelFactory: ...
@overload
def register_model(name_or_factory: str) -> Callable[[ModelFactory], ModelFactory]: ...


def register_model(name_or_factory: str | ModelFactory) -> Any:
    """Register a model factory under its function name, or under an explicit name.

    Args:
        name_or_factory: the factory (``@register_model``) or the name to use
            (``@register_model("my_model")``).

    Returns:
        The factory, unchanged (or a decorator that registers it).

    Raises:
        ValueError: the name is already registered.

    Example:
        >>> @register_model
        ... def deeplabv3p_convnext_atto(**kwargs):
        ...     return DeepLabV3Plus(encoder="convnext_atto", **kwargs)
        >>> create_model("deeplabv3p_convnext_atto", num_classes=2).num_classes
        2
    """

    def register(factory: ModelFactory, name: str) -> ModelFactory:
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    if isinstance(name_or_factory, str):
        return lambda factory: register(factory, name_or_factory)
    if not callable(name_or_factory):
        raise TypeError(
            f"register_model takes a factory function or a name; got "
            f"{type(name_or_factory).__name__}"
        )
    return register(name_or_factory, name_or_factory.__name__)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style pattern, sorted.

    Args:
        pattern: e.g. ``"deeplabv3p_resnet*"``.

    Returns:
        The sorted names.

    Example:
        >>> list_models("deeplabv3p_resnet*")
        ['deeplabv3p_resnet101', 'deeplabv3p_resnet18', 'deeplabv3p_resnet34', 'deeplabv3p_resnet50']
    """
    return sorted(name for name in _MODELS if fnmatch.fnmatchcase(name, pattern))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        **kwargs: the model's keyword arguments (for DeepLabv3+ see
            :class:`~gcrf.models.DeepLabV3Plus`: ``num_classes``, ``output_stride``, ``pretrained``,
            ``freeze_batchnorm``, ...; ``encoder`` for ``"deeplabv3p"``).

    Returns:
        The model.

    Raises:
        ValueError: unknown name (the message lists close matches and all names).

    Example:
        >>> model = create_model("deeplabv3p", encoder="resnet18", num_classes=21)
        >>> model = create_model("deeplabv3p_resnet50", num_classes=19, output_stride=8)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str; got {type(name).__name__}")
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown model name {name!r}.{hint} Available: {list_models()}")
    return _MODELS[name](**kwargs)


@register_model
def deeplabv3p(encoder: str = "resnet34", **kwargs: Any) -> DeepLabV3Plus:
    """DeepLabv3+ on any timm encoder (default resnet34, the published default)."""
    return DeepLabV3Plus(encoder=encoder, **kwargs)


def _fixed_encoder(
    family: str, model: Callable[..., nn.Module], encoder: str
) -> Callable[..., Any]:
    """A registered entry point ``<family>_<encoder>`` of ``model`` with the encoder fixed."""

    def factory(**kwargs: Any) -> nn.Module:
        if "encoder" in kwargs:
            raise TypeError(
                f"model '{family}_{encoder}' fixes encoder={encoder!r}; use "
                f"create_model('{family}', encoder={kwargs['encoder']!r}) for another one"
            )
        return model(encoder=encoder, **kwargs)

    factory.__name__ = factory.__qualname__ = f"{family}_{encoder}"
    factory.__doc__ = f"{model.__name__} on a timm {encoder} encoder."
    return factory


for _encoder in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register_model(_fixed_encoder("deeplabv3p", DeepLabV3Plus, _encoder))


@register_model
def unet(encoder: str = "resnet34", **kwargs: Any) -> UNet:
    """UNet on any timm encoder (default resnet34)."""
    return UNet(encoder=encoder, **kwargs)


for _encoder in ("resnet18", "resnet34"):
    register_model(_fixed_encoder("unet", UNet, _encoder))
