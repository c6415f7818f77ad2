"""The backend contract (docs/CONTRACTS.md §1), one suite that every backend runs.

Each test takes the ``core`` fixture: the three functions of one backend — ``"torch"``
(:mod:`gcrf.loss.torch_backend`) and ``"triton"`` (:mod:`gcrf.kernels.gated_crf`, through Triton's
CPU interpreter on a machine without CUDA, see tests/conftest.py). Values and gradients are compared
with the naive float64 references of tests/loss_reference.py (every pixel, every neighbour, explicit
coordinates), at odd sizes, several radii, every gate combination, 2D and 3D, upstream gradients
≠ 1. Shapes stay tiny: the interpreter runs every program in Python. Triton-only matters (channel
chunks, pixel tiles, the custom-op registration, autotune pruning, ahead-of-time compilation, CUDA)
are in tests/test_kernels.py.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from gcrf.kernels.window import GatedWindow, PairwiseInputs
from gcrf.loss.backends import Backend, available_backends, get_backend
from tests.loss_reference import naive_pairwise_sum, naive_window_affinity, naive_window_message

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Two kernels as gcrf.loss builds them from {"weight": 1, "xy": 6, "rgb": 0.1} and {"weight": 0.5,
# "xy": 3}: the first has 3 feature channels (and a position term), the second position only.
TWO_KERNELS = {
    "kernel_slices": ((0, 3), (3, 3)),
    "kernel_weights": (1.0, 0.5),
    "kernel_pos_scales": ((1 / 6, 1 / 5), (1 / 3, 1 / 3)),
}
MASKS = ["none", "src", "dst", "both"]


@pytest.fixture(params=["torch", "triton"])
def core(request: pytest.FixtureRequest) -> Backend:
    """The functions of one backend."""
    status = {s.name: s for s in available_backends()}[request.param]
    if not status.usable:
        pytest.skip(f"backend {request.param!r} cannot run here: {status.reason}")
    return get_backend(request.param)


def make_inputs(
    n: int = 2,
    c: int = 5,
    spatial: tuple[int, ...] = (13, 17),
    num_features: int = 3,
    masks: str = "none",
    compat: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Probabilities, features, 0/1 gates and a normalised μ̂, on the test device."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, *spatial, generator=gen), dim=1).to(dtype)
    features = 0.7 * torch.randn(n, num_features, *spatial, generator=gen)
    mask_src = mask_dst = None
    if masks in ("src", "both"):
        mask_src = (torch.rand(n, 1, *spatial, generator=gen) > 0.3).float()
    if masks in ("dst", "both"):
        mask_dst = (torch.rand(n, 1, *spatial, generator=gen) > 0.3).float()
    compatibility = None
    if compat:
        mu = torch.rand(c, c, generator=gen)
        mu.fill_diagonal_(0)
        compatibility = (c - 1) * mu / mu.sum(1, keepdim=True).clamp_min(1e-12)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def move(t: torch.Tensor | None, to: torch.dtype | None = None) -> torch.Tensor | None:
        return None if t is None else t.to(DEVICE, to)

    return {
        "probs": move(probs),
        "features": move(features, acc),
        "mask_src": move(mask_src),
        "mask_dst": move(mask_dst),
        "compatibility": move(compatibility, acc),
    }


def window_of(inputs: dict, tables: dict) -> GatedWindow:
    return GatedWindow(
        inputs["features"], **tables, mask_src=inputs["mask_src"], mask_dst=inputs["mask_dst"]
    )


def pairwise_with_grad(core: Backend, inputs: dict, tables: dict, upstream: float):
    """Value and ∂(upstream·S)/∂probs of one backend (the gradient in probs' dtype)."""
    probs = inputs["probs"].detach().clone().requires_grad_(True)
    value = core.pairwise_sum(
        PairwiseInputs(probs, window_of(inputs, tables), inputs["compatibility"])
    )
    value.backward(torch.as_tensor(upstream, dtype=value.dtype, device=value.device))
    return value.detach(), probs.grad


def reference_with_grad(inputs: dict, tables: dict, upstream: float):
    probs = inputs["probs"].detach().cpu().double().requires_grad_(True)
    value = naive_pairwise_sum(probs, window_of(inputs, tables), inputs["compatibility"])
    (value * upstream).backward()
    return value.detach(), probs.grad


def assert_pairwise_sum_matches(core, inputs, tables, upstream=0.37, rtol=2e-5, atol=1e-6):
    value, grad = pairwise_with_grad(core, inputs, tables, upstream)
    ref_value, ref_grad = reference_with_grad(inputs, tables, upstream)
    acc = torch.float64 if inputs["probs"].dtype == torch.float64 else torch.float32
    assert value.dtype == acc and value.shape == ()
    assert grad.dtype == inputs["probs"].dtype and grad.shape == inputs["probs"].shape
    torch.testing.assert_close(value.double().cpu(), ref_value, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# The pairwise sum S and its gradient
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masks", MASKS)
def test_pairwise_sum_for_every_gate_combination(core, masks):
    inputs = make_inputs(masks=masks)
    before = {k: v.clone() for k, v in inputs.items() if v is not None}
    assert_pairwise_sum_matches(core, inputs, {**TWO_KERNELS, "radius": 1})
    for name, tensor in before.items():
        assert torch.equal(inputs[name], tensor), f"{name} was modified"


@pytest.mark.parametrize(
    ("spatial", "radius"), [((1, 9), 2), ((12, 11), 2), ((3, 43), 2), ((7, 8), 3), ((5, 6), 4)]
)
def test_pairwise_sum_at_odd_sizes_and_radii(core, spatial, radius):
    inputs = make_inputs(n=1, spatial=spatial, masks="both", seed=radius)
    assert_pairwise_sum_matches(core, inputs, {**TWO_KERNELS, "radius": radius}, upstream=-1.7)


@pytest.mark.parametrize("masks", ["none", "both"])
def test_pairwise_sum_with_compatibility(core, masks):
    inputs = make_inputs(masks=masks, compat=True, seed=3)
    assert_pairwise_sum_matches(core, inputs, {**TWO_KERNELS, "radius": 2}, upstream=-1.3)


@pytest.mark.parametrize("rank", [2, 3])
def test_pairwise_sum_kernel_tables(core, rank):
    """A position-only term (F = 0), a zero weight, channels shared by two terms, anisotropy."""
    spatial = (6, 7) if rank == 2 else (3, 4, 5)
    tables = {
        "kernel_slices": ((0, 3), (3, 4), (4, 4), (0, 1)),
        "kernel_weights": (0.8, 0.4, 0.3, 0.0),
        "kernel_pos_scales": (
            (0.5,) * rank,
            (0.0,) * rank,
            tuple(0.2 + 0.1 * a for a in range(rank)),
            (1.0,) * rank,
        ),
        "radius": 2 if rank == 2 else 1,
    }
    for compat in (False, True):
        inputs = make_inputs(c=3, spatial=spatial, num_features=4, masks="both", compat=compat)
        assert_pairwise_sum_matches(core, inputs, tables, upstream=1.5)


@pytest.mark.parametrize("masks", ["none", "src"])
def test_pairwise_sum_position_only(core, masks):
    """No feature channel at all: the window depends on the offset only."""
    tables = {
        "kernel_slices": ((0, 0), (0, 0)),
        "kernel_weights": (1.0, 0.25),
        "kernel_pos_scales": ((1 / 2, 1 / 3), (1 / 5, 1 / 5)),
        "radius": 2,
    }
    inputs = make_inputs(num_features=0, masks=masks, seed=11)
    assert_pairwise_sum_matches(core, inputs, tables, upstream=-0.8)


def test_pairwise_sum_single_class(core):
    inputs = make_inputs(c=1, masks="both", seed=6)
    assert_pairwise_sum_matches(core, inputs, {**TWO_KERNELS, "radius": 1})


@pytest.mark.parametrize("compat", [False, True])
def test_pairwise_sum_of_volumes(core, compat):
    inputs = make_inputs(n=2, c=3, spatial=(4, 5, 6), masks="both", compat=compat, seed=11)
    tables = {
        "kernel_slices": ((0, 3), (3, 3)),
        "kernel_weights": (1.0, 0.25),
        "kernel_pos_scales": ((0.5, 0.2, 0.1), (0.3, 0.3, 0.3)),  # anisotropic voxels
        "radius": 1,
    }
    assert_pairwise_sum_matches(core, inputs, tables, upstream=0.8)


def test_pairwise_sum_in_float64(core):
    inputs = make_inputs(masks="both", compat=True, dtype=torch.float64, seed=9)
    assert_pairwise_sum_matches(core, inputs, {**TWO_KERNELS, "radius": 2}, rtol=1e-12, atol=1e-12)


def test_pairwise_sum_of_noncontiguous_inputs(core):
    inputs = make_inputs(spatial=(17, 13), seed=10)
    inputs["probs"] = inputs["probs"].transpose(2, 3)  # a 13×17 view with permuted strides
    inputs["features"] = inputs["features"].transpose(2, 3)
    assert not inputs["probs"].is_contiguous()
    assert_pairwise_sum_matches(core, inputs, {**TWO_KERNELS, "radius": 1})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pairwise_sum_of_low_precision_accumulates_in_float32(core, dtype):
    # The reference sees the same rounded probabilities upcast to fp64: only the final cast of the
    # gradient to the input dtype may lose precision, the value is accumulated in fp32.
    inputs = make_inputs(masks="src", dtype=dtype, seed=14)
    tables = {**TWO_KERNELS, "radius": 1}
    value, grad = pairwise_with_grad(core, inputs, tables, 1.0)
    ref_value, ref_grad = reference_with_grad(inputs, tables, 1.0)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(value.double().cpu(), ref_value, rtol=1e-5, atol=1e-5)
    resolution = torch.finfo(dtype).eps
    assert (grad.double().cpu() - ref_grad).abs().max() <= resolution * ref_grad.abs().max()


def test_pairwise_sum_without_gradient_equals_with_gradient(core):
    # The no-grad sweep (one gate, Σ⟨y, M⟩) and the gradient sweep (both gates, ½ Σ⟨y, M⟩) are two
    # formulas for the same S.
    for compat in (False, True):
        inputs = make_inputs(spatial=(7, 9), masks="both", compat=compat, seed=22)
        tables = {**TWO_KERNELS, "radius": 1}
        pairwise = PairwiseInputs(
            inputs["probs"], window_of(inputs, tables), inputs["compatibility"]
        )
        with torch.no_grad():
            value_only = core.pairwise_sum(pairwise)
        value, _ = pairwise_with_grad(core, inputs, tables, 1.0)
        ref_value, _ = reference_with_grad(inputs, tables, 1.0)
        torch.testing.assert_close(value_only.double().cpu(), ref_value, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(value_only, value, rtol=1e-5, atol=1e-5)


def test_pairwise_sum_refuses_a_second_derivative(core):
    # The gradient is saved from the sweep; a second derivative must raise, never be silently 0.
    inputs = make_inputs(n=1, c=2, spatial=(5, 5), seed=23)
    probs = inputs["probs"].requires_grad_(True)
    window = window_of(inputs, {**TWO_KERNELS, "radius": 1})
    value = core.pairwise_sum(PairwiseInputs(probs, window)) * torch.tensor(2.0, requires_grad=True)
    (grad,) = torch.autograd.grad(value, probs, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.sum(), probs)


def test_pairwise_sum_equals_the_sum_of_the_affinity(core):
    # With y = 0, φ = 1 for every pair, so S = Σ_ij G_ij K_ij: the sum of the affinity map.
    inputs = make_inputs(c=2, masks="dst", seed=17)
    window = window_of(inputs, {**TWO_KERNELS, "radius": 2})
    total = core.pairwise_sum(PairwiseInputs(torch.zeros_like(inputs["probs"]), window))
    affinity = core.window_affinity(window)
    torch.testing.assert_close(affinity.double().sum(), total.double(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The window affinity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spatial", "radius"), [((6, 9), 2), ((3, 4, 5), 1), ((2, 3), 3)])
def test_window_affinity_matches_reference(core, spatial, radius):
    inputs = make_inputs(n=2, spatial=spatial, masks="both", seed=16)
    rank = len(spatial)
    tables = {
        "kernel_slices": ((0, 3), (1, 2)),
        "kernel_weights": (1.0, 0.5),
        "kernel_pos_scales": ((0.3,) * rank, (0.0,) * rank),
        "radius": radius,
    }
    out = core.window_affinity(window_of(inputs, tables))
    assert out.dtype == torch.float32
    assert out.shape == (2, (2 * radius + 1) ** rank, *spatial)
    expected = naive_window_affinity(window_of(inputs, tables))
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.all(out[:, ((2 * radius + 1) ** rank) // 2] == 0)  # the centre offset


def test_window_affinity_of_float64_features_is_float64(core):
    inputs = make_inputs(n=1, spatial=(5, 7), masks="src", seed=3, dtype=torch.float64)
    tables = {"kernel_slices": ((0, 3),), "kernel_weights": (1.0,),
              "kernel_pos_scales": ((0.2, 0.2),), "radius": 1}  # fmt: skip
    out = core.window_affinity(window_of(inputs, tables))
    assert out.dtype == torch.float64
    expected = naive_window_affinity(window_of(inputs, tables))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# The window message M = Σ_j G_ij K_ij v_j
# --------------------------------------------------------------------------------------------------


def message_with_grad(core: Backend, window: GatedWindow, field: torch.Tensor, upstream):
    v = field.detach().clone().requires_grad_(True)
    out = core.window_message(window, v)
    out.backward(upstream.to(out.dtype))
    return out.detach(), v.grad


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("masks", MASKS)
def test_window_message_matches_reference(core, rank, masks):
    spatial = (7, 9) if rank == 2 else (3, 4, 5)
    inputs = make_inputs(n=2, c=3, spatial=spatial, masks=masks, seed=30 + rank)
    tables = {
        "kernel_slices": ((0, 3), (3, 3)),
        "kernel_weights": (1.0, 0.5),
        "kernel_pos_scales": (tuple(0.3 + 0.1 * a for a in range(rank)), (0.4,) * rank),
        "radius": 2 if rank == 2 else 1,
    }
    window = window_of(inputs, tables)
    gen = torch.Generator().manual_seed(rank)
    field = torch.randn(2, 4, *spatial, generator=gen).to(DEVICE)
    upstream = torch.randn(2, 4, *spatial, generator=gen).to(DEVICE)
    before = field.clone()
    out, grad = message_with_grad(core, window, field, upstream)
    assert torch.equal(field, before)
    assert out.dtype == torch.float32 and out.shape == field.shape
    reference_field = field.double().cpu().requires_grad_(True)
    expected = naive_window_message(reference_field, window_of(inputs, tables))
    expected.backward(upstream.double().cpu())
    torch.testing.assert_close(out.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), reference_field.grad, rtol=1e-5, atol=1e-6)
    # The backward is the message of the upstream gradient with the gate transposed.
    swapped = GatedWindow(window.features, **tables, mask_src=window.mask_dst,
                          mask_dst=window.mask_src)  # fmt: skip
    torch.testing.assert_close(grad, core.window_message(swapped, upstream), rtol=1e-6, atol=1e-6)


def test_window_message_gradcheck_in_float64(core):
    # Tiny: gradcheck calls the op twice per input element (the interpreter runs each in Python).
    inputs = make_inputs(n=1, c=1, spatial=(3, 3), masks="both", dtype=torch.float64, seed=40)
    window = window_of(inputs, {**TWO_KERNELS, "radius": 1})
    field = torch.rand(1, 1, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: core.window_message(window, v), (field,))
    assert torch.autograd.gradgradcheck(lambda v: core.window_message(window, v), (field,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_window_message_dtypes(core, dtype):
    """fp16/bf16 fields are accumulated in fp32 (the result is float32), fp64 in fp64."""
    inputs = make_inputs(n=1, c=3, spatial=(6, 7), masks="src", seed=41, dtype=dtype)
    tables = {**TWO_KERNELS, "radius": 2}
    field = inputs["probs"]
    out, grad = message_with_grad(core, window_of(inputs, tables), field, torch.ones_like(field))
    expected = naive_window_message(field.double(), window_of(inputs, tables))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc and grad.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tol, atol=tol)


def test_window_message_of_ones_is_the_affinity_sum(core):
    # v = 1: M_i = Σ_j G_ij K_ij, the sum of pixel i's affinity row.
    inputs = make_inputs(n=2, spatial=(6, 8), masks="both", seed=42)
    window = window_of(inputs, {**TWO_KERNELS, "radius": 2})
    ones = torch.ones(2, 1, 6, 8, device=DEVICE)
    message = core.window_message(window, ones)
    torch.testing.assert_close(message[:, 0], core.window_affinity(window).sum(1))


# --------------------------------------------------------------------------------------------------
# Determinism and the typed contract
# --------------------------------------------------------------------------------------------------


def test_repeated_runs_are_bitwise_equal(core):
    inputs = make_inputs(spatial=(7, 9), masks="both", compat=True, seed=15)
    tables = {**TWO_KERNELS, "radius": 1}
    window = window_of(inputs, tables)
    first = pairwise_with_grad(core, inputs, tables, 0.5)
    first_message = core.window_message(window, inputs["probs"])
    for _ in range(2):
        value, grad = pairwise_with_grad(core, inputs, tables, 0.5)
        assert torch.equal(value, first[0]) and torch.equal(grad, first[1])
        assert torch.equal(core.window_message(window, inputs["probs"]), first_message)


def test_backends_take_the_typed_contract_only(core):
    """Loose arguments are refused by name; a field that does not fit the window too."""
    inputs = make_inputs(seed=21)
    window = window_of(inputs, {**TWO_KERNELS, "radius": 1})
    with pytest.raises(TypeError, match="PairwiseInputs"):
        core.pairwise_sum(window)
    with pytest.raises(TypeError, match="GatedWindow"):
        core.window_affinity(inputs["features"])
    with pytest.raises(TypeError, match="GatedWindow"):
        core.window_message(inputs["features"], inputs["probs"])
    with pytest.raises(ValueError, match=r"field must be N×C×\*Ω .* got shape \(2, 5, 13, 16\)"):
        core.window_message(window, inputs["probs"][..., :-1])
    with pytest.raises(TypeError, match="field must be a float16"):
        core.window_message(window, inputs["probs"].to(torch.int64))


def test_contract_values_check_themselves():
    """GatedWindow / PairwiseInputs refuse malformed tables by name, for every backend alike."""
    inputs = make_inputs(seed=18)
    probs, features = inputs["probs"], inputs["features"]
    good = {**TWO_KERNELS, "radius": 1}
    with pytest.raises(ValueError, match="radius"):
        GatedWindow(features, **{**good, "radius": 0})
    with pytest.raises(TypeError, match="radius"):
        GatedWindow(features, **{**good, "radius": 1.5})
    with pytest.raises(ValueError, match="kernel_slices"):
        GatedWindow(features, **{**good, "kernel_slices": ((0, 9), (3, 3))})
    with pytest.raises(ValueError, match="kernel_pos_scales"):
        GatedWindow(features, **{**good, "kernel_pos_scales": ((1.0,), (1.0,))})
    with pytest.raises(ValueError, match="mask_src"):
        GatedWindow(features, **good, mask_src=probs[:, :1, :-1])
    window = GatedWindow(features, **good)
    with pytest.raises(ValueError, match="probs must be N×C×\\*Ω"):
        PairwiseInputs(probs[..., :-1], window)
    with pytest.raises(ValueError, match="compatibility"):
        PairwiseInputs(probs, window, torch.eye(3))
    with pytest.raises(ValueError, match="spatial rank"):
        PairwiseInputs(probs[:, :, None, None], window)
    with pytest.raises(TypeError, match="probs"):
        PairwiseInputs(probs.to(torch.int64), window)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that torch operations create and keep alive inside the
    ``with`` block: a storage counts from the op that returns it until the last tensor returned on
    it is freed. Independent of the allocator and of the process's other memory."""

    def __init__(self) -> None:
        super().__init__()
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or not tensor.untyped_storage().nbytes():
                continue
            key = tensor.untyped_storage().data_ptr()
            if key not in self._refs:
                self._refs[key] = 0
                self._sizes[key] = tensor.untyped_storage().nbytes()
                self.current += self._sizes[key]
                self.peak = max(self.peak, self.current)
            self._refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


@pytest.mark.parametrize("op", ["pairwise_sum", "window_message"])
@pytest.mark.parametrize("masks", ["none", "both"])
def test_torch_backend_memory_does_not_grow_with_the_radius(op, masks):
    """docs/math.md#message: the affinity is never stored, so the peak memory of a forward +
    backward is a few field-sized tensors whatever the radius (a half window of affinities held at
    once would grow ~(2r+1)²: 9× from r = 1 to r = 9 here)."""
    core = get_backend("torch")
    peaks = []
    for radius in (1, 9):
        inputs = make_inputs(n=1, c=3, spatial=(24, 24), masks=masks, seed=19)
        probs = inputs["probs"].cpu().requires_grad_(True)
        window = GatedWindow(
            inputs["features"].cpu(), **{**TWO_KERNELS, "radius": radius},
            mask_src=None if inputs["mask_src"] is None else inputs["mask_src"].cpu(),
            mask_dst=None if inputs["mask_dst"] is None else inputs["mask_dst"].cpu(),
        )  # fmt: skip
        with LiveTensorBytes() as memory:
            if op == "pairwise_sum":
                core.pairwise_sum(PairwiseInputs(probs, window)).backward()
            else:
                core.window_message(window, probs).sum().backward()
        peaks.append(memory.peak)
    field_bytes = probs.numel() * probs.element_size()
    assert peaks[1] <= peaks[0] + 2 * field_bytes, peaks
