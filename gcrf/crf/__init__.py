"""Mean-field CRF refinement on the Gated CRF window: installable, GPU, 3D, differentiable.

The dense-CRF step of weak-supervision pipelines (refining pseudo labels and predictions) on the
same windowed, gated Gaussian filter as the loss (docs/math.md#mean-field, docs/crf.md):

- :class:`MeanFieldCRF` (``nn.Module``) and :func:`mean_field_crf`, its functional twin;
- :func:`mean_field`, the iterations on a prepared window;
- :func:`kernels_from_pydensecrf` / :meth:`MeanFieldCRF.from_pydensecrf` for pydensecrf users, and
  :func:`window_coverage` / :func:`window_mass` (how much of a Gaussian the window holds, and its
  sum there).
"""

from gcrf.crf.mean_field import MeanFieldCRF, mean_field, mean_field_crf
from gcrf.crf.pydensecrf import kernels_from_pydensecrf, window_coverage, window_mass

__all__ = [
    "MeanFieldCRF",
    "kernels_from_pydensecrf",
    "mean_field",
    "mean_field_crf",
    "window_coverage",
    "window_mass",
]
