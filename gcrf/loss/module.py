"""``GatedCRFLoss``: the Gated CRF loss as an ``nn.Module`` (configuration in, data to forward)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from torch import Tensor, nn

from gcrf.loss.affinity import affinity_of_config, kernels_vis
from gcrf.loss.backends import check_backend_name, preload_backends
from gcrf.loss.functional import (
    Downsampler,
    KernelDescriptor,
    LossConfig,
    loss_from_prepared,
    prepare_inputs,
)

__all__ = ["GatedCRFLoss"]


class GatedCRFLoss(nn.Module):
    """Gated CRF loss (Obukhov et al., arXiv:1906.04651), exact and memory-lean.

    The configuration is validated once here; ``forward`` takes the data and computes what
    :func:`gcrf.loss.gated_crf_loss` computes (docs/math.md#loss).

    Args:
        kernels, radius, compatibility, downsamplers, spacing: the configuration, documented once
            at :meth:`~gcrf.loss.functional.LossConfig.build`. μ is kept as a buffer (it moves
            with ``.to(device)``).
        backend: ``"auto"`` (Triton on CUDA when available, else PyTorch), ``"triton"``, ``"torch"``.

    Shape:
        probs: N×C×h×w or N×C×d×h×w; features[m]: N×D_m×H×W (or ×D×H×W), integer multiples of
        the prediction size; masks: N×1×(input or prediction size). Output: scalar.

    Example:
        >>> loss_fn = GatedCRFLoss([{"weight": 1.0, "xy": 6.0, "rgb": 0.1}], radius=5)
        >>> images = torch.rand(2, 3, 64, 64)
        >>> probs = torch.softmax(torch.randn(2, 21, 16, 16, requires_grad=True), dim=1)
        >>> loss = loss_fn(probs, {"rgb": images}, mask_src=torch.ones(2, 1, 64, 64))
        >>> loss.backward()
    """

    def __init__(
        self,
        kernels: Sequence[KernelDescriptor],
        radius: int = 5,
        compatibility: Tensor | None = None,
        downsamplers: Mapping[str, Downsampler] | None = None,
        spacing: Sequence[float] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        config = LossConfig.build(kernels, radius, compatibility, downsamplers, spacing)
        self._kernels_desc = [dict(k) for k in kernels]
        # μ is a buffer (it follows .to(device)); the rest of the configuration is held once here.
        self.register_buffer(
            "compatibility",
            None if config.compatibility is None else config.compatibility.detach().clone(),
            persistent=False,
        )
        self._config = replace(config, compatibility=None)
        self.backend = check_backend_name(backend)
        if backend != "torch":
            preload_backends()

    def forward(
        self,
        probs: Tensor,
        features: Mapping[str, Tensor],
        mask_src: Tensor | None = None,
        mask_dst: Tensor | None = None,
    ) -> Tensor:
        """Loss value (0-dim; float32, float64 for float64 probs), differentiable w.r.t. probs."""
        prepared = prepare_inputs(probs, features, self.config, mask_src, mask_dst)
        return loss_from_prepared(prepared, self.backend)

    @property
    def config(self) -> LossConfig:
        """The validated configuration, with the compatibility buffer on its current device."""
        return replace(self._config, compatibility=self.compatibility)

    @property
    def radius(self) -> int:
        """Window radius r."""
        return self._config.radius

    @property
    def spacing(self) -> tuple[float, ...] | None:
        """Physical size of one input voxel per axis, or None."""
        return self._config.spacing

    @property
    def downsamplers(self) -> dict[str, Downsampler]:
        """Modality name → downsampler replacing area resizing."""
        return dict(self._config.downsamplers)

    def affinity(
        self,
        features: Mapping[str, Tensor],
        size: Sequence[int],
        mask_src: Tensor | None = None,
        mask_dst: Tensor | None = None,
    ) -> Tensor:
        """Exactly the gated kernel ``G_ij·K_ij`` this loss weighs for probabilities of ``size``.

        Same kernels, radius, downsamplers, spacing, gates and backend as :meth:`forward`; the
        layout is :func:`gcrf.loss.gaussian_affinity`'s.

        Args:
            features: the modalities passed to :meth:`forward`.
            size: spatial size of the probabilities the loss sees ((h, w) or (d, h, w)).
            mask_src, mask_dst: the gates passed to :meth:`forward`.

        Shape:
            Returns N×(2r+1)^q×*size.
        """
        return affinity_of_config(
            features, self.config, size=size, mask_src=mask_src, mask_dst=mask_dst,
            backend=self.backend,
        )  # fmt: skip

    def kernels_vis(
        self,
        features: Mapping[str, Tensor],
        size: Sequence[int],
        mask_src: Tensor | None = None,
        mask_dst: Tensor | None = None,
        output_size: Sequence[int] | None = None,
    ) -> Tensor:
        """The published ``kernels_vis`` tiling of :meth:`affinity` (images), N×1×H×W.

        Args:
            features, size, mask_src, mask_dst: as for :meth:`affinity`.
            output_size: (H, W) of the picture (default: the spatial size of the features).
        """
        affinity = self.affinity(features, size, mask_src, mask_dst)
        if output_size is None:
            output_size = next(iter(features.values())).shape[-2:] if features else size
        return kernels_vis(affinity, self.radius, tuple(int(s) for s in output_size))

    def extra_repr(self) -> str:
        return (
            f"kernels={self._kernels_desc}, radius={self.radius}, "
            f"compatibility={'None' if self.compatibility is None else 'C×C'}, "
            f"spacing={self.spacing}, backend={self.backend!r}"
        )
