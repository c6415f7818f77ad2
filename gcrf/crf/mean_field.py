"""Mean-field CRF refinement on the Gated CRF window (docs/math.md#mean-field).

With unaries ``U`` (the logits), ``Q⁰ = softmax(U)`` and for ``t = 1 … T``::

    M^t = message(Q^{t−1})                    (docs/math.md#message: Σ_{j∈W(i)} G_ij K_ij Q_j)
    Ũ^t_i(l) = U_i(l) − Σ_{l'} μ(l, l') M^t_i(l')
    Q^t = softmax(Ũ^t)

the result is ``Ũ^T``. The window (features, downsampling to the logits' size, positions, spacing,
gates, kernel weights) is prepared exactly as the loss prepares it, so one kernel description means
the same thing in both. Each iteration is one call of the backend's ``window_message``: the affinity
is never stored, and autograd keeps O(N·C·|Ω|) per iteration (``Q`` and ``M``), O(T·N·C·|Ω|) in all.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gcrf.kernels.window import GatedWindow, accumulation_dtype, check_field, describe
from gcrf.loss.backends import check_backend_name, choose_backend, get_backend, preload_backends
from gcrf.loss.functional import (
    Downsampler,
    KernelDescriptor,
    LossConfig,
    check_compatibility,
    prepare_window,
)

__all__ = ["MeanFieldCRF", "mean_field", "mean_field_crf", "validate_iterations"]


def validate_iterations(iterations: Any) -> int:
    """The number of mean-field iterations T: a positive int."""
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
        raise TypeError(
            f"iterations must be a positive int; got {iterations!r} ({type(iterations).__name__})"
        )
    if iterations < 1:
        raise ValueError(f"iterations must be a positive int; got {iterations!r}")
    return int(iterations)


def mean_field(
    logits: Tensor,
    window: GatedWindow,
    iterations: int = 5,
    compatibility: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``T`` mean-field iterations on a prepared window (docs/math.md#mean-field).

    The building block of :func:`mean_field_crf` for callers who already hold a window (e.g. from
    :func:`gcrf.loss.gated_window`) and want to reuse it across calls.

    Args:
        logits: the unaries U, N×C×*Ω with the window's N and Ω.
        window: the gated window at the logits' size.
        iterations: T ≥ 1.
        compatibility: μ (C×C, ≥ 0, used as given) or None for Potts ``1 − I``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (:func:`gcrf.loss.choose_backend`).

    Returns:
        ``Ũ^T``, N×C×*Ω in the logits' dtype (computed in float32; float64 for float64 logits).
    """
    check_field(window, logits, "logits")
    iterations = validate_iterations(iterations)
    num_classes = logits.shape[1]
    acc = accumulation_dtype(logits.dtype)
    mu = check_compatibility(compatibility, allow_grad=True, zero_diagonal=False)
    if mu is not None:
        if tuple(mu.shape) != (num_classes, num_classes):
            raise ValueError(
                f"compatibility must be C×C = {num_classes}×{num_classes} for logits of "
                f"{describe(logits)}; got {describe(mu)}"
            )
        mu = mu.to(device=logits.device, dtype=acc)
    core = get_backend(choose_backend(backend, logits, logits.dim() - 2))
    unary = logits.to(acc)
    q = torch.softmax(unary, dim=1)
    refined = unary
    for _ in range(iterations):
        message = core.window_message(window, q)
        if mu is None:
            # Potts μ = 1 − I: Σ_{l'} μ(l, l') M(l') = Σ_{l'} M(l') − M(l).
            pairwise = message.sum(dim=1, keepdim=True) - message
        else:
            pairwise = torch.einsum("lm,nm...->nl...", mu, message)
        refined = unary - pairwise
        q = torch.softmax(refined, dim=1)
    return refined.to(logits.dtype)


def _config(
    kernels: Sequence[KernelDescriptor],
    radius: int,
    downsamplers: Mapping[str, Downsampler] | None,
    spacing: Sequence[float] | None,
) -> LossConfig:
    return LossConfig.build(kernels, radius, None, downsamplers, spacing)


def mean_field_crf(
    logits: Tensor,
    features: Mapping[str, Tensor],
    kernels: Sequence[KernelDescriptor],
    radius: int = 5,
    iterations: int = 5,
    compatibility: Tensor | None = None,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    downsamplers: Mapping[str, Downsampler] | None = None,
    spacing: Sequence[float] | None = None,
    backend: str = "auto",
) -> Tensor:
    """Refine logits with ``T`` iterations of windowed mean field (docs/math.md#mean-field).

    Differentiable w.r.t. ``logits``, and w.r.t. ``compatibility`` when it requires grad.

    Args:
        logits: unaries U, N×C×h×w (N×C×d×h×w for volumes); the result has the same shape.
        features: modality name → feature map at the image resolution, as for the loss (resized
            to the logits' size; ``"xy"``/``"xyz"`` is built internally, in logit pixels or, with
            ``spacing``, in its unit).
        kernels, radius, downsamplers, spacing: the window's configuration, the loss's rules
            (:meth:`gcrf.loss.functional.LossConfig.build`).
        iterations: T ≥ 1.
        compatibility: μ, C×C, non-negative, used as given (not normalised like the loss's μ̂);
            None is Potts ``1 − I``. A tensor that requires grad is learnt (CRF-as-RNN).
        mask_src, mask_dst: gates (docs/math.md#gates): ``G_ij = m_dst(i)·m_src(j)``; a pixel
            with ``m_dst = 0`` keeps its unary, one with ``m_src = 0`` sends no message.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Shape:
        logits: N×C×*Ω; features[m]: N×D_m×(integer multiples of Ω); masks: N×1×(input or Ω).

    Returns:
        ``Ũ^T`` in the logits' dtype (``softmax(result) = Q^T``).

    Example:
        >>> image = torch.rand(1, 3, 64, 64)
        >>> logits = torch.randn(1, 4, 64, 64)
        >>> kernels = [{"weight": 3.0, "xy": 3.0}, {"weight": 5.0, "xy": 5.0, "rgb": 0.1}]
        >>> refined = mean_field_crf(logits, {"rgb": image}, kernels, radius=5, iterations=5)
        >>> refined.shape
        torch.Size([1, 4, 64, 64])
    """
    config = _config(kernels, radius, downsamplers, spacing)
    check_backend_name(backend)
    window = prepare_window(logits, features, config, mask_src, mask_dst, what="logits")
    return mean_field(logits, window, iterations, compatibility, backend)


class MeanFieldCRF(nn.Module):
    """Windowed mean-field CRF as a module: configuration in, logits and features to ``forward``.

    Computes what :func:`mean_field_crf` computes. Use it after a network at evaluation (dense-CRF
    refinement) or inside the training step as a trainable layer (CRF-as-RNN): the result is
    differentiable w.r.t. the logits, and ``compatibility`` given as an ``nn.Parameter`` is learnt
    (keep it non-negative, e.g. with ``torch.nn.utils.parametrize`` and a softplus; a negative
    value raises at the next call).

    Args:
        kernels, radius, downsamplers, spacing: the window's configuration (the loss's rules).
        iterations: T ≥ 1.
        compatibility: μ (C×C, ≥ 0, used as given) or None for Potts. An ``nn.Parameter`` is
            registered as a parameter, any other tensor as a buffer (it follows ``.to(device)``).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Example:
        >>> crf = MeanFieldCRF([{"weight": 3.0, "xy": 3.0}, {"weight": 5.0, "xy": 5.0, "rgb": 0.1}],
        ...                    radius=5, iterations=5)
        >>> refined = crf(torch.randn(2, 4, 32, 32), {"rgb": torch.rand(2, 3, 32, 32)})
    """

    def __init__(
        self,
        kernels: Sequence[KernelDescriptor],
        radius: int = 5,
        iterations: int = 5,
        compatibility: Tensor | None = None,
        downsamplers: Mapping[str, Downsampler] | None = None,
        spacing: Sequence[float] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self._config = _config(kernels, radius, downsamplers, spacing)
        self._kernels_desc = [dict(k) for k in kernels]
        self.iterations = validate_iterations(iterations)
        compatibility = check_compatibility(compatibility, allow_grad=True, zero_diagonal=False)
        if isinstance(compatibility, nn.Parameter):
            self.compatibility = compatibility
        else:
            self.register_buffer(
                "compatibility",
                None if compatibility is None else compatibility.detach().clone(),
                persistent=False,
            )
        self.backend = check_backend_name(backend)
        if backend != "torch":
            preload_backends()

    @classmethod
    def from_pydensecrf(
        cls,
        gaussian: Sequence[tuple[float, float]] = ((3.0, 3.0),),
        bilateral: Sequence[tuple[float, float, float]] = ((80.0, 13.0, 10.0),),
        *,
        radius: int = 5,
        iterations: int = 5,
        stride: int = 1,
        image_scale: float = 1.0,
        modality: str = "rgb",
        normalise: bool = False,
        backend: str = "auto",
    ) -> MeanFieldCRF:
        """The windowed counterpart of a pydensecrf setup (:func:`gcrf.crf.kernels_from_pydensecrf`).

        Args:
            gaussian: ``(sxy, compat)`` of each ``addPairwiseGaussian`` call.
            bilateral: ``(sxy, srgb, compat)`` of each ``addPairwiseBilateral`` call.
            radius, iterations, backend: as for the constructor.
            stride, image_scale, modality: how the logits and the image relate (see
                :func:`gcrf.crf.kernels_from_pydensecrf`).
            normalise: divide each weight by its position Gaussian's mass over this window
                (``window_radius=radius`` of :func:`gcrf.crf.kernels_from_pydensecrf`), as
                pydensecrf's default normalisation does where the colour is uniform.

        Example:
            >>> crf = MeanFieldCRF.from_pydensecrf(gaussian=[(3, 3)], bilateral=[(5, 5, 3)],
            ...                                    radius=5, image_scale=1.0)
        """
        from gcrf.crf.pydensecrf import kernels_from_pydensecrf

        kernels = kernels_from_pydensecrf(
            gaussian, bilateral, stride, image_scale, modality, radius if normalise else None
        )
        return cls(kernels, radius=radius, iterations=iterations, backend=backend)

    @property
    def config(self) -> LossConfig:
        """The validated window configuration (kernels, radius, downsamplers, spacing)."""
        return self._config

    @property
    def radius(self) -> int:
        """Window radius r."""
        return self._config.radius

    def window(
        self,
        logits: Tensor,
        features: Mapping[str, Tensor],
        mask_src: Tensor | None = None,
        mask_dst: Tensor | None = None,
    ) -> GatedWindow:
        """The gated window this CRF uses for these inputs (what :meth:`forward` filters with)."""
        return prepare_window(logits, features, self._config, mask_src, mask_dst, what="logits")

    def forward(
        self,
        logits: Tensor,
        features: Mapping[str, Tensor],
        mask_src: Tensor | None = None,
        mask_dst: Tensor | None = None,
    ) -> Tensor:
        """Refined logits ``Ũ^T`` (N×C×*Ω, the logits' dtype)."""
        window = self.window(logits, features, mask_src, mask_dst)
        return mean_field(logits, window, self.iterations, self.compatibility, self.backend)

    def extra_repr(self) -> str:
        mu = "Potts" if self.compatibility is None else "C×C"
        return (
            f"kernels={self._kernels_desc}, radius={self.radius}, iterations={self.iterations}, "
            f"compatibility={mu}, spacing={self._config.spacing}, backend={self.backend!r}"
        )
