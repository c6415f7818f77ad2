"""From pydensecrf's parameters to gcrf kernels, and how much of each Gaussian a window covers.

pydensecrf (Krähenbühl & Koltun's fully connected CRF) is set up as::

    d = dcrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(-log_probs)                       # U = log p: gcrf takes the logits
    d.addPairwiseGaussian(sxy=3, compat=3)              # σ in image pixels
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)  # colour σ in 0–255 units
    Q = d.inference(5)

and gcrf's :class:`~gcrf.crf.MeanFieldCRF` takes kernel descriptors in the loss's units (positions
in logit pixels, colours in the units of the tensor passed as the image). The conversion is exact
for σ and for Potts compatibilities: pydensecrf's Potts update adds ``compat · M(l)`` to the unary
of label ``l``, gcrf's subtracts ``Σ_{l'≠l} M(l')`` with the kernel weight ``w = compat``; the two
differ by ``w·Σ_{l'} M(l')``, the same for every label of a pixel, which the softmax removes.

What does not carry over:

- **Window.** pydensecrf is fully connected (every pixel with every pixel, on a permutohedral
  lattice); gcrf sums over a (2r+1)^q window. :func:`window_coverage` says which fraction of a
  position Gaussian the window holds: σ_xy = 3 logit pixels with r = 5 keeps 87 % of it, the
  bilateral σ_xy = 80 of the VOC setting under 1 % (there the window sees only close pixels).
- **Normalisation.** pydensecrf scales each filter by default (``NORMALIZE_SYMMETRIC``:
  ``n_i · Σ_j K_ij n_j v_j`` with ``n_i = (Σ_j K_ij)^{−1/2}``); gcrf's message is the plain sum of
  docs/math.md#mean-field. Equal ``compat`` values are therefore equal weights of different
  magnitudes. ``window_radius`` divides each weight by its position Gaussian's mass over the
  window (:func:`window_mass`), which is what the normalisation divides by where the colour is
  uniform (every colour term 1): the two filters then send the same total there, and differ only
  near edges, where pydensecrf's normalised filter is the stronger. Either way, choose the
  weights again on training data rather than copy them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["kernels_from_pydensecrf", "window_coverage", "window_mass"]


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{what} must be a number > 0; got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite; got {value!r}")
    return float(value)


def kernels_from_pydensecrf(
    gaussian: Sequence[tuple[float, float]] = ((3.0, 3.0),),
    bilateral: Sequence[tuple[float, float, float]] = ((80.0, 13.0, 10.0),),
    stride: int = 1,
    image_scale: float = 1.0,
    modality: str = "rgb",
    window_radius: int | None = None,
) -> list[dict[str, float]]:
    """gcrf kernel descriptors for pydensecrf's pairwise terms (Potts compatibilities).

    Args:
        gaussian: ``(sxy, compat)`` of each ``addPairwiseGaussian`` call (σ in image pixels).
        bilateral: ``(sxy, srgb, compat)`` of each ``addPairwiseBilateral`` call (σ_xy in image
            pixels, σ_rgb in 0–255 units).
        stride: image pixels per logit pixel (1 for logits at the image size, 4 for DeepLabv3+'s
            stride-4 logits); gcrf's positions are in logit pixels, so σ_xy = sxy / stride.
        image_scale: the value of a full-intensity channel in the tensor passed as the image
            (1.0 for images in [0, 1], 255.0 for 0–255 values): σ_rgb = srgb · image_scale / 255.
        modality: the feature name of the image in the kernels (``{"rgb": image}``).
        window_radius: None keeps ``weight = compat``; the radius r of the CRF's window divides
            each weight by :func:`window_mass` ``(σ_xy, r)``, matching pydensecrf's normalised
            filter where the colour is uniform (module docstring).

    Returns:
        ``[{"weight": compat, "xy": sxy / stride}, ..., {"weight": compat, "xy": ...,
        modality: ...}, ...]``: the Gaussian terms first, then the bilateral ones.

    Example:
        >>> kernels_from_pydensecrf([(3, 3)], [(80, 13, 10)], stride=4, image_scale=1.0)
        [{'weight': 3.0, 'xy': 0.75}, {'weight': 10.0, 'xy': 20.0, 'rgb': 0.050980392156862744}]
    """
    stride = _positive(stride, "stride")
    image_scale = _positive(image_scale, "image_scale")
    if not isinstance(modality, str) or modality in ("weight", "xy", "xyz"):
        raise ValueError(f"modality must name an image feature; got {modality!r}")
    kernels: list[dict[str, float]] = []
    for index, term in enumerate(gaussian):
        if len(term) != 2:
            raise ValueError(f"gaussian[{index}] must be (sxy, compat); got {term!r}")
        sxy, compat = term
        kernels.append(
            {
                "weight": _positive(compat, f"gaussian[{index}] compat"),
                "xy": _positive(sxy, f"gaussian[{index}] sxy") / stride,
            }
        )
    for index, term in enumerate(bilateral):
        if len(term) != 3:
            raise ValueError(f"bilateral[{index}] must be (sxy, srgb, compat); got {term!r}")
        sxy, srgb, compat = term
        kernels.append(
            {
                "weight": _positive(compat, f"bilateral[{index}] compat"),
                "xy": _positive(sxy, f"bilateral[{index}] sxy") / stride,
                modality: _positive(srgb, f"bilateral[{index}] srgb") * image_scale / 255.0,
            }
        )
    if not kernels:
        raise ValueError("give at least one gaussian or bilateral term")
    if window_radius is not None:
        _check_radius(window_radius)
        for kernel in kernels:
            kernel["weight"] /= window_mass(kernel["xy"], window_radius)
    return kernels


def _check_radius(radius: int) -> None:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be an int >= 1; got {radius!r}")


def _gaussian_mass(sigma: float, extent: int, spatial_rank: int) -> float:
    """Σ exp(−‖δ‖²/2σ²) over the (2·extent+1)^q block of integer offsets, the centre left out."""
    axis = sum(math.exp(-0.5 * (d / sigma) ** 2) for d in range(-extent, extent + 1))
    return axis**spatial_rank - 1.0


def window_mass(sigma: float, radius: int, spatial_rank: int = 2) -> float:
    """The mass of a position Gaussian over the window: ``Σ_{j∈W(i)} exp(−‖δ‖²/2σ²)``.

    The degree ``Σ_j K_ij`` of a pixel in a region of uniform features, away from the border, for
    a kernel of weight 1 and position σ ``sigma``: what pydensecrf's normalisation divides by there.

    Args:
        sigma: σ_xy in logit pixels.
        radius: window radius r.
        spatial_rank: 2 for images, 3 for volumes.

    Example:
        >>> round(window_mass(1.0, 5), 3)  # ≈ 2πσ² − 1 for σ well inside the window
        5.283
    """
    sigma = _positive(sigma, "sigma")
    _check_radius(radius)
    if spatial_rank not in (2, 3):
        raise ValueError(f"spatial_rank must be 2 or 3; got {spatial_rank!r}")
    return _gaussian_mass(sigma, radius, spatial_rank)


def window_coverage(sigma: float, radius: int, spatial_rank: int = 2) -> float:
    """The fraction of a position Gaussian's mass that a (2r+1)^q window holds.

    ``Σ_{j∈W(i)} exp(−‖δ‖²/2σ²) / Σ_{j≠i} exp(−‖δ‖²/2σ²)`` over the pixel grid (the centre is in
    neither sum, as the CRF has no self term): 1 means the window misses nothing of what a fully
    connected CRF would add with this σ, 0.5 that it sees half of it.

    Args:
        sigma: σ_xy in logit pixels (``"xy"`` of a kernel descriptor).
        radius: window radius r.
        spatial_rank: 2 for images, 3 for volumes.

    Example:
        >>> round(window_coverage(3.0, 5), 3)
        0.871
    """
    inside = window_mass(sigma, radius, spatial_rank)
    everywhere = _gaussian_mass(sigma, max(radius, math.ceil(12 * sigma)), spatial_rank)
    return inside / everywhere if everywhere > 0 else 1.0
