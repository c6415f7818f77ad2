"""Pretrained weights: local weight files, their layouts, and the offline message.

``DeepLabV3Plus(pretrained=...)`` accepts:

- ``False``: random initialisation;
- ``True``: timm downloads the encoder's ImageNet weights (Hugging Face hub or URL, cached);
- a path to a local file: ``.safetensors`` (read with safetensors) or anything else (read with
  ``torch.load(weights_only=True)``: tensors only, no pickled code). The file holds one of three
  layouts, recognised from its keys (see :func:`identify_layout`):

  ========== ============================================================ =========================
  layout     keys                                                         loaded into
  ========== ============================================================ =========================
  model      a whole ``DeepLabV3Plus.state_dict()`` (``encoder.…``,       the whole model, strictly
             ``aspp.…``, ``decoder.…``, ``head.…``)
  encoder    exactly the keys of ``model.encoder.state_dict()`` (a timm   the encoder, strictly
             ``features_only`` model, e.g. ``stem_0.weight`` for
             ConvNeXt)
  timm       a timm classification model (``timm.create_model(name,       the encoder, through
             pretrained=True).state_dict()`` or the hub's                  timm's own loader
             ``model.safetensors``)                                        (classifier dropped)
  ========== ============================================================ =========================

Every mismatch (missing or unexpected keys, different shapes) raises a ``ValueError`` that names
the file, the layout it was read as, and the first offending keys. A ``"state_dict"`` or ``"model"``
entry holding the weights (common checkpoint wrappers) and ``module.`` (DDP) or ``_orig_mod.``
(``torch.compile``) key prefixes are unwrapped.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "PretrainedWeightsError",
    "WeightsLayout",
    "check_state_dict_fits",
    "encoder_weights_hint",
    "identify_layout",
    "read_state_dict",
    "shorten",
]

logger = logging.getLogger(__name__)

WeightsLayout = Literal["model", "encoder", "timm"]

# Keys only a whole DeepLabV3Plus has ("head." is not among them: timm classifiers use it too).
_MODEL_ONLY_PREFIXES = ("aspp.", "decoder.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict", "model")


class PretrainedWeightsError(RuntimeError):
    """``pretrained=True`` could not fetch the encoder weights (offline, unreachable hub, ...).

    The message says where timm looks for the weights and how to provide them as a local file.
    """


def shorten(text: str, limit: int = 1500) -> str:
    """``text`` cut to ``limit`` characters (error messages from timm can list hundreds of keys)."""
    return text if len(text) <= limit else text[: limit - 5] + " [...]"


def encoder_weights_hint(name: str) -> str:
    """Where timm downloads an encoder's pretrained weights from, and how to provide them offline.

    Args:
        name: timm model name (optionally with a pretrained tag, ``"resnet34.tv_in1k"``).

    Returns:
        A few sentences for an error message.

    Example:
        >>> "pretrained='path/to/" in encoder_weights_hint("resnet34")
        True
    """
    import timm

    source = "its timm download location"
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, KeyError, ValueError):
        cfg = None
    if cfg is not None:
        if cfg.hf_hub_id:
            filename = cfg.hf_hub_filename or "model.safetensors"
            source = f"https://huggingface.co/{cfg.hf_hub_id} (file {filename})"
        elif cfg.url:
            source = cfg.url
    stem = name.replace("/", "_")
    return (
        f"timm downloads the weights of {name!r} from {source}. To use them offline, fetch them "
        f'on a machine with network access, e.g. `python -c "import timm, torch; '
        f"torch.save(timm.create_model('{name}', pretrained=True).state_dict(), '{stem}.pt')\"` "
        f"(or download the file above), copy the file over and pass "
        f"pretrained='path/to/{stem}.pt' (.pt/.pth are read with torch.load(weights_only=True), "
        f".safetensors with safetensors); or copy a populated Hugging Face cache (HF_HOME) to this "
        f"machine and keep pretrained=True."
    )


def _unwrap(obj: object, origin: str) -> dict[str, Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{origin} does not hold a state dict (a non-empty mapping of names to tensors); "
            f"got {type(obj).__name__}"
        )
    not_tensors = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(
            f"{origin} is not a state dict of tensors; entries that are not tensors: "
            f"{not_tensors[:5]}"
        )
    state_dict = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a weight file on the CPU, without executing pickled code.

    Args:
        path: ``.safetensors`` file (read with safetensors), or a ``torch.save`` file read with
            ``torch.load(weights_only=True)``.

    Returns:
        The state dict (name → tensor), unwrapped from a ``"state_dict"``/``"model"`` entry and
        from ``module.``/``_orig_mod.`` prefixes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no state dict of tensors, or needs unsafe unpickling.

    Example:
        >>> torch.save({"w": torch.ones(2)}, "/tmp/w.pt")
        >>> read_state_dict("/tmp/w.pt")
        {'w': tensor([1., 1.])}
    """
    file = Path(os.fspath(path))
    if not file.is_file():
        raise FileNotFoundError(f"pretrained weight file not found: {str(file)!r}")
    origin = f"weight file {str(file)!r}"
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:  # pragma: no cover - safetensors ships with the train extra
            raise ImportError(
                f"reading {origin} needs safetensors: pip install safetensors"
            ) from error
        obj: object = load_file(str(file), device="cpu")
    else:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{origin} cannot be read with torch.load(weights_only=True) (it holds pickled "
                f"objects other than tensors); save only the state dict "
                f"(torch.save(model.state_dict(), path)) or convert it to .safetensors: {error}"
            ) from error
    return _unwrap(obj, origin)


def identify_layout(state_dict: Mapping[str, Tensor], encoder: nn.Module) -> WeightsLayout:
    """Which of the three layouts a state dict has (see the module docstring).

    Args:
        state_dict: the weights.
        encoder: the model's timm ``features_only`` encoder.

    Returns:
        ``"model"`` when a key lies under ``aspp.`` or ``decoder.``; ``"encoder"`` when the
        keys are exactly those of ``encoder.state_dict()``; ``"timm"`` otherwise.
    """
    if any(key.startswith(_MODEL_ONLY_PREFIXES) for key in state_dict):
        return "model"
    if set(state_dict) == set(encoder.state_dict()):
        return "encoder"
    return "timm"


def check_state_dict_fits(
    state_dict: Mapping[str, Tensor], module: nn.Module, origin: str, layout: str
) -> None:
    """Raise a ``ValueError`` unless ``state_dict`` has exactly ``module``'s keys and shapes.

    Args:
        state_dict: the weights.
        module: the module they are meant for.
        origin: how the message names the weights (e.g. ``"weight file 'x.pt'"``).
        layout: how the message names the layout they were read as.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        ):
            if items:
                problems.append(f"{len(items)} {label} (first: {items[:5]})")
        raise ValueError(
            f"{origin} was read as a {layout} state dict but does not match the model: "
            + "; ".join(problems)
        )
