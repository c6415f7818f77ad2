"""gcrf.training: the objective, the Gated CRF schedule and resolution, LR, metrics, resume, images."""

from __future__ import annotations

import gc
import math
import weakref
from typing import NamedTuple

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from gcrf.data.synthetic import SyntheticDataModule, synthetic_augmentation
from gcrf.loss.module import GatedCRFLoss
from gcrf.training import (
    PlainProgressLog,
    SegmentationModule,
    SegmentationVisualizer,
    cross_entropy_loss,
    default_callbacks,
    gated_crf_start_step,
    make_optimizer_factory,
    make_poly_scheduler_factory,
    resize_probabilities,
)

KERNELS = [{"weight": 1.0, "xy": 6.0, "rgb": 0.1}]


class Output(NamedTuple):
    low: torch.Tensor
    high: torch.Tensor


class TinyNet(nn.Module):
    """Logits at stride 4 from a small conv stack; ``high`` is their bilinear upsampling."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, num_classes, 3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> Output:
        low = self.body(x)
        return Output(
            low, F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
        )


class RecordingLoss(nn.Module):
    """Stands in for GatedCRFLoss: records when, on what size and with which modalities it is
    called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self.modalities: set[str] = set()
        self.step = lambda: -1

    def forward(self, probs, features, mask_src=None, mask_dst=None):
        assert mask_src is not None and mask_src.shape[1] == 1
        self.calls.append((self.step(), tuple(probs.shape)))
        self.modalities |= set(features)
        return probs.sum() * 0.0 + 1.0


def _datamodule(**kwargs) -> SyntheticDataModule:
    settings = {
        "image_size": 32,
        "train_length": 16,
        "val_length": 8,
        "batch_size": 4,
        "batch_size_validation": 8,
    }
    settings.update(kwargs)
    return SyntheticDataModule(**settings)


def _trainer(tmp_path, max_steps: int, **kwargs) -> pl.Trainer:
    settings = {
        "accelerator": "cpu",
        "max_steps": max_steps,
        "val_check_interval": max_steps,
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    settings.update(kwargs)
    return pl.Trainer(**settings)


# ---------------------------------------------------------------------------- cross entropy
def test_cross_entropy_matches_torch_with_and_without_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 7, generator=generator, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 7), generator=generator)
    target[0, :2] = 255
    weight = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for w in (None, weight):
        expected = F.cross_entropy(
            logits.double(), target, weight=None if w is None else w.double(), ignore_index=255
        )
        assert torch.allclose(cross_entropy_loss(logits, target, w).double(), expected, atol=1e-6)


def test_cross_entropy_without_labels_is_zero_with_a_graph() -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = cross_entropy_loss(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="target"):
        cross_entropy_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))


# ------------------------------------------------------------------------------- resolution
def test_resize_probabilities_sizes_and_simplex() -> None:
    probs = torch.softmax(torch.randn(2, 3, 8, 8), dim=1)
    assert resize_probabilities(probs, None, (32, 32)) is probs
    assert resize_probabilities(probs, 8, (32, 32)) is probs
    up = resize_probabilities(probs, 16, (32, 32))
    assert up.shape == (2, 3, 16, 16)
    assert torch.allclose(up.sum(1), torch.ones(2, 16, 16), atol=1e-6)
    assert resize_probabilities(probs, 4, (32, 64)).shape == (2, 3, 4, 8)
    assert resize_probabilities(probs, (8, 16), (32, 64)).shape == (2, 3, 8, 16)
    with pytest.raises(ValueError, match="divide"):
        resize_probabilities(probs, 12, (32, 32))
    with pytest.raises(ValueError, match="non-integral"):
        resize_probabilities(probs, 5, (32, 48))


def test_gated_crf_start_step() -> None:
    assert gated_crf_start_step(0.005, 90_000) == 450
    assert gated_crf_start_step(0.0, 100) == 0
    assert gated_crf_start_step(0.5, 7) == 3


@pytest.mark.parametrize(
    ("resolution", "expected"), [(None, (8, 8)), (16, (16, 16)), (32, (32, 32))]
)
def test_warmup_switches_on_at_the_right_step_and_loss_sees_the_resolution(
    tmp_path, resolution, expected
) -> None:
    recorder = RecordingLoss()
    module = SegmentationModule(
        TinyNet(),
        4,
        gated_crf=recorder,
        cross_entropy_modality="semseg_scribbles",
        gated_crf_resolution=resolution,
        gated_crf_use_after_progress_ratio=0.5,
        optimizer=make_optimizer_factory("adam", {"lr": 1e-3}),
    )
    recorder.step = lambda: module.global_step
    _trainer(tmp_path, 6, limit_val_batches=0).fit(module, _datamodule())
    steps = [step for step, _ in recorder.calls]
    assert steps == [3, 4, 5]  # floor(0.5 · 6) = 3: off for steps 0, 1, 2
    assert {shape for _, shape in recorder.calls} == {(4, 4, *expected)}
    assert recorder.modalities == {"rgb"}  # what SyntheticDataModule declares its image to be


class IntensityScenes(SyntheticDataModule):
    """Procedural scenes declared as another modality (as ACDC declares its MR intensities)."""

    image_modality = "intensity"


def test_the_gated_crf_loss_gets_the_image_under_the_declared_modality(tmp_path) -> None:
    recorder = RecordingLoss()
    module = SegmentationModule(
        TinyNet(), 4, gated_crf=recorder, gated_crf_use_after_progress_ratio=0.0
    )
    _trainer(tmp_path, 2, limit_val_batches=0).fit(
        module, IntensityScenes(image_size=32, train_length=8, val_length=2, batch_size=4)
    )
    assert recorder.modalities == {"intensity"} and module.image_modality == "intensity"


def test_kernels_on_another_modality_than_the_image_fail_at_setup(tmp_path) -> None:
    module = SegmentationModule(
        TinyNet(), 4, gated_crf=GatedCRFLoss([{"weight": 1.0, "xy": 6.0, "intensity": 0.1}], 2)
    )
    with pytest.raises(ValueError, match=r"\['intensity'\].*image_modality='rgb'"):
        _trainer(tmp_path, 1).fit(module, _datamodule())


def test_validation_follows_what_the_data_module_declares(tmp_path) -> None:
    class DeclaresVolumes(SyntheticDataModule):
        validation_kind = "volumes"

    class DeclaresNonsense(SyntheticDataModule):
        validation_kind = "slices"

    settings = {"image_size": 32, "train_length": 4, "val_length": 2, "batch_size_validation": 2}
    with pytest.raises(ValueError, match=r"validation_kind='volumes'.*N×C×Z×H×W.*\(2, 3, 32, 32\)"):
        _trainer(tmp_path, 1).validate(
            SegmentationModule(TinyNet(), 4), DeclaresVolumes(**settings)
        )
    with pytest.raises(ValueError, match=r"validation_kind must be one of .*'slices'"):
        _trainer(tmp_path, 1).validate(
            SegmentationModule(TinyNet(), 4), DeclaresNonsense(**settings)
        )


def test_callbacks_get_the_detached_output_and_nothing_outlives_the_step(tmp_path) -> None:
    seen: list = []

    class Keep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            output = outputs["output"]
            seen.append(
                (weakref.ref(batch["image"]), output.high.requires_grad, tuple(output.high.shape))
            )

    module = SegmentationModule(TinyNet(), 4)
    _trainer(tmp_path, 3, limit_val_batches=0, callbacks=[Keep()]).fit(module, _datamodule())
    assert [(grad, shape) for _, grad, shape in seen] == [(False, (4, 4, 32, 32))] * 3
    gc.collect()
    # The module keeps no batch: every one is gone once training is over.
    assert all(ref() is None for ref, _, _ in seen)


# ------------------------------------------------------------------------------- objective
def test_objective_is_the_weighted_sum_of_ce_and_gated_crf() -> None:
    torch.manual_seed(0)
    network = TinyNet()
    loss = GatedCRFLoss(KERNELS, radius=2)
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    module = SegmentationModule(
        network,
        4,
        gated_crf=loss,
        cross_entropy_modality="semseg_clicks",
        cross_entropy_weight=0.7,
        class_weights=weights,
        gated_crf_weight=0.3,
        gated_crf_resolution=16,
        gated_crf_use_after_progress_ratio=0.0,
    )
    module._gated_crf_start = 0  # no trainer attached: the term is on from step 0
    datamodule = _datamodule(augmentation=synthetic_augmentation(32, stroke_width=3))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    before = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    output = network(batch["image"])
    terms = module.compute_losses(batch, output)

    ce = F.cross_entropy(output.high, batch["semseg_clicks"], weight=weights, ignore_index=255)
    probs = F.interpolate(
        torch.softmax(output.low, 1), size=(16, 16), mode="bilinear", align_corners=False
    )
    gcrf = loss(probs, {"rgb": batch["image"]}, mask_src=batch["valid"])
    assert torch.allclose(terms["loss_ce"], ce, atol=1e-6)
    assert torch.allclose(terms["loss_gatedcrf"], gcrf, atol=1e-6)
    assert torch.allclose(terms["loss"], 0.7 * ce + 0.3 * gcrf, atol=1e-6)
    for key, value in before.items():  # the batch is not modified
        assert torch.equal(batch[key], value)


def test_without_gated_crf_the_objective_is_ce_on_the_modality() -> None:
    network = TinyNet()
    module = SegmentationModule(network, 4, cross_entropy_modality="semseg_dense")
    datamodule = _datamodule()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    output = network(batch["image"])
    terms = module.compute_losses(batch, output)
    assert torch.allclose(
        terms["loss"], F.cross_entropy(output.high, batch["semseg_dense"], ignore_index=255)
    )
    assert terms["loss_gatedcrf"].item() == 0.0


# ------------------------------------------------------------------------- optimiser and LR
def test_optimizer_factories_defaults() -> None:
    params = list(nn.Linear(2, 2).parameters())
    sgd = make_optimizer_factory()(params)
    assert isinstance(sgd, torch.optim.SGD)
    assert {k: sgd.defaults[k] for k in ("lr", "momentum", "dampening", "weight_decay")} == {
        "lr": 0.007,
        "momentum": 0.9,
        "dampening": 0.0,
        "weight_decay": 1e-4,
    }
    adam = make_optimizer_factory("adam", {"lr": 0.01, "betas": (0.8, 0.9)})(params)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError, match="rmsprop"):
        make_optimizer_factory("rmsprop")
    with pytest.raises(ValueError, match="power"):
        make_poly_scheduler_factory(-1)


def test_poly_lr_is_stepped_every_iteration(tmp_path) -> None:
    lrs = []

    class RecordLR(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = SegmentationModule(TinyNet(), 4, optimizer=make_optimizer_factory("sgd", {"lr": 0.1}))
    _trainer(tmp_path, 7, limit_val_batches=0, callbacks=[RecordLR()]).fit(module, _datamodule())
    expected = [0.1 * (1 - k / 7) ** 0.9 for k in range(7)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_lr_scheduler_none_keeps_the_learning_rate_constant(tmp_path) -> None:
    lrs = []

    class RecordLR(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = SegmentationModule(
        TinyNet(), 4, optimizer=make_optimizer_factory("sgd", {"lr": 0.1}), lr_scheduler=None
    )
    _trainer(tmp_path, 5, limit_val_batches=0, callbacks=[RecordLR()]).fit(module, _datamodule())
    assert lrs == [0.1] * 5


def test_compile_network_does_not_shadow_module_compile() -> None:
    module = SegmentationModule(TinyNet(), 4, compile_network=True)
    assert module.compile_network is True
    # nn.Module.compile() is still the method (an attribute `compile` used to shadow it).
    assert module.compile.__func__ is torch.nn.Module.compile


# ---------------------------------------------------------------------------------- metrics
def test_validation_miou_matches_a_naive_computation(tmp_path) -> None:
    torch.manual_seed(0)
    network = TinyNet(3)
    module = SegmentationModule(network, 3)
    datamodule = _datamodule(num_classes=3, val_length=10, batch_size_validation=4)
    trainer = _trainer(tmp_path, 1)
    metrics = trainer.validate(module, datamodule, verbose=False)[0]

    datamodule.setup("validate")
    network.eval()
    intersection, union = torch.zeros(3), torch.zeros(3)
    with torch.no_grad():
        for index in range(10):
            item = datamodule.val_dataset[index]
            prediction = network(item["image"][None]).high.argmax(1)[0]
            target = item["semseg_dense"]
            keep = target != 255
            for c in range(3):
                p, t = (prediction == c) & keep, (target == c) & keep
                intersection[c] += (p & t).sum()
                union[c] += (p | t).sum()
    present = union > 0
    expected = (intersection[present] / union[present]).mean().item()
    assert metrics["val/mIoU"] == pytest.approx(expected, abs=1e-6)
    for c, name in enumerate(datamodule.class_names):
        if present[c]:
            assert metrics[f"val/IoU/{name}"] == pytest.approx(
                (intersection[c] / union[c]).item(), abs=1e-6
            )


# ----------------------------------------------------------------------------------- resume
# The recipes checkpoint where validation runs, mid-epoch; resumed, the epoch's batches start
# afresh (the shuffle is seeded, the loader keeps no position), which Lightning points out. The
# resumed trainer writes into the first one's checkpoint folder on purpose.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resume_from_checkpoint_restores_step_lr_and_best_metric(tmp_path) -> None:
    def make():
        torch.manual_seed(0)
        return SegmentationModule(
            TinyNet(),
            4,
            gated_crf=GatedCRFLoss(KERNELS, radius=1),
            cross_entropy_modality="semseg_scribbles",
            gated_crf_use_after_progress_ratio=0.3,
            optimizer=make_optimizer_factory("sgd", {"lr": 0.05, "momentum": 0.9}),
        )

    class KillAt(Callback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.step:
                raise KeyboardInterrupt  # a run killed mid-way

    scores = []

    class RecordScores(Callback):
        def on_validation_end(self, trainer, pl_module):
            scores.append(float(trainer.callback_metrics["val/mIoU"]))

    def checkpointing_trainer(*extra: Callback) -> pl.Trainer:
        checkpoints = [
            c
            for c in default_callbacks(checkpoint_dir=str(tmp_path / "ckpt"))
            if isinstance(c, ModelCheckpoint)
        ]
        return _trainer(
            tmp_path,
            10,
            val_check_interval=3,
            enable_checkpointing=True,
            callbacks=[*checkpoints, *extra],
        )

    trainer = checkpointing_trainer(RecordScores(), KillAt(7))
    with pytest.raises((SystemExit, KeyboardInterrupt)):  # Lightning shuts down and exits
        trainer.fit(make(), _datamodule())
    assert trainer.global_step == 7
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 6  # the last validation (every 3 steps) wrote it
    best_before = float(trainer.checkpoint_callback.best_model_score)
    assert len(scores) == 2 and best_before == pytest.approx(max(scores))

    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
            seen["best"] = float(trainer.checkpoint_callback.best_model_score)
            seen["gcrf_active"] = pl_module.gated_crf_active()

    resumed = checkpointing_trainer(Probe())
    resumed.fit(make(), _datamodule(), ckpt_path=str(last))
    assert seen["step"] == 6
    assert seen["lr"] == pytest.approx(0.05 * (1 - 6 / 10) ** 0.9, rel=1e-6)
    assert seen["best"] == pytest.approx(best_before)
    assert seen["gcrf_active"]  # floor(0.3 · 10) = 3 <= 6
    assert resumed.global_step == 10


# ------------------------------------------------------------------------------- callbacks
def test_visualization_schedule() -> None:
    vis = SegmentationVisualizer(
        num_batches_visualization_first=100, num_batches_visualization_step=1000
    )
    on = [s for s in range(0, 3200) if vis.is_visualization_step(s)]
    assert on == [100, 1100, 2100, 3100]


def test_visualizer_writes_grids_with_every_panel(tmp_path) -> None:
    images = []

    class FakeExperiment:
        def add_image(self, tag, image, global_step):
            images.append((tag, tuple(image.shape), image.dtype, global_step))

    class FakeLogger(pl.loggers.Logger):
        name = "fake"
        version = 0

        @property
        def experiment(self):
            return FakeExperiment()

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    module = SegmentationModule(
        TinyNet(),
        4,
        gated_crf=GatedCRFLoss(KERNELS, radius=2),
        cross_entropy_modality="semseg_scribbles",
        gated_crf_resolution=16,
    )
    vis = SegmentationVisualizer(
        num_batches_visualization_first=2,
        num_batches_visualization_step=3,
        visualize_num_samples_in_batch=3,
        observe_train_ids=[0, 5],
        observe_valid_ids=[1, 2, 3, 100],  # 100 is out of range: skipped
        tensorboard_img_grid_width=2,
    )
    trainer = _trainer(tmp_path, 5, val_check_interval=5, logger=FakeLogger(), callbacks=[vis])
    trainer.fit(module, _datamodule())
    tags = [(tag, step) for tag, _, _, step in images]
    assert ("train/batch", 2) in tags and ("train/batch", 5) in tags
    assert ("train/observed", 5) in tags and ("valid/observed", 5) in tags
    for tag, shape, dtype, _ in images:
        assert dtype == torch.uint8 and shape[0] == 3
        # 5 panels of 32 px stacked per sample, 2 samples per row, 2 px padding
        samples = {"train/batch": 3, "train/observed": 2, "valid/observed": 3}[tag]
        rows = math.ceil(samples / 2)
        assert shape[1] == rows * (5 * 32 + 2) + 2, (tag, shape)
        assert shape[2] == min(samples, 2) * (32 + 2) + 2, (tag, shape)


def test_default_callbacks_and_plain_progress(caplog) -> None:
    callbacks = default_callbacks(SegmentationVisualizer())
    kinds = {type(c).__name__ for c in callbacks}
    assert {"ModelCheckpoint", "LearningRateLog", "SegmentationVisualizer"} <= kinds
    # pytest captures stdout: no TTY, so plain progress lines instead of a rich bar
    assert "PlainProgressLog" in kinds
    best, latest = (c for c in callbacks if isinstance(c, ModelCheckpoint))
    assert best.monitor == "val/mIoU" and best.mode == "max"
    assert latest.monitor is None and latest.save_last == "link"
    with pytest.raises(ValueError, match="every_n_steps"):
        PlainProgressLog(0)


def test_progress_line_says_when_the_validation_metric_was_measured(tmp_path) -> None:
    lines: list[str] = []

    class Recording(PlainProgressLog):
        def line(self, trainer: pl.Trainer) -> str:
            lines.append(super().line(trainer))
            return lines[-1]

    module = SegmentationModule(TinyNet(), 4)
    trainer = _trainer(tmp_path, 5, val_check_interval=2, callbacks=[Recording(every_n_steps=1)])
    trainer.fit(module, _datamodule())
    assert [line.split(" |")[0] for line in lines] == [f"step {k}/5" for k in range(1, 6)]
    # A step's line is written before that step's validation: steps 1-2 have none yet, steps 3-4
    # show the one measured at step 2 and say so, step 5 the one of step 4.
    assert all("val/mIoU" not in line for line in lines[:2])
    assert all("@ step 2" in line for line in lines[2:4])
    assert "@ step 4" in lines[4]


# ------------------------------------------------------------------------------ validation
def test_module_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="network"):
        SegmentationModule("resnet", 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationModule(TinyNet(), 1)
    with pytest.raises(ValueError, match="cross_entropy_modality"):
        SegmentationModule(TinyNet(), 4, cross_entropy_modality="semseg_boxes")
    with pytest.raises(ValueError, match="class_weights"):
        SegmentationModule(TinyNet(), 4, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="ratio"):
        SegmentationModule(TinyNet(), 4, gated_crf_use_after_progress_ratio=1.5)
    for resolution in (0, (8,), (8, 0), 2.5, "64"):
        with pytest.raises(ValueError, match=r"gated_crf_resolution must be .*got"):
            SegmentationModule(TinyNet(), 4, gated_crf_resolution=resolution)
    with pytest.raises(ValueError, match="num_batches_visualization_step"):
        SegmentationVisualizer(num_batches_visualization_step=0)


# ------------------------------------------------------------------------- SyncBatchNorm plugin
def _bn_act_model() -> nn.Module:
    """A DeepLabv3+ whose encoder uses timm's fused BatchNormAct2d, with non-trivial BN statistics."""
    from gcrf.models import DeepLabV3Plus

    torch.manual_seed(0)
    model = DeepLabV3Plus("mobilenetv3_small_050", num_classes=3, aspp_channels=16)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_timm_sync_batchnorm_keeps_the_fused_activations() -> None:
    from lightning.pytorch.plugins import TorchSyncBatchNorm
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    from gcrf.training import TimmSyncBatchNorm

    model = _bn_act_model()
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        expected = model(x).high
    fused = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert fused > 0

    plugin = TimmSyncBatchNorm()
    synced = plugin.apply(model)
    kinds = [type(m) for m in synced.modules()]
    assert kinds.count(SyncBatchNormAct) == fused and BatchNormAct2d not in kinds
    with torch.no_grad():  # eval mode normalises with running statistics: same function
        torch.testing.assert_close(synced(x).high, expected)

    reverted = plugin.revert(synced)
    kinds = [type(m) for m in reverted.modules()]
    assert kinds.count(BatchNormAct2d) == fused
    assert not any(issubclass(k, nn.SyncBatchNorm) for k in kinds)
    with torch.no_grad():
        torch.testing.assert_close(reverted(x).high, expected)

    # Lightning's own conversion drops the activation of the fused layers: a different network.
    with torch.no_grad():
        broken = TorchSyncBatchNorm().apply(_bn_act_model())(x).high
    assert not torch.allclose(broken, expected, atol=1e-3)


# ------------------------------------------------------------------------- precision and DDP
def test_bf16_mixed_runs_the_network_in_bf16_and_the_losses_in_fp32(tmp_path) -> None:
    seen: dict[str, set] = {"network": set(), "gated_crf": set(), "features": set()}

    class RecordDtypes(GatedCRFLoss):
        def forward(self, probs, features, mask_src=None, mask_dst=None):
            seen["gated_crf"].add(probs.dtype)
            seen["features"].add(features["rgb"].dtype)
            return super().forward(probs, features, mask_src, mask_dst)

    network = TinyNet()
    network.register_forward_hook(lambda _m, _i, out: seen["network"].add(out.low.dtype))
    module = SegmentationModule(
        network,
        4,
        gated_crf=RecordDtypes(KERNELS, radius=1),
        cross_entropy_modality="semseg_scribbles",
        gated_crf_use_after_progress_ratio=0.0,
        optimizer=make_optimizer_factory("adam", {"lr": 1e-3}),
    )
    trainer = _trainer(tmp_path, 2, precision="bf16-mixed")
    trainer.fit(module, _datamodule())
    assert seen["network"] == {torch.bfloat16}  # autocast really ran the network in bf16
    assert seen["gated_crf"] == {torch.float32} and seen["features"] == {torch.float32}
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/loss_ce", "train/loss_gatedcrf"):
        assert torch.isfinite(metrics[name]), name
    assert all(p.dtype == torch.float32 for p in module.parameters())  # fp32 master weights


class CheckDDP(Callback):
    """Runs in every DDP process: two ranks on other samples, equal weights after the steps."""

    def __init__(self, synced_batchnorm: bool) -> None:
        self.synced_batchnorm = synced_batchnorm

    def on_train_start(self, trainer, pl_module):
        from timm.layers import BatchNormAct2d, SyncBatchNormAct

        assert trainer.world_size == 2
        kinds = [type(m) for m in pl_module.network.modules()]
        if self.synced_batchnorm:
            assert SyncBatchNormAct in kinds and BatchNormAct2d not in kinds, kinds

    def on_train_end(self, trainer, pl_module):
        def gathered(tensors):
            flat = torch.cat([t.detach().float().flatten() for t in tensors])
            return trainer.strategy.all_gather(flat)  # world × numel

        assert trainer.global_step == 2
        # Gradients are all-reduced: both ranks end with the same weights, although each
        # trained on other samples (DistributedSampler).
        weights = gathered(pl_module.parameters())
        torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
        first = trainer.strategy.all_gather(self.first_index)
        assert int(first[0]) != int(first[1])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.first_index = batch["index"][0]


def _ddp_fit(tmp_path, accelerator: str, sync_batchnorm: bool) -> None:
    """Two DDP processes, two steps; the checks run in the workers (a failure fails the test)."""
    from gcrf.models import DeepLabV3Plus
    from gcrf.training import TimmSyncBatchNorm

    torch.manual_seed(0)
    module = SegmentationModule(
        DeepLabV3Plus("mobilenetv3_small_050", num_classes=4, aspp_channels=16),
        4,
        gated_crf=GatedCRFLoss(KERNELS, radius=1),
        cross_entropy_modality="semseg_scribbles",
        gated_crf_use_after_progress_ratio=0.0,
        optimizer=make_optimizer_factory("sgd", {"lr": 0.01}),
    )
    trainer = _trainer(
        tmp_path,
        2,
        accelerator=accelerator,
        strategy="ddp_spawn",
        devices=2,
        limit_val_batches=1,
        plugins=[TimmSyncBatchNorm()] if sync_batchnorm else None,
        callbacks=[CheckDDP(sync_batchnorm)],
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, _datamodule(batch_size=2))
    # ddp_spawn sends rank 0's weights and metrics back to this process.
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert 0.0 <= float(trainer.callback_metrics["val/mIoU"]) <= 1.0


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path) -> None:
    # torch's SyncBatchNorm refuses CPU modules under DDP: the synchronised case needs 2 GPUs.
    _ddp_fit(tmp_path, "cpu", sync_batchnorm=False)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ddp_on_two_gpus_synchronises_timm_batchnorm(tmp_path) -> None:
    _ddp_fit(tmp_path, "gpu", sync_batchnorm=True)


@pytest.mark.slow
def test_compiled_network_trains_and_checkpoints_like_the_eager_one(tmp_path) -> None:
    def fit(compile_network: bool) -> SegmentationModule:
        torch.manual_seed(0)
        module = SegmentationModule(
            TinyNet(),
            4,
            gated_crf=GatedCRFLoss(KERNELS, radius=1),
            cross_entropy_modality="semseg_scribbles",
            gated_crf_use_after_progress_ratio=0.0,
            optimizer=make_optimizer_factory("sgd", {"lr": 0.05}),
            compile_network=compile_network,
        )
        _trainer(tmp_path, 3, limit_val_batches=1).fit(module, _datamodule())
        return module

    eager, compiled = fit(False), fit(True)
    assert compiled._compiled_network is not None  # the forward really was compiled
    assert eager._compiled_network is None
    # One copy of every weight, under `network.`, in both: checkpoints are interchangeable.
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    assert {k for k in eager.state_dict() if k.startswith("network.")} == {
        f"network.{k}" for k in eager.network.state_dict()
    }
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-4, atol=1e-5)
