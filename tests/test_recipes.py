"""The recipes: every published flag has a home on the real command line; short runs of each recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from recipes import synthetic

FLAGS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"

#: Every argument of the published ``scripts/train.py`` (its README's usage block), in order.
PUBLISHED_FLAGS = (
    "--log_dir",
    "--datasets_dir",
    "--dataset",
    "--dataset_download",
    "--workers",
    "--workers_validation",
    "--num_batches_train_total",
    "--num_batches_validation_step",
    "--batch_size",
    "--batch_size_validation",
    "--aug_input_crop_size",
    "--aug_geom_scale_min",
    "--aug_geom_scale_max",
    "--aug_geom_tilt_max_deg",
    "--aug_geom_wiggle_max_ratio",
    "--aug_geom_reflect",
    "--aug_geom_validation_center_crop_sts",
    "--aug_geom_validation_center_crop_size",
    "--aug_semseg_weak_stroke_width",
    "--optimizer",
    "--optimizer_kwargs",
    "--lr_scheduler",
    "--lr_scheduler_power",
    "--model_name",
    "--model_encoder_name",
    "--loss_cross_entropy_class_weights_sts",
    "--loss_cross_entropy_modality",
    "--loss_cross_entropy_weight",
    "--loss_gatedcrf_sts",
    "--loss_gatedcrf_resolution",
    "--loss_gatedcrf_radius",
    "--loss_gatedcrf_kernels_desc",
    "--loss_gatedcrf_weight",
    "--loss_gatedcrf_use_after_progress_ratio",
    "--num_batches_visualization_first",
    "--num_batches_visualization_step",
    "--visualize_num_samples_in_batch",
    "--observe_train_ids",
    "--observe_valid_ids",
    "--tensorboard_img_grid_width",
)


def flag_table() -> dict[str, str]:
    """The published-flag table of docs/recipes.md: old flag → the text of its "gcrf" cell."""
    text = FLAGS_PAGE.read_text()
    block = text.split("<!-- published-flags:start -->")[1].split("<!-- published-flags:end -->")[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`--"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def config_keys(main, capsys) -> set[str]:
    """Dotted keys of a recipe's full configuration, read from its real ``--print_config``."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--print_config"], run=False)
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)

    def flatten(node, prefix=""):
        for key, value in node.items():
            yield f"{prefix}{key}"
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")

    return set(flatten(config))


def test_every_published_flag_has_a_row() -> None:
    table = flag_table()
    assert sorted(table) == sorted(PUBLISHED_FLAGS)


def test_the_flag_table_names_real_arguments(capsys) -> None:
    import recipes.voc_clicks as voc

    keys = config_keys(voc.main, capsys)
    new_flags = []
    for old, cell in flag_table().items():
        named = re.findall(r"`--([a-z_][a-z0-9_.]*)`", cell)
        if old == "--dataset":
            assert "recipes.voc_" in cell and "recipes.cityscapes_" in cell
            continue
        assert named, f"{old} maps to no new argument: {cell!r}"
        new_flags.extend(named)
    missing = sorted(flag for flag in new_flags if flag not in keys)
    assert not missing, f"the flag table names arguments the CLI does not have: {missing}"


def test_recipe_defaults_reach_the_objects() -> None:
    cli = synthetic.main(
        [
            "--data.image_size=32",
            "--data.train_length=4",
            "--data.val_length=2",
            "--model.loss_cross_entropy_modality=semseg_scribbles",
            "--model.loss_gatedcrf=true",
            "--model.loss_gatedcrf_resolution=16",
            "--model.loss_gatedcrf_kernels_desc=[{weight: 1, xy: 4, rgb: 0.2}]",
            "--trainer.max_steps=7",
        ],
        run=False,
    )
    module = cli.model
    assert module.num_classes == cli.datamodule.num_classes == 4
    assert module.cross_entropy_modality == "semseg_scribbles"
    assert module.gated_crf is not None and module.gated_crf_resolution == 16
    (kernel,) = module.gated_crf.config.kernels
    assert (kernel.position_sigma, kernel.modalities) == (4, (("rgb", 0.2),))
    assert module.hparams["gated_crf_kernels"] == [{"weight": 1, "xy": 4, "rgb": 0.2}]
    assert cli.trainer.max_steps == 7
    # SyncBatchNorm under DDP goes through the timm-aware plugin (Lightning's drops activations).
    from gcrf.training import TimmSyncBatchNorm

    assert isinstance(cli.trainer._accelerator_connector._layer_sync, TimmSyncBatchNorm)
    no_sync = synthetic.main(["--trainer.sync_batchnorm=false"], run=False)
    assert no_sync.trainer._accelerator_connector._layer_sync is None


def synthetic_short_run(tmp_path: Path) -> list[str]:
    """Two steps of the synthetic recipe on tiny scenes, one validation."""
    return [
        "--data.image_size=32",
        "--data.train_length=4",
        "--data.val_length=2",
        "--data.batch_size=2",
        "--data.batch_size_validation=2",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}",
    ]


@pytest.mark.parametrize("gated_crf", [False, True])
def test_synthetic_recipe_trains(tmp_path, gated_crf) -> None:
    cli = synthetic.main(
        [
            *synthetic_short_run(tmp_path),
            "--model.loss_cross_entropy_modality=semseg_scribbles",
            f"--model.loss_gatedcrf={str(gated_crf).lower()}",
            "--model.loss_gatedcrf_use_after_progress_ratio=0",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    assert 0.0 <= float(metrics["val/mIoU"]) <= 1.0
    assert (float(metrics["train/loss_gatedcrf"]) > 0) == gated_crf
    assert list(tmp_path.rglob("last.ckpt")), "no checkpoint written"


@pytest.mark.parametrize(
    "flags",
    [
        ["--trainer.logger=false"],
        ["--trainer.enable_checkpointing=false"],
        ["--trainer.enable_progress_bar=false"],
        ["--trainer.enable_progress_bar=true"],
        ["--trainer.logger=false", "--trainer.enable_checkpointing=false"],
        ["--trainer.fast_dev_run=true"],
        pytest.param(
            ["--trainer.precision=bf16-mixed"],
            # Lightning's model summary cannot size bf16-mixed and counts 32 bits per parameter,
            # which is what the fp32 master weights take: the estimate is right, the notice expected.
            marks=pytest.mark.filterwarnings(
                "ignore:Precision bf16-mixed is not supported by the model summary"
            ),
        ),
        [
            "--trainer.max_steps=-1",
            "--trainer.max_epochs=1",
            "--trainer.val_check_interval=1.0",
            "--trainer.check_val_every_n_epoch=1",
        ],
    ],
    ids=lambda flags: " ".join(f.removeprefix("--trainer.") for f in flags),
)
def test_documented_trainer_flags_run(tmp_path, flags) -> None:
    """Lightning refuses some combinations with the recipes' default callbacks (a learning-rate
    monitor without a logger, checkpoints with checkpointing off): the recipes must not."""
    cli = synthetic.main([*synthetic_short_run(tmp_path), *flags])
    assert cli.trainer.global_step >= 1
    assert "val/mIoU" in cli.trainer.callback_metrics
    if "--trainer.enable_checkpointing=false" in flags:
        assert not list(tmp_path.rglob("*.ckpt"))


def test_gap_closed() -> None:
    from recipes.runs import gap_closed

    assert gap_closed(0.8, 0.6, 0.7) == pytest.approx(0.5)
    assert gap_closed(0.8, 0.6, 0.9) == pytest.approx(1.5)
    assert gap_closed(0.6, 0.6, 0.7) != gap_closed(0.6, 0.6, 0.7)  # no gap: NaN


@pytest.mark.parametrize("workers", [1, 3])
def test_demo_runs_three_settings_and_prints_the_table(tmp_path, capfd, workers) -> None:
    from recipes.demo import main

    results = main(
        [
            "--steps=2",
            "--data={image_size: 32, train_length: 4, val_length: 2, batch_size: 2}",
            "--model={gated_crf_weight: 0.5}",
            "--validations=1",
            f"--workers={workers}",
            f"--output_dir={tmp_path}",
        ]
    )
    assert [r.name for r in results] == ["full", "scribbles", "scribbles_gatedcrf"]
    assert all(r.steps == 2 and 0.0 <= r.miou <= 1.0 for r in results)
    # Every run validated raw and with the synthetic recipe's refinement, stated once.
    assert all(0.0 <= r.metrics["val/mIoU_crf"] <= 1.0 for r in results)
    out = capfd.readouterr().out  # the runs' processes write to the terminal itself
    assert "Gated CRF closes" in out and str(tmp_path) in out
    from gcrf.training import CRFSetting
    from recipes.presets import SYNTHETIC

    setting = CRFSetting(
        SYNTHETIC["model.crf_refinement_kernels"],
        SYNTHETIC["model.crf_refinement_radius"],
        SYNTHETIC["model.crf_refinement_iterations"],
    )
    assert f"refined by {setting}" in " ".join(out.split())
    # Every progress line says which run it belongs to (the runs share one console).
    progress = [line for line in out.splitlines() if "step 2/2 |" in line]
    labels = sorted(line.split()[1] for line in progress)
    assert labels == ["[full]", "[scribbles]", "[scribbles_gatedcrf]"], progress
    for result in results:
        assert list(Path(result.log_dir).glob("events.out.tfevents.*")), result.log_dir
        # Assembled through the recipe CLI: each run records its whole configuration, the
        # checkpoint's hyperparameters under gcrf's names, config.yaml under the command line's.
        hparams = yaml.safe_load((Path(result.log_dir) / "hparams.yaml").read_text())
        assert hparams["gated_crf"] == (result.name == "scribbles_gatedcrf")
        assert hparams["cross_entropy_modality"] == (
            "semseg_dense" if result.name == "full" else "semseg_scribbles"
        )
        assert hparams["gated_crf_weight"] == 0.5 and hparams["crf_refinement"]
        config = yaml.safe_load((Path(result.log_dir) / "config.yaml").read_text())
        assert config["trainer"]["max_steps"] == 2 and config["data"]["image_size"] == 32
        assert config["model"]["loss_gatedcrf_weight"] == 0.5
        state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
        assert state["global_step"] == 2 and any(
            k.startswith("network.") for k in state["state_dict"]
        )


def test_demo_refuses_settings_the_recipe_does_not_have(tmp_path) -> None:
    from recipes.demo import demo

    with pytest.raises(ValueError, match=r"model has settings .*\['gatedcrf_weight'\]"):
        demo(model={"gatedcrf_weight": 1.0}, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data has settings .*\['size'\]"):
        demo(data={"size": 32}, output_dir=str(tmp_path))


# ------------------------------------------------------------------------- one vocabulary
#: A value other than the default for every model setting whose command-line name is published.
PUBLISHED_VALUES = {
    "cross_entropy_modality": "semseg_clicks",
    "cross_entropy_weight": 0.7,
    "cross_entropy_class_weights": True,
    "dice_weight": 0.2,
    "gated_crf": True,
    "gated_crf_resolution": 16,
    "gated_crf_radius": 2,
    "gated_crf_kernels": [{"weight": 2.0, "xy": 3.0, "rgb": 0.3}],
    "gated_crf_weight": 0.3,
    "gated_crf_use_after_progress_ratio": 0.25,
}


def test_published_flags_set_the_settings_of_gcrfs_names() -> None:
    from recipes.cli import PUBLISHED_NAMES, command_line_args

    assert set(PUBLISHED_VALUES) == set(PUBLISHED_NAMES)
    args = command_line_args({f"model.{k}": v for k, v in PUBLISHED_VALUES.items()})
    assert (
        "--model.loss_gatedcrf_kernels_desc=" + '[{"weight": 2.0, "xy": 3.0, "rgb": 0.3}]' in args
    )
    module = synthetic.main(args, run=False).model
    for name, value in PUBLISHED_VALUES.items():
        assert module.hparams[name] == value, name
    # ... and reach the objects they configure.
    assert module.cross_entropy_modality == "semseg_clicks" and module.dice_weight == 0.2
    assert module.cross_entropy_weight == 0.7 and module.use_class_weights
    assert (module.gated_crf_weight, module.gated_crf_resolution) == (0.3, 16)
    assert module.gated_crf_use_after_progress_ratio == 0.25 and module.gated_crf.radius == 2
    (kernel,) = module.gated_crf.config.kernels
    assert (kernel.weight, kernel.position_sigma, kernel.modalities) == (2.0, 3.0, (("rgb", 0.3),))


def test_the_command_line_has_every_setting_once(capsys) -> None:
    """The ``--model.*`` flags are the recipe's settings, renamed where the published code named
    them: no setting is missing, none appears under both names (``num_classes`` is linked from the
    data module, not a flag)."""
    from recipes.cli import command_line_key, model_settings

    keys = {
        k.removeprefix("model.")
        for k in config_keys(synthetic.main, capsys)
        if k.startswith("model.") and k.count(".") == 1
    }
    expected = {
        command_line_key(f"model.{name}").removeprefix("model.") for name in model_settings()
    }
    assert keys == expected - {"num_classes"}
    assert {"loss_gatedcrf_weight", "compile_network", "model_kwargs"} <= keys
    assert not {"gated_crf_weight", "gated_crf", "network", "palette"} & keys


def test_presets_name_real_settings() -> None:
    from recipes import presets
    from recipes.cli import model_settings

    known = set(model_settings())
    for name in presets.__all__:
        preset = getattr(presets, name)
        if isinstance(preset, dict):
            unknown = {k for k in preset if k.startswith("model.")} - {f"model.{n}" for n in known}
            assert not unknown, (name, unknown)


def test_library_errors_name_the_library_settings() -> None:
    from gcrf.training import resize_probabilities

    with pytest.raises(ValueError) as info:
        resize_probabilities(torch.zeros(1, 2, 4, 4), 12, (32, 32))
    assert "loss_gatedcrf" not in str(info.value) and "resolution" in str(info.value)


#: A network small enough for seconds-long runs, without any download.
TINY_MODEL = (
    "--model.model_encoder_name=mobilenetv3_small_050",
    "--model.model_pretrained=false",
    "--model.model_kwargs={aspp_channels: 16}",
)


def short_run(tmp_path: Path) -> tuple[str, ...]:
    """Two training steps, one validation batch, on the CPU."""
    return (
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.log_every_n_steps=1",
        "--data.num_workers=0",
        "--data.num_workers_validation=0",
    )


def check_short_run(cli, modality: str, gated_crf: bool) -> None:
    module, metrics = cli.model, cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    assert module.cross_entropy_modality == modality
    assert (module.gated_crf is not None) == gated_crf
    assert 0.0 <= float(metrics["val/mIoU"]) <= 1.0
    if gated_crf:  # the paper's weak recipes weight CE by the classes of the weak labels
        assert module.class_weights is not None
        assert float(module.class_weights.sum()) == pytest.approx(1.0, abs=1e-5)


def _cityscapes_tree(root: Path, clicks: bool) -> list[str]:
    from gcrf.data.cityscapes_clicks import main as write_clicks
    from tests.test_cityscapes import make_tree

    make_tree(root)
    if clicks:
        assert write_clicks(["--root", str(root), "--workers", "0"]) == 0
    return []


def _voc_tree(root: Path, clicks: bool) -> list[str]:
    from tests.test_voc import make_voc_tree

    make_voc_tree(root)
    return [
        f"--data.clicks_dir={root / 'clicks'}",
        "--data.augmentation.validation_center_crop_size=32",
    ]


@pytest.mark.parametrize(
    ("recipe", "modality", "gated_crf"),
    [
        ("cityscapes_full", "semseg_dense", False),
        ("cityscapes_clicks", "semseg_clicks", True),
        ("voc_full", "semseg_dense", False),
        ("voc_scribbles", "semseg_scribbles", True),
        ("voc_clicks", "semseg_clicks", True),
    ],
)
def test_dataset_recipes_train_on_a_fake_tree(tmp_path, recipe, modality, gated_crf) -> None:
    import importlib

    voc = recipe.startswith("voc")
    root = tmp_path / "data"
    extra = (_voc_tree if voc else _cityscapes_tree)(root, clicks=modality == "semseg_clicks")
    main = importlib.import_module(f"recipes.{recipe}").main
    cli = main(
        [
            f"--data.root={root}",
            *extra,
            "--data.augmentation.crop_size=32",
            "--data.batch_size=2",
            "--data.batch_size_validation=1",
            "--model.loss_gatedcrf_resolution=16",
            *TINY_MODEL,
            *short_run(tmp_path),
        ]
    )
    assert cli.datamodule.num_classes == cli.model.num_classes == (21 if voc else 19)
    if voc:
        assert cli.datamodule.use_scribbles == (recipe != "voc_clicks")
    check_short_run(cli, modality, gated_crf)
