"""Drop-in replacement for the published ``ModelLossSemsegGatedCRF`` (Obukhov et al., 2019).

Code written for the published loss switches by changing one import::

    from gcrf.loss import ModelLossSemsegGatedCRF

The ``forward`` signature and the ``{'loss', 'kernels_vis'}`` result are the published ones; the
computation is :func:`gcrf.loss.gated_crf_loss`. Deliberate differences (docs/math.md#published-differences):
out-of-image neighbours are absent (the published value without ``mask_src`` is larger by a
y-independent constant; gradients are equal), the compatibility branch works, memory does not grow
with the window, invalid input raises ``ValueError``/``TypeError`` instead of ``assert``, and the
sample is never modified.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from gcrf.loss.affinity import affinity_from_prepared, kernels_vis
from gcrf.loss.backends import check_backend_name
from gcrf.loss.functional import (
    Downsampler,
    KernelDescriptor,
    LossConfig,
    loss_from_prepared,
    prepare_inputs,
)

__all__ = ["ModelLossSemsegGatedCRF"]


class ModelLossSemsegGatedCRF(nn.Module):
    """The published Gated CRF loss interface on top of :func:`gcrf.loss.gated_crf_loss`.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (the published class took no arguments;
            the default keeps that call valid).

    Example:
        >>> loss_fn = ModelLossSemsegGatedCRF()
        >>> batch = {"rgb": torch.rand(2, 3, 64, 64), "validity": torch.ones(2, 1, 64, 64)}
        >>> y = torch.softmax(torch.randn(2, 21, 16, 16), dim=1)
        >>> out = loss_fn(y, [{"weight": 1, "xy": 6, "rgb": 0.1}], 5, batch, 64, 64,
        ...               mask_src=batch["validity"], out_kernels_vis=True)
        >>> out["loss"].shape, out["kernels_vis"].shape
        (torch.Size([]), torch.Size([2, 1, 64, 64]))
    """

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = check_backend_name(backend)

    def forward(
        self,
        y_hat_softmax: Tensor,
        kernels_desc: Sequence[KernelDescriptor],
        kernels_radius: int,
        sample: Mapping[str, Any] | Tensor,
        height_input: int,
        width_input: int,
        mask_src: Tensor | None = None,
        mask_dst: Tensor | None = None,
        compatibility: Tensor | None = None,
        custom_modality_downsamplers: Mapping[str, Downsampler] | None = None,
        out_kernels_vis: bool = False,
    ) -> dict[str, Tensor | None]:
        """Published signature.

        Args:
            y_hat_softmax: N×C×h×w class probabilities.
            kernels_desc: kernel descriptors, e.g. ``[{"weight": 1, "xy": 6, "rgb": 0.1}]``.
            kernels_radius: window radius.
            sample: dict holding (at least) the modalities named in ``kernels_desc``, e.g. the
                training batch; other keys are ignored. Or a tensor (N×D×H×W), as the copies of
                this class in WSL4MIS and the repositories derived from it pass the image batch
                itself: every modality other than ``"xy"`` then reads that tensor (so
                ``{"xy": 6, "rgb": 0.1}`` is a kernel over position and the image's intensities,
                in the units of the tensor, e.g. [0, 1] MR intensities).
            height_input, width_input: image size, an integer multiple of h×w (same factor).
            mask_src, mask_dst: optional N×1×H×W gates.
            compatibility: optional C×C class compatibility μ.
            custom_modality_downsamplers: modality → ``f(tensor, (h, w))``; ``"mask"`` for masks.
            out_kernels_vis: also return the tiled kernel visualisation.

        Returns:
            ``{"loss": scalar, "kernels_vis": N×1×H×W or None}``.
        """
        if isinstance(y_hat_softmax, Tensor) and y_hat_softmax.dim() != 4:
            raise ValueError(
                "y_hat_softmax must be an N×C×h×w batch (use GatedCRFLoss for volumes); got shape "
                f"{tuple(y_hat_softmax.shape)}"
            )
        for name, value in (("height_input", height_input), ("width_input", width_input)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise TypeError(f"{name} must be a positive int; got {value!r}")
        config = LossConfig.build(
            kernels_desc, kernels_radius, compatibility, custom_modality_downsamplers
        )
        if isinstance(y_hat_softmax, Tensor):
            height_pred, width_pred = y_hat_softmax.shape[2:]
            if (
                height_input % height_pred
                or width_input % width_pred
                or height_input * width_pred != width_input * height_pred
            ):
                raise ValueError(
                    f"height_input×width_input = {height_input}×{width_input} must be an integer "
                    f"multiple of the prediction size {height_pred}×{width_pred} with the same "
                    "aspect ratio"
                )
        if isinstance(sample, Tensor):
            # The medical copies of this class read the tensor for every non-position modality.
            sample = {name: sample for kernel in config.kernels for name, _ in kernel.modalities}
        elif not isinstance(sample, Mapping):
            raise TypeError(
                f"sample must be a dict of modalities or an N×D×H×W tensor; got "
                f"{type(sample).__name__}"
            )
        prepared = prepare_inputs(y_hat_softmax, sample, config, mask_src, mask_dst)
        out: dict[str, Tensor | None] = {
            "loss": loss_from_prepared(prepared, self.backend),
            "kernels_vis": None,
        }
        if out_kernels_vis:
            affinity = affinity_from_prepared(prepared, self.backend)
            out["kernels_vis"] = kernels_vis(
                affinity, config.radius, (int(height_input), int(width_input))
            )
        return out
