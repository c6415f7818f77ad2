"""The Gated CRF loss (Obukhov et al., arXiv:1906.04651): exact, memory-lean, 2D and 3D.

Public API:

- :class:`GatedCRFLoss` (``nn.Module``) and its functional twin :func:`gated_crf_loss`;
- :class:`ModelLossSemsegGatedCRF`, a drop-in for the published class;
- :func:`gaussian_affinity` and :func:`kernels_vis` to look at the kernels;
- :func:`gated_window` and :func:`window_message`, the computational core itself (the message of
  docs/math.md#message), for other pairwise terms;
- :func:`choose_backend` / :func:`available_backends` ("torch" everywhere, "triton" on CUDA) and
  :func:`verify_triton`, the self-check that ``backend="auto"`` runs before it trusts Triton.

Importing this package needs only torch; the Triton backend is imported lazily when chosen.
"""

from gcrf.loss.affinity import gaussian_affinity, kernels_vis
from gcrf.loss.backends import available_backends, choose_backend
from gcrf.loss.core import gated_window, window_message
from gcrf.loss.functional import DEFAULT_KERNELS, gated_crf_loss
from gcrf.loss.module import GatedCRFLoss
from gcrf.loss.published import ModelLossSemsegGatedCRF
from gcrf.loss.selfcheck import verify_triton

__all__ = [
    "DEFAULT_KERNELS",
    "GatedCRFLoss",
    "ModelLossSemsegGatedCRF",
    "available_backends",
    "choose_backend",
    "gated_crf_loss",
    "gated_window",
    "gaussian_affinity",
    "kernels_vis",
    "verify_triton",
    "window_message",
]
