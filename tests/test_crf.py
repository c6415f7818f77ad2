"""gcrf.crf against the naive float64 mean field of tests/loss_reference.py (docs/math.md#mean-field).

The reference builds the dense N×P×P pair weights from user-level inputs with its own loop
(resizing, positions, spacing, gates) and iterates ``M = W Q``, ``Ũ = U − μ M``: it shares no code
with gcrf. Every backend runs the value tests; gradients w.r.t. the logits and a learnable μ are
checked against autograd through the reference and by ``gradcheck`` at tiny sizes.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gcrf.crf import (
    MeanFieldCRF,
    kernels_from_pydensecrf,
    mean_field,
    mean_field_crf,
    window_coverage,
    window_mass,
)
from gcrf.loss import gated_window, window_message
from gcrf.loss.backends import available_backends
from tests.loss_reference import naive_mean_field_crf

KERNELS = [{"weight": 1.5, "xy": 2.0}, {"weight": 2.0, "xy": 3.0, "rgb": 0.4}]
REPOSITORY = Path(__file__).resolve().parents[1]
# The Triton backend runs on CUDA where there is a GPU, else in Triton's CPU interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on(device: str, value):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _on(device, item) for key, item in value.items()}
    return value


def refine(backend: str, *args, **kwargs) -> torch.Tensor:
    """``mean_field_crf`` on the backend's device (CUDA for Triton when present), result on CPU."""
    device = DEVICE if backend == "triton" else "cpu"
    args = [_on(device, a) for a in args]
    kwargs = {key: _on(device, value) for key, value in kwargs.items()}
    return mean_field_crf(*args, backend=backend, **kwargs).cpu()


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest) -> str:
    status = {s.name: s for s in available_backends()}[request.param]
    if not status.usable:
        pytest.skip(f"backend {request.param!r} cannot run here: {status.reason}")
    return request.param


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def _mask(n: int, *spatial: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(n, 1, *spatial, generator=g) > 0.25).double()
    m[..., 0, 0] = float("nan")  # NaN and fractional values, as real gates have
    m[..., -1, -1] = 0.5
    return m


def _compatibility(c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, c, generator=g, dtype=torch.float64) * 2  # non-zero diagonal allowed


def _check(backend, logits, features, kernels, radius, iterations, rtol=1e-10, atol=1e-10, **kw):
    ours = refine(backend, logits, features, kernels, radius, iterations, **kw)
    ref = naive_mean_field_crf(logits, features, kernels, radius, iterations, **kw)
    assert ours.shape == logits.shape and ours.dtype == logits.dtype
    torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=atol)
    return ours


@pytest.mark.parametrize("masks", ["none", "src", "dst", "both"])
def test_images_against_reference(backend, masks):
    logits = _rand(2, 3, 7, 9, seed=1, scale=2)
    features = {"rgb": torch.rand(2, 3, 14, 18, dtype=torch.float64)}  # 2× the logits' size
    kw = {}
    if masks in ("src", "both"):
        kw["mask_src"] = _mask(2, 14, 18, seed=2)
    if masks in ("dst", "both"):
        kw["mask_dst"] = _mask(2, 14, 18, seed=3)
    _check(backend, logits, features, KERNELS, 2, 3, **kw)


@pytest.mark.parametrize(("radius", "iterations"), [(1, 1), (3, 2), (4, 5)])
def test_radii_and_iterations(backend, radius, iterations):
    logits = _rand(1, 4, 6, 5, seed=radius, scale=3)
    _check(backend, logits, {"rgb": torch.rand(1, 3, 6, 5, dtype=torch.float64)}, KERNELS,
           radius, iterations)  # fmt: skip


def test_compatibility_as_given(backend):
    """μ is used as given: not normalised, any non-negative diagonal."""
    logits = _rand(2, 3, 6, 7, seed=4, scale=2)
    features = {"rgb": torch.rand(2, 3, 6, 7, dtype=torch.float64)}
    ours = _check(backend, logits, features, KERNELS, 2, 3, compatibility=_compatibility(3, 5))
    potts = refine(backend, logits, features, KERNELS, 2, 3)
    assert not torch.allclose(ours, potts)


def test_potts_matrix_equals_default(backend):
    logits = _rand(1, 4, 5, 6, seed=6)
    features = {"rgb": torch.rand(1, 3, 5, 6, dtype=torch.float64)}
    default = refine(backend, logits, features, KERNELS, 2, 3)
    potts_matrix = 1 - torch.eye(4, dtype=torch.float64)
    explicit = refine(backend, logits, features, KERNELS, 2, 3, compatibility=potts_matrix)
    torch.testing.assert_close(default, explicit, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masks", [False, True])
def test_volumes_with_spacing(backend, masks):
    kernels = [{"weight": 1.0, "xyz": 2.0, "ct": 0.5}, {"weight": 0.5, "xyz": 1.5}]
    logits = _rand(2, 3, 3, 4, 5, seed=7, scale=2)
    features = {"ct": torch.rand(2, 1, 3, 8, 10, dtype=torch.float64)}  # ratio (1, 2, 2)
    kw = {"spacing": (2.5, 0.7, 0.7)}
    if masks:
        kw |= {"mask_src": _mask(2, 3, 8, 10, seed=8), "mask_dst": _mask(2, 3, 8, 10, seed=9)}
    _check(backend, logits, features, kernels, 1, 2, compatibility=_compatibility(3, 10), **kw)


def test_low_precision_logits(backend):
    """bf16/fp16 logits: computed in fp32, returned in their dtype."""
    logits32 = _rand(1, 3, 8, 8, seed=11, scale=2).float()
    features = {"rgb": torch.rand(1, 3, 8, 8)}
    for dtype in (torch.bfloat16, torch.float16):
        low = logits32.to(dtype)
        ours = refine(backend, low, features, KERNELS, 2, 3)
        ref = naive_mean_field_crf(low, features, KERNELS, 2, 3)
        assert ours.dtype == dtype
        resolution = torch.finfo(dtype).eps
        assert (ours.double() - ref).abs().max() <= 2 * resolution * ref.abs().max()


def test_gradients_of_logits_and_learnable_compatibility(backend):
    logits = _rand(2, 3, 5, 6, seed=12, scale=2).requires_grad_(True)
    mu = _compatibility(3, 13).requires_grad_(True)
    features = {"rgb": torch.rand(2, 3, 5, 6, dtype=torch.float64)}
    masks = {"mask_src": _mask(2, 5, 6, seed=14), "mask_dst": _mask(2, 5, 6, seed=15)}
    upstream = _rand(2, 3, 5, 6, seed=16)
    ours = refine(backend, logits, features, KERNELS, 2, 3, mu, **masks)
    g_logits, g_mu = torch.autograd.grad(ours, (logits, mu), upstream)
    ref = naive_mean_field_crf(logits, features, KERNELS, 2, 3, mu, **masks)
    r_logits, r_mu = torch.autograd.grad(ref, (logits, mu), upstream)
    torch.testing.assert_close(g_logits, r_logits, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g_mu, r_mu, rtol=1e-9, atol=1e-10)


def test_gradcheck_tiny():
    features = {"rgb": torch.rand(1, 3, 3, 4, dtype=torch.float64)}
    mask = _mask(1, 3, 4, seed=17)
    logits = _rand(1, 2, 3, 4, seed=18).requires_grad_(True)
    mu = _compatibility(2, 19).requires_grad_(True)
    for compatibility in (None, mu):
        inputs = (logits,) if compatibility is None else (logits, compatibility)

        def refine(*args):
            mu_arg = args[1] if len(args) > 1 else None
            return mean_field_crf(args[0], features, KERNELS, 1, 2, mu_arg, mask_src=mask,
                                  backend="torch")  # fmt: skip

        assert torch.autograd.gradcheck(refine, inputs)


def test_memory_has_no_window_axis():
    """Autograd keeps O(T·N·C·|Ω|): no saved tensor holds a (2r+1)^q window axis."""
    logits = _rand(1, 4, 16, 16, seed=20).float().requires_grad_(True)
    features = {"rgb": torch.rand(1, 3, 16, 16)}
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        refined = mean_field_crf(logits, features, KERNELS, radius=5, iterations=4,
                                 backend="torch")  # fmt: skip
    refined.sum().backward()
    field = logits.numel()
    assert saved and max(saved) <= field  # a window axis would be 121× the logits
    assert sum(saved) <= 4 * 4 * field  # a few field-sized tensors per iteration


def test_inputs_not_modified():
    logits = _rand(2, 3, 6, 6, seed=21).float()
    rgb = torch.rand(2, 3, 12, 12)
    m_src, m_dst = _mask(2, 12, 12, seed=22).float(), _mask(2, 6, 6, seed=23).float()
    mu = _compatibility(3, 24).float()
    originals = [t.clone() for t in (logits, rgb, m_src, m_dst, mu)]
    crf = MeanFieldCRF(KERNELS, radius=2, iterations=2, compatibility=mu)
    crf(logits, {"rgb": rgb}, mask_src=m_src, mask_dst=m_dst)
    mean_field_crf(logits, {"rgb": rgb}, KERNELS, 2, 2, mu, mask_src=m_src, mask_dst=m_dst)
    for before, after in zip(originals, (logits, rgb, m_src, m_dst, mu), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


def test_a_gated_off_pixel_keeps_its_unary():
    """m_dst(i) = 0: pixel i receives no message, so its refined logits are its unaries."""
    logits = _rand(1, 3, 6, 6, seed=25).float()
    mask_dst = torch.ones(1, 1, 6, 6)
    mask_dst[..., 2, 3] = 0
    refined = mean_field_crf(logits, {"rgb": torch.rand(1, 3, 6, 6)}, KERNELS, 2, 3,
                             mask_dst=mask_dst, backend="torch")  # fmt: skip
    torch.testing.assert_close(refined[..., 2, 3], logits[..., 2, 3])
    assert not torch.allclose(refined[..., 2, 2], logits[..., 2, 2])


def test_module_equals_functional_and_learns_compatibility():
    logits = _rand(2, 3, 6, 7, seed=26).float()
    features = {"rgb": torch.rand(2, 3, 6, 7)}
    mu = torch.nn.Parameter(_compatibility(3, 27).float())
    crf = MeanFieldCRF(KERNELS, radius=2, iterations=3, compatibility=mu, backend="torch")
    assert list(crf.parameters()) == [mu]
    expected = mean_field_crf(logits, features, KERNELS, 2, 3, mu.detach(), backend="torch")
    torch.testing.assert_close(crf(logits, features), expected)
    before = mu.detach().clone()
    torch.optim.SGD(crf.parameters(), lr=0.1).zero_grad()
    F.cross_entropy(crf(logits, features), torch.zeros(2, 6, 7, dtype=torch.long)).backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0
    torch.optim.SGD(crf.parameters(), lr=0.1).step()
    assert not torch.equal(mu.detach(), before)
    # A plain tensor is a buffer (no parameter, moves with the module); None is Potts.
    buffered = MeanFieldCRF(KERNELS, compatibility=before)
    assert list(buffered.parameters()) == [] and "compatibility" in dict(buffered.named_buffers())
    assert "Potts" in repr(MeanFieldCRF(KERNELS))


def test_softplus_parametrization_keeps_a_learnt_compatibility_non_negative():
    """The documented way to learn μ ≥ 0: torch.nn.utils.parametrize with a softplus."""

    class Softplus(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.softplus(x)

    raw = torch.nn.Parameter(torch.zeros(3, 3))
    crf = MeanFieldCRF(KERNELS, radius=1, iterations=2, compatibility=raw)
    torch.nn.utils.parametrize.register_parametrization(crf, "compatibility", Softplus())
    optimizer = torch.optim.SGD(crf.parameters(), lr=50.0)
    logits, features = _rand(1, 3, 5, 5, seed=28).float(), {"rgb": torch.rand(1, 3, 5, 5)}
    for _ in range(3):
        optimizer.zero_grad()
        crf(logits, features).pow(2).sum().backward()  # pushes μ down
        optimizer.step()
    original = crf.parametrizations.compatibility.original
    assert bool((original < 0).any())  # unconstrained, μ would now be negative and refused
    assert bool((crf.compatibility >= 0).all())
    crf(logits, features)  # and the CRF still runs


def test_mean_field_on_a_prepared_window_equals_the_functional():
    logits = _rand(1, 3, 8, 8, seed=29).float()
    features = {"rgb": torch.rand(1, 3, 16, 16)}
    window = gated_window(features, KERNELS, radius=2, size=(8, 8))
    torch.testing.assert_close(
        mean_field(logits, window, 3), mean_field_crf(logits, features, KERNELS, 2, 3)
    )


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        ({"iterations": 0}, ValueError, "iterations must be a positive int; got 0"),
        ({"iterations": 1.5}, TypeError, "iterations must be a positive int; got 1.5"),
        ({"iterations": True}, TypeError, "iterations"),
        ({"compatibility": -torch.ones(3, 3)}, ValueError, "compatibility must be >= 0"),
        ({"compatibility": torch.ones(4, 4)}, ValueError, "C×C = 3×3"),
        ({"compatibility": torch.ones(3, 2)}, ValueError, "C×C matrix"),
        ({"compatibility": [[0, 1], [1, 0]]}, TypeError, "compatibility must be a C×C"),
        ({"logits": torch.zeros(1, 3, 6, 6, dtype=torch.long)}, TypeError, "logits must be a"),
        ({"logits": torch.zeros(3, 6, 6)}, ValueError, "logits must be N×C×h×w"),
        ({"features": {"rgb": torch.rand(1, 3, 7, 7)}}, ValueError, "integer multiple"),
        ({"features": {}}, ValueError, "modality 'rgb'"),
        ({"mask_src": torch.ones(2, 1, 6, 6)}, ValueError, "differs from logits'"),
        ({"radius": 0}, ValueError, "radius"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_is_refused_by_name(call, error, text):
    args = {"logits": torch.zeros(1, 3, 6, 6), "features": {"rgb": torch.rand(1, 3, 6, 6)},
            "kernels": KERNELS, "radius": 2, "iterations": 2} | call  # fmt: skip
    with pytest.raises(error, match=re.escape(text)):
        mean_field_crf(**args)


# --------------------------------------------------------------------------------------------------
# pydensecrf's parameters
# --------------------------------------------------------------------------------------------------


def _fully_connected_potts(log_probs, image255, gaussian, bilateral, iterations):
    """pydensecrf's update, written here: fully connected, unnormalised, no self term.

    ``tmp = log p + Σ_terms compat · Σ_{j≠i} k(f_i, f_j) Q_j``, ``Q = softmax(tmp)``; positions in
    image pixels, colours in 0–255.
    """
    c, h, w = log_probs.shape
    yx = np.array(list(itertools.product(range(h), range(w))), dtype=np.float64)
    rgb = image255.reshape(3, -1).T.astype(np.float64)
    weights = np.zeros((h * w, h * w))
    for sxy, compat in gaussian:
        d = ((yx[:, None] - yx[None]) ** 2).sum(-1) / sxy**2
        weights += compat * np.exp(-0.5 * d)
    for sxy, srgb, compat in bilateral:
        d = ((yx[:, None] - yx[None]) ** 2).sum(-1) / sxy**2
        d += ((rgb[:, None] - rgb[None]) ** 2).sum(-1) / srgb**2
        weights += compat * np.exp(-0.5 * d)
    np.fill_diagonal(weights, 0.0)
    unary = log_probs.reshape(c, -1)
    q = np.exp(unary - unary.max(0)) / np.exp(unary - unary.max(0)).sum(0)
    for _ in range(iterations):
        tmp = unary + q @ weights.T
        q = np.exp(tmp - tmp.max(0))
        q /= q.sum(0)
    return q.reshape(c, h, w)


def test_pydensecrf_parameters_give_its_update_when_the_window_covers_the_image():
    """σ in image pixels, colour σ in 0–255, Potts compat: gcrf's Q^T equals pydensecrf's update
    (written in the test) once the window holds the whole image and both are unnormalised."""
    g = torch.Generator().manual_seed(30)
    h, w, stride = 5, 6, 2
    image = torch.rand(1, 3, h * stride, w * stride, generator=g, dtype=torch.float64)
    log_probs = torch.log_softmax(2 * torch.randn(1, 3, h, w, generator=g, dtype=torch.float64), 1)
    gaussian, bilateral = [(3.0, 3.0)], [(8.0, 60.0, 2.0)]
    kernels = kernels_from_pydensecrf(gaussian, bilateral, stride=stride, image_scale=1.0)
    refined = mean_field_crf(log_probs, {"rgb": image}, kernels, radius=max(h, w), iterations=4)
    # pydensecrf sees the image at the logits' resolution: the area-averaged pixels, positions in
    # image pixels (stride × the logit index), colours in 0–255.
    small = F.adaptive_avg_pool2d(image, (h, w))[0].numpy() * 255.0
    scaled_gaussian = [(sxy / stride, compat) for sxy, compat in gaussian]
    scaled_bilateral = [(sxy / stride, srgb, compat) for sxy, srgb, compat in bilateral]
    expected = _fully_connected_potts(log_probs[0].numpy(), small, scaled_gaussian,
                                      scaled_bilateral, 4)  # fmt: skip
    np.testing.assert_allclose(torch.softmax(refined, 1)[0].numpy(), expected, atol=1e-12)


def test_window_mass_is_the_degree_of_a_uniform_region():
    """window_mass(σ, r) is Σ_{j∈W(i)} exp(−‖δ‖²/2σ²): the degree of an interior pixel of a
    uniform image under a weight-1 kernel, in 2D and 3D (against the message of ones)."""
    for sigma, radius, rank in ((1.0, 2, 2), (2.5, 3, 2), (1.5, 1, 3)):
        brute = sum(
            math.exp(-0.5 * sum(d * d for d in delta) / sigma**2)
            for delta in itertools.product(range(-radius, radius + 1), repeat=rank)
            if any(delta)
        )
        assert window_mass(sigma, radius, rank) == pytest.approx(brute, rel=1e-12)
        size = (2 * radius + 3,) * rank
        position = "xy" if rank == 2 else "xyz"
        image = torch.full((1, 1, *size), 0.3, dtype=torch.float64)
        window = gated_window({"rgb": image}, [{"weight": 1.0, position: sigma, "rgb": 0.1}],
                              radius)  # fmt: skip
        degree = window_message(window, torch.ones(1, 1, *size, dtype=torch.float64))
        centre = (0, 0, *(s // 2 for s in size))
        assert degree[centre].item() == pytest.approx(window_mass(sigma, radius, rank), rel=1e-12)
    with pytest.raises(ValueError, match="radius must be an int >= 1"):
        window_mass(1.0, 0)


def test_pydensecrf_weights_scaled_to_the_window_match_its_normalised_filter_in_flat_regions():
    """With window_radius, each term's weight is compat / window_mass: an interior pixel of a
    uniform image has degree Σ compat, which is what pydensecrf's normalised filter
    (n_i Σ_j K_ij n_j, n = d^{-1/2}) gives every pixel of a uniform region."""
    gaussian, bilateral, radius = [(1.5, 3.0)], [(2.0, 10.0, 5.0)], 3
    plain = kernels_from_pydensecrf(gaussian, bilateral, modality="intensity")
    scaled = kernels_from_pydensecrf(gaussian, bilateral, modality="intensity",
                                     window_radius=radius)  # fmt: skip
    for a, b in zip(plain, scaled, strict=True):
        assert b["weight"] == pytest.approx(a["weight"] / window_mass(a["xy"], radius))
        assert {k: v for k, v in a.items() if k != "weight"} == {
            k: v for k, v in b.items() if k != "weight"
        }
    image = torch.full((1, 1, 11, 11), 0.5, dtype=torch.float64)
    window = gated_window({"intensity": image}, scaled, radius)
    degree = window_message(window, torch.ones(1, 1, 11, 11, dtype=torch.float64))
    assert degree[0, 0, 5, 5].item() == pytest.approx(3.0 + 5.0, rel=1e-12)
    crf = MeanFieldCRF.from_pydensecrf(gaussian, bilateral, radius=radius, modality="intensity",
                                       normalise=True)  # fmt: skip
    assert crf._kernels_desc == scaled
    with pytest.raises(ValueError, match="radius must be an int >= 1"):
        kernels_from_pydensecrf(window_radius=0)


def test_from_pydensecrf_builds_the_same_crf():
    crf = MeanFieldCRF.from_pydensecrf([(3, 3)], [(80, 13, 10)], radius=3, stride=4,
                                       image_scale=255.0)  # fmt: skip
    assert crf._kernels_desc == [{"weight": 3.0, "xy": 0.75},
                                 {"weight": 10.0, "xy": 20.0, "rgb": 13.0}]  # fmt: skip
    with pytest.raises(ValueError, match=r"bilateral\[0\] must be \(sxy, srgb, compat\)"):
        kernels_from_pydensecrf([], [(80, 13)])
    with pytest.raises(ValueError, match="stride must be a number > 0"):
        kernels_from_pydensecrf(stride=0)


@pytest.mark.parametrize(("sigma", "radius", "rank"), [(3.0, 5, 2), (20.0, 5, 2), (1.0, 2, 3)])
def test_window_coverage_by_brute_force(sigma, radius, rank):
    reach = int(12 * sigma)
    grid = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1)] * rank, indexing="ij"), -1)
    gauss = np.exp(-0.5 * (grid**2).sum(-1) / sigma**2)
    inside = (np.abs(grid) <= radius).all(-1)
    centre = (grid == 0).all(-1)
    expected = gauss[inside & ~centre].sum() / gauss[~centre].sum()
    assert math.isclose(window_coverage(sigma, radius, rank), expected, rel_tol=1e-9)


# --------------------------------------------------------------------------------------------------
# The documentation's examples run and check what they say
# --------------------------------------------------------------------------------------------------


def test_docs_examples_run():
    text = (REPOSITORY / "docs" / "crf.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "docs/crf.md", "exec"), {})


def test_subnormal_values_are_flushed_without_touching_the_input():
    """The torch backend drops subnormal field values and affinities (slow on a CPU, below fp32
    precision): the message equals the reference, and the caller's field keeps them."""
    tiny = torch.finfo(torch.float32).tiny
    field = torch.rand(1, 3, 6, 7)
    field[0, 0, :3] = tiny / 8  # subnormal probabilities, as a converged mean field has
    before = field.clone()
    image = torch.zeros(1, 3, 6, 7)
    image[..., 4:] = 1.0  # a colour edge far beyond σ: affinities across it underflow
    window = gated_window({"rgb": image}, [{"weight": 1.0, "xy": 2.0, "rgb": 0.05}], 2)
    from gcrf.loss import window_message
    from tests.loss_reference import naive_window_message

    message = window_message(window, field, backend="torch")
    assert torch.equal(field, before)  # subnormals still there: nothing modified in place
    expected = naive_window_message(field, window)
    torch.testing.assert_close(message.double(), expected, rtol=1e-6, atol=1e-30)  # fmt: skip
    assert not bool(((message != 0) & (message.abs() < tiny)).any())  # no subnormal left
