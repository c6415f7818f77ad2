"""ACDC in the WSL4MIS layout on tiny fake HDF5 trees: folds, samples, augmentation, volumes,
metrics, download and verification, errors, and the recipes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from gcrf.conventions import IGNORE_INDEX
from gcrf.data.acdc import (
    ACDCDataModule,
    ACDCSliceDataset,
    ACDCVolumeDataset,
    acdc_fold,
    download_acdc,
    read_manifest,
    verify_acdc,
)
from gcrf.data.transforms import AugmentationConfig, RandomRotateFlipResize, SampleTransform
from gcrf.training.metrics import VolumeScores, score_volume

# Two frames per patient, 2–3 slices each, odd in-plane sizes that differ between patients.
PATIENTS = (1, 2, 21, 22, 41, 61, 81, 100)


def _volume(rng: np.random.Generator, depth: int, height: int, width: int) -> dict:
    image = rng.random((depth, height, width), dtype=np.float32)
    label = np.zeros((depth, height, width), np.uint8)
    cy, cx = height // 2, width // 2
    label[:, cy - 4 : cy + 4, cx - 4 : cx + 4] = 2  # myocardium ring around the LV
    label[:, cy - 2 : cy + 2, cx - 2 : cx + 2] = 3
    label[:, cy - 4 : cy + 4, cx - 9 : cx - 5] = 1  # RV beside it
    scribble = np.full(label.shape, 4, np.uint16)  # 4 = unlabelled, as in the WSL4MIS files
    scribble[:, cy, cx - 8 : cx + 3] = label[:, cy, cx - 8 : cx + 3]
    scribble[:, 1, 1:6] = 0
    return {"image": image, "label": label, "scribble": scribble}


def make_tree(root: Path, seed: int = 0) -> dict[str, int]:
    """Write the fake tree; returns the number of slices per patient id."""
    rng = np.random.default_rng(seed)
    (root / "ACDC_training_slices").mkdir(parents=True)
    (root / "ACDC_training_volumes").mkdir(parents=True)
    slices = {}
    for k, patient in enumerate(PATIENTS):
        name = f"patient{patient:03d}"
        slices[name] = 0
        for frame in (1, 12):
            depth, height, width = 2 + k % 2, 27 + k, 23 + 2 * k
            volume = _volume(rng, depth, height, width)
            with h5py.File(
                root / "ACDC_training_volumes" / f"{name}_frame{frame:02d}.h5", "w"
            ) as f:
                for key, value in volume.items():
                    f.create_dataset(key, data=value, compression="gzip")
            for z in range(depth):
                path = root / "ACDC_training_slices" / f"{name}_frame{frame:02d}_slice_{z}.h5"
                with h5py.File(path, "w") as f:
                    for key, value in volume.items():
                        f.create_dataset(key, data=value[z], compression="gzip")
                slices[name] += 1
    return slices


def write_manifest(root: Path, path: Path, url: str) -> dict:
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.h5"))
    }
    manifest = {"repository": "fake/WSL4MIS", "commit": "c0ffee", "url": url, "files": files}
    path.write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def tree(tmp_path) -> tuple[Path, dict[str, int]]:
    root = tmp_path / "ACDC"
    return root, make_tree(root)


# -------------------------------------------------------------------------------------- folds
def test_folds_are_wsl4mis_patient_blocks() -> None:
    for fold in range(1, 6):
        train, val = acdc_fold(fold)
        assert val == [f"patient{i:03d}" for i in range(20 * (fold - 1) + 1, 20 * fold + 1)]
        assert len(train) == 80 and not set(train) & set(val)
    for bad in (0, 6, "1", 1.0, True):
        with pytest.raises(ValueError, match=r"fold must be an int in 1\.\.5"):
            acdc_fold(bad)


def test_data_module_counts_and_samples(tree) -> None:
    root, slices = tree
    dm = ACDCDataModule(str(root), fold=2, image_size=32, num_workers=0, num_workers_validation=0)
    dm.setup("fit")
    val_patients = {"patient021", "patient022"}
    assert len(dm.train_dataset) == sum(n for p, n in slices.items() if p not in val_patients)
    assert len(dm.val_dataset) == 2 * len(val_patients)  # two frames each
    sample = dm.train_dataset[0]
    assert sample["image"].shape == (1, 32, 32) and sample["image"].dtype == torch.float32
    assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0
    for key in ("semseg_dense", "semseg_scribbles", "semseg_clicks"):
        assert sample[key].shape == (32, 32) and sample[key].dtype == torch.int64
    assert sample["valid"].shape == (1, 32, 32)
    assert set(torch.unique(sample["semseg_scribbles"]).tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
    assert (sample["semseg_clicks"] == IGNORE_INDEX).all()
    volume = dm.val_dataset[0]
    assert volume["image"].dim() == 4 and volume["image"].shape[0] == 1
    assert volume["semseg_dense"].shape == volume["image"].shape[1:]
    assert dm.inference_size == (32, 32) and dm.num_classes == 4


def test_raw_slice_maps_unlabelled_4_to_255_and_keeps_the_labels(tree) -> None:
    root, _ = tree
    dataset = ACDCSliceDataset(root, ["patient001"])
    with h5py.File(dataset.files[0]) as f:
        scribble, label, image = f["scribble"][()], f["label"][()], f["image"][()]
    raw = dataset[0]
    assert np.array_equal(raw["semseg_scribbles"] == IGNORE_INDEX, scribble == 4)
    assert np.array_equal(raw["semseg_scribbles"][scribble != 4], scribble[scribble != 4])
    assert np.array_equal(raw["semseg_dense"], label) and np.array_equal(raw["image"], image)


def test_validation_volume_is_the_file_at_its_original_size(tree) -> None:
    root, _ = tree
    dataset = ACDCVolumeDataset(root, ["patient041"])
    with h5py.File(dataset.files[1]) as f:
        image, label = f["image"][()], f["label"][()]
    item = dataset[1]
    assert np.array_equal(item["image"][0].numpy(), image)
    assert np.array_equal(item["semseg_dense"].numpy(), label.astype(np.int64))


# ------------------------------------------------------------------------------ augmentation
def test_rotate_flip_branch_is_an_exact_dihedral_map_of_the_resized_labels() -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (12, 8)).astype(np.uint8)
    image = rng.random((12, 8), dtype=np.float32)
    transform = SampleTransform(
        AugmentationConfig(crop_size=24), True, None, RandomRotateFlipResize(24, 20.0)
    )
    # Nearest resize to 24×24 keeps each input pixel as a block; the rot/flip branch is exact.
    candidates = []
    for k in range(4):
        turned = np.rot90(label, k)
        for flipped in (np.flip(turned, 0), np.flip(turned, 1)):
            rows = np.arange(24) * flipped.shape[0] // 24
            cols = np.arange(24) * flipped.shape[1] // 24
            candidates.append(flipped[rows][:, cols])
    exact = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = transform({"image": image, "semseg_dense": label, "index": 0})
        dense = out["semseg_dense"].numpy()
        if any(np.array_equal(dense, c) for c in candidates):
            exact += 1
            assert bool((out["valid"] == 1).all())  # no padding in that branch
        else:  # the small rotation (or nothing): labels stay labels, padding is ignore
            assert set(np.unique(dense)) <= {0, 1, 2, 3, IGNORE_INDEX}
    assert 10 <= exact <= 30  # the branch is taken about half of the time


def test_rotate_flip_resize_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        RandomRotateFlipResize(0)
    with pytest.raises(ValueError, match="max_rotation_deg"):
        RandomRotateFlipResize(8, -1)


# ------------------------------------------------------------------------------------ errors
def test_missing_layout_names_what_to_fetch_and_where(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        ACDCDataModule(str(tmp_path / "nothing"), num_workers=0).setup("fit")
    message = str(info.value)
    assert "HiLab-git/WSL4MIS" in message and "a594da8d" in message
    assert str(tmp_path / "nothing" / "ACDC_training_slices") in message


def test_missing_key_and_wrong_shape_name_the_file(tree) -> None:
    root, _ = tree
    dataset = ACDCSliceDataset(root, ["patient002"])
    path = dataset.files[0]
    with h5py.File(path, "a") as f:
        del f["scribble"]
    with pytest.raises(KeyError, match=rf"{path.name}.*scribble"):
        dataset[0]
    path = dataset.files[1]
    with h5py.File(path, "a") as f:
        del f["label"]
        f.create_dataset("label", data=np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match=rf"{path.name}.*'label' has shape \(3, 3\)"):
        dataset[1]
    volumes = ACDCVolumeDataset(root, ["patient002"])
    with h5py.File(volumes.files[0], "a") as f:
        image = f["image"][()]
        del f["image"]
        f.create_dataset("image", data=image[0])  # a slice where a volume belongs
    with pytest.raises(ValueError, match=rf"{volumes.files[0].name}.*Z×H×W"):
        volumes[0]


def test_fold_outside_one_to_five_is_refused(tree) -> None:
    root, _ = tree
    with pytest.raises(ValueError, match=r"fold must be an int in 1\.\.5 \(WSL4MIS folds\), got 6"):
        ACDCDataModule(str(root), fold=6)


# ----------------------------------------------------------------------- download and verify
def test_download_fetches_checks_and_places_every_file(tmp_path) -> None:
    remote = tmp_path / "remote" / "c0ffee"
    make_tree(remote)
    manifest_path = tmp_path / "manifest.json"
    manifest = write_manifest(
        remote, manifest_path, f"file://{tmp_path}/remote/{{commit}}/{{path}}"
    )
    local = tmp_path / "local"
    assert download_acdc(local, read_manifest(manifest_path)) == len(manifest["files"])
    assert verify_acdc(local, manifest) == len(manifest["files"])
    assert download_acdc(local, manifest) == 0  # nothing missing any more
    # A corrupted local file is named with both hashes.
    victim = local / next(iter(manifest["files"]))
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(ValueError, match=rf"{victim}.*sha256"):
        verify_acdc(local, manifest)
    # A remote file that differs from the manifest is refused and not placed.
    victim.unlink()
    (remote / next(iter(manifest["files"]))).write_bytes(b"not the file")
    with pytest.raises(ValueError, match=r"downloaded ACDC file .* has sha256"):
        download_acdc(local, manifest)
    assert not victim.exists()


def test_download_offline_says_what_to_fetch(tmp_path) -> None:
    manifest = {
        "repository": "https://github.com/HiLab-git/WSL4MIS",
        "commit": "c0ffee",
        "url": f"file://{tmp_path}/absent/{{commit}}/{{path}}",
        "files": {"ACDC_training_slices/patient001_frame01_slice_0.h5": "0" * 64},
    }
    with pytest.raises(FileNotFoundError, match=r"could not download .*HiLab-git/WSL4MIS"):
        download_acdc(tmp_path / "local", manifest)


def test_shipped_manifest_lists_the_wsl4mis_files() -> None:
    manifest = read_manifest()
    assert manifest["commit"] == "a594da8d99a42860bf1dad7cea02bd168e3683b1"
    files = manifest["files"]
    assert sum(k.startswith("ACDC_training_slices/") for k in files) == 1902
    assert sum(k.startswith("ACDC_training_volumes/") for k in files) == 200
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in files.values())
    # Fold 1 trains on the slices of patients 21..100: 1,512 of them.
    train, _ = acdc_fold(1)
    names = [k.split("/")[1] for k in files if k.startswith("ACDC_training_slices/")]
    assert sum(n.split("_")[0] in set(train) for n in names) == 1512


# ----------------------------------------------------------------------------------- metrics
def _naive_dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_volume_scores_match_naive_dice_and_a_known_hd95() -> None:
    reference = torch.zeros(6, 20, 20, dtype=torch.long)
    reference[1:5, 4:12, 4:12] = 1
    reference[1:5, 14:18, 4:10] = 2
    prediction = torch.zeros_like(reference)
    prediction[1:5, 6:14, 4:12] = 1  # class 1 shifted by 2 rows: HD95 = 2
    prediction[2:4, 14:18, 4:8] = 2
    dice, hd95 = score_volume(prediction, reference, num_classes=4)
    ref, pred = reference.numpy(), prediction.numpy()
    assert dice[0].item() == pytest.approx(_naive_dice(pred == 1, ref == 1))
    assert dice[1].item() == pytest.approx(_naive_dice(pred == 2, ref == 2))
    assert hd95[0].item() == pytest.approx(2.0)
    # Class 3 is in neither volume: Dice 1, no distance.
    assert dice[2].item() == 1.0 and math.isnan(hd95[2].item())
    # A class predicted nowhere scores Dice 0 and the volume's diagonal, not 0.
    one_class = (reference == 1).long()
    dice, hd95 = score_volume(torch.zeros_like(one_class), one_class, num_classes=2)
    assert dice.tolist() == [0.0] and hd95.item() == pytest.approx(math.sqrt(36 + 400 + 400))
    with pytest.raises(ValueError, match=r"reference labels must be in \[0, 2\), got \[0, 2\]"):
        score_volume(one_class, reference, num_classes=2)

    scores = VolumeScores(["background", "a", "b", "c"])
    scores.update(prediction, reference)
    scores.update(reference, reference)
    result = scores.compute()
    first = score_volume(prediction, reference, 4)[0]
    assert result["dice_a"].item() == pytest.approx((first[0].item() + 1) / 2, rel=1e-6)
    assert result["dice"].item() == pytest.approx(
        float(torch.stack([(first + 1) / 2]).mean()), rel=1e-6
    )


def _naive_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face neighbour outside it or outside the array."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis)[tuple(slice(1, -1) for _ in mask.shape)]
    return mask & ~inner


def _naive_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """float64 distance of every surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    pa = np.argwhere(_naive_surface(a)) * np.asarray(spacing, dtype=np.float64)
    pb = np.argwhere(_naive_surface(b)) * np.asarray(spacing, dtype=np.float64)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


def _blobs(rng: np.random.Generator, shape, num_classes: int) -> np.ndarray:
    """Smooth random label volumes: network-like regions with ragged boundaries."""
    from scipy import ndimage

    fields = ndimage.gaussian_filter(rng.standard_normal((num_classes, *shape)), (0, 1, 1.5, 1.5))
    return fields.argmax(0)


# A far-away false positive: a few prediction surface voxels lie far from the reference, so the
# 95th percentile of the prediction→reference direction alone is large while that of both
# directions pooled is not — the case where medpy's HD95 and the max of the directed ones differ.
def _cube_and_far_blob() -> tuple[torch.Tensor, torch.Tensor]:
    reference = torch.zeros(6, 24, 24, dtype=torch.long)
    reference[1:5, 4:14, 4:14] = 1
    prediction = reference.clone()
    prediction[1:5, 4:14, 12:15] = 1  # boundary error of one column
    prediction[2:4, 19:22, 19:22] = 1  # false positive far away
    return prediction, reference


@pytest.mark.parametrize("spacing", [None, (5.0, 1.25, 1.25), (1.0, 0.7, 1.9)])
def test_hd95_and_dice_are_medpys_on_random_volumes(spacing) -> None:
    from medpy.metric.binary import dc, hd95

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(4):
        reference = _blobs(rng, (5, 19, 23), 4)
        prediction = _blobs(rng, (5, 19, 23), 4)
        prediction = np.where(rng.random(reference.shape) < 0.7, reference, prediction)
        dice, distance = score_volume(
            torch.from_numpy(prediction), torch.from_numpy(reference), 4, spacing
        )
        for k, label in enumerate((1, 2, 3)):
            p, r = prediction == label, reference == label
            assert dice[k].item() == pytest.approx(dc(p, r), abs=1e-6)
            assert distance[k].item() == pytest.approx(hd95(p, r, voxelspacing=spacing), rel=1e-12)
            checked += 1
    assert checked == 12
    prediction, reference = _cube_and_far_blob()
    _, distance = score_volume(prediction, reference, 2, spacing)
    expected = hd95(prediction.numpy() == 1, reference.numpy() == 1, voxelspacing=spacing)
    assert distance.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.0, 0.5)])
def test_both_hd95_definitions_match_a_naive_float64_reference(spacing) -> None:
    rng = np.random.default_rng(1)
    cases = [_cube_and_far_blob()]
    for _ in range(3):
        reference = _blobs(rng, (4, 9, 11), 3)
        cases.append((torch.from_numpy(_blobs(rng, (4, 9, 11), 3)), torch.from_numpy(reference)))
    differ = 0
    for prediction, reference in cases:
        pooled = score_volume(prediction, reference, 3 if prediction.max() > 1 else 2, spacing)[1]
        directed = score_volume(
            prediction, reference, 3 if prediction.max() > 1 else 2, spacing, "directed_max"
        )[1]
        for k in range(len(pooled)):
            p, r = prediction.numpy() == k + 1, reference.numpy() == k + 1
            forward, backward = _naive_directed(p, r, spacing), _naive_directed(r, p, spacing)
            naive_pooled = np.percentile(np.concatenate([forward, backward]), 95)
            naive_directed = max(np.percentile(forward, 95), np.percentile(backward, 95))
            assert pooled[k].item() == pytest.approx(naive_pooled, rel=1e-12)
            assert directed[k].item() == pytest.approx(naive_directed, rel=1e-12)
            differ += not math.isclose(naive_pooled, naive_directed)
    assert differ >= 2  # the two definitions really are different numbers on these volumes
    prediction, reference = _cube_and_far_blob()
    assert (
        score_volume(prediction, reference, 2)[1].item()
        < score_volume(prediction, reference, 2, hd95_definition="directed_max")[1].item()
    )
    with pytest.raises(ValueError, match=r"hd95_definition must be one of .*'medpy'"):
        score_volume(prediction, reference, 2, hd95_definition="medpy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hd95_definition"):
        VolumeScores(["background", "a"], hd95_definition="max")  # type: ignore[arg-type]


def test_volume_scores_carry_the_hd95_definition() -> None:
    prediction, reference = _cube_and_far_blob()
    for definition in ("pooled", "directed_max"):
        scores = VolumeScores(
            ["background", "a"], spacing=(2.0, 1.0, 1.0), hd95_definition=definition
        )
        scores.update(prediction, reference)
        expected = score_volume(prediction, reference, 2, (2.0, 1.0, 1.0), definition)[1]
        assert scores.compute()["hd95"].item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------------- recipes
def _short(tmp_path: Path) -> list[str]:
    return [
        "--data.image_size=32",
        "--data.batch_size=2",
        "--data.num_workers=0",
        "--data.num_workers_validation=0",
        "--model.model_encoder_name=resnet10t",
        "--model.model_kwargs={in_channels: 1, decoder_channels: [16, 16, 8, 8, 8, 8]}",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]


@pytest.mark.parametrize(
    ("recipe", "extra", "gated_crf"),
    [
        ("acdc_full", [], False),
        ("acdc_scribbles", [], True),
        ("acdc_scribbles", ["--model.loss_gatedcrf=false"], False),
    ],
)
def test_acdc_recipes_train_on_a_fake_tree(tmp_path, tree, recipe, extra, gated_crf) -> None:
    import importlib

    root, _ = tree
    cli = importlib.import_module(f"recipes.{recipe}").main(
        [f"--data.root={root}", *_short(tmp_path), *extra]
    )
    module, metrics = cli.model, cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    assert type(module.network).__name__ == "UNet" and module.network.in_channels == 1
    assert (module.gated_crf is not None) == gated_crf
    assert (float(metrics["train/loss_gatedcrf"]) > 0) == gated_crf
    assert ("train/loss_dice" in metrics) == (recipe == "acdc_full")
    for key in ("val/dice", "val/dice_rv", "val/dice_myo", "val/dice_lv", "val/hd95"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["val/dice"]) <= 1.0
    best = cli.trainer.checkpoint_callback
    assert best.monitor == "val/dice" and best.best_model_path


def test_acdc_declares_volumes_dice_and_intensities_and_its_kernel_follows(tmp_path, tree) -> None:
    """What ACDCDataModule declares reaches the module and the callbacks; a kernel on the
    natural images' ``rgb`` is refused before training, naming the modality to use."""
    import recipes.acdc_scribbles
    from recipes.presets import ACDC_SCRIBBLES

    assert (ACDCDataModule.validation_kind, ACDCDataModule.monitor) == ("volumes", "val/dice")
    assert ACDCDataModule.monitor_mode == "max" and ACDCDataModule.image_modality == "intensity"
    assert ACDC_SCRIBBLES["model.gated_crf_kernels"] == [
        {"weight": 1.0, "xy": 6.0, "intensity": 0.1}
    ]
    root, _ = tree
    with pytest.raises(ValueError, match=r"\['rgb'\].*image_modality='intensity'"):
        recipes.acdc_scribbles.main(
            [
                f"--data.root={root}",
                *_short(tmp_path),
                "--model.loss_gatedcrf_kernels_desc=[{weight: 1, xy: 6, rgb: 0.1}]",
            ]
        )


def test_volume_validation_scores_the_slice_by_slice_prediction(tmp_path, tree) -> None:
    """The module's 3D scores are those of its own predictions, computed independently."""
    import recipes.acdc_full

    root, _ = tree
    cli = recipes.acdc_full.main([f"--data.root={root}", *_short(tmp_path)], run=False)
    module, dm = cli.model, cli.datamodule
    metrics = cli.trainer.validate(module, dm, verbose=False)[0]
    module.eval()
    scores = VolumeScores(dm.class_names)
    for k in range(2):  # --trainer.limit_val_batches=2: the first two volumes
        item = dm.val_dataset[k]
        slices = item["image"].transpose(0, 1)  # Z×1×H×W
        x = torch.nn.functional.interpolate(slices, size=(32, 32), mode="bilinear")
        with torch.no_grad():
            logits = module.network(x).high
        logits = torch.nn.functional.interpolate(logits, size=slices.shape[-2:], mode="bilinear")
        scores.update(logits.argmax(1), item["semseg_dense"])
    expected = scores.compute()
    assert metrics["val/dice"] == pytest.approx(float(expected["dice"]), abs=1e-6)
    assert metrics["val/hd95"] == pytest.approx(float(expected["hd95"]), abs=1e-4)


def test_acdc_compare_runs_the_settings_raw_and_refined(tmp_path, tree, capsys) -> None:
    from recipes import acdc_compare

    root, _ = tree
    results = acdc_compare.main(
        [
            f"--data.root={root}",
            "--steps=2",
            "--image_size=32",
            "--batch_size=2",
            "--model_encoder_name=resnet10t",
            "--decoder_channels=[16, 16, 8, 8, 8, 8]",
            "--crf_grid={weights: [1.0, 2.0], xy: [2.0], intensity: [0.1], radii: [2], volumes: 2}",
            f"--output_dir={tmp_path / 'runs'}",
            "--workers=1",
        ]
    )
    names = ["full", "pce", "pce_gatedcrf", "pce_gatedcrf_crflayer"]
    assert [r.name for r in results] == names
    assert all(r.steps == 2 and 0 <= r.metrics["val/dice"] <= 1 for r in results)
    assert all(0 <= r.metrics["val/dice_crf"] <= 1 and "val/hd95_crf" in r.metrics for r in results)
    # Each run's refinement was chosen on 2 training volumes among the grid's two settings.
    assert all(r.extra["selection_volumes"] == 2 for r in results)
    assert all("radius 2, 5 iterations" in r.extra["crf_setting"] for r in results)
    assert np.array(results[3].extra["crf_layer_compatibility"]).shape == (4, 4)
    printed = capsys.readouterr().out
    assert "closes" in printed and "pce_gatedcrf" in printed
    progress = [line for line in printed.splitlines() if "step 2/2 |" in line]
    assert sorted(line.split()[1] for line in progress) == [f"[{n}]" for n in sorted(names)]
    for name in names:  # every run's chosen setting, on a line labelled with the run
        assert any(
            line.startswith(f"[{name}] ") and "CRF chosen" in line for line in printed.splitlines()
        )
    # The Gated CRF run's kernel: the recipe's, σ_xy scaled from 256² to 32², on "intensity".
    config = yaml.safe_load(
        next((tmp_path / "runs" / "pce_gatedcrf").rglob("config.yaml")).read_text()
    )
    assert config["model"]["loss_gatedcrf_kernels_desc"] == [
        {"weight": 1.0, "xy": 0.75, "intensity": 0.1}
    ]
    assert config["model"]["loss_gatedcrf_radius"] == 1
    # The layer's run: the loss's kernel and radius, μ learnt.
    config = yaml.safe_load(
        next((tmp_path / "runs" / "pce_gatedcrf_crflayer").rglob("config.yaml")).read_text()
    )
    assert config["model"]["crf_layer"] and config["model"]["crf_layer_learn_compatibility"]
    assert config["model"]["crf_layer_kernels"] == [{"weight": 1.0, "xy": 0.75, "intensity": 0.1}]
    # Each run went through its recipe: its configuration is on disk.
    assert len(list((tmp_path / "runs").rglob("config.yaml"))) == 4


@pytest.mark.parametrize("padding_label", [0, IGNORE_INDEX])
def test_rotation_padding_is_labelled_as_asked(tree, padding_label) -> None:
    """Outside an MR field of view is background (the data module's default, as WSL4MIS pads);
    255 ignores it. Either way the padded pixels are invalid for the Gated CRF loss."""
    root, _ = tree
    dm = ACDCDataModule(str(root), image_size=24, padding_label=padding_label, num_workers=0)
    dm.setup("fit")
    padded_seen = 0
    for seed in range(30):
        torch.manual_seed(seed)
        sample = dm.train_dataset[seed % len(dm.train_dataset)]
        padded = sample["valid"][0] == 0
        if not padded.any():
            continue
        padded_seen += 1
        assert (sample["semseg_dense"][padded] == padding_label).all()
        assert (sample["semseg_scribbles"][padded] == padding_label).all()
        assert (sample["image"][0][padded] == 0).all()
        # On the image the labels are the file's: no background leaks in from the padding.
        assert (sample["semseg_dense"][~padded] != IGNORE_INDEX).all()
    assert padded_seen >= 3  # the small-rotation branch pads its corners


def test_label_histogram_counts_the_scribble_maps(tree) -> None:
    """Class weights of partial CE read the scribbles given as label maps (4 → 255 excluded)."""
    root, _ = tree
    dm = ACDCDataModule(str(root), fold=1, image_size=16, num_workers=0)
    expected = torch.zeros(4, dtype=torch.float64)
    dm.setup("fit")
    for path in dm.train_raw.files:
        with h5py.File(path) as f:
            scribble = torch.from_numpy(f["scribble"][()].astype(np.int64))
        expected += torch.bincount(scribble[scribble < 4], minlength=4).double()
    assert torch.equal(dm.label_histogram("semseg_scribbles"), expected)
    assert expected[1:].min() > 0
