"""Tests of gcrf.models: DeepLabv3+ on timm encoders, registry, weights, BatchNorm helpers.

Small inputs (2×3×65×97: not a multiple of 4, 16 or 32), pretrained=False, never the network.
"""

from __future__ import annotations

import copy
import socket

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from gcrf.models import (
    DeepLabV3Plus,
    PretrainedWeightsError,
    SegmentationOutput,
    UNet,
    convert_sync_batchnorm,
    create_model,
    freeze_batchnorm,
    list_models,
    register_model,
)

ENCODERS = ("resnet18", "convnext_atto", "mobilenetv3_small_050")  # stem at /2, stem at /4, BNAct
NUM_CLASSES = 5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # The CI machine has 2 cores shared by parallel jobs; oversubscribed intra-op threads make small
    # convolutions ~20x slower. One thread keeps this module fast; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def _images(n: int = 2, h: int = 65, w: int = 97) -> torch.Tensor:
    return torch.randn(n, 3, h, w)


def _bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in module.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    }


def _sgd_step(model: nn.Module, x: torch.Tensor) -> None:
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(x)
    loss = out.high.square().mean() + out.low.square().mean()
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()


# --------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_shapes_odd_input(encoder: str, output_stride: int) -> None:
    model = DeepLabV3Plus(encoder, num_classes=NUM_CLASSES, output_stride=output_stride)
    assert model.aspp_rates == ((12, 24, 36) if output_stride == 8 else (6, 12, 18))
    for mode in (True, False):
        out = model.train(mode)(_images())
        assert isinstance(out, SegmentationOutput)
        assert out.low.shape == (2, NUM_CLASSES, 17, 25)  # ceil(65/4), ceil(97/4)
        assert out.high.shape == (2, NUM_CLASSES, 65, 97)
        assert torch.isfinite(out.high).all()


def test_sizes_come_from_feature_info() -> None:
    # The decoder reads channel counts from timm, for the stride-4 level wherever it sits.
    for encoder in ENCODERS:
        info = timm.create_model(encoder, features_only=True).feature_info
        skip = info.channels()[info.reduction().index(4)]
        model = DeepLabV3Plus(encoder, num_classes=3)
        assert model.decoder.skip[0].in_channels == skip
        assert model.decoder.skip[0].out_channels == 48
        assert model.aspp.branches[0][0].in_channels == info.channels()[-1]
        assert model.encoder.feature_info.reduction() == [4, 16]
        assert model.head.out_channels == 3


def test_batch_of_one_eval_and_train() -> None:
    model = DeepLabV3Plus("resnet18", num_classes=NUM_CLASSES)
    x = _images(1, 33, 47)
    low, high = model.eval()(x)
    assert low.shape == (1, NUM_CLASSES, 9, 12) and high.shape == (1, NUM_CLASSES, 33, 47)
    low, high = model.train()(x)  # image pooling has no BatchNorm: batch 1 trains
    assert high.shape == (1, NUM_CLASSES, 33, 47)


def test_multiple_of_stride_needs_no_padding_and_high_is_upsampled_low() -> None:
    model = DeepLabV3Plus("resnet18", num_classes=NUM_CLASSES).eval()
    low, high = model(_images(2, 64, 96))
    assert low.shape[-2:] == (16, 24)
    expected = F.interpolate(low, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(high, expected, rtol=0, atol=0)


@pytest.mark.parametrize("padding_mode", ["constant", "replicate"])
def test_padding_policy_is_bottom_right_then_crop(padding_mode: str) -> None:
    model = DeepLabV3Plus("resnet18", num_classes=NUM_CLASSES, padding_mode=padding_mode).eval()
    x = _images()
    padded = F.pad(x, (0, 112 - 97, 0, 80 - 65), mode=padding_mode)  # next multiples of 16
    low, high = model(x)
    low_padded, high_padded = model(padded)
    torch.testing.assert_close(low, low_padded[..., :17, :25], rtol=0, atol=0)
    torch.testing.assert_close(high, high_padded[..., :65, :97], rtol=0, atol=0)
    assert not x.isnan().any()  # the caller's tensor is untouched (no in-place edits)


def test_padding_modes_differ() -> None:
    constant = DeepLabV3Plus("resnet18", num_classes=NUM_CLASSES).eval()
    replicate = DeepLabV3Plus("resnet18", num_classes=NUM_CLASSES, padding_mode="replicate").eval()
    replicate.load_state_dict(constant.state_dict())
    x = _images() + 3.0  # far from the zero padding value
    assert not torch.allclose(constant(x).low, replicate(x).low)


def test_channels_last() -> None:
    model = DeepLabV3Plus("resnet18", num_classes=NUM_CLASSES).eval()
    x = _images()
    reference = model(x)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out.low, reference.low, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.high, reference.high, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("encoder", "first_conv"), [("resnet18", "conv1"), ("convnext_atto", "stem_0")]
)
def test_gradient_reaches_first_encoder_layer(encoder: str, first_conv: str) -> None:
    model = DeepLabV3Plus(encoder, num_classes=NUM_CLASSES)
    out = model(_images())
    (out.high.square().mean() + out.low.mean()).backward()
    grad = model.encoder.get_submodule(first_conv).weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_parameter_count_equals_timm(encoder: str) -> None:
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    model = DeepLabV3Plus(encoder, num_classes=NUM_CLASSES)
    assert count(model.encoder) == count(timm.create_model(encoder, features_only=True))
    if encoder == "resnet18":  # and the classification network without its classifier
        assert count(model.encoder) == count(timm.create_model(encoder, num_classes=0))


# ------------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    names = list_models()
    assert {"deeplabv3p", *(f"deeplabv3p_resnet{d}" for d in (18, 34, 50, 101))} <= set(names)
    assert list_models("deeplabv3p_resnet1*") == ["deeplabv3p_resnet101", "deeplabv3p_resnet18"]
    model = create_model("deeplabv3p_resnet18", num_classes=2)
    assert model.encoder_name == "resnet18" and model.num_classes == 2
    model = create_model("deeplabv3p", encoder="resnet10t", num_classes=2, output_stride=8)
    assert model.encoder_name == "resnet10t" and model.output_stride == 8


def test_register_model_and_duplicates() -> None:
    @register_model("test_models_tiny_deeplab")
    def tiny(**kwargs):
        return DeepLabV3Plus("resnet10t", aspp_channels=16, skip_projection=8, **kwargs)

    model = create_model("test_models_tiny_deeplab", num_classes=4)
    assert model.head.in_channels == 16 and model.decoder.skip[0].out_channels == 8
    with pytest.raises(ValueError, match="already registered"):
        register_model("test_models_tiny_deeplab")(tiny)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown model name 'deeplabv3p_resnet35'.*resnet34"):
        create_model("deeplabv3p_resnet35")
    with pytest.raises(TypeError, match="fixes encoder='resnet50'"):
        create_model("deeplabv3p_resnet50", encoder="resnet18")
    with pytest.raises(ValueError, match="encoder 'resnet_nope' is not a timm model"):
        DeepLabV3Plus("resnet_nope")
    with pytest.raises(TypeError, match="encoder must be a timm model name"):
        DeepLabV3Plus(encoder=18)
    for output_stride in (4, 12, 32.0, True):
        with pytest.raises(
            ValueError, match=f"output_stride must be one of .*got {output_stride!r}"
        ):
            DeepLabV3Plus("resnet18", output_stride=output_stride)
    with pytest.raises(ValueError, match="num_classes must be a positive integer; got 0"):
        DeepLabV3Plus("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        DeepLabV3Plus("resnet18", padding_mode="reflect")
    with pytest.raises(TypeError, match="pretrained must be a bool or the path"):
        DeepLabV3Plus("resnet18", pretrained=1)
    with pytest.raises(ValueError, match=r"no stride-4 feature level.*16"):
        DeepLabV3Plus("vit_tiny_patch16_224")


def test_bad_inputs() -> None:
    model = DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES).eval()
    with pytest.raises(ValueError, match=r"N×3×H×W.*\(3, 65, 97\)"):
        model(torch.randn(3, 65, 97))
    with pytest.raises(ValueError, match=r"N×3×H×W.*\(2, 4, 65, 97\)"):
        model(torch.randn(2, 4, 65, 97))
    with pytest.raises(TypeError, match=r"floating-point.*torch.uint8"):
        model(torch.zeros(2, 3, 65, 97, dtype=torch.uint8))
    with pytest.raises(TypeError, match="x must be a tensor; got list"):
        model([[0.0]])
    with pytest.raises(ValueError, match="must not be empty"):
        model(torch.randn(0, 3, 65, 97))


def test_in_channels_and_output_stride_32() -> None:
    model = DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES, in_channels=1).eval()
    assert model(torch.randn(1, 1, 40, 40)).high.shape == (1, NUM_CLASSES, 40, 40)
    with pytest.raises(ValueError, match="encoder_kwargs must not set 'in_chans'"):
        DeepLabV3Plus("resnet10t", encoder_kwargs={"in_chans": 1})
    # Output stride 32: no dilation, ASPP rates halved, inputs padded to a multiple of 32.
    model = DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES, output_stride=32).eval()
    assert model.aspp_rates == (3, 6, 9) and model.encoder.feature_info.reduction() == [4, 32]
    low, high = model(_images())
    assert low.shape[-2:] == (17, 25) and high.shape[-2:] == (65, 97)


# -------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_whole_model_weight_file_round_trip(tmp_path, suffix: str) -> None:
    source = DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES).eval()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES, pretrained=path).eval()
    x = _images()
    expected, out = source(x), loaded(x)
    torch.testing.assert_close(out.low, expected.low, rtol=0, atol=0)
    torch.testing.assert_close(out.high, expected.high, rtol=0, atol=0)


def test_encoder_weight_files(tmp_path) -> None:
    # Layout "encoder": model.encoder.state_dict() (timm features_only key names, e.g. stem_0).
    source = DeepLabV3Plus("convnext_atto", num_classes=NUM_CLASSES)
    torch.save(source.encoder.state_dict(), tmp_path / "encoder.pt")
    loaded = DeepLabV3Plus(
        "convnext_atto", num_classes=NUM_CLASSES, pretrained=tmp_path / "encoder.pt"
    )
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key
    # Layout "timm": a classification model's state dict (stem.0, head.fc, ...), via timm's loader.
    classifier = timm.create_model("convnext_atto")
    torch.save({"state_dict": classifier.state_dict()}, tmp_path / "classifier.pth")
    loaded = DeepLabV3Plus("convnext_atto", pretrained=str(tmp_path / "classifier.pth"))
    torch.testing.assert_close(
        loaded.encoder.stem_0.weight, classifier.stem[0].weight, rtol=0, atol=0
    )
    torch.testing.assert_close(
        loaded.encoder.stages_3.blocks[1].mlp.fc2.weight,
        classifier.stages[3].blocks[1].mlp.fc2.weight,
        rtol=0,
        atol=0,
    )


def test_mismatched_weight_files_fail_clearly(tmp_path) -> None:
    # A resnet18 classification checkpoint is not a resnet10t (different stem and keys).
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(ValueError, match=r"resnet18.pt.*timm classification-model.*resnet10t"):
        DeepLabV3Plus("resnet10t", pretrained=tmp_path / "resnet18.pt")
    # A whole model with another number of classes: the head does not fit.
    torch.save(DeepLabV3Plus("resnet10t", num_classes=3).state_dict(), tmp_path / "c3.pt")
    with pytest.raises(
        ValueError,
        match=r"whole-model.*2 shape mismatches.*head.weight: file \(3, 256, 1, 1\) vs model \(5, 256, 1, 1\)",
    ):
        DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES, pretrained=tmp_path / "c3.pt")
    # A whole model with a key missing.
    state = DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES).state_dict()
    del state["aspp.project.0.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"1 missing keys \(first: \['aspp.project.0.weight'\]\)"):
        DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES, pretrained=tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError, match=r"nope.pt"):
        DeepLabV3Plus("resnet10t", pretrained=tmp_path / "nope.pt")
    torch.save({"epoch": 3}, tmp_path / "not_weights.pt")
    with pytest.raises(ValueError, match=r"not a state dict of tensors.*epoch"):
        DeepLabV3Plus("resnet10t", pretrained=tmp_path / "not_weights.pt")


def test_offline_pretrained_error_explains_local_file(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PretrainedWeightsError) as caught:
        DeepLabV3Plus("resnet18", pretrained=True)
    message = str(caught.value)
    assert "resnet18" in message
    assert "huggingface.co/timm/resnet18" in message
    assert "pretrained='path/to/resnet18.pt'" in message
    assert "weights_only=True" in message and ".safetensors" in message


# ------------------------------------------------------------------------------ BatchNorm


def test_frozen_batchnorm_keeps_running_stats() -> None:
    x = _images() * 3 + 1  # far from the initial statistics, so unfrozen stats move
    model = DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES, freeze_batchnorm=True)
    before = _bn_stats(model)
    model.train()  # as Lightning does at every epoch
    _sgd_step(model, x)
    assert all(torch.equal(before[k], v) for k, v in _bn_stats(model).items())
    assert not model.encoder.bn1.training and model.aspp.training
    assert model.encoder.bn1.weight.grad is not None  # affine parameters still train
    # The test can fail: without freezing the same step moves the statistics.
    reference = DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES).train()
    before = _bn_stats(reference)
    _sgd_step(reference, x)
    assert not all(torch.equal(before[k], v) for k, v in _bn_stats(reference).items())


def test_freeze_batchnorm_helper_affine_and_copies() -> None:
    model = DeepLabV3Plus("resnet10t", num_classes=NUM_CLASSES)
    freeze_batchnorm(model.encoder, affine=True)
    model = copy.deepcopy(model).train()  # the freeze survives copies and train()
    encoder_stats, decoder_stats = _bn_stats(model.encoder), _bn_stats(model.decoder)
    weight = model.encoder.bn1.weight.detach().clone()
    _sgd_step(model, _images() * 3 + 1)
    assert all(torch.equal(encoder_stats[k], v) for k, v in _bn_stats(model.encoder).items())
    assert torch.equal(model.encoder.bn1.weight, weight)
    assert not model.encoder.bn1.weight.requires_grad
    assert not all(torch.equal(decoder_stats[k], v) for k, v in _bn_stats(model.decoder).items())
    with pytest.raises(TypeError, match=r"module must be an nn.Module"):
        freeze_batchnorm("model")


def test_convert_sync_batchnorm() -> None:
    model = DeepLabV3Plus("mobilenetv3_small_050", num_classes=NUM_CLASSES).eval()
    freeze_batchnorm(model.encoder)
    x = _images()
    expected = model(x)
    converted = convert_sync_batchnorm(model)
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "SyncBatchNormAct" in kinds  # timm's fused BN+activation keeps its activation
    assert not any(type(m) in (nn.BatchNorm2d,) for m in converted.modules())
    torch.testing.assert_close(converted(x).high, expected.high, rtol=0, atol=0)
    converted.train()
    assert not converted.encoder.bn1.training  # frozen layers stay frozen after conversion
    assert converted.decoder.skip[1].training


# ------------------------------------------------------------------------------------ UNet
@pytest.mark.parametrize(("encoder", "in_channels"), [("resnet18", 1), ("convnext_atto", 3)])
def test_unet_shapes_odd_input_and_typed_output(encoder: str, in_channels: int) -> None:
    model = UNet(encoder, num_classes=NUM_CLASSES, in_channels=in_channels).eval()
    out = model(torch.randn(2, in_channels, 65, 97))
    assert isinstance(out, SegmentationOutput)
    assert out.high.shape == (2, NUM_CLASSES, 65, 97) and out.low is out.high
    # the decoder reaches the input size: one block per level plus ×2 steps below the first
    reductions = timm.create_model(encoder, features_only=True).feature_info.reduction()
    assert len(model.decoder) == len(reductions) - 1 + int(reductions[0]).bit_length() - 1


def test_unet_gradient_reaches_encoder_and_outputs_depend_on_every_skip() -> None:
    model = UNet("resnet10t", num_classes=3, in_channels=1, decoder_channels=[32, 16, 16, 8, 8, 8])
    x = torch.randn(2, 1, 64, 64)
    model(x).high.square().mean().backward()
    first = model.encoder.conv1[0].weight
    assert first.shape[1] == 1 and first.grad is not None and first.grad.abs().sum() > 0
    # The full-resolution output changes most where one input pixel changes: the skips carry
    # detail (the deepest level sees the whole 64×64 image, so far pixels move a little too).
    model.eval()
    y = x.clone()
    y[0, 0, 10, 10] += 5.0
    difference = (model(y).high - model(x).high).abs()[0].sum(0)
    assert difference[10, 10] > 10 * difference[50:, 50:].max()


def test_unet_registry_in_channels_and_bad_arguments() -> None:
    assert {"unet", "unet_resnet18", "unet_resnet34"} <= set(list_models())
    model = create_model("unet_resnet18", num_classes=4, in_channels=1)
    assert isinstance(model, UNet) and model.encoder_name == "resnet18"
    with pytest.raises(TypeError, match="fixes encoder='resnet18'"):
        create_model("unet_resnet18", encoder="resnet34")
    with pytest.raises(ValueError, match="decoder_channels must give 5"):
        UNet("resnet18", decoder_channels=[16, 16])
    with pytest.raises(ValueError, match="encoder_kwargs must not set 'in_chans'"):
        UNet("resnet18", encoder_kwargs={"in_chans": 1})
    with pytest.raises(ValueError, match="x must be N×1×H×W"):
        UNet("resnet18", in_channels=1)(torch.randn(1, 3, 32, 32))


def test_unet_whole_model_weight_file_round_trip(tmp_path) -> None:
    source = UNet("resnet10t", num_classes=NUM_CLASSES, in_channels=1).eval()
    path = tmp_path / "unet.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(7)
    loaded = UNet("resnet10t", num_classes=NUM_CLASSES, in_channels=1, pretrained=path).eval()
    x = torch.randn(1, 1, 40, 36)
    torch.testing.assert_close(loaded(x).high, source(x).high, rtol=0, atol=0)


def test_one_channel_timm_weights_are_adapted_as_timm_does(tmp_path) -> None:
    """A 3-channel timm classification state dict loads into a 1-channel model: timm sums the
    first convolution over the input channels."""
    classifier = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.pt"
    torch.save(classifier.state_dict(), path)
    for model in (
        UNet("resnet10t", num_classes=2, in_channels=1, pretrained=path),
        DeepLabV3Plus("resnet10t", num_classes=2, in_channels=1, pretrained=path),
    ):
        first = model.encoder.conv1[0].weight
        expected = classifier.conv1[0].weight.sum(dim=1, keepdim=True)
        torch.testing.assert_close(first, expected)
