"""Naive float64 references of the Gated CRF core (docs/math.md, docs/CONTRACTS.md §1), for tests only.

Written to be obviously right rather than fast: every pixel, every neighbour of its window, explicit
coordinates. Only tiny shapes. The pair weights ``W[n, i, j] = G_ij K_ij`` are built by the loop;
the loss is then ``Σ W φ(y_i, y_j)`` in float64 torch ops, so autograd gives the reference gradient.

- :func:`naive_pairwise_sum` / :func:`naive_window_affinity` / :func:`naive_window_message`: the
  backend contract, same arguments (a field instead of probabilities for the message).
- :func:`naive_gated_crf_loss` / :func:`naive_mean_field_crf`: the whole loss and the whole CRF from
  user-level inputs (dict of modalities, kernel descriptors, masks at the image resolution, spacing),
  sharing no code with ``gcrf``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from gcrf.kernels.window import GatedWindow

POSITION_KEYS = {2: "xy", 3: "xyz"}


def _window(radius: int, rank: int) -> list[tuple[int, ...]]:
    """Offsets of the window in row-major order (axis by axis from −r to r)."""
    return list(itertools.product(range(-radius, radius + 1), repeat=rank))


def _pair_weights(
    vectors: Sequence[np.ndarray],
    weights: Sequence[float],
    shape: tuple[int, ...],
    radius: int,
    mask_src: np.ndarray | None,
    mask_dst: np.ndarray | None,
) -> np.ndarray:
    """W[i, j] = m_dst(i) m_src(j) Σ_k w_k exp(−½‖x_k(i) − x_k(j)‖²) for j in the window of i.

    vectors[k]: P×F_k per-pixel vectors x_k(i) = (f_k(i), s_k ⊙ i) of kernel k: its features
    (docs/math.md#kernel) with the scaled pixel coordinates appended, so that
    ‖x_k(i) − x_k(j)‖² = ‖f_k(i) − f_k(j)‖² + ‖δ ⊙ s_k‖² (the position term computed from
    coordinates, independently of the backends' per-offset factor).
    """
    pixels = list(itertools.product(*(range(s) for s in shape)))
    flat = {p: index for index, p in enumerate(pixels)}
    count = len(pixels)
    out = np.zeros((count, count))
    for i, p in enumerate(pixels):
        neighbours = []
        for offset in _window(radius, len(shape)):
            if not any(offset):
                continue  # j == i is not a neighbour
            q = tuple(a + d for a, d in zip(p, offset, strict=True))
            if all(0 <= a < s for a, s in zip(q, shape, strict=True)):
                neighbours.append(flat[q])  # out-of-image neighbours are absent
        neighbours = np.array(neighbours, dtype=np.int64)
        if neighbours.size == 0:
            continue
        kernel = np.zeros(neighbours.size)
        for vec, weight in zip(vectors, weights, strict=True):
            diff = vec[neighbours] - vec[i]
            kernel += weight * np.exp(-0.5 * (diff**2).sum(axis=1))
        gate = np.ones(neighbours.size)
        if mask_dst is not None:
            gate *= mask_dst[i]
        if mask_src is not None:
            gate *= mask_src[neighbours]
        out[i, neighbours] = gate * kernel
    return out


def _loss_from_weights(probs: Tensor, weights: Tensor, compatibility: Tensor | None) -> Tensor:
    """Σ_n Σ_ij W_ij φ(y_i, y_j) in float64 (differentiable w.r.t. probs)."""
    y = probs.to(torch.float64).flatten(2).transpose(1, 2)  # N×P×C
    if compatibility is None:
        return (weights * (1.0 - y @ y.transpose(1, 2))).sum()
    mu = compatibility.to(torch.float64)
    return (weights * (y @ mu @ y.transpose(1, 2))).sum()


def naive_weights_from_prepared(window: GatedWindow) -> Tensor:
    """N×P×P float64 pair weights W = G ⊙ K of a gated window (docs/CONTRACTS.md §1)."""
    features = window.features
    batch = features.shape[0]
    shape = tuple(features.shape[2:])
    coordinates = np.array(list(itertools.product(*(range(s) for s in shape))), dtype=np.float64)
    out = []
    for n in range(batch):
        flat = features[n].detach().to(torch.float64).flatten(1).T.cpu().numpy()  # P×F
        vectors = [
            np.concatenate([flat[:, a:b], coordinates * np.asarray(scales)], axis=1)
            for (a, b), scales in zip(window.kernel_slices, window.kernel_pos_scales, strict=True)
        ]
        gates = [
            None if mask is None else mask[n, 0].double().flatten().cpu().numpy()
            for mask in (window.mask_src, window.mask_dst)
        ]
        out.append(_pair_weights(vectors, window.kernel_weights, shape, window.radius, *gates))
    return torch.from_numpy(np.stack(out))


def naive_pairwise_sum(probs: Tensor, window: GatedWindow, compatibility: Tensor | None) -> Tensor:
    """S of docs/CONTRACTS.md §1 by a plain loop; float64, on CPU, differentiable w.r.t. probs."""
    return _loss_from_weights(probs.cpu(), naive_weights_from_prepared(window), compatibility)


def naive_window_affinity(window: GatedWindow) -> Tensor:
    """window_affinity of CONTRACTS §1 by a plain loop: N×(2r+1)^q×*Ω float64."""
    weights = naive_weights_from_prepared(window).numpy()
    batch = window.features.shape[0]
    shape = tuple(window.features.shape[2:])
    offsets = _window(window.radius, len(shape))
    out = np.zeros((batch, len(offsets), *shape))
    pixels = list(itertools.product(*(range(s) for s in shape)))
    flat = {p: index for index, p in enumerate(pixels)}
    for o, offset in enumerate(offsets):
        for i, p in enumerate(pixels):
            q = tuple(a + d for a, d in zip(p, offset, strict=True))
            if q in flat:
                out[(slice(None), o, *p)] = weights[:, i, flat[q]]
    return torch.from_numpy(out)


def naive_window_message(field: Tensor, window: GatedWindow) -> Tensor:
    """M_i = Σ_j G_ij K_ij v_j by the pair-weight loop; float64, on CPU, differentiable in field."""
    weights = naive_weights_from_prepared(window)
    v = field.cpu().to(torch.float64)
    return torch.einsum("nij,ncj->nci", weights, v.flatten(2)).reshape(v.shape)


def area_downsample(tensor: Tensor, size: Sequence[int]) -> Tensor:
    """Average over non-overlapping blocks (the integer-ratio area resize), float64."""
    tensor = tensor.to(torch.float64)
    shape = tuple(tensor.shape[2:])
    ratios = [s // t for s, t in zip(shape, size, strict=True)]
    split = list(tensor.shape[:2])
    for t, r in zip(size, ratios, strict=True):
        split += [t, r]
    blocks = tensor.reshape(split)
    return blocks.mean(dim=tuple(range(3, blocks.dim(), 2)))


def naive_user_weights(
    shape: tuple[int, ...],
    batch: int,
    features: Mapping[str, Tensor],
    kernels: Sequence[Mapping[str, float]],
    radius: int,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    spacing: Sequence[float] | None = None,
    downsamplers: Mapping[str, Callable[[Tensor, tuple[int, ...]], Tensor]] | None = None,
) -> tuple[Tensor, np.ndarray | None, np.ndarray | None]:
    """N×P×P float64 pair weights W = G ⊙ K from user-level inputs, and the binarised gates.

    Positions: the coordinate of a prediction pixel along axis a is its index times
    ``spacing[a] · ratio[a]`` (ratio = input size / prediction size of that axis), or just its
    index without spacing; ``ratio`` comes from the modalities used by the kernels (else the masks,
    else 1).
    """
    downsamplers = downsamplers or {}
    rank = len(shape)
    maps = [m for m in (mask_src, mask_dst) if m is not None]
    used = {name for k in kernels for name in k if name not in ("weight", POSITION_KEYS[rank])}
    sources = [features[name] for name in used] or maps
    ratio = (
        [s // t for s, t in zip(sources[0].shape[2:], shape, strict=True)]
        if sources
        else [1] * rank
    )
    axis_unit = (
        [1.0] * rank if spacing is None else [s * r for s, r in zip(spacing, ratio, strict=True)]
    )
    coordinates = np.array(list(itertools.product(*(range(s) for s in shape))), dtype=np.float64)
    positions = coordinates * np.asarray(axis_unit)

    def resize(name: str, tensor: Tensor) -> Tensor:
        if name in downsamplers:
            return downsamplers[name](tensor.to(torch.float64), shape).to(torch.float64)
        if tuple(tensor.shape[2:]) == shape:
            return tensor.to(torch.float64)
        return area_downsample(tensor, shape)

    def binarise(mask: Tensor | None) -> np.ndarray | None:
        if mask is None:
            return None
        m = resize("mask", mask.to(torch.float64)).numpy()
        m = np.nan_to_num(m, nan=0.0)
        return np.where(m < 1.0, 0.0, 1.0)

    src = binarise(mask_src)
    dst = binarise(mask_dst)
    resized = {name: resize(name, features[name]) for name in used}

    weights = []
    for n in range(batch):
        vectors = []
        for descriptor in kernels:
            parts = []
            for name, sigma in descriptor.items():
                if name == "weight":
                    continue
                if name == POSITION_KEYS[rank]:
                    parts.append(positions / sigma)
                else:
                    parts.append(resized[name][n].flatten(1).T.numpy() / sigma)
            vectors.append(np.concatenate(parts, axis=1))
        weights.append(
            _pair_weights(
                vectors,
                [float(k["weight"]) for k in kernels],
                shape,
                radius,
                None if src is None else src[n, 0].flatten(),
                None if dst is None else dst[n, 0].flatten(),
            )
        )
    return torch.from_numpy(np.stack(weights)), src, dst


def naive_gated_crf_loss(
    probs: Tensor,
    features: Mapping[str, Tensor],
    kernels: Sequence[Mapping[str, float]],
    radius: int,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    compatibility: Tensor | None = None,
    spacing: Sequence[float] | None = None,
    downsamplers: Mapping[str, Callable[[Tensor, tuple[int, ...]], Tensor]] | None = None,
) -> Tensor:
    """The whole loss of docs/math.md#loss from user-level inputs, float64, differentiable in probs."""
    batch, num_classes = probs.shape[:2]
    shape = tuple(probs.shape[2:])
    weights, src, dst = naive_user_weights(
        shape, batch, features, kernels, radius, mask_src, mask_dst, spacing, downsamplers
    )
    mu_hat = None
    if compatibility is not None:
        mu = compatibility.to(torch.float64)
        row_sum = mu.sum(dim=1, keepdim=True)
        # A class with an all-zero row is compatible with every other: its row stays zero.
        mu_hat = torch.where(row_sum > 0, (num_classes - 1) * mu / row_sum, 0.0)
    total = _loss_from_weights(probs, weights, mu_hat)
    if dst is not None:
        denominator = max(1.0, float(dst.sum()))
    elif src is not None:
        denominator = max(1.0, float(src.sum()))
    else:
        denominator = float(batch * np.prod(shape))
    return total / denominator


def naive_mean_field_crf(
    logits: Tensor,
    features: Mapping[str, Tensor],
    kernels: Sequence[Mapping[str, float]],
    radius: int,
    iterations: int,
    compatibility: Tensor | None = None,
    mask_src: Tensor | None = None,
    mask_dst: Tensor | None = None,
    spacing: Sequence[float] | None = None,
    downsamplers: Mapping[str, Callable[[Tensor, tuple[int, ...]], Tensor]] | None = None,
) -> Tensor:
    """Ũ^T of docs/math.md#mean-field by the pair-weight loop: float64, on CPU, differentiable
    w.r.t. logits and compatibility (``M = W Q`` with the dense N×P×P weights)."""
    batch, num_classes = logits.shape[:2]
    shape = tuple(logits.shape[2:])
    weights, _, _ = naive_user_weights(
        shape, batch, features, kernels, radius, mask_src, mask_dst, spacing, downsamplers
    )
    if compatibility is None:
        mu = 1.0 - torch.eye(num_classes, dtype=torch.float64)
    else:
        mu = compatibility.to(torch.float64)
    unary = logits.to(torch.float64).flatten(2)  # N×C×P
    q = torch.softmax(unary, dim=1)
    refined = unary
    for _ in range(iterations):
        message = torch.einsum("nij,ncj->nci", weights, q)
        refined = unary - torch.einsum("lm,nmi->nli", mu, message)
        q = torch.softmax(refined, dim=1)
    return refined.reshape(logits.shape)


def flat_pairwise_sum(backend_function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A backend's ``gated_crf_pairwise_sum`` called with the contract's fields as arguments.

    The tests (and :func:`naive_pairwise_sum`) speak in fields; the backends take the typed values
    of ``gcrf.kernels.window``, built here, so the value's own checks run on every call.
    """
    from gcrf.kernels.window import GatedWindow, PairwiseInputs

    def call(
        probs, features, kernel_slices, kernel_weights, kernel_pos_scales, radius,
        mask_src=None, mask_dst=None, compatibility=None,
    ):  # fmt: skip
        window = GatedWindow(
            features, kernel_slices, kernel_weights, kernel_pos_scales, radius, mask_src, mask_dst
        )
        return backend_function(PairwiseInputs(probs, window, compatibility))

    return call


def flat_window_affinity(backend_function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A backend's ``window_affinity`` called with the window's fields as arguments."""
    from gcrf.kernels.window import GatedWindow

    def call(
        features, kernel_slices, kernel_weights, kernel_pos_scales, radius,
        mask_src=None, mask_dst=None,
    ):  # fmt: skip
        window = GatedWindow(
            features, kernel_slices, kernel_weights, kernel_pos_scales, radius, mask_src, mask_dst
        )
        return backend_function(window)

    return call
