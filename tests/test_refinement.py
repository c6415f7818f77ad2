"""The mean-field CRF in training and evaluation: validation refinement, the checkpoint monitor,
the CRF layer and its learnt μ, the recipe flags, and choosing a refinement on training volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from gcrf.crf import MeanFieldCRF, mean_field_crf
from gcrf.data.acdc import ACDCDataModule, acdc_fold
from gcrf.loss.module import GatedCRFLoss
from gcrf.training import (
    CRFSetting,
    PredictedVolume,
    SegmentationModule,
    make_optimizer_factory,
    mean_field_grid,
    refined_metric,
    select_refinement,
)
from gcrf.training.metrics import VolumeScores
from gcrf.training.refinement import Softplus
from recipes import synthetic
from tests.test_acdc import _short, make_tree
from tests.test_recipes import config_keys, synthetic_short_run
from tests.test_training import KERNELS, Output, TinyNet, _datamodule, _trainer

CRF_KERNELS = [{"weight": 2.0, "xy": 2.0, "rgb": 0.5}]


def _iou(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[int, float]:
    """IoU per class present in prediction or target (255 ignored), float64."""
    keep = target != 255
    out = {}
    for c in range(num_classes):
        p, t = (prediction == c) & keep, (target == c) & keep
        union = int((p | t).sum())
        if union:
            out[c] = int((p & t).sum()) / union
    return out


# ---------------------------------------------------------------------------- metric names
def test_refined_metric_appends_crf_to_the_metric_name() -> None:
    assert refined_metric("val/mIoU") == "val/mIoU_crf"
    assert refined_metric("val/IoU/person") == "val/IoU_crf/person"
    assert refined_metric("val/hd95_myo") == "val/hd95_myo_crf"
    with pytest.raises(ValueError, match="'mIoU'"):
        refined_metric("mIoU")


# ----------------------------------------------------------------- refinement at validation
def test_validation_refinement_is_refining_the_high_logits_and_scoring_them(tmp_path) -> None:
    torch.manual_seed(0)
    network = TinyNet()
    crf = MeanFieldCRF(CRF_KERNELS, radius=2, iterations=3)
    module = SegmentationModule(network, 4, crf_refinement=crf)
    datamodule = _datamodule(val_length=6, batch_size_validation=3)
    metrics = _trainer(tmp_path, 1).validate(module, datamodule, verbose=False)[0]
    plain = _trainer(tmp_path, 1).validate(
        SegmentationModule(network, 4), datamodule, verbose=False
    )[0]

    datamodule.setup("validate")
    network.eval()
    raw, refined = [], []
    with torch.no_grad():
        for index in range(6):
            item = datamodule.val_dataset[index]
            image, valid = item["image"][None], item["valid"][None].float()
            high = network(image).high
            # Independently: the lead's functional CRF on the same logits, image and gate.
            refined_high = mean_field_crf(
                high, {"rgb": image}, CRF_KERNELS, radius=2, iterations=3, mask_src=valid
            )
            raw.append((high.argmax(1)[0], item["semseg_dense"]))
            refined.append((refined_high.argmax(1)[0], item["semseg_dense"]))

    def miou(pairs):
        prediction = torch.cat([p.flatten() for p, _ in pairs])
        target = torch.cat([t.flatten() for _, t in pairs])
        return _iou(prediction, target, 4)

    expected, expected_raw = miou(refined), miou(raw)
    assert metrics["val/mIoU_crf"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
    for c, name in enumerate(datamodule.class_names):
        if c in expected:
            assert metrics[f"val/IoU_crf/{name}"] == pytest.approx(expected[c], abs=1e-6)
    # The raw metrics stay what they are without the refinement.
    assert metrics["val/mIoU"] == pytest.approx(np.mean(list(expected_raw.values())), abs=1e-6)
    assert metrics["val/mIoU"] == pytest.approx(plain["val/mIoU"], abs=1e-7)
    assert "val/mIoU_crf" not in plain
    # The refinement changed the predictions (the check above could not pass by accident).
    assert any(not torch.equal(p, q) for (p, _), (q, _) in zip(raw, refined, strict=True))


def _acdc_short(root: Path, tmp_path: Path) -> list[str]:
    return [f"--data.root={root}", *_short(tmp_path)]


def test_volume_refinement_refines_each_slice_at_the_inference_size(tmp_path) -> None:
    import recipes.acdc_full

    root = tmp_path / "ACDC"
    make_tree(root)
    kernels = [{"weight": 1.5, "xy": 2.0, "intensity": 0.2}]
    cli = recipes.acdc_full.main(
        [
            *_acdc_short(root, tmp_path),
            "--model.crf_refinement=true",
            f"--model.crf_refinement_kernels={kernels}",
            "--model.crf_refinement_radius=2",
            "--model.crf_refinement_iterations=4",
        ],
        run=False,
    )
    module, dm = cli.model, cli.datamodule
    metrics = cli.trainer.validate(module, dm, verbose=False)[0]
    module.eval()
    raw, refined = VolumeScores(dm.class_names), VolumeScores(dm.class_names)
    for k in range(2):  # --trainer.limit_val_batches=2: the first two volumes
        item = dm.val_dataset[k]
        slices = item["image"].transpose(0, 1)  # Z×1×H×W
        x = F.interpolate(slices, size=(32, 32), mode="bilinear")
        with torch.no_grad():
            logits = module.network(x).high
            crf = mean_field_crf(logits, {"intensity": x}, kernels, radius=2, iterations=4)
        for scores, out in ((raw, logits), (refined, crf)):
            out = F.interpolate(out, size=slices.shape[-2:], mode="bilinear")
            scores.update(out.argmax(1), item["semseg_dense"])
    for scores, suffix in ((raw.compute(), ""), (refined.compute(), "_crf")):
        for key in ("dice", "hd95", "dice_rv", "dice_myo", "dice_lv", "hd95_lv", "dice_std"):
            assert metrics[f"val/{key}{suffix}"] == pytest.approx(float(scores[key]), abs=1e-4)


# ------------------------------------------------------------------------ checkpoint monitor
def test_the_best_checkpoint_follows_the_raw_metric_unless_asked(tmp_path) -> None:
    import recipes.acdc_full

    raw = synthetic.main(["--model.crf_refinement=true"], run=False)
    assert raw.trainer.checkpoint_callback.monitor == "val/mIoU"
    cli = synthetic.main(
        [
            *synthetic_short_run(tmp_path),
            "--model.crf_refinement=true",
            "--model.crf_refinement_monitor=true",
        ]
    )
    best = cli.trainer.checkpoint_callback
    assert best.monitor == "val/mIoU_crf"
    assert float(best.best_model_score) == pytest.approx(
        float(cli.trainer.callback_metrics["val/mIoU_crf"])
    )
    assert "mIoU_crf" in Path(best.best_model_path).name
    # Volumes: the data module's declared metric, or its refined twin.
    root = tmp_path / "ACDC"
    make_tree(root)
    for flags, monitor in (
        ([], "val/dice"),
        (["--model.crf_refinement_monitor=true"], "val/dice_crf"),
    ):
        acdc = recipes.acdc_full.main(
            [*_acdc_short(root, tmp_path), "--model.crf_refinement=true", *flags], run=False
        )
        assert acdc.trainer.checkpoint_callback.monitor == monitor
    with pytest.raises(ValueError, match=r"crf_refinement_monitor=True .* crf_refinement is None"):
        SegmentationModule(TinyNet(), 4, crf_refinement_monitor=True)


# ------------------------------------------------------------------------------ the layer
def test_the_layer_changes_the_loss_exactly_as_refining_the_logits_first() -> None:
    torch.manual_seed(0)
    network = TinyNet()
    loss = GatedCRFLoss(KERNELS, radius=2)
    layer = MeanFieldCRF(CRF_KERNELS, radius=2, iterations=3)
    settings = {
        "gated_crf": loss,
        "cross_entropy_modality": "semseg_scribbles",
        "gated_crf_resolution": 8,
        "gated_crf_use_after_progress_ratio": 0.0,
    }
    with_layer = SegmentationModule(network, 4, crf_layer=layer, **settings)
    without = SegmentationModule(network, 4, **settings)
    for module in (with_layer, without):
        module._gated_crf_start = 0  # no trainer attached: the term is on from step 0
    datamodule = _datamodule()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    image, valid = batch["image"], batch["valid"].float()

    output = network(image)
    low = mean_field_crf(
        output.low, {"rgb": image}, CRF_KERNELS, radius=2, iterations=3, mask_src=valid
    )
    high = F.interpolate(low, size=image.shape[-2:], mode="bilinear", align_corners=False)
    expected = without.compute_losses(batch, type(output)(low, high))
    terms = with_layer.compute_losses(batch, with_layer(image, batch["valid"]))
    for key in ("loss_ce", "loss_gatedcrf", "loss"):
        assert torch.allclose(terms[key], expected[key], atol=1e-6), key
    plain = without.compute_losses(batch, output)
    assert not torch.allclose(terms["loss"], plain["loss"], atol=1e-3)  # the layer did something
    # The gradient reaches the network through the layer.
    terms["loss"].backward()
    assert all(p.grad is not None for p in network.parameters())


def test_the_layer_refines_a_unet_output_once() -> None:
    class SameSize(nn.Module):
        """Logits at the input size, ``low`` and ``high`` the same tensor (as UNet's)."""

        def forward(self, x):
            logits = x * torch.tensor([1.0, -1.0, 2.0])[None, :, None, None]
            return Output(logits, logits)

    layer = MeanFieldCRF(CRF_KERNELS, radius=1, iterations=2)
    module = SegmentationModule(SameSize(), 3, crf_layer=layer)
    image = torch.rand(2, 3, 8, 8)
    out = module(image)
    logits = image * torch.tensor([1.0, -1.0, 2.0])[None, :, None, None]
    expected = mean_field_crf(logits, {"rgb": image}, CRF_KERNELS, radius=1, iterations=2)
    assert out.low is out.high and torch.allclose(out.low, expected, atol=1e-6)


def test_a_learnt_compatibility_starts_at_potts_and_stays_non_negative() -> None:
    crf = CRFSetting(CRF_KERNELS, radius=1, iterations=2).build(
        learn_compatibility=True, num_classes=3
    )
    names = [name for name, _ in crf.named_parameters()]
    assert names == ["parametrizations.compatibility.original"]
    potts = 1 - torch.eye(3)
    assert torch.allclose(crf.compatibility, potts.clamp_min(1e-4), rtol=1e-5)
    # A large step that drives every θ far below 0 leaves μ = softplus(θ) >= 0 and usable.
    (theta,) = crf.parameters()
    start = theta.detach().clone()
    optimizer = torch.optim.SGD([theta], lr=1.0)
    (1e3 * crf.compatibility.sum()).backward()
    optimizer.step()
    assert bool((theta < start).all()) and float(theta.detach().min()) < -100
    mu = crf.compatibility
    assert bool((mu >= 0).all()) and bool(torch.isfinite(mu).all())
    out = crf(torch.randn(1, 3, 6, 6), {"rgb": torch.rand(1, 3, 6, 6)})
    assert torch.isfinite(out).all()
    # softplus and its right inverse agree.
    values = torch.tensor([1e-4, 0.5, 1.0, 30.0])
    assert torch.allclose(Softplus()(Softplus().right_inverse(values)), values, rtol=1e-5)
    with pytest.raises(ValueError, match="num_classes"):
        CRFSetting(CRF_KERNELS).build(learn_compatibility=True)
    with pytest.raises(ValueError, match="compatibility must be 3×3"):
        CRFSetting(CRF_KERNELS, compatibility=[[0.0, 1.0], [1.0, 0.0]]).build(num_classes=3)
    with pytest.raises(ValueError, match="radius must be an int >= 1; got 0"):
        CRFSetting(CRF_KERNELS, radius=0)


def test_the_layers_mu_is_learnt_by_the_optimiser_under_bf16_mixed(tmp_path) -> None:
    seen: set = set()
    torch.manual_seed(0)
    layer = CRFSetting(CRF_KERNELS, radius=1, iterations=2).build(
        learn_compatibility=True, num_classes=4
    )
    layer.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype))
    start = layer.compatibility.detach().clone()
    module = SegmentationModule(
        TinyNet(),
        4,
        crf_layer=layer,
        gated_crf=GatedCRFLoss(KERNELS, radius=1),
        cross_entropy_modality="semseg_scribbles",
        gated_crf_use_after_progress_ratio=0.0,
        optimizer=make_optimizer_factory("adam", {"lr": 0.05}),
    )
    trainer = _trainer(tmp_path, 3, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(module, _datamodule())
    (theta,) = layer.parameters()
    assert any(theta is p for group in trainer.optimizers[0].param_groups for p in group["params"])
    mu = layer.compatibility.detach()
    assert not torch.allclose(mu, start) and bool((mu >= 0).all())
    assert seen == {torch.float32}  # the bf16 logits reach the CRF cast to float32
    assert theta.dtype == torch.float32
    for name in ("train/loss", "train/loss_ce", "train/loss_gatedcrf"):
        assert torch.isfinite(trainer.callback_metrics[name]), name


# ------------------------------------------------------------------- flags and checkpoints
CRF_FLAGS = {
    "crf_refinement",
    "crf_refinement_kernels",
    "crf_refinement_radius",
    "crf_refinement_iterations",
    "crf_refinement_compatibility",
    "crf_refinement_monitor",
    "crf_layer",
    "crf_layer_kernels",
    "crf_layer_radius",
    "crf_layer_iterations",
    "crf_layer_compatibility",
    "crf_layer_learn_compatibility",
}


def test_the_crf_flags_are_on_the_command_line(capsys) -> None:
    keys = config_keys(synthetic.main, capsys)
    assert {f"model.{flag}" for flag in CRF_FLAGS} <= keys
    with pytest.raises(SystemExit):
        synthetic.main(["--help"], run=False)
    help_text = capsys.readouterr().out
    for flag in CRF_FLAGS:
        assert f"--model.{flag} " in help_text, flag
    # The presets give every dataset its refinement setting, in the units of its image.
    from recipes import presets

    assert presets.ACDC["model.crf_refinement_kernels"][0].keys() == {"weight", "xy", "intensity"}
    for preset in (presets.VOC, presets.CITYSCAPES, presets.SYNTHETIC):
        assert "rgb" in preset["model.crf_refinement_kernels"][0]


def test_checkpoints_round_trip_with_the_crf_settings(tmp_path) -> None:
    from recipes.cli import SegmentationRecipe

    mu = [[0.0, 1.0, 2.0, 1.0], [1.0, 0.0, 1.0, 1.0], [2.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]
    cli = synthetic.main(
        [
            *synthetic_short_run(tmp_path),
            "--model.crf_refinement=true",
            "--model.crf_refinement_kernels=[{weight: 3, xy: 2, rgb: 0.4}]",
            "--model.crf_refinement_radius=2",
            "--model.crf_refinement_iterations=3",
            f"--model.crf_refinement_compatibility={mu}",
            "--model.crf_layer=true",
            "--model.crf_layer_radius=1",
            "--model.crf_layer_iterations=2",
            "--model.crf_layer_learn_compatibility=true",
            "--model.optimizer_kwargs={lr: 0.05}",
        ]
    )
    trained = cli.model
    assert "val/mIoU_crf" in cli.trainer.callback_metrics
    (path,) = list(tmp_path.rglob("last.ckpt"))
    loaded = SegmentationRecipe.load_from_checkpoint(path, map_location="cpu")
    refinement = loaded.crf_refinement
    assert (refinement.radius, refinement.iterations) == (2, 3)
    (kernel,) = refinement.config.kernels
    assert (kernel.weight, kernel.position_sigma, kernel.modalities) == (3, 2, (("rgb", 0.4),))
    assert torch.equal(refinement.compatibility, torch.tensor(mu))
    assert (loaded.crf_layer.radius, loaded.crf_layer.iterations) == (1, 2)
    learnt = trained.crf_layer.compatibility.detach()
    assert not torch.allclose(learnt, (1 - torch.eye(4)).clamp_min(1e-4))  # it was trained
    assert torch.equal(loaded.crf_layer.compatibility.detach(), learnt)
    hparams = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
    assert hparams["crf_layer_learn_compatibility"] and hparams["crf_refinement_radius"] == 2


# --------------------------------------------------------------------- choosing a setting
def _naive_dice(prediction: np.ndarray, reference: np.ndarray, label: int) -> float:
    p, r = prediction == label, reference == label
    if not p.any() and not r.any():
        return 1.0
    return 2 * float((p & r).sum()) / float(p.sum() + r.sum())


def _fake_volumes(seed: int, count: int) -> list[PredictedVolume]:
    generator = torch.Generator().manual_seed(seed)
    volumes = []
    for k in range(count):
        depth, size = 2 + k % 2, (9 + k, 11)
        reference = torch.randint(0, 3, (depth, *size), generator=generator)
        logits = torch.randn(depth, 3, 6, 6, generator=generator)
        image = torch.full((depth, 1, 6, 6), float(seed))  # says which set it comes from
        volumes.append(PredictedVolume(image, logits, reference))
    return volumes


def test_select_refinement_scores_every_setting_by_mean_3d_dice() -> None:
    volumes = _fake_volumes(seed=1, count=3)
    before = [tuple(t.clone() for t in v) for v in volumes]
    settings = [0.0, 0.5, 2.0, 5.0]

    def refine(logits, image, setting):
        return logits + setting * torch.linspace(-1, 1, logits.shape[1])[None, :, None, None]

    choice = select_refinement(volumes, settings, refine, num_classes=3)

    def mean_dice(setting):
        per_class = np.zeros((len(volumes), 2))
        for k, v in enumerate(volumes):
            refined = F.interpolate(
                refine(v.logits, v.image, setting), size=v.reference.shape[-2:], mode="bilinear"
            )
            labels = refined.argmax(1).numpy()
            per_class[k] = [_naive_dice(labels, v.reference.numpy(), c) for c in (1, 2)]
        return per_class.mean(0).mean()

    expected = [mean_dice(s) for s in settings]
    assert choice.scores == pytest.approx(expected, abs=1e-6)  # torchmetrics: float32
    assert choice.setting == settings[int(np.argmax(expected))]
    assert choice.dice == pytest.approx(max(expected)) and choice.volumes == 3
    assert choice.raw_dice == pytest.approx(expected[0])  # setting 0 leaves the logits as they are
    assert len(set(np.round(expected, 9))) > 1  # the settings really differ
    for volume, saved in zip(volumes, before, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(volume, saved, strict=True))
    # Ties go to the setting given first.
    assert select_refinement(volumes, ["a", "b"], lambda x, _i, _s: x, 3).setting == "a"
    with pytest.raises(ValueError, match="keep the shape"):
        select_refinement(volumes, [1], lambda x, _i, _s: x[:, :2], 3)
    with pytest.raises(TypeError, match=r"predictions\[0\] must be a PredictedVolume"):
        select_refinement([tuple(volumes[0])], [1], refine, 3)
    with pytest.raises(ValueError, match="at least one setting"):
        select_refinement(volumes, [], refine, 3)


def test_select_refinement_reads_only_the_volumes_it_is_given() -> None:
    """Training and validation volumes differ in content; the choice sees only the former."""
    train, validation = _fake_volumes(seed=1, count=2), _fake_volumes(seed=2, count=2)
    seen: set = set()

    def refine(logits, image, setting):
        seen.add(float(image.flatten()[0]))
        return logits * setting

    select_refinement(train, [1.0, -1.0], refine, num_classes=3)
    assert seen == {1.0}
    choice_train = select_refinement(train, [1.0, -1.0], refine, 3)
    choice_val = select_refinement(validation, [1.0, -1.0], refine, 3)
    assert choice_train.scores != choice_val.scores  # the data decide the scores


def test_the_comparison_chooses_on_training_volumes_only(tmp_path) -> None:
    """``recipes.acdc_compare`` reads the fold's training volumes for the choice: with every
    validation volume deleted it still chooses, and it predicts training patients only."""
    from recipes.acdc_compare import RefinementGrid, choose_refinement, training_volumes

    root = tmp_path / "ACDC"
    make_tree(root)
    dm = ACDCDataModule(str(root), fold=1, image_size=16, num_workers=0)
    train_patients, val_patients = acdc_fold(1)
    for path in (root / "ACDC_training_volumes").iterdir():
        if path.name.split("_")[0] in val_patients:
            path.unlink()
    items = training_volumes(dm, count=5)
    names = [item["name"] for item in items]
    assert len(names) == 5 and len(set(names)) == 5
    assert all(name.split("_")[0] in train_patients for name in names)
    all_training = sorted(p.stem for p in (root / "ACDC_training_volumes").iterdir())
    assert names == [all_training[k * 12 // 5] for k in range(5)]  # evenly spaced over 12

    seen = []

    class Recording(SegmentationModule):
        def predict_volume_logits(self, volume, slices_per_batch=16):
            seen.append(tuple(volume.shape))
            return super().predict_volume_logits(volume, slices_per_batch)

    class OneChannel(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.body[0] = nn.Conv2d(1, 8, 3, stride=2, padding=1)

    torch.manual_seed(0)
    module = Recording(OneChannel(), 4)
    module.image_modality, module.inference_size = "intensity", (16, 16)
    grid = RefinementGrid(weights=[1.0], xy=[2.0], intensity=[0.1, 0.3], radii=[1], volumes=3)
    choice = choose_refinement(module, dm, grid)
    assert choice.volumes == 3 and len(choice.scores) == 2
    assert seen == [tuple(item["image"].shape) for item in training_volumes(dm, 3)]
    assert [s.kernels[0]["intensity"] for s in grid.settings()] == [0.1, 0.3]
    assert choice.setting in grid.settings()
    assert not module.training  # predicted in eval mode


def test_mean_field_grid_is_the_stated_product() -> None:
    grid = mean_field_grid([1, 2], [3, 5], [0.1], [3, 5], "intensity", iterations=4)
    assert len(grid) == 8 and all(s.iterations == 4 for s in grid)
    assert grid[0] == CRFSetting([{"weight": 1.0, "xy": 3.0, "intensity": 0.1}], 3, 4)
    assert grid[-1] == CRFSetting([{"weight": 2.0, "xy": 5.0, "intensity": 0.1}], 5, 4)
